"""SIGTERM / SIGINT during training: stop after the current step with a checkpoint; a second
signal aborts at once."""
from __future__ import annotations

import signal
import threading
from pathlib import Path

__all__ = ["StopRequest", "TrainingInterrupted", "TrainingAborted", "exit_code"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """The shell's exit status of a process ended by ``signum`` (143 for SIGTERM, 130 for SIGINT)."""
    return 128 + int(signum)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing a checkpoint (``checkpoint`` None: nothing new to save)."""

    def __init__(self, signum: int, iteration: int, checkpoint: Path | None):
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint
        saved = (f"checkpoint {checkpoint} written" if checkpoint else "no new checkpoint (no step trained since the "
                 "last one)")
        super().__init__(f"stopped by {signal.Signals(signum).name} after iteration {iteration}; {saved}")


class TrainingAborted(BaseException):
    """A second signal arrived while stopping: the run ended at once, the checkpoint being written was
    discarded. A ``BaseException`` so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"aborted by a second {signal.Signals(signum).name}")


class StopRequest:
    """While active (a context manager, in the main thread), the first SIGTERM / SIGINT only sets
    :attr:`signum`; the training loop checks it after each step. A second one raises
    :class:`TrainingAborted` wherever the program is."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        raise TrainingAborted(signum)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None
