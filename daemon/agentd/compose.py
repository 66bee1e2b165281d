"""Composition without a template pass: an agent's output as literal bytes around its sections.

The base template runs once per agent state with a stand-in (a "slot") for each section's
content; the output, split at the slots, is the agent's *skeleton*. Composing is then a
``bytes.join`` of the skeleton's pieces and the sections' bytes: ~5 µs for a 540 KB agent
instead of a ~1 ms Jinja pass that copies every section through ``str`` twice. A section edit
recomposes by concatenation; the skeleton is rendered again only when what it read changes.

This is only valid when the template copies ``content`` verbatim. Two safeguards, and any doubt
falls back to the full render (never wrong output, only slower):

- a slot records every operation on it other than ``str()`` (``|length``, ``|indent``, ``|upper``,
  truthiness, slicing, methods, comparisons): inspected content cannot be a stand-in;
- the skeleton is rendered twice with slots of different length, case, words and lines; C code
  that reads the text without going through Python methods (a regex in ``|wordcount``) shows as
  a difference between the two, and the skeleton is refused.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from .cache import Rendered
from .trace import fingerprint

# Distinct per process, so a section's own text cannot look like a slot.
_NONCE = os.urandom(6).hex()
#: Two spellings of each slot: different length, case, word and line counts.
_SPELLINGS = ("\x00agentd-slot-{i}-{n}\x00", "\x00AGENTD SLOT {i} {n}\nWITH MORE WORDS\x00")


class _Slot(str):
    """A section's content while the skeleton renders: ``str()`` gives the marker text, anything
    else marks the slot as inspected."""

    def __new__(cls, text: str, inspected: list[str]) -> _Slot:
        slot = super().__new__(cls, text)
        slot.__dict__["inspected"] = inspected
        return slot

    def __getattribute__(self, name: str) -> Any:
        if name != "__dict__":
            object.__getattribute__(self, "__dict__")["inspected"].append(name)
        return super().__getattribute__(name)

    def __str__(self) -> str:
        return str.__str__(self)


def _inspecting(name: str) -> Callable[..., Any]:
    base = getattr(str, name)

    def method(self: _Slot, *args: Any) -> Any:
        object.__getattribute__(self, "__dict__")["inspected"].append(name)
        return base(self, *args)

    method.__name__ = name
    return method


# Operations Python runs on the type, not through __getattribute__.
for _name in (
    "__len__ __getitem__ __iter__ __contains__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ __hash__ "
    "__add__ __radd__ __mul__ __rmul__ __mod__ __rmod__ __format__ __bool__ __reduce__ __reduce_ex__"
).split():
    if hasattr(str, _name):
        setattr(_Slot, _name, _inspecting(_name))


@dataclasses.dataclass(frozen=True)
class Skeleton:
    """The base template's output between the sections: ``parts[0] slot parts[1] slot ...``."""

    parts: tuple[bytes, ...]
    #: Which section's content fills each gap (a template may reorder, repeat or omit them).
    slots: tuple[int, ...]
    #: What the skeleton render read (agent keys, templates, catalog), not the sections.
    reads: dict[str, bytes]
    #: The sections' metadata it was rendered for (number, title, anchor, template).
    metas_fp: bytes
    #: Identifies parts + slots: with the sections' digests it names the output without hashing
    #: it (hashing 540 KB costs as much as writing it).
    digest: bytes = b""

    def output_digest(self, section_digests: Sequence[bytes]) -> bytes:
        return fingerprint(b"skeleton\0" + self.digest + b"".join(section_digests))

    def spans(self, contents: Sequence[bytes], digests: Sequence[bytes]) -> dict[bytes, tuple[int, int]]:
        """Where each section's bytes sit in ``join(contents)``, by section digest."""
        spans: dict[bytes, tuple[int, int]] = {}
        offset = len(self.parts[0])
        for slot, part in zip(self.slots, self.parts[1:], strict=True):
            end = offset + len(contents[slot])
            spans.setdefault(digests[slot], (offset, end))
            offset = end + len(part)
        return spans

    def join(self, contents: Sequence[bytes]) -> bytes:
        pieces = [self.parts[0]]
        for slot, part in zip(self.slots, self.parts[1:], strict=True):
            pieces.append(contents[slot])
            pieces.append(part)
        return b"".join(pieces)

    def fill(self, contents: Sequence[bytes], digests: Sequence[bytes]) -> tuple[bytes, Layout]:
        """The output with these sections, and where they sit in it (its digest included)."""
        digest = self.output_digest(digests)
        return self.join(contents), Layout(digest, self.spans(contents, digests))


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the sections sit in an output agentd wrote (its digest): while the file is
    unchanged since (size and mtime, as the manifest records them), a section the memory budget
    dropped is a slice of it. Reading one 540 KB file costs less than fetching and checksumming
    eight 60 KB sections from the store."""

    digest: bytes
    spans: dict[bytes, tuple[int, int]]

    def to_bytes(self) -> bytes:
        """16-byte digest, then per section its 16-byte digest, start and end (the persistent
        store keeps it with the composition, so workers can compose right after a restart)."""
        return self.digest + b"".join(d + _SPAN.pack(*span) for d, span in self.spans.items())

    @classmethod
    def from_bytes(cls, data: bytes) -> Layout:
        step = 16 + _SPAN.size
        spans = {data[i : i + 16]: _SPAN.unpack_from(data, i + 16) for i in range(16, len(data), step)}
        return cls(data[:16], spans)


_SPAN = struct.Struct("<QQ")


def render_skeleton(render: Callable[[list[str]], Rendered], count: int, metas_fp: bytes) -> Skeleton | None:
    """Render the skeleton through ``render(contents)`` (the base template with those section
    contents); None when the template does more with a section's content than copy it."""
    layouts = []
    reads: dict[str, bytes] = {}
    for spelling in _SPELLINGS:
        inspected: list[str] = []
        markers = [spelling.format(i=i, n=_NONCE) for i in range(count)]
        rendered = render([_Slot(m, inspected) for m in markers])
        if inspected:
            return None
        reads = rendered.reads
        layouts.append(_split(rendered.data, [m.encode() for m in markers]))
    if layouts[0] != layouts[1]:
        return None
    parts, slots = layouts[0]
    digest = fingerprint(orjson.dumps([[p.hex() for p in parts], slots]))
    return Skeleton(parts, slots, reads, metas_fp, digest)


def _split(data: bytes, markers: list[bytes]) -> tuple[tuple[bytes, ...], tuple[int, ...]]:
    if not markers:
        return (data,), ()
    index = {m: i for i, m in enumerate(markers)}
    pieces = re.split(b"(" + b"|".join(map(re.escape, markers)) + b")", data)
    return tuple(pieces[0::2]), tuple(index[m] for m in pieces[1::2])
