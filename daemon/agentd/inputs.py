"""Input nodes of the dependency graph: what each is worth now, and who reads them.

A stored render is valid when every input it read still has the fingerprint it had
(``Inputs.current_fp``, the store's check); ``affected`` walks the same graph the other way,
from changed files to the renders that read them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from . import graph as g
from .catalog import Relations
from .config import Config
from .exceptions import ConfigError
from .plan import Plan
from .trace import MISSING, fingerprint
from .workspace import AgentSource, TraitSource, Workspace


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
