"""What a forked helper process (a render worker, a parser) does first."""

from __future__ import annotations

import signal


def detach_signals() -> None:
    """The parent decides when its helpers stop: a Ctrl-C reaches the whole process group, and
    a signal here must not be relayed to the parent's event loop through the wakeup fd the
    child inherited (``signal.set_wakeup_fd``). SIGTERM still ends the child at once."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
