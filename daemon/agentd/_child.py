"""What a forked helper process (a render worker, a parser) does first."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.connection import Connection


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (AttributeError, OSError):
        return None


#: Looked up in the parent, at import: a child only calls it.
_PRCTL = _prctl()
_PR_SET_PDEATHSIG = 1


def detach_signals(parent: int, parent_ends: Iterable[Connection] = ()) -> None:
    """The parent decides when its helpers stop: a Ctrl-C reaches the whole process group, and
    a signal here must not be relayed to the parent's event loop through the wakeup fd the
    child inherited (``signal.set_wakeup_fd``). SIGTERM still ends the child at once.

    A helper never outlives its parent (``parent``: its pid, taken before the fork): a parent
    killed by SIGKILL closes no pipe in an orderly way, and a helper blocked writing to one,
    or busy rendering, would go on for ever. The kernel kills the child when the thread that
    forked it exits (``PR_SET_PDEATHSIG``; agentd forks from threads that live as long as the
    process); a parent already gone before that was set is seen in ``getppid``. The pipe ends
    the child inherited but only the parent reads (``parent_ends``) are closed, so a parent's
    death is EOF or EPIPE here, never a write blocked for ever."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
    for end in parent_ends:
        end.close()
