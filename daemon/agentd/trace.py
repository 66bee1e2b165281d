"""Recording what a render actually reads.

Every render runs inside ``tracing()``; the data views below and the template-loading hook in
``render.py`` call ``record(node, fingerprint)`` for each input they hand out. The trace is the
render's exact input set: static analysis cannot see a dynamic include or which agent keys a
template touches, a trace can. A render is a pure function of its trace, which is what makes it
safe to reuse while every traced input keeps its fingerprint.
"""

from __future__ import annotations

import contextvars
import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import orjson

#: Fingerprint of an input that does not exist (a missing key, template or trait): reading
#: "nothing" is a dependency too, so creating the thing later invalidates the render.
MISSING = b""

_ORJSON_OPTS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def fingerprint(value: Any) -> bytes:
    """A 16-byte content hash of a YAML value or of raw bytes."""
    if not isinstance(value, bytes):
        try:
            value = orjson.dumps(value, option=_ORJSON_OPTS)
        except TypeError:  # keys orjson cannot sort (mixed types): repr is stable enough
            value = repr(value).encode()
    return hashlib.blake2b(value, digest_size=16).digest()


class Trace:
    """The inputs one render read: graph node id -> fingerprint at read time."""

    __slots__ = ("reads", "outer")

    def __init__(self, outer: Trace | None = None) -> None:
        self.reads: dict[str, bytes] = {}
        #: The trace of the render this one runs inside (a fragment's caller), if any.
        self.outer = outer


_current: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("agentd_trace", default=None)


def record(node: str, fp: bytes) -> None:
    trace = _current.get()
    if trace is not None:
        trace.reads[node] = fp


def reads_so_far() -> dict[str, bytes]:
    """What the render under way has read up to now, its fragments' reads included: for a
    render that stops early (it read a catalog entry that does not load), what decided it."""
    reads: dict[str, bytes] = {}
    trace = _current.get()
    while trace is not None:
        reads.update(trace.reads)
        trace = trace.outer
    return reads


@contextmanager
def tracing() -> Iterator[Trace]:
    """Collect the reads of the code inside the block into a fresh ``Trace``."""
    trace = Trace(_current.get())
    token = _current.set(trace)
    try:
        yield trace
    finally:
        _current.reset(token)


class TrackedMapping:
    """A read-only view of a mapping that records each top-level key as it is read.

    Jinja resolves ``agent.name`` as ``getattr`` then ``[...]``; defining no attributes of our
    own keeps every key reachable both ways. Values below the top level are handed out as they
    are: one key is the unit of invalidation.
    """

    __slots__ = ("_data", "_prefix", "_fps", "fingerprint", "label")

    def __init__(
        self, data: Mapping[str, Any], prefix: str, fps: Mapping[str, bytes], fp: bytes, label: str = "mapping"
    ) -> None:
        self._data = data
        self._prefix = prefix
        self._fps = fps
        #: How errors name this mapping ("agent 'x'").
        self.label = label
        #: Fingerprint of the whole mapping, for cache keys built from it (see ``include_cached``).
        self.fingerprint = fp

    def __getitem__(self, key: str) -> Any:
        record(self._prefix + str(key), self._fps.get(key, MISSING))
        return self._data[key]

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            record(self._prefix + key, self._fps.get(key, MISSING))
        return key in self._data

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def _read_all(self) -> None:
        record(self._prefix + "*", self.fingerprint)

    def __iter__(self) -> Iterator[str]:
        self._read_all()
        return iter(self._data)

    def __len__(self) -> int:
        self._read_all()
        return len(self._data)

    def keys(self) -> Any:
        self._read_all()
        return self._data.keys()

    def items(self) -> Any:
        self._read_all()
        return self._data.items()

    def values(self) -> Any:
        self._read_all()
        return self._data.values()

    def __repr__(self) -> str:
        return self.label


class TrackedValue:
    """A read-only view of a mapping or sequence that records one node on any read: for derived
    values (an agent's resolved traits, its section list) whose parts change together."""

    __slots__ = ("_value", "_node", "fingerprint", "_also")

    def __init__(self, value: Any, node: str, fp: bytes, also: tuple[tuple[str, bytes], ...] = ()) -> None:
        self._value = value
        self._node = node
        self.fingerprint = fp
        self._also = also  # further inputs the value is derived from

    def _read(self) -> Any:
        record(self._node, self.fingerprint)
        for node, fp in self._also:
            record(node, fp)
        return self._value

    def __repr__(self) -> str:
        return self._node

    def __getitem__(self, key: Any) -> Any:
        return self._read()[key]

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        value = self._read()
        if isinstance(value, Mapping) and key in value:
            return value[key]
        return getattr(value, key)

    def __contains__(self, key: object) -> bool:
        return key in self._read()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._read())

    def __len__(self) -> int:
        return len(self._read())

    def __bool__(self) -> bool:
        return bool(self._read())
