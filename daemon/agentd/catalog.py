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
from collections.abc import Iterator, Mapping
from typing import Any

from . import graph as g
from .trace import MISSING, fingerprint, record

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
    each entry it returns."""

    __slots__ = ("_entries", "_fps", "_members_fp", "_relations")

    def __init__(
        self,
        entries: Mapping[str, Mapping[str, Any]],
        fps: Mapping[str, bytes],
        members_fp: bytes,
        relations: Relations,
    ) -> None:
        self._entries = entries
        self._fps = fps
        self._members_fp = members_fp
        self._relations = relations

    def __getitem__(self, agent_id: str) -> Any:
        record(g.catalog_node(agent_id), self._fps.get(agent_id, MISSING))
        return self._entries[agent_id]

    def get(self, agent_id: str, default: Any = None) -> Any:
        try:
            return self[agent_id]
        except KeyError:
            return default

    def related(self, agent_id: str, limit: int = RELATED_LIMIT) -> list[Any]:
        record(g.RELATIONS, self._relations.fingerprint)
        return [self[peer] for peer in self._relations.related(agent_id, limit)]

    def __contains__(self, agent_id: object) -> bool:
        record(g.CATALOG, self._members_fp)
        return agent_id in self._entries

    def __iter__(self) -> Iterator[Any]:
        record(g.CATALOG, self._members_fp)
        for agent_id in sorted(self._entries):
            yield self[agent_id]

    def __len__(self) -> int:
        record(g.CATALOG, self._members_fp)
        return len(self._entries)
