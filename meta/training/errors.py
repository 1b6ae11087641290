"""The one exception a run stops with: :class:`RunError`, whose message is the line the command line prints."""

from __future__ import annotations


class RunError(Exception):
    """A run that cannot start or go on. ``str(error)`` is one line naming the cause and the fix (the command-line
    tools print it and exit with status 1); ``meta.train`` and ``meta.evaluate`` raise it instead of exiting."""


class RunInterrupted(RunError):
    """Training stopped on a signal (Ctrl-C, SIGTERM, SIGHUP) after saving a checkpoint at :attr:`step`: the run
    continues from there with ``resume=true``."""

    def __init__(self, message: str, step: int, signal_number: int) -> None:
        super().__init__(message)
        self.step, self.signal_number = step, signal_number
