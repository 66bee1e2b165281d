"""Worker processes that render sections in parallel and stay warm across builds.

Threads cannot help: Jinja rendering holds the GIL. Processes can, if starting them stays off
the hot path and they never render from stale state:

- Workers are *forked* from the engine once its state is current (sources parsed, templates
  compiled, agents resolved), so each starts with everything in memory: nothing is parsed or
  compiled twice, and a batch costs no pool start.
- They are kept in step by the workspace *journal*: the bytes of every file the parent re-read
  since the last batch. A worker replays them through the same ``refresh`` code (recompiling,
  evicting and re-resolving exactly as the parent did), so it renders from the parent's
  snapshot, never from a disk that may have moved on since.
- Each batch is dealt out in small chunks, two ahead to each worker, and results stream back
  (sent by a thread in the worker) so the parent composes and writes an agent as soon as its
  sections arrive while the workers go on rendering. Workers put what they render into the
  persistent store themselves (SQLite serialises the writers), so the parent never re-sends
  those bytes to the store.

A worker that dies costs nothing but speed: the parent renders the rest of the batch itself
and starts a new pool for the next one.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import queue
import signal
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import graph as g
from .cache import Counters, Rendered
from .compose import Skeleton
from .exceptions import AgentdError, SourceError

if TYPE_CHECKING:
    from .build import Engine

#: One agent's share of a batch: (agent id, section ids to render, render its skeleton too).
Task = tuple[str, list[str], bool]
#: What comes back per agent: (agent id, rendered sections, errors, timings, the skeleton in a
#: 1-tuple when asked for and rendered: ``(None,)`` means "not composable").
Result = tuple[
    str, list[tuple[str, Rendered]], list[AgentdError], list[tuple[str, float]], tuple[Skeleton | None] | None
]


class WorkerLost(Exception):
    """A worker process exited in the middle of a batch."""


class Pool:
    """``jobs`` forked workers. Create it from the thread that runs builds."""

    def __init__(self, engine: Engine, jobs: int) -> None:
        context = multiprocessing.get_context("fork")
        self._conns: list[multiprocessing.connection.Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        store = engine.store
        if store is not None:
            store.close()  # never carry an open SQLite connection across fork()
        try:
            for _ in range(jobs):
                self._start(context, engine)
        except OSError:  # fork() refused (process limits): stop the ones that started
            _shutdown(self._conns, self._procs, 10.0)
            raise
        # An engine dropped without ``close()`` still stops its workers.
        self._finalizer = weakref.finalize(self, _shutdown, self._conns, self._procs, 10.0)

    def _start(self, context: Any, engine: Engine) -> None:
        parent, child = context.Pipe()
        try:
            proc = context.Process(
                target=_serve, args=(engine, child, [*self._conns, parent]), name="agentd-worker", daemon=True
            )
            proc.start()
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._conns.append(parent)
        self._procs.append(proc)

    @property
    def size(self) -> int:
        return len(self._procs)

    def render(
        self, journal: dict[Path, bytes | None], tasks: list[Task]
    ) -> Iterator[tuple[Result, dict[str, Counters]]]:
        """Render ``tasks`` after bringing every worker up to ``journal``; yield each agent's
        result as it arrives. Raises ``WorkerLost`` (after which the pool is unusable); a caller
        that stops early must ``close()`` the pool (chunks would still be in flight)."""
        try:
            for conn in self._conns:
                conn.send(("sync", journal))
            chunks = _chunks(tasks, len(self._conns))
            # Each worker holds IN_FLIGHT chunks, so it renders the next one while the daemon
            # composes what it sent (never idle waiting for the daemon to come back to it).
            queued = dict.fromkeys(self._conns, 0)
            for _ in range(IN_FLIGHT):
                for conn in self._conns:
                    queued[conn] += self._give(conn, chunks)
            for conn, n in queued.items():
                if not n:
                    conn.send(("idle", None))
            while any(queued.values()):
                for ready in multiprocessing.connection.wait([c for c, n in queued.items() if n]):
                    conn = ready  # type: ignore[assignment]
                    results, counters = conn.recv()
                    queued[conn] += self._give(conn, chunks) - 1
                    if not queued[conn]:
                        conn.send(("idle", None))  # nothing left for it: time to write its renders to the store
                    for result in results:
                        yield result, counters
                        counters = {}
        except (EOFError, OSError, BrokenPipeError) as exc:
            raise WorkerLost(str(exc) or type(exc).__name__) from exc

    @staticmethod
    def _give(conn: multiprocessing.connection.Connection, chunks: list[list[Task]]) -> int:
        if not chunks:
            return 0
        conn.send(("render", chunks.pop()))
        return 1

    def close(self) -> None:
        """Let every worker flush its store writes and exit; kill the ones that do not."""
        self._finalizer()


def _shutdown(
    conns: list[multiprocessing.connection.Connection], procs: list[multiprocessing.process.BaseProcess], timeout: float
) -> None:
    for conn in conns:
        try:
            conn.send(None)
        except OSError:
            pass
        # Closed before waiting: a worker stopped mid-batch may be sending results nobody will
        # read; the closed socket ends that send at once (the None stays readable).
        conn.close()
    for proc in procs:
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()


#: Most sections per chunk: each result message holds this many ~60 KB renders, pickled and
#: unpickled at once in the daemon (bigger chunks only add to its peak memory).
MAX_CHUNK_SECTIONS = 32
#: Chunks dealt ahead to each worker (see ``Pool.render``).
IN_FLIGHT = 2


def _chunks(tasks: list[Task], workers: int) -> list[list[Task]]:
    """Split a batch into ~8 chunks per worker by section count (agents stay whole), biggest
    first so the slowest chunk does not start last. Returned reversed: ``pop()`` takes next."""
    total = sum(_weight(task) for task in tasks)
    target = min(MAX_CHUNK_SECTIONS, max(1, total // (workers * 8)))
    chunks: list[list[Task]] = []
    current: list[Task] = []
    size = 0
    for task in tasks:
        current.append(task)
        size += _weight(task)
        if size >= target:
            chunks.append(current)
            current, size = [], 0
    if current:
        chunks.append(current)
    chunks.sort(key=lambda c: sum(map(_weight, c)))
    return chunks


def _weight(task: Task) -> int:
    """A skeleton (two renders of the base template) costs about what a section does."""
    return len(task[1]) + task[2]


# -- in the worker ------------------------------------------------------------------------------
def _serve(
    engine: Engine,
    conn: multiprocessing.connection.Connection,
    parent_ends: list[multiprocessing.connection.Connection],
) -> None:
    """A worker's loop: sync, render chunks, flush when idle, exit on ``None`` or EOF."""
    for end in parent_ends:
        end.close()  # so that when the parent dies, every worker sees EOF and exits
    # The parent decides when to stop: a Ctrl-C reaches the whole process group, and a signal
    # here must not be relayed to the parent's event loop through its inherited wakeup fd.
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if engine.store is not None:
        engine.store.abandon()
    engine.workspace.journal = None
    catalog = engine.worker_catalog()
    outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    sender = threading.Thread(target=_send, args=(conn, outbox), name="agentd-send", daemon=True)
    sender.start()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message is None:
            break
        kind, payload = message
        if kind == "sync":
            if payload:
                catalog = engine.replay(payload)
        elif kind == "render":
            before = engine.caches.counters()
            results = [_render(engine, catalog, *task) for task in payload]
            counters = {k: v.since(before[k]) for k, v in engine.caches.counters().items()}
            outbox.put((results, counters))
        elif kind == "idle" and engine.store is not None:
            engine.store.flush()
    outbox.put(None)
    sender.join()
    if engine.store is not None:
        engine.store.flush()


def _send(conn: multiprocessing.connection.Connection, outbox: queue.SimpleQueue[Any]) -> None:
    """Send results from a thread: a message of renders is bigger than the socket's buffer, so
    ``send`` waits until the daemon reads it, and the daemon reads only between compositions.
    Meanwhile the worker renders its next chunk (sending mostly waits in ``write``, without
    the GIL)."""
    while (message := outbox.get()) is not None:
        try:
            conn.send(message)
        except OSError:
            return  # the daemon is gone: the main loop sees EOF and exits


def _render(engine: Engine, catalog: Any, agent_id: str, sections: list[str], skeleton: bool) -> Result:
    engine.renderer.timings = []
    plan = engine.plans[agent_id]
    metas = plan.meta_by_id
    context = engine._context(plan, catalog)
    entries: list[tuple[str, Rendered]] = []
    errors: list[AgentdError] = []
    for section in sections:
        try:
            entry = engine._render_one(plan, metas[section], context)
        except SourceError as exc:
            errors.append(exc)
            continue
        entries.append((section, entry))
        if engine.store is not None:
            engine.store.put(g.section_node(agent_id, section), entry)
    made: tuple[Skeleton | None] | None = None
    if skeleton:
        try:
            made = (engine.render_skeleton(plan, catalog),)
        except SourceError:
            pass  # the daemon renders it again and reports the error where it composes
    return agent_id, entries, errors, engine.renderer.timings, made
