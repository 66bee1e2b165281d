"""The catalog: every agent as the others see it, and who is related to whom.

Templates cross-reference the other agents of the workspace. Listing *every* peer in every agent
makes each output grow with the workspace and a build quadratic in it, so templates ask for an
agent's related peers instead (``catalog.related(agent.id)``): the peers it hands work to or
receives work from, then those sharing the most tags, up to a limit. Which peers are related
depends only on ids, tags and handoffs; that structure has one fingerprint (the
``catalog-relations`` graph node), so editing a description re-renders only the sections that
show that agent, while editing tags or handoffs re-renders every ``related()`` reader.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NoReturn

from . import graph as g
from .exceptions import BlockedError, SourceError
from .trace import MISSING, fingerprint, reads_so_far, record

#: How many related peers ``related()`` returns by default.
RELATED_LIMIT = 7
#: A handoff in either direction outweighs any number of shared tags.
HANDOFF_WEIGHT = 100


class Relations:
    """Related peers per agent, computed lazily from ids, tags and handoffs."""

    def __init__(self, entries: Mapping[str, Mapping[str, Any]]) -> None:
        self._links: dict[str, set[str]] = defaultdict(set)
        self._tags: dict[str, set[str]] = {}
        by_tag: dict[str, set[str]] = defaultdict(set)
        shape = []
        for agent_id in sorted(entries):
            entry = entries[agent_id]
            tags = {t for t in entry.get("tags") or [] if isinstance(t, str)}
            self._tags[agent_id] = tags
            for tag in tags:
                by_tag[tag].add(agent_id)
            targets = sorted(
                h["agent"]
                for h in entry.get("handoffs") or []
                if isinstance(h, dict) and isinstance(h.get("agent"), str)
            )
            for target in targets:
                if target in entries and target != agent_id:
                    self._links[agent_id].add(target)
                    self._links[target].add(agent_id)
            shape.append((agent_id, sorted(tags), targets))
        self._by_tag = by_tag
        self._ids = sorted(entries)
        self._memo: dict[tuple[str, int], list[str]] = {}
        #: Changes exactly when some agent's related peers may change.
        self.fingerprint = fingerprint(shape)

    def related(self, agent_id: str, limit: int) -> list[str]:
        key = (agent_id, limit)
        if key not in self._memo:
            score: dict[str, int] = defaultdict(int)
            for peer in self._links.get(agent_id, ()):
                score[peer] += HANDOFF_WEIGHT
            for tag in self._tags.get(agent_id, ()):
                for peer in self._by_tag[tag]:
                    score[peer] += 1
            score.pop(agent_id, None)
            ranked = sorted(score, key=lambda p: (-score[p], p))[:limit]
            if len(ranked) < limit:  # small workspaces: fill with the rest, by id
                ranked += [p for p in self._ids if p != agent_id and p not in score][: limit - len(ranked)]
            self._memo[key] = ranked
        return self._memo[key]


class TrackedCatalog:
    """The catalog as templates see it: ``catalog[id]`` records that one entry; iterating records
    the membership and each entry handed out; ``related(id)`` records the relation structure and
    each entry it returns.

    An agent whose source does not load (``broken``) has no entry, and a catalog without it is
    not the one its author means: a render that reads where it belongs stops there with a
    ``BlockedError`` instead of showing the catalog without it (its agent keeps its last good
    output). Where it belongs: its own entry, and, since its id, tags and handoffs are unknown,
    the catalog as a whole (iteration, ``in``, ``len``) and ``related()``. The rule depends only
    on which sources are broken, never on what an earlier state held, so a clean build and an
    incremental one stop the same renders at the same read."""

    __slots__ = ("_entries", "_fps", "_members_fp", "_relations", "_broken")

    def __init__(
        self,
        entries: Mapping[str, Mapping[str, Any]],
        fps: Mapping[str, bytes],
        members_fp: bytes,
        relations: Relations,
        broken: Mapping[str, SourceError] | None = None,
    ) -> None:
        self._entries = entries
        self._fps = fps
        self._members_fp = members_fp
        self._relations = relations
        self._broken = broken or {}

    def _block(self, node: str, blockers: Iterable[str]) -> NoReturn:
        record(node, MISSING)  # an input of the stopped render: its change may unblock it
        raise blocked_error(sorted(blockers), self._broken, reads=reads_so_far())

    def __getitem__(self, agent_id: str) -> Any:
        if agent_id in self._broken:
            self._block(g.catalog_node(agent_id), [agent_id])
        record(g.catalog_node(agent_id), self._fps.get(agent_id, MISSING))
        return self._entries[agent_id]

    def get(self, agent_id: str, default: Any = None) -> Any:
        try:
            return self[agent_id]
        except KeyError:
            return default

    def related(self, agent_id: str, limit: int = RELATED_LIMIT) -> list[Any]:
        if self._broken:
            self._block(g.RELATIONS, self._broken)
        record(g.RELATIONS, self._relations.fingerprint)
        return [self[peer] for peer in self._relations.related(agent_id, limit)]

    def _members(self) -> None:
        if self._broken:
            self._block(g.CATALOG, self._broken)
        record(g.CATALOG, self._members_fp)

    def __contains__(self, agent_id: object) -> bool:
        self._members()
        return agent_id in self._entries

    def __iter__(self) -> Iterator[Any]:
        self._members()
        for agent_id in sorted(self._entries):
            yield self[agent_id]

    def __len__(self) -> int:
        self._members()
        return len(self._entries)


def blocked_error(
    blockers: Iterable[str],
    broken: Mapping[str, SourceError],
    readers: Iterable[str] = (),
    reads: dict[str, bytes] | None = None,
) -> BlockedError:
    """The error of the renders waiting for ``blockers`` (agents whose sources do not load),
    located at the first one's mistake: every reader of the same sources gets an identical
    one (reported once), naming the ``readers`` in its context and agents when known."""
    ids = sorted(blockers)
    errors = [broken[b] for b in ids]
    where = " and ".join(e.location for e in errors)
    names = ", ".join(repr(b) for b in ids)
    if len(ids) == 1:
        what = f"agent {names} does not load, and the agents that read it in the catalog"
        until = "it does"
    else:
        what = f"agents {names} do not load, and the agents that read them in the catalog"
        until = "they do"
    what += f" keep their last good output until {until}"
    error = BlockedError(f"blocked by {where}: {what}", errors[0].path, errors[0].line)
    error.blockers = tuple(ids)
    error.reads = reads or {}
    shown = sorted(readers)
    error.agents = tuple(shown)
    if shown:
        more = f" and {len(shown) - READERS_SHOWN} more" if len(shown) > READERS_SHOWN else ""
        error.context = "building " + ", ".join(repr(r) for r in shown[:READERS_SHOWN]) + more
    return error


#: How many blocked agents an error names (the rest are counted).
READERS_SHOWN = 5
