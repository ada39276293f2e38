"""moesys.evo: EvoMoE dense-to-sparse training (Nie et al. 2021) and upcycling.

    from moesys.evo import EvoConfig, EvoController, TauSchedule, EvoMoELayer, upcycle_model
"""
from .callback import EvoCallback
from .controller import EvoController
from .optim_state import transfer_optimizer_state
from .diversify import fresh_router, spawn_expert, spawn_slice, stream_seed
from .layer import EvoMoELayer
from .schedule import EvoConfig, TauSchedule
from .upcycle import upcycle_model

__all__ = [
    "EvoCallback", "EvoConfig", "EvoController", "EvoMoELayer", "TauSchedule", "fresh_router", "spawn_expert",
    "spawn_slice", "stream_seed", "transfer_optimizer_state", "upcycle_model",
]
