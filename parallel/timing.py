"""The step clocks the tuner's trials and the probe are timed with (the runner's `*_s` metrics are
plain `time.perf_counter` reads in the runner itself).

On CPU the host clock measures the work. On CUDA the host clock measures kernel launches, not the
work, so trials are timed with CUDA events: recording one costs no host sync; reading a trial's
time synchronises once on its last event, at the next step, and only on the steps the tuner times.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch


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
