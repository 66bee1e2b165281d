"""What a forked helper process (a render worker, a parser) does first."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess


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


#: A forked helper as its parent sees it: the parent's end of the pipe, and the process.
Child = tuple["Connection", "BaseProcess"]


def fork(context: Any, target: Callable[..., None], name: str, children: list[Child], *args: Any) -> Child:
    """Fork a helper running ``target(conn, parent_ends, parent_pid, *args)``, after
    ``children`` (whose pipe ends it closes: see ``detach_signals``), and append it to them.
    The pipe is closed again when the fork fails, so a refused start leaks no descriptor."""
    parent, child = context.Pipe()
    try:
        proc = context.Process(
            target=target,
            args=(child, [*(c for c, _p in children), parent], os.getpid(), *args),
            name=name,
            daemon=True,
        )
        proc.start()
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    children.append((parent, proc))
    return parent, proc


def stop(children: list[Child], timeout: float | None) -> None:
    """Stop helpers: with a ``timeout``, ask each to finish (``None`` on its pipe) and kill the
    ones that take longer; without one, their work is not wanted: terminate them."""
    for conn, _proc in children:
        if timeout is not None:
            try:
                conn.send(None)
            except OSError:
                pass
        # Closed before waiting: a helper stopped mid-batch may be sending what nobody will
        # read; the closed socket ends that send at once (the None stays readable).
        conn.close()
    for _conn, proc in children:
        if timeout is None:
            proc.terminate()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
    children.clear()
