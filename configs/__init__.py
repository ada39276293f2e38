"""moesys.configs: Hydra configs of `moesys-train` (structured dataclasses + yaml presets).

`train.yaml` is the primary config: the `TrainConfig` schema (registered as `train_schema`) plus an
optional `preset` group (`moesys-train preset=tiny`).
"""
from .schema import TrainConfig, register

__all__ = ["TrainConfig", "register"]
