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
  many renders is sent ahead, before the daemon deals out the batch (``Engine._sync_ahead``).
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
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import queue
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import graph as g
from ._child import detach_signals
from .cache import Counters, Rendered
from .compose import Layout, Skeleton
from .exceptions import AgentdError, OutputError, SourceError
from .output import OutputChanged, WriteOutcome

if TYPE_CHECKING:
    from .build import Engine
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


#: One agent's share of a batch: (agent id, section ids to render, render its skeleton too,
#: compose and write it too).
Task = tuple[str, list[str], bool, ComposeSpec | None]
#: What comes back per agent: (agent id, rendered sections, errors, timings, the skeleton in a
#: 1-tuple when asked for and rendered: ``(None,)`` means "not composable", the composition).
#: Sections of a composed agent come back without their bytes.
Result = tuple[
    str,
    list[tuple[str, Rendered]],
    list[AgentdError],
    list[tuple[str, float]],
    tuple[Skeleton | None] | None,
    Composed | None,
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
                target=_serve,
                args=(engine, child, [*self._conns, parent], os.getpid()),
                name="agentd-worker",
                daemon=True,
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
        self, journal: dict[Path, Read], tasks: list[Task], finish_early: bool = False
    ) -> Iterator[tuple[Result, dict[str, Counters]]]:
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
                    results, counters = conn.recv()
                    queued[conn] += self._give(conn, chunks) - 1
                    if finish_early and not queued[conn]:
                        conn.send(("idle", None))
                    for result in results:
                        yield result, counters
                        counters = {}
            if not finish_early:
                for conn in self._conns:
                    conn.send(("idle", None))
        except (EOFError, OSError, BrokenPipeError) as exc:
            raise WorkerLost(str(exc) or type(exc).__name__) from exc

    def sync(self, journal: dict[Path, Read]) -> None:
        """Send every worker the files the daemon re-read since their last batch, to replay
        (``Engine.replay``) before their next chunk. Raises ``WorkerLost``."""
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
#: Renders a worker queues for the store before writing them in the middle of a batch (the
#: daemon: ``Store.FLUSH_EVERY``): ~60 MB of sections here. A flush in the middle of a batch
#: (SQLite copying its pages into the WAL) delays the batch's last output; after it, it does not.
WORKER_FLUSH_EVERY = 1024


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
    parent: int,
) -> None:
    """A worker's loop: sync, render chunks, finish the batch when idle, exit on ``None`` or EOF."""
    detach_signals(parent, parent_ends)  # when the parent dies, every worker sees EOF and exits
    if engine.store is not None:
        engine.store.abandon()
        engine.store.FLUSH_EVERY = WORKER_FLUSH_EVERY
    engine.workspace.journal = None
    engine.output.replaced = []
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
            catalog = engine.replay(payload)
        elif kind == "render":
            before = engine.caches.counters()
            results = [_render(engine, catalog, *task) for task in payload]
            counters = {k: v.since(before[k]) for k, v in engine.caches.counters().items()}
            outbox.put((results, counters))
        elif kind == "idle":
            _finish_batch(engine)
    outbox.put(None)
    sender.join()
    _finish_batch(engine)


def _finish_batch(engine: Engine) -> None:
    """What can wait until the batch's last output is written: the store writes of its
    renders, unlinking the outputs it replaced."""
    if engine.store is not None:
        engine.store.flush()
    engine.output.remove_replaced()


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


def _render(
    engine: Engine, catalog: Any, agent_id: str, sections: list[str], skeleton: bool, compose: ComposeSpec | None
) -> Result:
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
    composed = None
    if compose is not None and not errors:
        composed = _compose(engine, agent_id, compose, dict(entries), made[0] if made else None)
    if composed is not None:  # the daemon needs their digests and reads, not their bytes
        entries = [(section, Rendered(b"", entry.reads, entry.digest)) for section, entry in entries]
    return agent_id, entries, errors, engine.renderer.timings, made, composed


def _compose(
    engine: Engine, agent_id: str, spec: ComposeSpec, rendered: dict[str, Rendered], made: Skeleton | None
) -> Composed | None:
    """Compose and write the agent as the daemon would; None when this worker cannot (the
    daemon composes it from the sections sent back)."""
    skeleton = spec.skeleton or made
    if skeleton is None:
        return None
    digests: list[bytes] = []
    for section, known in zip(spec.sections, spec.digests, strict=True):
        digest = rendered[section].digest if section in rendered else known
        if digest is None:
            return None
        digests.append(digest)
    output_digest = skeleton.output_digest(digests)
    if output_digest == spec.current:
        return Composed(output_digest, None, None)
    old = None
    if spec.layout is not None:
        # This worker's copies of the manifest entry and the layout, brought up to the
        # daemon's, so that the daemon's own unchanged-file check serves.
        engine.output.files.pop(spec.name, None)
        if spec.entry is not None:
            engine.output.files[spec.name] = spec.entry
        engine.layouts[agent_id] = spec.layout
        old = engine.written_layout(agent_id)
    have = {entry.digest: entry.data for entry in rendered.values()}
    missing = [d for d in spec.digests if d is not None and d not in have and (old is None or d not in old.spans)]
    if missing and engine.store is not None:  # restored from the store: not in the output yet
        have.update(engine.store.blobs_by_digest(missing))
    spliced = skeleton.splice(digests, have, old)
    if spliced is None:
        return None  # changed behind agentd's back, not stored: the daemon has the bytes
    pieces, layout = spliced
    outcome: WriteOutcome
    try:
        outcome = engine.output.write_file(spec.name, pieces, layout.digest, spec.entry)
    except OutputChanged:
        return None  # changed since the check above: the daemon composes it from bytes
    except (OutputError, OSError) as exc:
        outcome = exc
    return Composed(layout.digest, layout, outcome)
