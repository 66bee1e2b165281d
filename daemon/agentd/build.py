"""The build engine: turn workspace changes into the minimal set of renders and writes.

A build is: refresh the workspace (``Delta``) -> recompile changed templates (L1) -> evict the
renders that read a changed input (graph) -> re-resolve agents whose source or references
changed -> render the dirty sections (in worker processes for a big batch, ``pool.py``) ->
recompose agents whose sections or own inputs changed (a join around a skeleton,
``skeleton.py``) -> write outputs whose bytes changed (a writer thread). Each step cuts off
early: an unchanged file yields no delta, a re-render with identical bytes recomposes nothing,
an identical agent writes nothing. A one-shot ``agentd build`` is the same code starting from
empty caches.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import graph as g
from . import inputs
from . import plan as plans
from .cache import Caches, Rendered
from .catalog import Relations, TrackedCatalog
from .compose import Composer, StaleOutputs
from .config import Config
from .exceptions import (
    AgentdError,
    BlockedError,
    SourceError,
    WriteError,
    group_errors,
)
from .gates import Check, Gates
from .inputs import Inputs, Invalidation
from .output import MANIFEST, OutputDir, output_agent
from .parallel import Parallel, tasks_for
from .plan import Plan
from .pool import WORKER_FLUSH_EVERY, Composed, Result, Task
from .render import Renderer
from .report import BuildReport, Run
from .sections import Sections, render_section
from .store import Store
from .workspace import Delta, ParseAhead, Read, Workspace

if TYPE_CHECKING:
    from .progress import Progress


class Engine:
    """Holds one workspace's caches and graph across builds (the daemon keeps one alive)."""

    def __init__(
        self,
        config: Config,
        store: Store | None = None,
        jobs: int | None = None,
        *,
        restore: bool = True,
        fresh: Iterable[str] = (),
        parse_ahead: ParseAhead | None = None,
        output_check: Check | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.config = config
        self.store = store
        #: Sources being parsed in workers already (``agentd build`` starts it before importing
        #: the rest of agentd); used by the first scan.
        self.parse_ahead = parse_ahead
        #: Take unchanged renders from the store, unless a build says otherwise (``build``).
        self.restore = restore
        #: The build running (or the last one).
        self._run: Run
        #: Agents never taken from the store, whatever ``restore`` says (``agentd rebuild
        #: AGENT...`` without a daemon: the others come back from the store as in a build).
        self.fresh = set(fresh)
        self.workspace = Workspace(config)
        self.workspace.parsed_cache = store
        budget = config.memory_budget_mb * 1_000_000  # SI, as agentd prints sizes
        self.caches = Caches(budget or None)
        self.graph = g.DepGraph()
        #: Section digests, the dirty set and the blocked sections.
        self.sections = Sections(self.caches.l3, self.graph)
        self.section_digests = self.sections.digests
        self.renderer = Renderer(self.workspace, self.caches, self.graph, store)
        self.output = OutputDir(config.output_path)
        self.plans: dict[str, Plan] = {}
        #: Fingerprints of input nodes (to validate stored renders).
        self.inputs = Inputs(self.workspace, self.plans, self.section_digests)
        self.agent_errors: dict[str, list[AgentdError]] = {}
        #: Standing failures to save the manifest or remove a stale output, by file name.
        self.write_errors: dict[str, WriteError] = {}
        #: The output gates (``output_check``, the daemon's): run after each build's writes on
        #: what it composed; their findings are kept per agent until it is composed again.
        self.gates = Gates(output_check, config.output_path)
        self.findings = self.gates.findings
        #: Worker processes for large batches of renders (``--jobs``; see ``parallel.py``).
        self.parallel = Parallel(
            max(1, jobs if jobs is not None else config.workers),
            self.workspace,
            self.graph,
            store,
            lambda: _Worker(self),
        )
        #: Skeletons, layouts, the agents to compose, and their writes (``compose.Composer``).
        self.composer = Composer(
            output=self.output,
            store=store,
            caches=self.caches,
            graph=self.graph,
            renderer=self.renderer,
            sections=self.sections,
            inputs=self.inputs,
            plans=self.plans,
            agent_errors=self.agent_errors,
            gates=self.gates,
            fresh=self.fresh,
        )
        #: Evicting what a change invalidates, resolving the agents it touches (``inputs.py``).
        self.invalidation = Invalidation(
            config,
            self.workspace,
            self.graph,
            self.caches,
            self.sections,
            self.inputs,
            self.plans,
            self.agent_errors,
            self.composer.pending,
            self.composer.skeletons,
            self.findings,
        )
        #: Told the sections a build renders and each agent's as they are done (a progress line
        #: on a terminal, ``progress.py``); None: nobody asks.
        self.progress = progress
        self._stale = StaleOutputs()
        self._known_dirs: set[Path] | None = None
        self._scanned = False
        self._ids = itertools.count(1)

    # -- public ---------------------------------------------------------------------------
    def new_build_id(self) -> str:
        return f"{next(self._ids)}-{uuid.uuid4().hex[:8]}"

    def build(
        self,
        paths: Iterable[Path] | None = None,
        *,
        write: bool = True,
        build_id: str | None = None,
        restore: bool | None = None,
    ) -> BuildReport:
        """Bring outputs up to date with the disk. ``paths``: what may have changed (None:
        rescan everything). ``write=False`` renders in memory only. ``restore``: take
        unchanged renders from the store (default: the engine's ``restore``; False for a
        forced rebuild: render, then save)."""
        restore = self.restore if restore is None else restore
        report = BuildReport(build_id=build_id or self.new_build_id(), started=time.time())
        t0 = time.perf_counter()
        before = self.caches.counters()
        self.renderer.timings = []
        report.cold = not self._scanned
        compile_later: set[str] = set()
        if paths is None or not self._scanned:
            delta = self._scan(restore)
            if write and not self._scanned:
                self.output.sweep()
            self._scanned = True
        else:
            paths = list(paths)
            delta = self.workspace.refresh(paths)
            report.changed = sorted({self.workspace.rel(Path(p).absolute()) for p in paths})
            if self.parallel.sync_ahead(delta):
                self.renderer.evict(delta.templates)
                compile_later = delta.templates
            else:
                self.renderer.compile(delta.templates)
        old, catalog = self._apply(delta)
        self._run = self.composer.run = Run(report, catalog, old, write, restore)
        todo = self._collect()
        sections = sum(map(len, todo.values()))
        held = self.sections.held()
        skeletons = self.composer.skeletons_wanted(todo)
        progress = self.progress
        if progress is not None and sections:
            progress.count(sections, "sections")
        done: set[str] = set()
        if self.parallel.wanted(sections + len(skeletons)) and len(todo.keys() | skeletons) > 1:
            done = self._render_in_workers(todo, skeletons)
        if compile_later:
            self.renderer.compile(compile_later)
        for agent_id, metas in todo.items():  # all of them, or what the workers left
            if agent_id not in done:
                self._render_agent(agent_id, metas)
                if progress is not None:
                    progress.advance(len(metas))
        planned = sum(len(p.metas) for p in self.plans.values()) - held
        report.sections_reused = planned - report.sections_restored - sections
        self.caches.l3.counters.hits += report.sections_reused  # used as they were, unvisited
        for agent_id in sorted(self.composer.pending & self.plans.keys()):
            self.composer.compose(agent_id)
        self.composer.finish_writes()
        report.findings += self.gates.run()  # after every write of this build
        if write:
            self._remove_stale()
            self._save_manifest()
        if self.store:
            self.store.flush()
        report.agents = len(self.workspace.agents) + len(self.workspace.agent_errors)
        report.errors = self.current_errors()
        report.caches = {k: v.since(before[k]) for k, v in self.caches.counters().items()}
        report.timings = self.renderer.timings
        report.duration_ms = (time.perf_counter() - t0) * 1000
        return report

    def load(self) -> None:
        """Read and resolve the workspace, rendering nothing: what ``explain`` starts from."""
        if not self._scanned:
            self._apply(self._scan(self.restore))
            self._scanned = True

    def _scan(self, restore: bool) -> Delta:
        """Read and compile everything. With worker processes, they parse the YAML sources
        while this process compiles the templates."""
        parsing, self.parse_ahead = self.parse_ahead, None
        if parsing is None and self.parallel.jobs > 1:
            parsing = ParseAhead.start(self.config, self.parallel.jobs, self.store if restore else None)
        try:
            delta = self.workspace.refresh([self.config.templates_path])
            self.renderer.compile(delta.templates)
            if parsing is not None:
                self.workspace.prefetched = parsing.result()
        finally:
            if parsing is not None:
                parsing.close()
        delta.update(self.workspace.refresh([self.config.agents_path]))
        self.workspace.prefetched.clear()
        return delta

    def _apply(self, delta: Delta) -> tuple[dict[tuple[str, str], bytes], TrackedCatalog]:
        """Evict what the change invalidates and re-resolve the agents it touches (templates
        are compiled already); return the evicted sections' old digests and the catalog."""
        if delta.membership:
            self._known_dirs = None
        return self.invalidation.apply(delta), self._catalog(delta)

    def replay(self, journal: dict[Path, Read]) -> TrackedCatalog:
        """In a worker process: reach the parent's state from the files it read since."""
        delta = self.workspace.replay(journal)
        self.renderer.compile(delta.templates)
        return self._apply(delta)[1]

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (they write their renders to the store first) and the
        writer thread."""
        self.composer.writer.close()
        self.parallel.close()

    def forget(self, agent_ids: Iterable[str]) -> None:
        """Drop every cached render of these agents, so the next build renders them anew."""
        self.close()  # the workers' fragments too
        for agent_id in agent_ids:
            plan = self.plans.get(agent_id)
            for meta in plan.metas if plan else []:
                self.sections.drop((agent_id, meta["id"]))
            self.caches.l4.pop(agent_id)
            self.composer.forget(agent_id)

    def restore_outputs(self, names: Iterable[str] | None) -> list[str]:
        """Outputs (and the manifest) deleted behind agentd's back, to write again at the next
        build: ``names`` were reported deleted (None: every one, ``out/`` itself went away).
        Composed from what the caches and the store hold; a section neither has is rendered.
        An agent that fails keeps failing (it has no good output to restore). Returns the
        files that will be written."""
        listed = self.output.files
        restored = []
        for name in sorted(listed if names is None else set(names) & listed.keys()):
            agent_id = output_agent(name)
            if agent_id is None or agent_id not in self.plans or agent_id in self.agent_errors:
                continue
            if os.path.lexists(self.output.path / name):  # not gone, or back already
                continue
            self.caches.l4.pop(agent_id)  # what agentd wrote there last is not there
            self.composer.pending.add(agent_id)
            restored.append(name)
        if (names is None or MANIFEST in names) and self.output.lost_manifest():
            restored.append(MANIFEST)
        return restored

    def known_dirs(self) -> set[Path]:
        """Every folder holding a file the workspace has read (to recognise a deleted folder).
        Recomputed only after a build that added or removed files."""
        if self._known_dirs is None:
            self._known_dirs = {parent for path in self.workspace.files() for parent in path.parents}
        return self._known_dirs

    def current_errors(self) -> list[AgentdError]:
        """Every error standing now: broken sources, templates that do not compile, renders
        that failed. Errors are never cached as results: each is retried on the next build."""
        errors: list[AgentdError] = []
        errors += self.workspace.template_errors.values()
        errors += (e for n, e in self.renderer.compile_errors.items() if n not in self.workspace.template_errors)
        errors += self.workspace.trait_errors.values()
        errors += self.workspace.agent_errors.values()
        errors += self.sections.blocked_errors(self.agent_errors, self.workspace.agent_errors)
        errors += self.workspace.folder_errors.values()
        for agent_id in sorted(self.agent_errors):
            errors += (e for e in self.agent_errors[agent_id] if not isinstance(e, BlockedError))
        errors += self.write_errors.values()
        return group_errors(errors)

    def affected(self, paths: Iterable[Path]) -> dict[str, list[str]]:
        """Agents and sections a change to ``paths`` would re-render (see ``inputs.affected``)."""
        return inputs.affected(self.config, self.workspace, self.graph, self.plans, paths)

    # -- invalidation ---------------------------------------------------------------------
    # -- rendering ------------------------------------------------------------------------
    def _catalog(self, delta: Any) -> TrackedCatalog:
        if self.inputs.relations is None or g.RELATIONS in delta.nodes:
            self.inputs.relations = Relations(dict(self.workspace.catalog_entries))
        return plans.catalog(self.workspace, self.inputs.relations)

    def _render_agent(
        self,
        agent_id: str,
        metas: list[dict[str, Any]],
    ) -> None:
        """Render an agent's dirty sections and compose it while they are in L3."""
        result = self._run_task(Task(agent_id, [m["id"] for m in metas]), self._run.catalog)
        self._take_result(result)

    def _run_task(self, task: Task, catalog: TrackedCatalog) -> Result:
        """Render one agent's share of a batch (and its skeleton, and compose it, when asked):
        the one render path, in this process and in the workers. Renders go to the store as
        they are made."""
        plan = self.plans[task.agent]
        saved, self.renderer.timings = self.renderer.timings, []
        try:
            context = self.composer.context(plan, catalog)
            metas = plan.meta_by_id
            result = Result(task.agent, [], [], self.renderer.timings)
            for section in task.sections:
                try:
                    entry = render_section(self.renderer, plan, metas[section], context)
                except SourceError as exc:
                    result.errors.append(exc)  # stays dirty: retried next build
                    continue
                result.rendered.append((section, entry))
                if self.store is not None:
                    self.store.put(g.section_node(task.agent, section), entry)
            if task.skeleton:
                try:
                    result.skeleton, result.made_skeleton = self.composer.render_skeleton(plan, catalog), True
                except SourceError:
                    pass  # the daemon renders it again and reports the error where it composes
            if task.compose is not None and not result.errors:
                result.composed = self.composer.compose_task(plan, task.compose, dict(result.rendered), result, catalog)
        finally:
            self.renderer.timings = saved
        if result.composed is not None:  # the daemon needs their digests and reads, not their bytes
            result.rendered = [(s, Rendered(b"", entry.reads, entry.digest)) for s, entry in result.rendered]
        return result

    def _agent_rendered(
        self,
        agent_id: str,
        errors: list[AgentdError],
        composed: Composed | None = None,
    ) -> None:
        if errors:
            self.agent_errors[agent_id] = errors
        elif composed is not None and (agent_id in self.composer.pending or composed.outcome is not None):
            self.composer.composed_in_worker(agent_id, composed)
        elif agent_id in self.composer.pending:
            self.composer.compose(agent_id)

    @property
    def pool_error(self) -> str | None:
        """Why workers could not be started (the daemon logs it once), if they could not."""
        return self.parallel.error

    @pool_error.setter
    def pool_error(self, error: str | None) -> None:
        self.parallel.error = error

    def start_pool(self) -> None:
        """Fork the worker processes now (the daemon does this after its first build, so no
        edit ever waits for a pool to start)."""
        self.parallel.start()

    def _render_in_workers(self, todo: dict[str, list[dict[str, Any]]], skeletons: set[str]) -> set[str]:
        """Render in the workers (``parallel.py``), composing each agent as it arrives."""
        spec = self.composer.spec if self._run.write else None
        progress = self.progress
        advance = (lambda result: progress.advance(len(todo.get(result.agent, ())))) if progress else None
        tasks = functools.partial(tasks_for, todo, skeletons, spec)
        workers, done = self.parallel.render(tasks, self._run.report.cold, self._take_result, advance)
        self._run.report.workers = workers
        return done

    def _take_result(
        self,
        result: Result,
    ) -> None:
        """Record what a task did (here or in a worker) and compose its agent unless done."""
        agent_id = result.agent
        self.caches.add(result.counters)
        self.renderer.timings += result.timings
        if result.made_skeleton:
            self.composer.skeletons[agent_id] = result.skeleton
        for section, entry in result.rendered:
            self._keep_section(agent_id, section, entry, cached=result.composed is None)
        errors = self.sections.hold(agent_id, result.errors, self._run.old)
        self._agent_rendered(agent_id, errors, result.composed)

    def _collect(self) -> dict[str, list[dict[str, Any]]]:
        """The dirty sections the store cannot give back, by agent (``Sections.collect``)."""

        def lookup(agent_id: str, node: str) -> Rendered | None:
            if self.store is None or not self.composer.restorable(agent_id):
                return None
            return self.store.lookup(node, self.inputs.current_fp, data=False)

        todo, restored = self.sections.collect(self.plans, lookup)
        self._run.report.sections_restored += len(restored)
        for key, digest in restored:
            if self._run.old.get(key) != digest:
                self.composer.pending.add(key[0])
        return todo

    def _keep_section(
        self,
        agent_id: str,
        section: str,
        entry: Rendered,
        cached: bool = True,
    ) -> None:
        """Record a fresh render (``_run_task`` stored it); not ``cached``: a worker composed
        its agent and kept the bytes (``_section_bytes`` then takes them from the output file)."""
        self.sections.keep((agent_id, section), entry, cached)
        self._run.report.sections_rendered.append(f"{agent_id}/{section}")
        if self._run.old.get((agent_id, section)) == entry.digest:
            self._run.report.sections_cut_off += 1
        else:
            self.composer.pending.add(agent_id)

    def _remove_stale(self) -> None:
        """Remove the outputs of agents that are gone (``compose.StaleOutputs``)."""
        removed, gone, errors = self._stale.remove(self.config, self.workspace, self.output)
        if errors is not None:  # walked: the write errors found anew
            self.write_errors = {k: v for k, v in self.write_errors.items() if k == MANIFEST} | errors
        self._run.report.removed += removed
        for agent_id in gone:
            self.caches.l4.pop(agent_id)

    def _save_manifest(self) -> None:
        try:
            self.output.save()
        except WriteError as exc:
            self.write_errors[MANIFEST] = exc  # still to save: tried again next build
        else:
            self.write_errors.pop(MANIFEST, None)


class _Worker:
    """The engine as a pool worker (``pool.Work``): a forked copy of the daemon's engine,
    kept in step by replaying the files the daemon re-read."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.catalog: TrackedCatalog | None = None

    def enter(self) -> None:
        engine = self.engine
        if engine.store is not None:
            engine.store.abandon()
            engine.store.FLUSH_EVERY = WORKER_FLUSH_EVERY
        engine.workspace.journal = None
        engine.output.replaced = []
        self.catalog = engine._catalog(Delta())

    def replay(self, journal: dict[Path, Read]) -> None:
        self.catalog = self.engine.replay(journal)

    def run(self, task: Task) -> Result:
        caches = self.engine.caches
        assert self.catalog is not None
        before = caches.counters()
        result = self.engine._run_task(task, self.catalog)
        result.counters = {k: v.since(before[k]) for k, v in caches.counters().items()}
        return result

    def finish_batch(self) -> None:
        """The store writes of the batch's renders, unlinking the outputs it replaced."""
        if self.engine.store is not None:
            self.engine.store.flush()
        self.engine.output.remove_replaced()
