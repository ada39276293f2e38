"""The tuner's trials are timed with a step clock: CUDA events on a GPU (checked here with a stand-in
event class), the host clock on CPU; a trial's time is read once, at the next decision."""
import pytest
import torch

from moesys import MoEConfig, MoELayer
from moesys.parallel import apply_expert_parallel
from moesys.parallel.timing import CudaEventClock, HostClock, clock_for
from moesys.parallel.tuner import DEGREES, MODES


class FakeTimeline:
    """A GPU timeline stand-in: each recorded event gets the time of the work queued so far, which
    grows by cost(candidate running) per record; counts host syncs."""

    def __init__(self, cost):
        self.cost, self.now, self.syncs, self.events = cost, 0.0, 0, 0

    def event_cls(self, enable_timing=False):
        assert enable_timing
        tl = self

        class Event:
            def record(self):
                tl.events += 1
                tl.now += tl.cost()
                self.t = tl.now

            def synchronize(self):
                tl.syncs += 1
                self.synced = True

            def elapsed_time(self, end):
                assert getattr(end, "synced", False), "read before synchronising on the end event"
                return (end.t - self.t) * 1e3  # ms

        return Event()


def test_cuda_event_clock_reads_gpu_time_after_one_sync():
    tl = FakeTimeline(lambda: 0.25)
    clock = CudaEventClock(tl.event_cls)
    a, b = clock.mark(), clock.mark()
    assert tl.syncs == 0  # marking never syncs
    assert clock.seconds(a, b) == pytest.approx(0.25)
    assert tl.syncs == 1
    assert isinstance(clock_for(torch.device("cpu")), HostClock)
    assert isinstance(clock_for(torch.device("cuda", 0)), CudaEventClock)


def test_tuner_trials_are_timed_by_the_device_clock(world1):
    import torch.distributed as dist

    cost = {(m, c): (1.0 if m == "sharded_dp" else 3.0) + 0.1 * c for m in MODES for c in DEGREES}
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=12, num_experts=4, top_k=2))
    n = len(cost)
    apply_expert_parallel(layer, dist.group.WORLD, tuner=dict(warmup_steps=0, top_candidates=n, trials=1))
    runner = layer.runner
    tl = FakeTimeline(lambda: cost[runner.current])  # the candidate running when an event is recorded
    runner.clock = CudaEventClock(tl.event_cls)
    for step in range(n + 3):
        x = torch.randn(17, 8)
        y, aux = layer(x)
        y.square().sum().backward()
        with torch.no_grad():  # forward-only calls never mark or sync
            events = tl.events
            layer(x)
            assert tl.events == events
    t = runner.tuner
    assert t.phase == "exploit" and t.decision == min(cost, key=lambda k: (cost[k], k))
    assert sorted(t.measured) == sorted(cost)
    # one host sync per trial read (its end event), none on the steps after the decision
    assert tl.syncs == 2 * n  # forward and backward spans of each of the n trials
    ratios = {k: v[0] / cost[k] for k, v in t.measured.items()}
    assert max(ratios.values()) == pytest.approx(min(ratios.values()))  # time ∝ the candidate's cost
