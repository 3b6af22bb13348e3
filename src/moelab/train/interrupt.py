"""Stop cleanly on Ctrl-C or SIGTERM: the loop finishes its step, checkpoints and returns."""

from __future__ import annotations

import signal


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the step and exits.
    A second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


