"""Stopping a run cleanly: SIGINT (Ctrl-C), SIGTERM (what schedulers send before pre-emption)
and SIGUSR1 ask the loop to save a checkpoint at the end of the current step and stop. Under
torchrun every rank learns at each step whether any rank was asked (in the step's one all-reduce,
:func:`~qformer.train.faults.step_values`), so all stop at one step."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(Exception):
    """A run stopped on a signal after saving ``checkpoint``; ``status`` is 128 + the signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path, resume: str) -> None:
        self.signum, self.step, self.checkpoint, self.resume = signum, step, checkpoint, resume
        self.status = 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint {checkpoint}; "
            f"resume with: {resume}"
        )


class StopRequests:
    """A context that turns the stop signals into a request the loop polls once a step
    (:meth:`flags`, then :meth:`agreed`); a second Ctrl-C stops at once (KeyboardInterrupt). The
    previous handlers come back on exit. Outside the main thread (where Python allows no handlers) it does nothing.
    With ``announce`` (rank 0), the first signal says at once that a save is pending and what a
    second Ctrl-C would do, since a step may take long and the save is otherwise silent until done."""

    def __init__(self, announce: bool = True) -> None:
        self.signum = 0
        self.announce = announce
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.announce and not self.signum:
            # os.write: a signal handler may run in the middle of a print to the same stream
            os.write(2, f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping "
                        "(Ctrl-C again stops at once without saving)\n".encode())
        self.signum = signum

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def flags(self) -> list[float]:
        """This rank's request as one flag per stop signal, for the step's all-reduce
        (:func:`~qformer.train.faults.step_values`), which sums them over the ranks."""
        return [float(self.signum == signum) for signum in STOP_SIGNALS]

    @staticmethod
    def agreed(counts: list[float]) -> int:
        """The signal some rank was stopped by (the highest number if several), or 0, from the
        flags summed over the ranks: the same answer on every rank."""
        return max((signum for signum, count in zip(STOP_SIGNALS, counts) if count > 0), default=0)


def ignore_stop_signals(worker: int) -> None:
    """A DataLoader ``worker_init_fn``: workers leave the stop signals to the main process
    (Ctrl-C reaches the whole process group), which ends them when it is done."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
