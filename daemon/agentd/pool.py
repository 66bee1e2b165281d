"""Worker processes that render sections in parallel and stay warm across builds.

Threads cannot help: Jinja rendering holds the GIL. Processes can, if starting them stays off
the hot path and they never render from stale state:

- Workers are *forked* from the engine once its state is current (sources parsed, templates
  compiled, agents resolved), so each starts with everything in memory: nothing is parsed or
  compiled twice, and a batch costs no pool start.
- They are kept in step by the workspace *journal*: the bytes of every file the parent re-read
  since the last batch. A worker replays them through the same ``refresh`` code (recompiling,
  evicting and re-resolving exactly as the parent did), so it renders from the parent's
  snapshot, never from a disk that may have moved on since. A template change read by
  many renders is sent ahead, before the daemon deals out the batch (``Parallel.sync_ahead``).
- Each batch is dealt out in small chunks, two ahead to each worker, and results stream back
  (sent by a thread in the worker). Workers put what they render into the persistent store
  themselves (SQLite serialises the writers), so the parent never re-sends those bytes to the
  store.
- Workers also compose and write the agents they render (``ComposeSpec``): the parent sends the
  skeleton and where everything sits in the current output file (sections not there, e.g.
  restored from the store by an undo, the worker reads from the store by digest), the worker
  writes the new output copying what the old one keeps (``Skeleton.splice``), and only
  digests, reads and the file's stat come back. On 2 cores a batch is CPU-bound, and the
  parent composing every agent (unpickling their sections, joining and writing them through a
  writer thread that waits for the GIL) took that CPU from the workers (README, "Design
  measurements"). Whatever a worker cannot compose (the output was changed behind
  agentd's back, a base template that inspects content) comes back as sections and is
  composed by the parent as before.
- What can wait until a batch's last output is written (the store's transaction, unlinking
  the replaced outputs) waits: the daemon tells the workers when the whole batch is in (in a
  cold build, each worker as soon as it has no more chunks: see ``Pool.render``).

A worker that dies costs nothing but speed: the parent renders the rest of the batch itself
and starts a new pool for the next one.

The pool knows nothing of the engine: it drives a ``Work`` (enter, replay, run a task, finish
the batch) that the engine side implements with the same render and compose code it runs
itself, and passes ``Task``/``Result`` values.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.connection
import queue
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ._child import Child, detach_signals, fork, stop
from .cache import Counters, Rendered
from .exceptions import AgentdError
from .output import WriteOutcome
from .skeleton import Layout, Skeleton

if TYPE_CHECKING:
    from .workspace import Read


@dataclasses.dataclass(frozen=True)
class ComposeSpec:
    """What a worker needs to compose an agent and write its output, beside the sections it
    renders: the daemon's view of everything else."""

    #: The output's file name.
    name: str
    #: The agent's sections, in order, and the digest of each one this task does not render.
    sections: tuple[str, ...]
    digests: tuple[bytes | None, ...]
    #: The skeleton to fill (None: the one this task renders).
    skeleton: Skeleton | None
    #: Where the sections not rendered here sit in the current output (None: all rendered here).
    layout: Layout | None
    #: The manifest's entry for the output (None: not agentd's file).
    entry: list[Any] | None
    #: The digest of the output agentd wrote there last (an equal one is not written again).
    current: bytes | None


@dataclasses.dataclass(frozen=True)
class Composed:
    """What a worker composed: the output's digest, and unless it equals ``current``, where
    its sections sit in it and what writing it did."""

    digest: bytes
    layout: Layout | None
    outcome: WriteOutcome | None


@dataclasses.dataclass(frozen=True)
class Task:
    """One agent's share of a batch."""

    agent: str
    #: Section ids to render.
    sections: list[str]
    #: Render its skeleton too.
    skeleton: bool = False
    #: Compose and write it too (None: the daemon composes it).
    compose: ComposeSpec | None = None

    @property
    def weight(self) -> int:
        """A skeleton (two renders of the base template) costs about what a section does."""
        return len(self.sections) + self.skeleton


@dataclasses.dataclass
class Result:
    """What a task did. Sections of an agent composed where it was rendered come back without
    their bytes (the daemon needs their digests and reads)."""

    agent: str
    rendered: list[tuple[str, Rendered]]
    errors: list[AgentdError]
    #: (template, seconds) for every render of the task.
    timings: list[tuple[str, float]]
    #: Whether the skeleton was rendered (asked for and no error), and the skeleton (None: the
    #: agent is not composable).
    made_skeleton: bool = False
    skeleton: Skeleton | None = None
    composed: Composed | None = None
    #: What the task did to a worker's caches (empty when run where the caches are the daemon's).
    counters: dict[str, Counters] = dataclasses.field(default_factory=dict)


class Work(Protocol):
    """What a worker process does, as the pool drives it (the engine side implements it)."""

    def enter(self) -> None:
        """Become a worker: called once, first thing after the fork."""

    def replay(self, journal: dict[Path, Read]) -> None:
        """Reach the daemon's state from the files it re-read since the last batch."""

    def run(self, task: Task) -> Result:
        """Render (and maybe compose and write) one agent's share of a batch."""

    def finish_batch(self) -> None:
        """Do what could wait until the batch's last output was written."""


class WorkerLost(Exception):
    """A worker process exited in the middle of a batch."""


class Pool:
    """``jobs`` forked workers doing ``work``. Create it from the thread that runs builds, with
    no SQLite connection open (never carried across ``fork()``)."""

    def __init__(self, work: Work, jobs: int) -> None:
        context = multiprocessing.get_context("fork")
        self._children: list[Child] = []
        try:
            for _ in range(jobs):
                fork(context, _serve, "agentd-worker", self._children, work)
        except OSError:  # fork() refused (process limits): stop the ones that started
            stop(self._children, 10.0)
            raise
        self._conns = [conn for conn, _proc in self._children]
        # An engine dropped without ``close()`` still stops its workers.
        self._finalizer = weakref.finalize(self, stop, self._children, 10.0)

    @property
    def size(self) -> int:
        return len(self._children)

    def render(self, journal: dict[Path, Read], tasks: list[Task], finish_early: bool = False) -> Iterator[Result]:
        """Render ``tasks`` after bringing every worker up to ``journal``; yield each agent's
        result as it arrives. Raises ``WorkerLost`` (after which the pool is unusable); a caller
        that stops early must ``close()`` the pool (chunks would still be in flight).

        ``finish_early``: let each worker finish its part (store transaction, unlinking) as soon
        as it has no more chunks, not when the whole batch is in. For a cold ``agentd build``,
        whose end is when the workers' store writes are done. Not for edits: there the batch's
        last output is what counts, and a worker finishing early takes CPU from it."""
        self.sync(journal)
        try:
            chunks = _chunks(tasks, len(self._conns))
            # Each worker holds IN_FLIGHT chunks, so it renders the next one while the daemon
            # composes what it sent (never idle waiting for the daemon to come back to it).
            queued = dict.fromkeys(self._conns, 0)
            for _ in range(IN_FLIGHT):
                for conn in self._conns:
                    queued[conn] += self._give(conn, chunks)
            while any(queued.values()):
                for ready in multiprocessing.connection.wait([c for c, n in queued.items() if n]):
                    conn = ready  # type: ignore[assignment]
                    results = conn.recv()
                    queued[conn] += self._give(conn, chunks) - 1
                    if finish_early and not queued[conn]:
                        conn.send(("idle", None))
                    yield from results
            if not finish_early:
                for conn in self._conns:
                    conn.send(("idle", None))
        except (EOFError, OSError, BrokenPipeError) as exc:
            raise WorkerLost(str(exc) or type(exc).__name__) from exc

    def sync(self, journal: dict[Path, Read]) -> None:
        """Send every worker the files the daemon re-read since their last batch, to replay
        (``Work.replay``) before their next chunk. Raises ``WorkerLost``."""
        if not journal:
            return
        try:
            for conn in self._conns:
                conn.send(("sync", journal))
        except (EOFError, OSError) as exc:
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


#: Most sections per chunk: each result message holds this many ~60 KB renders, pickled and
#: unpickled at once in the daemon (bigger chunks only add to its peak memory).
MAX_CHUNK_SECTIONS = 32
#: Chunks dealt ahead to each worker (see ``Pool.render``).
IN_FLIGHT = 2
#: Renders a worker queues for the store before writing them in the middle of a batch (the
#: daemon: ``Store.FLUSH_EVERY``): ~60 MB of sections here. A flush in the middle of a batch
#: (SQLite copying its pages into the WAL) delays the batch's last output; after it, it does not.
WORKER_FLUSH_EVERY = 1024


def _chunks(tasks: list[Task], workers: int) -> list[list[Task]]:
    """Split a batch into ~8 chunks per worker by section count (agents stay whole), biggest
    first so the slowest chunk does not start last. Returned reversed: ``pop()`` takes next."""
    total = sum(task.weight for task in tasks)
    target = min(MAX_CHUNK_SECTIONS, max(1, total // (workers * 8)))
    chunks: list[list[Task]] = []
    current: list[Task] = []
    size = 0
    for task in tasks:
        current.append(task)
        size += task.weight
        if size >= target:
            chunks.append(current)
            current, size = [], 0
    if current:
        chunks.append(current)
    chunks.sort(key=lambda c: sum(task.weight for task in c))
    return chunks


# -- in the worker ------------------------------------------------------------------------------
def _serve(
    conn: multiprocessing.connection.Connection,
    parent_ends: list[multiprocessing.connection.Connection],
    parent: int,
    work: Work,
) -> None:
    """A worker's loop: sync, render chunks, finish the batch when idle, exit on ``None`` or EOF."""
    detach_signals(parent, parent_ends)  # when the parent dies, every worker sees EOF and exits
    work.enter()
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
            work.replay(payload)
        elif kind == "render":
            outbox.put([work.run(task) for task in payload])
        elif kind == "idle":
            work.finish_batch()
    outbox.put(None)
    sender.join()
    work.finish_batch()


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
