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

import dataclasses
import functools
import itertools
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import graph as g
from . import inputs
from . import plan as plans
from .cache import Caches, Counters, Rendered
from .catalog import Relations, TrackedCatalog
from .compose import StaleOutputs, Writer
from .config import Config
from .exceptions import (
    AgentdError,
    BlockedError,
    DataError,
    OutputError,
    SourceError,
    WriteError,
    group_errors,
)
from .gates import Check, Gates
from .inputs import Inputs
from .output import MANIFEST, OutputChanged, OutputDir, WriteOutcome, output_agent, output_name
from .plan import Plan
from .pool import WORKER_FLUSH_EVERY, Composed, ComposeSpec, Pool, Result, Task, WorkerLost
from .render import BASE_TEMPLATE, Renderer
from .sections import Sections
from .skeleton import Layout, Piece, Skeleton, joined, render_skeleton
from .store import Store
from .trace import fingerprint
from .workspace import Delta, ParseAhead, Read, Workspace

if TYPE_CHECKING:
    from .progress import Progress


@dataclasses.dataclass
class BuildReport:
    """What one build did; the CLI prints it, the daemon logs it."""

    build_id: str
    started: float
    changed: list[str] = dataclasses.field(default_factory=list)
    agents: int = 0
    agents_composed: list[str] = dataclasses.field(default_factory=list)
    sections_rendered: list[str] = dataclasses.field(default_factory=list)
    sections_reused: int = 0
    #: Sections taken from the persistent store (rendered by an earlier process).
    sections_restored: int = 0
    sections_cut_off: int = 0
    written: list[str] = dataclasses.field(default_factory=list)
    unchanged: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    errors: list[AgentdError] = dataclasses.field(default_factory=list)
    caches: dict[str, Counters] = dataclasses.field(default_factory=dict)
    #: (template, seconds) for every render of this build.
    timings: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    #: A build from empty caches (the first one): its misses say nothing about cache health.
    cold: bool = False
    #: Output-gate findings for the agents composed in this build (see ``gates.py``).
    findings: list[Any] = dataclasses.field(default_factory=list)
    #: Worker processes that rendered in this build (0: all in this process).
    workers: int = 0
    duration_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def record(self) -> dict[str, Any]:
        """What the build did, as data: ``stats``' ``last_build``, the ``build.finished`` log
        line and event, the reply to ``rebuild``, and ``agentd build``'s summary all print it."""
        return {
            "build_id": self.build_id,
            "start": self.started,
            "duration_ms": round(self.duration_ms, 2),
            "changed": self.changed,
            "agents": self.agents,
            "agents_rendered": self.agents_composed,
            "sections_rendered": len(self.sections_rendered),
            "sections_reused": self.sections_reused,
            "sections_restored": self.sections_restored,
            "sections_cut_off": self.sections_cut_off,
            "workers": self.workers,
            "outputs_written": len(self.written),
            "outputs_unchanged": len(self.unchanged),
            "outputs_removed": len(self.removed),
            "errors": len(self.errors),
            "findings": len(self.findings),
            "caches": {k: {"hits": c.hits, "misses": c.misses, "expected": c.expected} for k, c in self.caches.items()},
        }


#: A warm worker pool takes a batch from this many sections (below it, dispatch costs more).
PARALLEL_MIN_SECTIONS = 16
#: Starting a pool (forking) pays off from this many sections.
POOL_START_MIN_SECTIONS = 36


@dataclasses.dataclass
class _Run:
    """One build's state, shared by its steps instead of passed from one to the next."""

    report: BuildReport
    catalog: TrackedCatalog
    #: The digests the sections this build evicted had (a re-render with the same one is cut off).
    old: dict[tuple[str, str], bytes]
    #: False: render in memory only.
    write: bool
    #: Take unchanged renders from the store.
    restore: bool


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
        #: Worker processes for large batches of renders (``--jobs``; see ``pool.py``).
        self.jobs = max(1, jobs if jobs is not None else config.workers)
        self._pool: Pool | None = None
        #: Sources being parsed in workers already (``agentd build`` starts it before importing
        #: the rest of agentd); used by the first scan.
        self.parse_ahead = parse_ahead
        #: Why workers could not be started (the daemon logs it once), if they could not.
        self.pool_error: str | None = None
        #: Take unchanged renders from the store, unless a build says otherwise (``build``).
        self.restore = restore
        #: The build running (or the last one).
        self._run: _Run
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
        #: The writer thread (``compose.Writer``), with what it was handed: (agent, plan, digest).
        self.writer: Writer[tuple[str, Plan, bytes]] = Writer(self.output)
        self.plans: dict[str, Plan] = {}
        #: Fingerprints of input nodes (to validate stored renders).
        self.inputs = Inputs(self.workspace, self.plans, self.section_digests)
        self.agent_errors: dict[str, list[AgentdError]] = {}
        #: Standing failures to save the manifest or remove a stale output, by file name.
        self.write_errors: dict[str, WriteError] = {}
        self._compose_pending: set[str] = set()
        #: Per agent: its output around the sections (``skeleton.py``), None when not composable.
        self.skeletons: dict[str, Skeleton | None] = {}
        #: Per agent: where its sections sit in its last composed output.
        self.layouts: dict[str, Layout] = {}
        #: The output gates (``output_check``, the daemon's): run after each build's writes on
        #: what it composed; their findings are kept per agent until it is composed again.
        self.gates = Gates(output_check, config.output_path)
        self.findings = self.gates.findings
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
            if self._sync_ahead(delta):
                self.renderer.evict(delta.templates)
                compile_later = delta.templates
            else:
                self.renderer.compile(delta.templates)
        old, catalog = self._apply(delta)
        self._run = _Run(report, catalog, old, write, restore)
        todo = self._collect()
        sections = sum(map(len, todo.values()))
        held = self.sections.held()
        skeletons = self._skeletons_wanted(todo)
        progress = self.progress
        if progress is not None and sections:
            progress.count(sections, "sections")
        done: set[str] = set()
        if self._parallel(sections + len(skeletons)) and len(todo.keys() | skeletons) > 1:
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
        for agent_id in sorted(self._compose_pending & self.plans.keys()):
            self._compose(agent_id)
        self._finish_writes()
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

    def _scan(self, restore: bool) -> Delta:
        """Read and compile everything. With worker processes, they parse the YAML sources
        while this process compiles the templates."""
        parsing, self.parse_ahead = self.parse_ahead, None
        if parsing is None and self.jobs > 1:
            parsing = ParseAhead.start(self.config, self.jobs, self.store if restore else None)
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
        old_sections = self._invalidate(delta)
        if self.sections.blocked:
            self.sections.unblock(self.workspace.agent_errors, old_sections)
        self._resolve(delta, old_sections)
        return old_sections, self._catalog(delta)

    def replay(self, journal: dict[Path, Read]) -> TrackedCatalog:
        """In a worker process: reach the parent's state from the files it read since."""
        delta = self.workspace.replay(journal)
        self.renderer.compile(delta.templates)
        return self._apply(delta)[1]

    def _sync_ahead(self, delta: Delta) -> bool:
        """Send a template change to the workers before this process prepares the batch, when
        enough renders read it to go to them: they replay it (compiling the template) while
        this process invalidates, collects and deals out the batch, and this process compiles
        its own copy once the batch is rendered (its graph needs the new version's static
        references, and its later renders the code). Compiled here first, a section template
        was the longest step before any worker could start, with the other core idle (README,
        "Design measurements")."""
        if self._pool is None or not delta.templates:
            return False
        if len(self.graph.readers({g.template_node(name) for name in delta.templates})) < PARALLEL_MIN_SECTIONS:
            return False
        assert self.workspace.journal is not None
        journal, self.workspace.journal = self.workspace.journal, {}
        try:
            self._pool.sync(journal)
        except WorkerLost:
            self.close()
            return False
        return True

    def _parallel(self, sections: int) -> bool:
        if self.jobs < 2:
            return False
        return sections >= (PARALLEL_MIN_SECTIONS if self._pool is not None else POOL_START_MIN_SECTIONS)

    def start_pool(self) -> None:
        """Fork the worker processes now (the daemon does this after its first build, so no
        edit ever waits for a pool to start)."""
        if self.jobs > 1 and self._pool is None:
            if self.store is not None:
                self.store.close()  # never carry an open SQLite connection across fork()
            try:
                self._pool = Pool(_Worker(self), self.jobs)
            except OSError as exc:  # no processes to be had (limits): render here from now on
                self.pool_error = f"cannot start {self.jobs} worker processes: {exc}; rendering in-process"
                self.jobs = 1
                return
            self.workspace.journal = {}

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (they write their renders to the store first) and the
        writer thread."""
        self.writer.close()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
            self.workspace.journal = None

    def forget(self, agent_ids: Iterable[str]) -> None:
        """Drop every cached render of these agents, so the next build renders them anew."""
        self.close()  # the workers' fragments too
        for agent_id in agent_ids:
            plan = self.plans.get(agent_id)
            for meta in plan.metas if plan else []:
                self.sections.drop((agent_id, meta["id"]))
            self.caches.l4.pop(agent_id)
            self.skeletons.pop(agent_id, None)
            self._compose_pending.add(agent_id)

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
            self._compose_pending.add(agent_id)
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
    def _invalidate(self, delta: Any) -> dict[tuple[str, str], bytes]:
        """Evict every render that read a changed input; return evicted sections' old digests
        (to detect re-renders that come out identical)."""
        old: dict[tuple[str, str], bytes] = {}
        for node in self.graph.readers(delta.nodes):
            kind, name, part = g.parse(node)
            if kind == "section":
                digest = self.sections.drop((name, part))
                if digest is not None:
                    old[(name, part)] = digest
            elif kind == "fragment":
                self.caches.l2.pop(name)
                self.graph.remove([node])
            elif kind == "compose":
                self._compose_pending.add(name)
                self.skeletons.pop(name, None)
        return old

    # -- resolution -----------------------------------------------------------------------
    def _resolve(self, delta: Any, old_sections: dict[tuple[str, str], bytes]) -> None:
        ws = self.workspace
        todo = set(delta.agents) | set(self.agent_errors)
        if delta.membership:
            todo |= set(ws.agents) | set(self.plans)
        available = plans.available_sections(ws)
        defaults = plans.default_sections(self.config, ws)
        kinds = sorted({ref.split("/", 1)[0] for ref in ws.traits})
        self.inputs.trait_kinds_fp = fingerprint(kinds)
        for agent_id in sorted(todo):
            self.agent_errors.pop(agent_id, None)
            agent = ws.agents.get(agent_id)
            old = self.plans.pop(agent_id, None)
            if agent is None:
                self._drop_agent(agent_id, old, keep_output=agent_id in ws.agent_errors)
                continue
            try:
                plan = plans.resolve(self.config, ws, agent, available, defaults, kinds)
            except DataError as exc:
                self.agent_errors[agent_id] = [exc]
                self._drop_agent(agent_id, old, keep_output=True)
                continue
            self.plans[agent_id] = plan
            held = self.sections.blocked.get(agent_id, {})
            self.sections.dirty.update(
                (agent_id, s) for s in plan.meta_fps if (agent_id, s) not in self.section_digests and s not in held
            )
            if old is None or old.meta_fps != plan.meta_fps or agent_id not in self.caches.l4:
                self._compose_pending.add(agent_id)
            if old is not None and old.metas_fp != plan.metas_fp:  # renders that read the whole list
                old_sections.update(self._invalidate(Delta(nodes={g.section_list_node(agent_id)})))
            for section, fp in (old.meta_fps if old else {}).items():
                if plan.meta_fps.get(section) != fp:
                    digest = self.sections.drop((agent_id, section))
                    self.graph.remove([g.section_node(agent_id, section)])
                    if digest is not None and section in plan.meta_fps:
                        old_sections[(agent_id, section)] = digest

    def _drop_agent(self, agent_id: str, old: Plan | None, keep_output: bool) -> None:
        """Forget an agent's renders (it was deleted or no longer resolves). Its output stays
        when the source is merely broken: the last good output is kept."""
        if old is not None:
            for meta in old.metas:
                self.sections.drop((agent_id, meta["id"]))
            self.graph.remove([g.section_node(agent_id, m["id"]) for m in old.metas] + [g.compose_node(agent_id)])
        self._compose_pending.discard(agent_id)
        self.skeletons.pop(agent_id, None)
        self.sections.blocked.pop(agent_id, None)
        if not keep_output:
            self.caches.l4.pop(agent_id)
            self.findings.pop(agent_id, None)

    # -- rendering ------------------------------------------------------------------------
    def _catalog(self, delta: Any) -> TrackedCatalog:
        if self.inputs.relations is None or g.RELATIONS in delta.nodes:
            self.inputs.relations = Relations(dict(self.workspace.catalog_entries))
        return plans.catalog(self.workspace, self.inputs.relations)

    def _context(self, plan: Plan, catalog: TrackedCatalog) -> dict[str, Any]:
        return plans.context(plan, catalog, self.inputs.trait_kinds_fp)

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
            context = self._context(plan, catalog)
            metas = plan.meta_by_id
            result = Result(task.agent, [], [], self.renderer.timings)
            for section in task.sections:
                try:
                    entry = self._render_one(plan, metas[section], context)
                except SourceError as exc:
                    result.errors.append(exc)  # stays dirty: retried next build
                    continue
                result.rendered.append((section, entry))
                if self.store is not None:
                    self.store.put(g.section_node(task.agent, section), entry)
            if task.skeleton:
                try:
                    result.skeleton, result.made_skeleton = self.render_skeleton(plan, catalog), True
                except SourceError:
                    pass  # the daemon renders it again and reports the error where it composes
            if task.compose is not None and not result.errors:
                result.composed = self._compose_task(plan, task.compose, dict(result.rendered), result, catalog)
        finally:
            self.renderer.timings = saved
        if result.composed is not None:  # the daemon needs their digests and reads, not their bytes
            result.rendered = [(s, Rendered(b"", entry.reads, entry.digest)) for s, entry in result.rendered]
        return result

    def _compose_task(
        self, plan: Plan, spec: ComposeSpec, rendered: dict[str, Rendered], result: Result, catalog: TrackedCatalog
    ) -> Composed | None:
        """In a worker: compose and write the agent as the daemon would; None when this worker
        cannot (the daemon composes it from the sections sent back)."""
        agent_id = plan.agent.id
        skeleton = spec.skeleton or result.skeleton
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
        self.layouts.pop(agent_id, None)
        if spec.layout is not None:
            # This worker's copies of the manifest entry and the layout, brought up to the
            # daemon's, so that the daemon's own unchanged-file check serves.
            self.output.files.pop(spec.name, None)
            if spec.entry is not None:
                self.output.files[spec.name] = spec.entry
            self.layouts[agent_id] = spec.layout
            old = self.written_layout(agent_id)
        have = {entry.digest: entry.data for entry in rendered.values()}
        assembled = self._assemble(plan, skeleton, catalog, digests, have, old, render=False)
        if assembled is None:
            return None  # changed behind agentd's back, not stored: the daemon has the bytes
        _digests, pieces, layout = assembled
        outcome: WriteOutcome
        try:
            outcome = self.output.write_file(spec.name, pieces, layout.digest, spec.entry)
        except OutputChanged:
            return None  # changed since the check above: the daemon composes it from bytes
        except (OutputError, OSError) as exc:
            outcome = exc
        return Composed(layout.digest, layout, outcome)

    def _agent_rendered(
        self,
        agent_id: str,
        errors: list[AgentdError],
        composed: Composed | None = None,
    ) -> None:
        if errors:
            self.agent_errors[agent_id] = errors
        elif composed is not None and (agent_id in self._compose_pending or composed.outcome is not None):
            self._composed_in_worker(agent_id, composed)
        elif agent_id in self._compose_pending:
            self._compose(agent_id)

    def _compose_spec(self, agent_id: str, rendering: set[str], renders_skeleton: bool) -> ComposeSpec | None:
        """What a worker needs to compose and write this agent itself, or None when only this
        process can: its skeleton is a full render (not composable), or a section it does not
        render is neither in the current output nor (without a store) anywhere a worker reads."""
        plan = self.plans[agent_id]
        skeleton = None if renders_skeleton else self.skeletons.get(agent_id)
        if (skeleton is None and not renders_skeleton) or agent_id in self.sections.blocked:
            return None
        layout = self.layouts.get(agent_id)
        digests: list[bytes | None] = []
        for meta in plan.metas:
            if meta["id"] in rendering:
                digests.append(None)
                continue
            digest = self.section_digests.get((agent_id, meta["id"]))
            if digest is None or (self.store is None and (layout is None or digest not in layout.spans)):
                return None  # (with a store, the worker fetches it by digest)
            digests.append(digest)
        name = output_name(agent_id)
        return ComposeSpec(
            name=name,
            sections=tuple(m["id"] for m in plan.metas),
            digests=tuple(digests),
            skeleton=skeleton,
            layout=layout if any(d is not None for d in digests) else None,
            entry=self.output.files.get(name),
            current=self.caches.l4.peek(agent_id) if self.output.owns(name) else None,
        )

    def _composed_in_worker(self, agent_id: str, composed: Composed) -> None:
        """Record what a worker composed and wrote, as ``_compose`` records its own."""
        plan = self.plans[agent_id]
        skeleton = self.skeletons[agent_id]
        assert skeleton is not None  # a worker composes only with a skeleton
        digests = [self.section_digests[(agent_id, m["id"])] for m in plan.metas]
        reads = {**skeleton.reads, **_section_reads(plan, digests)}
        if composed.layout is not None:
            self.layouts[agent_id] = composed.layout
        if not self._composed(agent_id, reads, composed.digest):
            assert composed.outcome is not None  # the worker saw the same L4 entry
            self._record_write(agent_id, plan, composed.digest, composed.outcome)

    def _skeletons_wanted(self, todo: dict[str, list[dict[str, Any]]]) -> set[str]:
        """Agents that will be composed in this build and have no valid skeleton: those with
        sections to render, and those composed before (in L4) whose skeleton an edit of the
        base template dropped. (An agent composed by an earlier process is first looked up in
        the store: most need no composition at all.)"""
        candidates = todo.keys() | {a for a in self._compose_pending if a in self.caches.l4}
        return {a for a in candidates if a in self.plans and not self._skeleton_valid(self.plans[a])}

    def _render_in_workers(
        self,
        todo: dict[str, list[dict[str, Any]]],
        skeletons: set[str],
    ) -> set[str]:
        """Render sections and skeletons in the worker processes (``pool.py``) and compose
        each agent as they arrive; return the agents done. A lost worker (or none to be had)
        only costs speed: the caller renders what is left."""
        forked = self._pool is None
        self.start_pool()
        if self._pool is None:
            return set()
        assert self.workspace.journal is not None
        journal, self.workspace.journal = self.workspace.journal, {}
        self._run.report.workers = self._pool.size
        # Workers forked before this build load the templates it compiled from the store, not
        # compiling them again: write those first. Workers forked just now have them (fork
        # copied them), and a change sent ahead (``_sync_ahead``) is replayed already; then
        # this process writes its queue once they are rendering, not before (so no core idles
        # while it writes).
        unwritten = bool(self.store) and (forked or not journal)
        if self.store and not unwritten:
            self.store.flush()
        tasks: list[Task] = []
        for agent_id in sorted(todo.keys() | skeletons):
            sections = [m["id"] for m in todo.get(agent_id, [])]
            spec = self._compose_spec(agent_id, set(sections), agent_id in skeletons) if self._run.write else None
            tasks.append(Task(agent_id, sections, agent_id in skeletons, spec))
        # What a worker composed is recorded after the batch's last result: the workers write
        # those outputs, and on two cores every ms of bookkeeping here (graph, store records,
        # manifest: ~0.4 ms per agent) would be taken from them. An agent left to this process
        # (its sections' bytes in the result) is composed at once, so they are not all held.
        done: set[str] = set()
        composed_there: list[Result] = []
        progress = self.progress
        try:
            for result in self._pool.render(journal, tasks, finish_early=self._run.report.cold):
                if unwritten and self.store:
                    self.store.flush()
                    unwritten = False
                done.add(result.agent)
                if progress is not None:  # results stream back per chunk of ~32 sections
                    progress.advance(len(todo.get(result.agent, ())))
                if result.composed is None:
                    self._take_result(result)
                else:
                    composed_there.append(result)
        except WorkerLost:
            self.close()
        except BaseException:
            self.close()  # chunks still in flight would answer the next batch
            raise
        for result in composed_there:
            self._take_result(result)
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
            self.skeletons[agent_id] = result.skeleton
        for section, entry in result.rendered:
            self._keep_section(agent_id, section, entry, cached=result.composed is None)
        errors = self.sections.hold(agent_id, result.errors, self._run.old)
        self._agent_rendered(agent_id, errors, result.composed)

    def _collect(self) -> dict[str, list[dict[str, Any]]]:
        """The dirty sections the store cannot give back, by agent (``Sections.collect``)."""

        def lookup(agent_id: str, node: str) -> Rendered | None:
            if self.store is None or not self._restorable(agent_id):
                return None
            return self.store.lookup(node, self.inputs.current_fp, data=False)

        todo, restored = self.sections.collect(self.plans, lookup)
        self._run.report.sections_restored += len(restored)
        for key, digest in restored:
            if self._run.old.get(key) != digest:
                self._compose_pending.add(key[0])
        return todo

    def _restorable(self, agent_id: str) -> bool:
        """Whether the store may give this agent's renders back (callers check there is one)."""
        return self._run.restore and agent_id not in self.fresh

    def _render_one(self, plan: Plan, meta: dict[str, Any], context: dict[str, Any]) -> Rendered:
        """Render one section (no bookkeeping: also runs in worker processes)."""
        try:
            rendered = self.renderer.render(meta["template"], {**context, "section": meta})
        except BlockedError as exc:
            exc.section = meta["id"]
            raise
        except SourceError as exc:
            exc.context = f"rendering section {meta['id']!r} of agent {plan.agent.id!r} ({plan.agent.path})"
            exc.agents = (plan.agent.id,)
            raise
        reads = {**rendered.reads, g.meta_node(plan.agent.id, meta["id"]): plan.meta_fps[meta["id"]]}
        return Rendered(rendered.data, reads, fingerprint(rendered.data))

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
            self._compose_pending.add(agent_id)

    def _section_bytes(
        self,
        plan: Plan,
        catalog: TrackedCatalog,
        old: Layout | None,
        given: Sequence[bytes | None],
        have: dict[bytes, bytes],
        render: bool = True,
    ) -> tuple[list[bytes], dict[bytes, bytes]] | None:
        """Every section's digest for composing (``given``: the ones known, None for a section
        to find by its inputs), and the bytes of those neither ``have`` nor the output on disk
        (``old``: as written, or None) holds. Bytes the memory budget dropped from L3 are
        sliced out of the output, or read from the store by their digest (a lookup by inputs
        would cost a dependency record, a fingerprint per input and a second query). A section
        found nowhere is rendered again; not by a worker (``render`` False: None), whose
        daemon has its bytes."""
        keys = [(plan.agent.id, meta["id"]) for meta in plan.metas]
        digests = list(given)
        spans = old.spans if old is not None else {}
        wanted: dict[bytes, tuple[str, str]] = {}
        for index, key in enumerate(keys):
            if digests[index] in spans or digests[index] in have:
                continue
            entry = self.caches.l3.peek(key)
            # (A worker's L3 may hold an older render than the daemon's digest names.)
            if entry is not None and digests[index] in (None, entry.digest):
                digests[index] = entry.digest
                have[entry.digest] = entry.data
            elif (known := digests[index]) is not None:
                wanted[known] = key
        sources: list[Callable[[list[bytes]], dict[bytes, bytes]]] = [
            functools.partial(self._from_output, plan.agent.id)
        ]
        if self.store:
            sources.append(self.store.blobs_by_digest)
        for fetch in sources:
            for digest, data in fetch(list(wanted)).items() if wanted else ():
                self.caches.l3.put(wanted.pop(digest), Rendered(data, {}, digest))
                have[digest] = data
        complete: list[bytes] = []
        for known, meta in zip(digests, plan.metas, strict=True):
            if known is None or (known not in have and known not in spans):
                if not render:
                    return None
                entry = self._section_entry(plan, meta, catalog)
                known = entry.digest
                have[known] = entry.data
            complete.append(known)
        return complete, have

    def _from_output(self, agent_id: str, digests: list[bytes]) -> dict[bytes, bytes]:
        """Sections sliced out of the agent's output on disk (see ``Layout``)."""
        layout = self.layouts.get(agent_id)
        if not digests or layout is None or not any(d in layout.spans for d in digests):
            return {}
        if self.written_layout(agent_id) is None:
            return {}
        try:
            data = (self.output.path / output_name(agent_id)).read_bytes()
        except OSError:
            return {}
        return {d: data[slice(*layout.spans[d])] for d in digests if d in layout.spans}

    def written_layout(self, agent_id: str) -> Layout | None:
        """The layout of the agent's output on disk, if that file is still as agentd wrote it."""
        layout = self.layouts.get(agent_id)
        if layout is None or not self.output.unchanged_since_written(output_name(agent_id), layout.digest):
            return None
        return layout

    def _section_entry(self, plan: Plan, meta: dict[str, Any], catalog: TrackedCatalog) -> Rendered:
        """A section neither L3 nor a digest could give: from the store by its inputs, or
        rendered again (its inputs did not change: same bytes)."""
        key = (plan.agent.id, meta["id"])
        entry = None
        if self.store:
            entry = self.store.lookup(g.section_node(*key), self.inputs.current_fp)
        if entry is None:
            # Valid, yet lost to memory, the output and the store: the one L3 miss not bound to happen.
            self.caches.l3.counters.misses += 1
            entry = self._render_one(plan, meta, self._context(plan, catalog))
            if self.store:  # its stored bytes were evicted or damaged: store them again
                self.store.put(g.section_node(*key), entry)
        self.caches.l3.put(key, entry)
        self.section_digests[key] = entry.digest
        return entry

    def _compose_render(
        self, plan: Plan, catalog: TrackedCatalog, splice: bool
    ) -> tuple[bytes | list[Piece], dict[str, bytes], bytes]:
        """The agent's output from its sections (no bookkeeping): the skeleton around the
        sections' bytes, or, when the base template inspects a section's content, a full
        render; with its reads and digest. ``splice``: as pieces copying what the output on
        disk already holds (``Skeleton.splice``) where it can, for ``write_file``."""
        agent_id = plan.agent.id
        skeleton = self._skeleton(plan, catalog)
        known = [self.section_digests.get((agent_id, meta["id"])) for meta in plan.metas]
        if skeleton is not None:
            old = self.written_layout(agent_id) if splice else None
            assembled = self._assemble(plan, skeleton, catalog, known, {}, old)
            assert assembled is not None  # (a section found nowhere is rendered again)
            digests, pieces, layout = assembled
            data = joined(pieces)
            return pieces if data is None else data, {**skeleton.reads, **_section_reads(plan, digests)}, layout.digest
        gathered = self._section_bytes(plan, catalog, None, known, {})
        assert gathered is not None
        digests, have = gathered
        self.layouts.pop(agent_id, None)
        rendered = self._render_base(plan, catalog, [have[d].decode() for d in digests])
        return rendered.data, {**rendered.reads, **_section_reads(plan, digests)}, fingerprint(rendered.data)

    def _assemble(
        self,
        plan: Plan,
        skeleton: Skeleton,
        catalog: TrackedCatalog,
        known: Sequence[bytes | None],
        have: dict[bytes, bytes],
        old: Layout | None,
        render: bool = True,
    ) -> tuple[list[bytes], list[Piece], Layout] | None:
        """The one gather-and-splice, in this process and in the workers: the bytes of every
        section the output on disk (``old``) does not hold, around the skeleton. Returns every
        section's digest, the pieces for ``write_file`` and the new layout; None when a
        section is found nowhere and not ``render`` (see ``_section_bytes``)."""
        gathered = self._section_bytes(plan, catalog, old, known, have, render)
        if gathered is None:
            return None
        digests, have = gathered
        spliced = skeleton.splice(digests, have, old)
        assert spliced is not None  # every section is in ``have`` or in ``old``
        pieces, layout = spliced
        self.layouts[plan.agent.id] = layout
        return digests, pieces, layout

    def _render_base(self, plan: Plan, catalog: TrackedCatalog, contents: list[str]) -> Rendered:
        context = self._context(plan, catalog)
        context["sections"] = [{**meta, "content": c} for meta, c in zip(plan.metas, contents, strict=True)]
        try:
            return self.renderer.render(BASE_TEMPLATE, context)
        except SourceError as exc:
            exc.context = f"composing agent {plan.agent.id!r} ({plan.agent.path})"
            exc.agents = (plan.agent.id,)
            raise

    def _skeleton(self, plan: Plan, catalog: TrackedCatalog) -> Skeleton | None:
        """The agent's skeleton, rendered when missing or made for other section metadata.
        ``self.skeletons`` also remembers "not composable" (None) until the inputs change."""
        if not self._skeleton_valid(plan):
            self.skeletons[plan.agent.id] = self.render_skeleton(plan, catalog)
        return self.skeletons[plan.agent.id]

    def _skeleton_valid(self, plan: Plan) -> bool:
        if plan.agent.id not in self.skeletons and not self._restore_skeleton(plan):
            return False
        known = self.skeletons[plan.agent.id]
        return known is None or known.metas_fp == plan.metas_fp

    def _restore_skeleton(self, plan: Plan) -> bool:
        """Take the skeleton an earlier process rendered for the same inputs from the store."""
        if self.store is None or not self._restorable(plan.agent.id):
            return False
        stored = self.store.lookup(g.skeleton_unit(plan.agent.id), self.inputs.current_fp)
        if stored is None:
            return False
        self.skeletons[plan.agent.id] = Skeleton.from_bytes(stored.data, stored.reads)
        return True

    def render_skeleton(self, plan: Plan, catalog: TrackedCatalog) -> Skeleton | None:
        """Render an agent's skeleton (no caching: also runs in worker processes) and store it:
        after a restart the first edit of a section template would otherwise render every
        agent's skeleton again (two base template renders each: a 100-agent batch took ~1.7x
        as long as the next one)."""
        skeleton = render_skeleton(
            lambda contents: self._render_base(plan, catalog, contents), len(plan.metas), plan.metas_fp
        )
        if skeleton is not None and self.store is not None:
            data = skeleton.to_bytes()
            self.store.put(g.skeleton_unit(plan.agent.id), Rendered(data, skeleton.reads, fingerprint(data)))
        return skeleton

    def _compose(
        self,
        agent_id: str,
    ) -> None:
        plan = self.plans[agent_id]
        if agent_id in self.agent_errors or agent_id in self.sections.blocked:
            return  # keep the last good output; retried next build (blocked: once unblocked)
        name = output_name(agent_id)
        restorable = self._run.write and self.store and self._restorable(agent_id) and agent_id not in self.caches.l4
        if restorable and self._restore_compose(agent_id, name):
            return
        try:
            data, reads, digest = self._compose_render(plan, self._run.catalog, splice=self._run.write)
        except SourceError as exc:
            self.agent_errors[agent_id] = [exc]
            return
        if self._composed(agent_id, reads, digest):
            return
        if not self._run.write:
            assert isinstance(data, bytes)  # (not spliced)
            self.gates.queue(agent_id, data, plan)
            return
        # Written by a thread: it overlaps rendering and composing the next agents.
        self.writer.submit((agent_id, plan, digest), name, data, digest, self.output.files.get(name))

    def _composed(self, agent_id: str, reads: dict[str, bytes], digest: bytes) -> bool:
        """Record a composition (here or in a worker); True when the output is the one agentd
        already wrote (early cutoff: nothing to write)."""
        node = g.compose_node(agent_id)
        self.graph.set_inputs(node, reads)
        self._compose_pending.discard(agent_id)
        self._run.report.agents_composed.append(agent_id)
        if self.store:  # the composition's inputs -> its output's digest and layout, not bytes
            layout = self.layouts.get(agent_id)
            record = layout.to_bytes() if layout is not None and layout.digest == digest else digest
            self.store.put(node, Rendered(record, reads, fingerprint(record)))
        name = output_name(agent_id)
        if self.caches.l4.check(agent_id, digest) and self.output.owns(name):
            self._run.report.unchanged.append(name)
            return True
        self.caches.l4.put(agent_id, digest)
        return False

    def _finish_writes(self) -> None:
        """Wait for the queued writes; record them (manifest, report) or fail their agents."""
        for (agent_id, plan, digest), outcome in self.writer.drain():
            if outcome is None:  # someone wrote to it since it was checked: write all bytes
                outcome = self._write_whole(plan, digest)
            self._record_write(agent_id, plan, digest, outcome)

    def _write_whole(self, plan: Plan, digest: bytes) -> WriteOutcome:
        name = output_name(plan.agent.id)
        try:
            data = self._compose_render(plan, self._run.catalog, splice=False)[0]
            assert isinstance(data, bytes)  # (not spliced)
            return self.output.write_file(name, data, digest, self.output.files.get(name))
        except SourceError as exc:  # re-rendering a section its store row no longer had
            return OutputError(f"{name}: {exc}")
        except (OutputError, OSError) as exc:
            return exc

    def _record_write(self, agent_id: str, plan: Plan, digest: bytes, outcome: WriteOutcome) -> None:
        """Enter a write (here or in a worker) in the manifest and the report, or fail its
        agent: the output stays as it was and the agent is composed again next build."""
        name = output_name(agent_id)
        if isinstance(outcome, BaseException):
            self.caches.l4.pop(agent_id)
            self._compose_pending.add(agent_id)
            error = outcome if isinstance(outcome, OutputError) else self.output.write_error(name, outcome)
            self.agent_errors[agent_id] = [error]
            return
        written, stat = outcome
        self.output.record(name, digest, stat)
        (self._run.report.written if written else self._run.report.unchanged).append(name)
        self.gates.queue(agent_id, None, plan)

    def _restore_compose(self, agent_id: str, name: str) -> bool:
        """After a restart: if the composition's inputs are unchanged and out/ still holds the
        output it produced, there is nothing to do (no render, no write)."""
        assert self.store is not None
        node = g.compose_node(agent_id)
        stored = self.store.lookup(node, self.inputs.current_fp)
        digest = stored.data[:16] if stored is not None else b""
        if stored is None or not self.output.unchanged_since_written(name, digest):
            return False
        if len(stored.data) > len(digest):
            self.layouts[agent_id] = Layout.from_bytes(stored.data)
        self.graph.set_inputs(node, stored.reads)
        self.caches.l4.put(agent_id, digest)
        self._compose_pending.discard(agent_id)
        self._run.report.unchanged.append(name)
        return True

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


def _section_reads(plan: Plan, digests: list[bytes]) -> dict[str, bytes]:
    """A composition's reads of its sections: each one's digest and metadata."""
    reads: dict[str, bytes] = {g.section_list_node(plan.agent.id): plan.metas_fp}
    for meta, digest in zip(plan.metas, digests, strict=True):
        reads[g.section_node(plan.agent.id, meta["id"])] = digest
        reads[g.meta_node(plan.agent.id, meta["id"])] = plan.meta_fps[meta["id"]]
    return reads


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
