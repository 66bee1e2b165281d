"""Section bookkeeping: what every section's current render is, and which ones a build visits.

A build's cost follows the change, not the workspace: only *dirty* sections (invalidated,
new, or failed last time) are visited, and the digest of every section's current render is
kept even when the memory budget drops its bytes (the store and the output hold them). A
section whose render stopped at a broken agent source is *blocked*: held, not retried, until
what it read changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import graph as g
from .cache import Layer, Rendered
from .catalog import blocked_error
from .exceptions import AgentdError, BlockedError, SourceError
from .plan import Plan
from .render import Renderer
from .trace import fingerprint


class Sections:
    """The digests, the dirty set and the blocked sections of one engine."""

    def __init__(self, l3: Layer[tuple[str, str], Rendered], graph: g.DepGraph) -> None:
        self._l3 = l3
        self._graph = graph
        #: Digest of every section's current output, kept even when L3 drops the bytes.
        self.digests: dict[tuple[str, str], bytes] = {}
        #: Sections of current plans without a valid render: the only ones a build visits.
        self.dirty: set[tuple[str, str]] = set()
        #: Sections whose render stopped at a catalog read of a broken agent source (see
        #: ``TrackedCatalog``), by agent: section -> (the broken agents, the digest of the last
        #: good render). Like a render, kept until what it read changes (its graph inputs are
        #: what it read up to the stop), so a build while a source stays broken does not retry
        #: them; their agents are not composed.
        self.blocked: dict[str, dict[str, tuple[tuple[str, ...], bytes | None]]] = {}

    def held(self) -> int:
        """How many sections are blocked (not visited, not reused)."""
        return sum(map(len, self.blocked.values()))

    def keep(self, key: tuple[str, str], entry: Rendered, cached: bool) -> None:
        """Record a section's current render (``cached``: its bytes in L3 too)."""
        if cached:
            self._l3.put(key, entry)
        self.digests[key] = entry.digest
        self.dirty.discard(key)
        self._graph.set_inputs(g.section_node(*key), entry.reads)

    def collect(
        self, plans: dict[str, Plan], lookup: Callable[[str, str], Rendered | None]
    ) -> tuple[dict[str, list[dict[str, Any]]], list[tuple[tuple[str, str], bytes]]]:
        """The dirty sections (invalidated, new, or failed last time) that ``lookup`` (the
        store, by inputs) cannot give back, by agent; and the (key, digest) of those it gave.
        Only dirty sections are visited: a build's cost follows the change, not the size of
        the workspace."""
        todo: dict[str, list[dict[str, Any]]] = {}
        restored: list[tuple[tuple[str, str], bytes]] = []
        counters = self._l3.counters
        for key in sorted(self.dirty):
            agent_id, section = key
            plan = plans.get(agent_id)
            meta = plan.meta_by_id.get(section) if plan else None
            if meta is None:  # the agent or the section is gone
                self.dirty.discard(key)
                continue
            node = g.section_node(agent_id, section)
            # Rendered by an earlier process or state, inputs unchanged: its digest and reads
            # suffice (a composition that needs the bytes reads them then; a restart reads none).
            # The store is L3's disk tier: a section it gives back is a hit, a render a miss.
            stored = lookup(agent_id, node)
            if stored is None:  # dirty: an input changed, or it is new or dropped on request
                counters.misses += 1
                counters.expected += 1
                todo.setdefault(agent_id, []).append(meta)
                continue
            counters.hits += 1
            self.keep(key, stored, cached=False)
            restored.append((key, stored.digest))
        return todo, restored

    def drop(self, key: tuple[str, str]) -> bytes | None:
        """Forget a section's render (it becomes dirty); return the digest it had (for early
        cutoff)."""
        self._l3.pop(key)
        self.dirty.add(key)
        digest = self.digests.pop(key, None)
        held = self.blocked.get(key[0])
        if held is not None and key[1] in held:  # blocked: its last good render's digest
            digest = held.pop(key[1])[1]
            if not held:
                del self.blocked[key[0]]
        return digest

    def hold(self, agent_id: str, errors: list[AgentdError], old: dict[tuple[str, str], bytes]) -> list[AgentdError]:
        """Keep the sections that stopped at a broken agent's catalog entry as blocked (until
        what they read changes); return the other errors."""
        others: list[AgentdError] = []
        for error in errors:
            if not isinstance(error, BlockedError) or error.section is None:
                others.append(error)
                continue
            key = (agent_id, error.section)
            self.dirty.discard(key)
            self._graph.set_inputs(g.section_node(*key), error.reads)
            self.blocked.setdefault(agent_id, {})[error.section] = (error.blockers, old.get(key))
        return others

    def unblock(self, broken: dict[str, Any], old: dict[tuple[str, str], bytes]) -> None:
        """Render again the blocked sections a source they waited for no longer blocks. (A
        change of which sources load invalidates them through the graph already, see
        ``Workspace._broken_changed``: this only makes sure no agent is ever held silently.)"""
        for agent_id, held in list(self.blocked.items()):
            for section, (blockers, _digest) in list(held.items()):
                if not all(b in broken for b in blockers):
                    digest = self.drop((agent_id, section))
                    if digest is not None:
                        old[(agent_id, section)] = digest

    def blocked_errors(self, agent_errors: dict[str, list[AgentdError]], broken: dict[str, Any]) -> list[BlockedError]:
        """One error per set of broken agent sources that holds agents back, naming them (not
        one per reader: a typo in one agent would otherwise be reported once per agent)."""
        readers: dict[tuple[str, ...], set[str]] = {}
        for agent_id, held in self.blocked.items():
            for blockers, _digest in held.values():
                readers.setdefault(blockers, set()).add(agent_id)
        for agent_id, errors in agent_errors.items():  # a base template that read the catalog
            for error in errors:
                if isinstance(error, BlockedError):
                    readers.setdefault(error.blockers, set()).add(agent_id)
        return [
            blocked_error(present, broken, agents)
            for blockers, agents in sorted(readers.items())
            if (present := [b for b in blockers if b in broken])
        ]


def render_section(renderer: Renderer, plan: Plan, meta: dict[str, Any], context: dict[str, Any]) -> Rendered:
    """Render one section (no bookkeeping: also runs in worker processes)."""
    try:
        rendered = renderer.render(meta["template"], {**context, "section": meta})
    except BlockedError as exc:
        exc.section = meta["id"]
        raise
    except SourceError as exc:
        exc.context = f"rendering section {meta['id']!r} of agent {plan.agent.id!r} ({plan.agent.path})"
        exc.agents = (plan.agent.id,)
        raise
    reads = {**rendered.reads, g.meta_node(plan.agent.id, meta["id"]): plan.meta_fps[meta["id"]]}
    return Rendered(rendered.data, reads, fingerprint(rendered.data))
