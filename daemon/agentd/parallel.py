"""The worker pool's daemon side: when a batch goes to the workers, keeping them in step with
this process, and dealing a batch out (``pool.py`` is the pool itself)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import graph as g
from .pool import Pool, Result, Task, Work, WorkerLost
from .store import Store
from .workspace import Delta, Workspace

#: A warm worker pool takes a batch from this many sections (below it, dispatch costs more).
PARALLEL_MIN_SECTIONS = 16
#: Starting a pool (forking) pays off from this many sections.
POOL_START_MIN_SECTIONS = 36


class Parallel:
    """The engine's worker processes (``--jobs``): started on the first batch big enough (or
    by ``start``), stopped by ``close``, started again after a worker was lost."""

    def __init__(
        self, jobs: int, workspace: Workspace, graph: g.DepGraph, store: Store | None, work: Callable[[], Work]
    ) -> None:
        self.jobs = jobs
        self._workspace = workspace
        self._graph = graph
        self._store = store
        self._work = work
        self.pool: Pool | None = None
        #: Why workers could not be started (the daemon logs it once), if they could not.
        self.error: str | None = None

    def wanted(self, sections: int) -> bool:
        """Whether a batch of this many renders goes to the workers."""
        if self.jobs < 2:
            return False
        return sections >= (PARALLEL_MIN_SECTIONS if self.pool is not None else POOL_START_MIN_SECTIONS)

    def sync_ahead(self, delta: Delta) -> bool:
        """Send a template change to the workers before this process prepares the batch, when
        enough renders read it to go to them: they replay it (compiling the template) while
        this process invalidates, collects and deals out the batch, and this process compiles
        its own copy once the batch is rendered (its graph needs the new version's static
        references, and its later renders the code). Compiled here first, a section template
        was the longest step before any worker could start, with the other core idle."""
        if self.pool is None or not delta.templates:
            return False
        if len(self._graph.readers({g.template_node(name) for name in delta.templates})) < PARALLEL_MIN_SECTIONS:
            return False
        assert self._workspace.journal is not None
        journal, self._workspace.journal = self._workspace.journal, {}
        try:
            self.pool.sync(journal)
        except WorkerLost:
            self.close()
            return False
        return True

    def start(self) -> None:
        """Fork the worker processes now (the daemon does this after its first build, so no
        edit ever waits for a pool to start)."""
        if self.jobs > 1 and self.pool is None:
            if self._store is not None:
                self._store.close()  # never carry an open SQLite connection across fork()
            try:
                self.pool = Pool(self._work(), self.jobs)
            except OSError as exc:  # no processes to be had (limits): render here from now on
                self.error = f"cannot start {self.jobs} worker processes: {exc}; rendering in-process"
                self.jobs = 1
                return
            self._workspace.journal = {}

    def close(self) -> None:
        """Stop the worker processes (they write their renders to the store first)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
            self._workspace.journal = None

    def render(
        self,
        tasks: Callable[[], list[Task]],
        cold: bool,
        take: Callable[[Result], None],
        advance: Callable[[Result], None] | None,
    ) -> tuple[int, set[str]]:
        """Render the ``tasks`` in the workers, handing each result to ``take`` as it arrives
        (the ones a worker composed after the last); return the workers' count (0: none to be
        had) and the agents done. A lost worker only costs speed: the caller renders what is
        left."""
        forked = self.pool is None
        self.start()
        if self.pool is None:
            return 0, set()
        assert self._workspace.journal is not None
        journal, self._workspace.journal = self._workspace.journal, {}
        workers = self.pool.size
        # Workers forked before this build load the templates it compiled from the store, not
        # compiling them again: write those first. Workers forked just now have them (fork
        # copied them), and a change sent ahead (``sync_ahead``) is replayed already; then
        # this process writes its queue once they are rendering, not before (so no core idles
        # while it writes).
        store = self._store
        unwritten = bool(store) and (forked or not journal)
        if store and not unwritten:
            store.flush()
        batch = tasks()
        # What a worker composed is recorded after the batch's last result: the workers write
        # those outputs, and on two cores every ms of bookkeeping here (graph, store records,
        # manifest) would be taken from them. An agent left to this process (its sections'
        # bytes in the result) is composed at once, so they are not all held.
        done: set[str] = set()
        composed_there: list[Result] = []
        try:
            for result in self.pool.render(journal, batch, finish_early=cold):
                if unwritten and store:
                    store.flush()
                    unwritten = False
                done.add(result.agent)
                if advance is not None:  # results stream back per chunk of ~32 sections
                    advance(result)
                if result.composed is None:
                    take(result)
                else:
                    composed_there.append(result)
        except WorkerLost:
            self.close()
        except BaseException:
            self.close()  # chunks still in flight would answer the next batch
            raise
        for result in composed_there:
            take(result)
        return workers, done


def tasks_for(
    todo: dict[str, list[dict[str, Any]]], skeletons: set[str], spec: Callable[[str, set[str], bool], Any] | None
) -> list[Task]:
    """One task per agent with sections or a skeleton to render (``spec``: what a worker needs
    to compose it too; None: this process composes every agent)."""
    tasks: list[Task] = []
    for agent_id in sorted(todo.keys() | skeletons):
        sections = [m["id"] for m in todo.get(agent_id, [])]
        compose = spec(agent_id, set(sections), agent_id in skeletons) if spec is not None else None
        tasks.append(Task(agent_id, sections, agent_id in skeletons, compose))
    return tasks
