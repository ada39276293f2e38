"""Stop requests from signals: SIGINT, SIGTERM and SIGUSR1 ask a rank to stop at the next step boundary.

The handler only records the signal (no I/O, no collectives: it runs between two bytecodes of
whatever the rank is doing, maybe inside a collective). The trainer reads the request once per
step and adds it to the step's loss all-reduce, so every rank agrees to stop after the same step
even when the signal reached one rank only (`Trainer.train_step`). Then, for SIGTERM and SIGUSR1
(a scheduler's "you are about to be preempted", SLURM's `--signal`), the ranks write a checkpoint
together; SIGINT (Ctrl-C) stops without one. A save request wins over a plain stop: a rank that
receives SIGINT and then SIGTERM or SIGUSR1 keeps the saving one, and ranks that received different
signals adopt the saving one (`agreed_signal`). Otherwise a repeated signal changes nothing: a
terminal's Ctrl-C reaches every rank and the parent, and the parent forwards it again.

    with StopSignal() as stop:           # main thread only; restores the previous handlers on exit
        Trainer(cfg, dims=dims, out_dir=out, stop=stop).fit()
"""
from __future__ import annotations

import signal
from typing import Dict, Optional

# the signals a run stops on; those that write a checkpoint before stopping
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
SAVING_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def exit_code(signum: int) -> int:
    """The exit status of a run stopped by `signum`: 130 for SIGINT, 143 for SIGTERM and for SIGUSR1
    (treated as SIGTERM: a scheduler's advance notice of termination)."""
    return 130 if signum == signal.SIGINT else 128 + int(signal.SIGTERM)


class StopSignal:
    """Records the stop signal this process receives while entered (a context manager): the first
    one, except that a saving signal (SIGTERM, SIGUSR1) replaces an earlier SIGINT.

    `signum` is None until a signal arrives. `request(signum)` records one without a signal (tests,
    callers that decide to stop for their own reasons).
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # keep this a flag write: see the module docstring
        if self.signum is None or (signum in SAVING_SIGNALS and self.signum not in SAVING_SIGNALS):
            self.signum = signum

    def request(self, signum: int) -> None:
        self._handler(signum, None)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopSignal":
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only: nothing to install
        for s in STOP_SIGNALS:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()


def flags_of(signum: Optional[int]) -> list:
    """This rank's stop request as numbers to all-reduce with SUM: [SIGINT, SIGTERM, SIGUSR1] counts."""
    return [float(signum == s) for s in STOP_SIGNALS]


def agreed_signal(summed) -> Optional[int]:
    """The stop every rank adopts from the summed flags: None (go on), or the signal that decides
    what happens (a saving signal wins over SIGINT, so a preemption notice on any rank is honoured)."""
    counts = {s: float(summed[i]) for i, s in enumerate(STOP_SIGNALS)}
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        if counts[s] > 0:
            return int(s)
    return None
