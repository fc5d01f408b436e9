"""Preemption: SIGTERM/SIGINT become a flag the training loop checks between steps.

A preempted run must not die mid-step or mid-save. The handler only records the signal; the
loop then finishes the in-flight async checkpoint, saves the current step and raises
``TrainingInterrupted`` with a message that says how to resume (the same command). A second
SIGINT (Ctrl-C twice) aborts at once.
"""

from __future__ import annotations

import signal
import threading

from lmtrain.errors import LmtrainError

HANDLED = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(LmtrainError):
    """Training stopped on a signal after saving a checkpoint; rerun the command to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum  # the shell convention for "killed by signal N"


class PreemptionGuard:
    """Context manager: records SIGTERM/SIGINT in ``self.signum`` instead of dying."""

    def __init__(self, signals: tuple[int, ...] = HANDLED):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt("second SIGINT: aborting without a final checkpoint")
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> PreemptionGuard:
        # Handlers can only be installed from the main thread (e.g. not inside a server worker).
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        self._previous.clear()
