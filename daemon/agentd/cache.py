"""The cache layers and their counters.

- L1: compiled templates (owned by the Jinja environment; ``render.py`` counts its loads).
- L2: rendered fragments (trait bodies shared by many agents), keyed by template + inputs.
- L3: rendered sections, keyed by (agent, section).
- L4: the fingerprint of each final agent, for early cutoff before touching the disk.

Rendered text is kept as UTF-8 bytes: one non-Latin-1 character (an em dash, a box-drawing
char) makes CPython store a whole ``str`` at 2-4 bytes per character (PEP 393).

A miss is *expected* when no cache could have hit: the entry was dropped because an input it
read changed (or the entry's key is new: new inputs, a new agent), so it is made again by
design. Only the other misses, of entries a layer held valid and lost (to its memory budget),
say something about the caches: the hit-rate alerts judge ``hits / could_hit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclasses.dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    #: Of ``misses``, those bound to happen (see the module's docstring).
    expected: int = 0

    @property
    def hit_rate(self) -> float | None:
        """Of all lookups (what the caches answered, misses by design included)."""
        total = self.hits + self.misses
        return self.hits / total if total else None

    @property
    def could_hit(self) -> int:
        """Lookups that could have hit: all but the expected misses."""
        return self.hits + self.misses - self.expected

    def snapshot(self) -> Counters:
        return dataclasses.replace(self)

    def add(self, other: Counters) -> None:
        self.hits += other.hits
        self.misses += other.misses
        self.evictions += other.evictions
        self.expected += other.expected

    def since(self, before: Counters) -> Counters:
        return Counters(
            self.hits - before.hits,
            self.misses - before.misses,
            self.evictions - before.evictions,
            self.expected - before.expected,
        )


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A render's output and the inputs it read (graph node -> fingerprint)."""

    data: bytes
    reads: dict[str, bytes]
    #: Content fingerprint, computed once where it is needed again (sections: compose, cutoff).
    digest: bytes = b""


class Layer(Generic[K, V]):
    """A dict with counters and, optionally, a byte budget kept by evicting the least recently
    used entries (the persistent store still holds them). ``size_of`` says what an entry
    weighs."""

    def __init__(self, name: str, budget: int | None = None) -> None:
        self.name = name
        self.counters = Counters()
        self.budget = budget
        self._entries: dict[K, V] = {}  # insertion order = recency (a hit moves to the end)
        self._bytes = 0
        #: Keys dropped by the budget while still valid: a miss of one was not bound to happen.
        self._lost: set[K] = set()

    @staticmethod
    def size_of(value: Any) -> int:
        return len(value.data) if isinstance(value, Rendered) else 0

    def get(self, key: K) -> V | None:
        value = self._entries.get(key)
        if value is None:
            self._miss(key)
        else:
            self.counters.hits += 1
            if self.budget is not None:  # most recently used last
                del self._entries[key]
                self._entries[key] = value
        return value

    def check(self, key: K, value: V) -> bool:
        """Count a hit when the entry equals ``value`` (early cutoff), a miss otherwise."""
        same = self._entries.get(key) == value
        if same:
            self.counters.hits += 1
        else:
            self._miss(key)  # a different value: what it fingerprints changed
        return same

    def _miss(self, key: K) -> None:
        self.counters.misses += 1
        if key not in self._lost:
            self.counters.expected += 1

    def peek(self, key: K) -> V | None:
        """Look without counting (bookkeeping, not a cache use)."""
        return self._entries.get(key)

    def put(self, key: K, value: V) -> None:
        old = self._entries.get(key)
        if old is not None:
            self._bytes -= self.size_of(old)
        self._entries[key] = value
        self._bytes += self.size_of(value)
        self._lost.discard(key)
        if self.budget is not None:
            while self._bytes > self.budget and len(self._entries) > 1:
                oldest = next(iter(self._entries))
                self._drop(oldest)
                self._lost.add(oldest)

    def pop(self, key: K) -> V | None:
        """Drop an entry because its inputs changed (counted as an eviction)."""
        self._lost.discard(key)
        return self._drop(key)

    def _drop(self, key: K) -> V | None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= self.size_of(old)
            self.counters.evictions += 1
        return old

    def keys(self) -> list[K]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def bytes(self) -> int:
        return self._bytes


class Caches:
    """All four layers; L1's entries live in the Jinja environment, only its counters here."""

    def __init__(self, budget: int | None = None) -> None:
        self.l1_counters = Counters()
        self.l1_entries = 0
        self.l1_bytes = 0
        self.l2: Layer[str, Rendered] = Layer("L2", budget)
        self.l3: Layer[tuple[str, str], Rendered] = Layer("L3", budget)
        self.l4: Layer[str, bytes] = Layer("L4")

    def counters(self) -> dict[str, Counters]:
        return {
            "L1": self.l1_counters.snapshot(),
            "L2": self.l2.counters.snapshot(),
            "L3": self.l3.counters.snapshot(),
            "L4": self.l4.counters.snapshot(),
        }

    def add(self, counters: dict[str, Counters]) -> None:
        """Count what a worker process did (its own copies of L1 and L2) as this cache's."""
        layers = {"L1": self.l1_counters, "L2": self.l2.counters, "L3": self.l3.counters, "L4": self.l4.counters}
        for name, c in counters.items():
            layers[name].add(c)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Entries, bytes and lifetime counters per layer (for the CLI, logs and status)."""
        rows = {
            "L1": (self.l1_entries, self.l1_bytes, self.l1_counters),
            "L2": (len(self.l2), self.l2.bytes, self.l2.counters),
            "L3": (len(self.l3), self.l3.bytes, self.l3.counters),
            "L4": (len(self.l4), 16 * len(self.l4), self.l4.counters),
        }
        return {
            name: {
                "entries": entries,
                "bytes": size,
                "hits": c.hits,
                "misses": c.misses,
                "evictions": c.evictions,
                "expected": c.expected,
                "hit_rate": c.hit_rate,
            }
            for name, (entries, size, c) in rows.items()
        }
