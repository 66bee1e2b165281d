"""Agents resolved against the workspace, and what their templates render from.

A plan is an agent whose sections and traits exist: resolving it is where a source's
references are validated, at the line that names them. The catalog and the render context
are built here too, so a render in this process and one in a worker see the same values.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterable
from typing import Any, NoReturn

from . import graph as g
from .catalog import Relations, TrackedCatalog
from .config import Config
from .exceptions import ConfigError, DataError
from .render import anchor, section_title
from .trace import MISSING, TrackedMapping, TrackedValue, fingerprint
from .workspace import AgentSource, Workspace, locate, source_line, trait_ids

SECTION_DIR = "sections"


@dataclasses.dataclass
class Plan:
    """An agent resolved against the workspace: its sections and traits exist."""

    agent: AgentSource
    metas: list[dict[str, Any]]
    meta_fps: dict[str, bytes]
    traits: dict[str, list[TrackedMapping]]

    @property
    def meta_by_id(self) -> dict[str, dict[str, Any]]:
        return {m["id"]: m for m in self.metas}

    @functools.cached_property
    def metas_fp(self) -> bytes:
        return fingerprint(self.metas)


#: Known agent ids an unknown one's error lists at most.
KNOWN_SHOWN = 20


def check_agents(requested: Iterable[str], known: Iterable[str]) -> None:
    """Refuse agent ids the workspace does not have, naming them and the ones it has (the
    daemon's ``rebuild`` and ``agentd rebuild`` without one say the same)."""
    have = sorted(set(known))
    unknown = sorted(set(requested) - set(have))
    if unknown:
        shown = ", ".join(have[:KNOWN_SHOWN]) + (f" ... ({len(have)} in all)" if len(have) > KNOWN_SHOWN else "")
        raise ConfigError(f"unknown agent(s): {', '.join(unknown)}; known: {shown or 'none'}")


def available_sections(ws: Workspace) -> list[str]:
    """Section ids an agent may enable: ``templates/sections/<id>.j2``, "_" partials aside.
    A section template that does not load counts: its agents fail with its error (reported
    once) rather than each with "unknown section"."""
    prefix = f"{SECTION_DIR}/"
    return sorted(
        n[len(prefix) : -3]
        for n in itertools.chain(ws.templates, ws.template_errors.keys() - ws.templates.keys())
        if n.startswith(prefix) and n.endswith(".j2") and not n[len(prefix) :].startswith("_")
    )


def default_sections(config: Config, ws: Workspace) -> list[str]:
    """The sections of an agent whose source lists none: ``sections`` of the configuration,
    else every section template (partials and subfolders aside), sorted by name. A section
    template created or deleted changes the set of templates, which re-plans every agent
    (``Delta.membership``); what read a plan's section list depends on it
    (``g.section_list_node``), so nothing made for the old list is kept or restored."""
    if config.sections:
        return list(config.sections)
    return [s for s in available_sections(ws) if "/" not in s]


def resolve(
    config: Config, ws: Workspace, agent: AgentSource, available: list[str], defaults: list[str], kinds: list[str]
) -> Plan:
    """Resolve an agent's section list and trait references, or raise ``DataError`` at the
    offending line. Every trait kind of the library is present in ``traits`` (empty when
    the agent lists none), so templates can loop over ``traits.safety`` unconditionally."""
    data = agent.data
    sections = data.get("sections", defaults)
    if not isinstance(sections, list) or not all(isinstance(s, str) for s in sections):
        _fail(ws, agent, ["sections"], "sections: expected a list of section names")
    if not sections and "sections" not in data:
        folder = f"{config.templates_dir}/{SECTION_DIR}"
        why = f"no sections: add {folder}/<name>.j2, or set `sections` in agentd.toml or in this file"
        _fail(ws, agent, [], why, rule="unknown-section")
    metas: list[dict[str, Any]] = []
    for i, section in enumerate(sections):
        if section not in available:
            where = "" if "sections" in data else " (a default section: `sections` in agentd.toml)"
            _fail(
                ws,
                agent,
                ["sections", i],
                f"unknown section {section!r}{where}; expected one of: {', '.join(available) or '(none)'}",
                rule="unknown-section",
            )
        number = i + 1
        title = section_title(section)
        metas.append(
            {
                "id": section,
                "title": title,
                "number": number,
                "anchor": anchor(f"{number}. {title}"),
                "template": f"{SECTION_DIR}/{section}.j2",
            }
        )
    traits = data.get("traits", {})
    if not isinstance(traits, dict):
        _fail(ws, agent, ["traits"], "traits: expected a mapping of kind -> list of trait ids")
    resolved: dict[str, list[TrackedMapping]] = {kind: [] for kind in kinds}
    for kind, ids in traits.items():
        if not isinstance(ids, list):
            _fail(ws, agent, ["traits", kind], f"traits.{kind}: expected a list of trait ids")
        resolved[kind] = []
        for i, trait_id in enumerate(ids):
            ref = f"{kind}/{trait_id}"
            trait = ws.traits.get(ref)
            if trait is None:
                broken = ws.trait_errors.get(ref)
                known = trait_ids(ws.traits, kind)
                why = (
                    f"trait {ref!r} does not load (see {broken.location})"
                    if broken
                    else f"unknown trait {trait_id!r} of kind {kind!r}; expected one of: "
                    f"{', '.join(known) or '(none: add agents/traits/' + kind + '/<id>.yaml)'}"
                )
                _fail(ws, agent, ["traits", kind, i], why, rule="" if broken else "unknown-trait")
            else:
                resolved[kind].append(
                    TrackedMapping(trait.data, g.trait_prefix(ref), trait.fps, trait.fp, label=f"trait {ref!r}")
                )
    return Plan(agent, metas, {m["id"]: fingerprint(m) for m in metas}, resolved)


def _fail(ws: Workspace, agent: AgentSource, keys: list[str | int], message: str, rule: str = "schema") -> NoReturn:
    text = ws.source_text(agent.path)
    line = locate(text, keys)
    error = DataError(f"{agent.path}: {message}", agent.path, line, source_line(text, line))
    error.rule = rule
    raise error


def catalog(ws: Workspace, relations: Relations) -> TrackedCatalog:
    """The catalog templates read, over copies (the workspace updates its own in place)."""
    entries = dict(ws.catalog_entries)
    return TrackedCatalog(entries, dict(ws.catalog_fps), ws.catalog_fp, relations, dict(ws.agent_errors))


def context(plan: Plan, catalog: TrackedCatalog, trait_kinds_fp: bytes) -> dict[str, Any]:
    """What an agent's templates render from, each value tracked to the graph node it reads."""
    a = plan.agent
    return {
        # Labelled "agent", not by id: a key every agent lacks is one error, not one per agent.
        "agent": TrackedMapping(a.data, g.key_prefix(a.id), a.fps, a.fp, label="agent"),
        "sections": TrackedValue(plan.metas, g.section_list_node(a.id), plan.metas_fp),
        "traits": TrackedValue(
            plan.traits,
            g.key_node(a.id, "traits"),
            a.fps.get("traits", MISSING),
            also=((g.TRAIT_KINDS, trait_kinds_fp),),
        ),
        "catalog": catalog,
    }
