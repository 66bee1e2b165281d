"""Getting composed outputs onto disk: the writer thread, and the removal of stale outputs.

Writing an output is mostly system calls that release the GIL (temp file, write or copy,
exchange), so a thread writes while the build renders and composes the next agents. What the
outputs hold is composed around a skeleton (``skeleton.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from . import graph as g
from . import plan as plans
from .cache import Caches, Rendered
from .catalog import TrackedCatalog
from .config import Config
from .exceptions import AgentdError, OutputError, SourceError, WriteError
from .gates import Gates
from .inputs import Inputs
from .output import OutputChanged, OutputDir, WriteOutcome, output_agent, output_name
from .plan import Plan
from .pool import Composed, ComposeSpec, Result
from .render import BASE_TEMPLATE, Renderer
from .report import Run
from .sections import Sections, render_section
from .skeleton import Layout, Piece, Skeleton, joined, render_skeleton
from .store import Store
from .trace import fingerprint
from .workspace import Workspace

K = TypeVar("K")


class Writer(Generic[K]):
    """Outputs written by one thread, in order; each handed over with a key (what its caller
    needs to record it) that comes back with its outcome."""

    #: Outputs handed to the thread and not yet on disk, at most (each may hold 540 KB).
    MAX_PENDING = 4

    def __init__(self, output: OutputDir) -> None:
        self._output = output
        self._thread: ThreadPoolExecutor | None = None
        self._pending: list[tuple[K, Future[tuple[bool, list[int]]]]] = []

    def submit(self, key: K, name: str, data: bytes | Sequence[Piece], digest: bytes, entry: list[Any] | None) -> None:
        """Queue an output (``OutputDir.write_file``); waits while MAX_PENDING are queued."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="agentd-write")
        if len(self._pending) >= self.MAX_PENDING:
            self._pending[-self.MAX_PENDING][1].exception()  # wait for it, not for its result
        self._pending.append((key, self._thread.submit(self._output.write_file, name, data, digest, entry)))

    def drain(self) -> Iterator[tuple[K, WriteOutcome | None]]:
        """Wait for the queued writes, in order: each key with its outcome, None when the file
        changed since it was checked (``OutputChanged``: write all its bytes instead)."""
        pending, self._pending = self._pending, []
        for key, future in pending:
            try:
                outcome: WriteOutcome | None = future.result()
            except OutputChanged:
                outcome = None
            except (OutputError, OSError) as exc:
                outcome = exc
            yield key, outcome

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown()
            self._thread = None


class StaleOutputs:
    """Removes the outputs of agents that are gone. It walks the manifest (O(agents)), so only
    when the set of agents changed since the last walk."""

    def __init__(self) -> None:
        self._checked: tuple[bytes, tuple[str, ...]] | None = None

    def remove(
        self, config: Config, ws: Workspace, output: OutputDir
    ) -> tuple[list[str], list[str], dict[str, WriteError] | None]:
        """Remove them: the files removed, the agents whose outputs are gone, and the files
        that could not be removed (None: nothing walked)."""
        if config.agents_path in ws.unlisted:  # which agents exist is unknown: keep all
            return [], [], None
        agent_set = (ws.catalog_fp, tuple(sorted(ws.agent_errors)))
        if agent_set == self._checked:
            return [], [], None
        self._checked = agent_set
        existing = set(ws.agents) | set(ws.agent_errors)
        removed: list[str] = []
        gone: list[str] = []
        errors: dict[str, WriteError] = {}
        for name in sorted(output.files):
            agent_id = output_agent(name)
            if agent_id is not None and agent_id not in existing:
                try:
                    if output.remove(name):
                        removed.append(name)
                except WriteError as exc:
                    errors[name] = exc
                    self._checked = None  # walk again next build
                    continue
                gone.append(agent_id)
        return removed, gone, errors


class Composer:
    """Each agent's composition: its skeleton, where its sections sit in its output (layout),
    whether it is to be composed again (``pending``), the section bytes it is composed from
    (memory, the output on disk, the store) and the writes it hands to the writer thread.
    The objects it is given are the engine's own; ``run`` is the build running."""

    def __init__(
        self,
        *,
        output: OutputDir,
        store: Store | None,
        caches: Caches,
        graph: g.DepGraph,
        renderer: Renderer,
        sections: Sections,
        inputs: Inputs,
        plans: dict[str, Plan],
        agent_errors: dict[str, list[AgentdError]],
        gates: Gates,
        fresh: set[str],
    ) -> None:
        self.output = output
        self.store = store
        self.caches = caches
        self.graph = graph
        self.renderer = renderer
        self.sections = sections
        self.digests = sections.digests
        self.inputs = inputs
        self.plans = plans
        self.agent_errors = agent_errors
        self.gates = gates
        self.fresh = fresh
        #: The writer thread, with what it was handed: (agent, plan, digest).
        self.writer: Writer[tuple[str, Plan, bytes]] = Writer(output)
        #: Agents to compose at the end of the build.
        self.pending: set[str] = set()
        #: Per agent: its output around the sections (``skeleton.py``), None when not composable.
        self.skeletons: dict[str, Skeleton | None] = {}
        #: Per agent: where its sections sit in its last composed output.
        self.layouts: dict[str, Layout] = {}
        self.run: Run

    def restorable(self, agent_id: str) -> bool:
        """Whether the store may give this agent's renders back (callers check there is one)."""
        return self.run.restore and agent_id not in self.fresh

    def context(self, plan: Plan, catalog: TrackedCatalog) -> dict[str, Any]:
        return plans.context(plan, catalog, self.inputs.trait_kinds_fp)

    # -- section bytes --------------------------------------------------------------------
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
            entry = render_section(self.renderer, plan, meta, self.context(plan, catalog))
            if self.store:  # its stored bytes were evicted or damaged: store them again
                self.store.put(g.section_node(*key), entry)
        self.caches.l3.put(key, entry)
        self.digests[key] = entry.digest
        return entry

    # -- composing ------------------------------------------------------------------------
    def _compose_render(
        self, plan: Plan, catalog: TrackedCatalog, splice: bool
    ) -> tuple[bytes | list[Piece], dict[str, bytes], bytes]:
        """The agent's output from its sections (no bookkeeping): the skeleton around the
        sections' bytes, or, when the base template inspects a section's content, a full
        render; with its reads and digest. ``splice``: as pieces copying what the output on
        disk already holds (``Skeleton.splice``) where it can, for ``write_file``."""
        agent_id = plan.agent.id
        skeleton = self._skeleton(plan, catalog)
        known = [self.digests.get((agent_id, meta["id"])) for meta in plan.metas]
        if skeleton is not None:
            old = self.written_layout(agent_id) if splice else None
            assembled = self._assemble(plan, skeleton, catalog, known, {}, old)
            assert assembled is not None  # (a section found nowhere is rendered again)
            digests, pieces, layout = assembled
            data = joined(pieces)
            return pieces if data is None else data, {**skeleton.reads, **section_reads(plan, digests)}, layout.digest
        gathered = self._section_bytes(plan, catalog, None, known, {})
        assert gathered is not None
        digests, have = gathered
        self.layouts.pop(agent_id, None)
        rendered = self.render_base(plan, catalog, [have[d].decode() for d in digests])
        return rendered.data, {**rendered.reads, **section_reads(plan, digests)}, fingerprint(rendered.data)

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

    def render_base(self, plan: Plan, catalog: TrackedCatalog, contents: list[str]) -> Rendered:
        context = self.context(plan, catalog)
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
        if not self.skeleton_valid(plan):
            self.skeletons[plan.agent.id] = self.render_skeleton(plan, catalog)
        return self.skeletons[plan.agent.id]

    def skeleton_valid(self, plan: Plan) -> bool:
        if plan.agent.id not in self.skeletons and not self._restore_skeleton(plan):
            return False
        known = self.skeletons[plan.agent.id]
        return known is None or known.metas_fp == plan.metas_fp

    def _restore_skeleton(self, plan: Plan) -> bool:
        """Take the skeleton an earlier process rendered for the same inputs from the store."""
        if self.store is None or not self.restorable(plan.agent.id):
            return False
        stored = self.store.lookup(g.skeleton_unit(plan.agent.id), self.inputs.current_fp)
        if stored is None:
            return False
        self.skeletons[plan.agent.id] = Skeleton.from_bytes(stored.data, stored.reads)
        return True

    def render_skeleton(self, plan: Plan, catalog: TrackedCatalog) -> Skeleton | None:
        """Render an agent's skeleton (no caching: also runs in worker processes) and store it:
        after a restart the first edit of a section template would otherwise render every
        agent's skeleton again."""
        skeleton = render_skeleton(
            lambda contents: self.render_base(plan, catalog, contents), len(plan.metas), plan.metas_fp
        )
        if skeleton is not None and self.store is not None:
            data = skeleton.to_bytes()
            self.store.put(g.skeleton_unit(plan.agent.id), Rendered(data, skeleton.reads, fingerprint(data)))
        return skeleton

    def skeletons_wanted(self, todo: dict[str, list[dict[str, Any]]]) -> set[str]:
        """Agents that will be composed in this build and have no valid skeleton: those with
        sections to render, and those composed before (in L4) whose skeleton an edit of the
        base template dropped. (An agent composed by an earlier process is first looked up in
        the store: most need no composition at all.)"""
        candidates = todo.keys() | {a for a in self.pending if a in self.caches.l4}
        return {a for a in candidates if a in self.plans and not self.skeleton_valid(self.plans[a])}

    def compose(self, agent_id: str) -> None:
        plan = self.plans[agent_id]
        if agent_id in self.agent_errors or agent_id in self.sections.blocked:
            return  # keep the last good output; retried next build (blocked: once unblocked)
        name = output_name(agent_id)
        restorable = self.run.write and self.store and self.restorable(agent_id) and agent_id not in self.caches.l4
        if restorable and self._restore_compose(agent_id, name):
            return
        try:
            data, reads, digest = self._compose_render(plan, self.run.catalog, splice=self.run.write)
        except SourceError as exc:
            self.agent_errors[agent_id] = [exc]
            return
        if self._composed(agent_id, reads, digest):
            return
        if not self.run.write:
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
        self.pending.discard(agent_id)
        self.run.report.agents_composed.append(agent_id)
        if self.store:  # the composition's inputs -> its output's digest and layout, not bytes
            layout = self.layouts.get(agent_id)
            record = layout.to_bytes() if layout is not None and layout.digest == digest else digest
            self.store.put(node, Rendered(record, reads, fingerprint(record)))
        name = output_name(agent_id)
        if self.caches.l4.check(agent_id, digest) and self.output.owns(name):
            self.run.report.unchanged.append(name)
            return True
        self.caches.l4.put(agent_id, digest)
        return False

    def finish_writes(self) -> None:
        """Wait for the queued writes; record them (manifest, report) or fail their agents."""
        for (agent_id, plan, digest), outcome in self.writer.drain():
            if outcome is None:  # someone wrote to it since it was checked: write all bytes
                outcome = self._write_whole(plan, digest)
            self._record_write(agent_id, plan, digest, outcome)

    def _write_whole(self, plan: Plan, digest: bytes) -> WriteOutcome:
        name = output_name(plan.agent.id)
        try:
            data = self._compose_render(plan, self.run.catalog, splice=False)[0]
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
            self.pending.add(agent_id)
            error = outcome if isinstance(outcome, OutputError) else self.output.write_error(name, outcome)
            self.agent_errors[agent_id] = [error]
            return
        written, stat = outcome
        self.output.record(name, digest, stat)
        (self.run.report.written if written else self.run.report.unchanged).append(name)
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
        self.pending.discard(agent_id)
        self.run.report.unchanged.append(name)
        return True

    # -- composing in a worker ------------------------------------------------------------
    def spec(self, agent_id: str, rendering: set[str], renders_skeleton: bool) -> ComposeSpec | None:
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
            digest = self.digests.get((agent_id, meta["id"]))
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

    def compose_task(
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

    def composed_in_worker(self, agent_id: str, composed: Composed) -> None:
        """Record what a worker composed and wrote, as ``compose`` records its own."""
        plan = self.plans[agent_id]
        skeleton = self.skeletons[agent_id]
        assert skeleton is not None  # a worker composes only with a skeleton
        digests = [self.digests[(agent_id, m["id"])] for m in plan.metas]
        reads = {**skeleton.reads, **section_reads(plan, digests)}
        if composed.layout is not None:
            self.layouts[agent_id] = composed.layout
        if not self._composed(agent_id, reads, composed.digest):
            assert composed.outcome is not None  # the worker saw the same L4 entry
            self._record_write(agent_id, plan, composed.digest, composed.outcome)

    def forget(self, agent_id: str) -> None:
        """Compose the agent again, its skeleton rendered anew."""
        self.skeletons.pop(agent_id, None)
        self.pending.add(agent_id)


def section_reads(plan: Plan, digests: list[bytes]) -> dict[str, bytes]:
    """A composition's reads of its sections: each one's digest and metadata."""
    reads: dict[str, bytes] = {g.section_list_node(plan.agent.id): plan.metas_fp}
    for meta, digest in zip(plan.metas, digests, strict=True):
        reads[g.section_node(plan.agent.id, meta["id"])] = digest
        reads[g.meta_node(plan.agent.id, meta["id"])] = plan.meta_fps[meta["id"]]
    return reads
