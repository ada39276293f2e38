"""Clocks for the runtime: a wall-clock accumulator for the runner's metrics, and the step clocks
the tuner's trials and the probe are timed with.

On CPU the host clock measures the work. On CUDA the host clock measures kernel launches, not the
work, so trials are timed with CUDA events: recording one costs no host sync; reading a trial's
time synchronises once on its last event, at the next step, and only on the steps the tuner times.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Optional

import torch


class Timer:
    """Accumulated host time per key (the runner's `*_s` metrics)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def span(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - t0


@contextlib.contextmanager
def maybe_span(timer, key: str):
    """timer.span(key) when a timer is given, else nothing."""
    if timer is None:
        yield
    else:
        with timer.span(key):
            yield


class HostClock:
    """Marks are host times (perf_counter)."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start


class CudaEventClock:
    """Marks are CUDA events recorded on the current stream (`event_cls`: torch.cuda.Event, or a
    stand-in with the same record / synchronize / elapsed_time methods in tests)."""

    def __init__(self, event_cls: Optional[Callable[..., Any]] = None) -> None:
        self.event_cls = event_cls if event_cls is not None else torch.cuda.Event

    def mark(self):
        event = self.event_cls(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        end.synchronize()  # host sync: the one read of a timed trial
        return start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds


def clock_for(device: torch.device):
    """The step clock for work on `device`: CUDA events on a GPU, the host clock elsewhere."""
    return CudaEventClock() if torch.device(device).type == "cuda" else HostClock()
