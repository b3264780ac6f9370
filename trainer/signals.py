"""Stopping on a signal: SIGTERM (preemption, suspend, delete) or Ctrl-C asks the run to
checkpoint at the end of the current step and exit with EXIT_TERMINATED."""

from __future__ import annotations

import os
import signal
import sys
import threading

from trainer.contract import EXIT_TERMINATED


class StopFlag:
    """SIGTERM (preemption, suspend, delete) asks for a checkpoint at the end of the
    current step. If that has not finished within `grace_seconds`, the process exits
    anyway, before the kubelet's SIGKILL: the half-written checkpoint has no manifest
    and is skipped on resume, so the previous one is used. Ctrl-C (SIGINT) does the
    same for a run in a terminal; a second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_seconds: float):
        self.requested = False
        self.signal_name = "a signal"
        self.grace_seconds = grace_seconds
        self._watchdog: threading.Timer | None = None
        self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        self._watchdog = threading.Timer(self.grace_seconds, self._give_up)
        self._watchdog.daemon = True
        self._watchdog.start()

    def close(self) -> None:
        """The previous handlers back, and no exit pending: the run is over."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _give_up(self):
        sys.stderr.write(f"no checkpoint within checkpoint.grace_seconds={self.grace_seconds}; exiting\n")
        sys.stderr.flush()
        os._exit(EXIT_TERMINATED)

    def __call__(self) -> bool:
        return self.requested
