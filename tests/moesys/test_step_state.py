"""moesys.step_state.StepState: a training forward/backward's side effects, put back exactly.

The re-run of parallel.overflow=rerun relies on it: after `restore`, a second pass must draw the
same jitter noise, the same random drop order (the layer's generator) and accumulate the
sigmoid_bias router's loads from the same start, so it equals the first pass bit for bit.
"""
import random

import numpy as np
import torch

from moesys import MoEConfig, MoELayer
from moesys.step_state import StepState


def _layer():
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2, router="sigmoid_bias",
                    jitter_eps=0.05, capacity_factor=0.5, drop_policy="random", kernel_backend="torch")
    layer = MoELayer(cfg)
    layer._generator = torch.Generator().manual_seed(3)
    return layer.train()


def _pass(layer, x):
    y, aux = layer(x)
    (y.square().sum() + aux.loss).backward()
    grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    layer.zero_grad(set_to_none=True)
    return (y.detach().clone(), grads, layer.router.load_since_update.clone(), torch.rand(3),
            random.random(), np.random.rand())


def test_restore_replays_the_step_exactly():
    layer = _layer()
    x = torch.randn(2, 11, 8)
    snap = StepState.capture(layer, torch.device("cpu"))
    first = _pass(layer, x)
    assert first[2].sum() > 0  # the forward did accumulate loads (what restore must undo)
    snap.restore(layer)
    second = _pass(layer, x)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    assert torch.equal(first[2], second[2])  # loads counted once, not twice
    assert torch.equal(first[3], second[3]) and first[4:] == second[4:]  # every RNG stream replayed


def test_without_restore_the_second_pass_differs():
    """The control: the same two passes without restore differ (jitter, drop order, loads)."""
    layer = _layer()
    x = torch.randn(2, 11, 8)
    first = _pass(layer, x)
    second = _pass(layer, x)
    assert not torch.equal(first[0], second[0])
    assert not torch.equal(first[2], second[2])  # the second pass's loads pile onto the first's


def test_restore_keeps_buffer_storage():
    layer = _layer()
    buf = layer.router.expert_bias
    snap = StepState.capture(layer, torch.device("cpu"))
    with torch.no_grad():
        buf.add_(1.0)
    snap.restore(layer)
    assert layer.router.expert_bias is buf and torch.equal(buf, torch.zeros(4))


def _evo_layer():
    """An EvoMoE layer in its sparse phase with the DTS gate at a low temperature (the Gumbel noise
    decides routes), its gate noise keyed by (seed, step, rank) as EvoController sets it each step."""
    from moesys.evo.layer import EvoMoELayer

    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=1, router="dts", kernel_backend="torch")
    layer = EvoMoELayer(cfg, dense_phase=False, layer_index=1).train()
    layer.router.set_gate_state(tau=0.3)
    layer.set_noise_key(seed=5, step=3, rank=1)
    return layer


def _evo_pass(layer, x):
    y, aux = layer(x)
    (y.square().sum() + aux.loss).backward()
    grads = [p.grad.clone() for p in layer.parameters() if p.grad is not None]
    layer.zero_grad(set_to_none=True)
    return y.detach().clone(), grads


def test_restore_replays_an_evomoe_layers_gate_noise():
    """The overflow re-run of an EvoMoE layer: its gate noise comes from streams keyed by the n-th
    routing call of the step (a Python counter, not an RNG), so StepState must put the counter back
    through the layer's step_state()/load_step_state(), or the re-run draws the next call's noise."""
    layer, x = _evo_layer(), torch.randn(2, 11, 8)
    snap = StepState.capture(layer, torch.device("cpu"))
    assert snap.modules == {"": {"noise_calls": 0}}
    first = _evo_pass(layer, x)
    assert layer._noise_calls > 0
    snap.restore(layer)
    assert layer._noise_calls == 0
    second = _evo_pass(layer, x)
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))
    # the controls: a third pass without restore, and a restore that skips the layer's own state
    third = _evo_pass(layer, x)
    assert not torch.equal(first[0], third[0])
    snap.restore(layer)
    _evo_pass(layer, x)
    snap.modules = {}
    snap.restore(layer)
    assert not torch.equal(first[0], _evo_pass(layer, x)[0])
