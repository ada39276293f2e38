"""A tiny wall-clock accumulator for the runner's metrics (host time; on CPU that is the work)."""
from __future__ import annotations

import contextlib
import time


class Timer:
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
