"""Input nodes of the dependency graph: what each is worth now, and who reads them.

A stored render is valid when every input it read still has the fingerprint it had
(``Inputs.current_fp``, the store's check); ``affected`` walks the same graph the other way,
from changed files to the renders that read them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from . import graph as g
from . import plan as plans_
from .cache import Caches
from .catalog import Relations
from .config import Config
from .exceptions import AgentdError, ConfigError, DataError
from .plan import Plan
from .sections import Sections
from .skeleton import Skeleton
from .trace import MISSING, fingerprint
from .workspace import AgentSource, Delta, TraitSource, Workspace


class Inputs:
    """The engine's view of its input nodes (the objects are the engine's own, updated in
    place); ``relations`` and ``trait_kinds_fp`` are set by the engine as it resolves."""

    def __init__(
        self, workspace: Workspace, plans: dict[str, Plan], section_digests: dict[tuple[str, str], bytes]
    ) -> None:
        self.workspace = workspace
        self.plans = plans
        self.section_digests = section_digests
        self.relations: Relations | None = None
        self.trait_kinds_fp = fingerprint([])

    def current_fp(self, node: str) -> bytes | None:
        """The current value fingerprint of an input node (to validate stored renders), or None
        when it cannot be known."""
        ws = self.workspace
        kind, rest, part = g.parse(node)
        if kind == "template":
            return ws.template_fps.get(rest, MISSING)
        if kind == "key":
            return _key_fp(ws.agents.get(rest), part)
        # While an agent source does not load, a render that read the catalog where it belongs
        # was blocked, never stored: nothing stored that read there is valid (``TrackedCatalog``).
        if kind == "catalog":
            if not rest:
                return None if ws.agent_errors else ws.catalog_fp
            if rest in ws.agent_errors:
                return None
            agent = ws.agents.get(rest)
            return agent.catalog_fp if agent else MISSING
        if node == g.RELATIONS:
            return self.relations.fingerprint if self.relations and not ws.agent_errors else None
        if node == g.TRAIT_KINDS:
            return self.trait_kinds_fp
        if kind == "trait":
            return _key_fp(ws.traits.get(rest), part)
        if kind == "section-list":
            plan = self.plans.get(rest)
            return plan.metas_fp if plan else MISSING
        if kind == "meta":
            plan = self.plans.get(rest)
            return plan.meta_fps.get(part, MISSING) if plan else MISSING
        if kind == "section":
            return self.section_digests.get((rest, part))
        return None


def _key_fp(source: AgentSource | TraitSource | None, key: str) -> bytes:
    """A source's fingerprint ("*": the whole of it) or one top-level key's."""
    if source is None:
        return MISSING
    return source.fp if key == "*" else source.fps.get(key, MISSING)


def affected(
    config: Config, workspace: Workspace, graph: g.DepGraph, plans: dict[str, Plan], paths: Iterable[Path]
) -> dict[str, list[str]]:
    """Agents and sections a change to ``paths`` would re-render (conservatively: any key
    of a changed agent source may change). A path agentd does not read is a usage error."""
    absolute = [Path(os.path.abspath(p)) for p in paths]  # `templates/../agents/x.yaml` is agents/x.yaml
    classified = [(p, workspace.classify(p)) for p in absolute]
    foreign = [workspace.rel(p) for p, kind in classified if kind is None]
    if foreign:
        raise ConfigError(
            f"not a template, agent or trait file of this workspace: {', '.join(foreign)} "
            f"(expected paths under {config.templates_dir}/ or {config.agents_dir}/)"
        )
    inputs: set[str] = set()
    agents: set[str] = set()
    for _path, kind in classified:
        assert kind is not None
        what, name = kind
        if what == "template":
            inputs.add(g.template_node(name))
        elif what == "trait":
            prefix = g.trait_prefix(name)
            inputs.update(n for n in graph.g if n.startswith(prefix))
        else:
            agents.add(name)
            inputs.add(g.catalog_node(name))
            inputs.add(g.CATALOG)
            prefix = g.key_prefix(name)
            inputs.update(n for n in graph.g if n.startswith(prefix))
    renders = graph.readers(inputs)
    nodes = [g.parse(r) for r in renders]
    keys = {(n.name, n.part) for n in nodes if n.kind == "section"}
    keys |= {(a, m["id"]) for a in agents if a in plans for m in plans[a].metas}
    sections = {f"{a}/{s}" for a, s in keys}
    composed = {n.name for n in nodes if n.kind == "compose"} | {a for a, _ in keys} | agents
    return {"agents": sorted(composed), "sections": sorted(sections)}


class Invalidation:
    """Evicts the renders a change invalidates and resolves the agents it touches, over the
    engine's own objects (updated in place)."""

    def __init__(
        self,
        config: Config,
        workspace: Workspace,
        graph: g.DepGraph,
        caches: Caches,
        sections: Sections,
        inputs: Inputs,
        plans: dict[str, Plan],
        agent_errors: dict[str, list[AgentdError]],
        pending: set[str],
        skeletons: dict[str, Skeleton | None],
        findings: dict[str, Any],
    ) -> None:
        self._config = config
        self._ws = workspace
        self._graph = graph
        self._caches = caches
        self.sections = sections
        self._inputs = inputs
        self.plans = plans
        self.agent_errors = agent_errors
        #: The composer's agents to compose and skeletons.
        self._pending = pending
        self._skeletons = skeletons
        self._findings = findings

    def apply(self, delta: Delta) -> dict[tuple[str, str], bytes]:
        """Evict what the change invalidates and re-resolve the agents it touches (templates
        are compiled already); return the evicted sections' old digests."""
        old_sections = self.invalidate(delta)
        if self.sections.blocked:
            self.sections.unblock(self._ws.agent_errors, old_sections)
        self.resolve(delta, old_sections)
        return old_sections

    def invalidate(self, delta: Delta) -> dict[tuple[str, str], bytes]:
        """Evict every render that read a changed input; return evicted sections' old digests
        (to detect re-renders that come out identical)."""
        old: dict[tuple[str, str], bytes] = {}
        for node in self._graph.readers(delta.nodes):
            kind, name, part = g.parse(node)
            if kind == "section":
                digest = self.sections.drop((name, part))
                if digest is not None:
                    old[(name, part)] = digest
            elif kind == "fragment":
                self._caches.l2.pop(name)
                self._graph.remove([node])
            elif kind == "compose":
                self._pending.add(name)
                self._skeletons.pop(name, None)
        return old

    def resolve(self, delta: Delta, old_sections: dict[tuple[str, str], bytes]) -> None:
        ws = self._ws
        todo = set(delta.agents) | set(self.agent_errors)
        if delta.membership:
            todo |= set(ws.agents) | set(self.plans)
        available = plans_.available_sections(ws)
        defaults = plans_.default_sections(self._config, ws)
        kinds = sorted({ref.split("/", 1)[0] for ref in ws.traits})
        self._inputs.trait_kinds_fp = fingerprint(kinds)
        for agent_id in sorted(todo):
            self.agent_errors.pop(agent_id, None)
            agent = ws.agents.get(agent_id)
            old = self.plans.pop(agent_id, None)
            if agent is None:
                self._drop_agent(agent_id, old, keep_output=agent_id in ws.agent_errors)
                continue
            try:
                plan = plans_.resolve(self._config, ws, agent, available, defaults, kinds)
            except DataError as exc:
                self.agent_errors[agent_id] = [exc]
                self._drop_agent(agent_id, old, keep_output=True)
                continue
            self.plans[agent_id] = plan
            held = self.sections.blocked.get(agent_id, {})
            self.sections.dirty.update(
                (agent_id, s) for s in plan.meta_fps if (agent_id, s) not in self.sections.digests and s not in held
            )
            if old is None or old.meta_fps != plan.meta_fps or agent_id not in self._caches.l4:
                self._pending.add(agent_id)
            if old is not None and old.metas_fp != plan.metas_fp:  # renders that read the whole list
                old_sections.update(self.invalidate(Delta(nodes={g.section_list_node(agent_id)})))
            for section, fp in (old.meta_fps if old else {}).items():
                if plan.meta_fps.get(section) != fp:
                    digest = self.sections.drop((agent_id, section))
                    self._graph.remove([g.section_node(agent_id, section)])
                    if digest is not None and section in plan.meta_fps:
                        old_sections[(agent_id, section)] = digest

    def _drop_agent(self, agent_id: str, old: Plan | None, keep_output: bool) -> None:
        """Forget an agent's renders (it was deleted or no longer resolves). Its output stays
        when the source is merely broken: the last good output is kept."""
        if old is not None:
            for meta in old.metas:
                self.sections.drop((agent_id, meta["id"]))
            self._graph.remove([g.section_node(agent_id, m["id"]) for m in old.metas] + [g.compose_node(agent_id)])
        self._pending.discard(agent_id)
        self._skeletons.pop(agent_id, None)
        self.sections.blocked.pop(agent_id, None)
        if not keep_output:
            self._caches.l4.pop(agent_id)
            self._findings.pop(agent_id, None)
