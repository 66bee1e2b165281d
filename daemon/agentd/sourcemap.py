"""Source maps: which template line, reached how, and which YAML value made each output line.

``agentd explain`` renders an agent a second time in a tracing mode the normal path never
touches: a separate Jinja environment whose code generator routes every piece of output
through ``environment.agentd_out(template, line, value)``. What comes back is ``Traced`` text:
a ``str`` that carries two span lists, one naming the template step each character came from
(with the include/extends/block/macro chain, read off the live Python frames), one naming
the YAML value it came from. The YAML data is handed to the templates as a copy whose
strings are ``Traced`` with their file, line and path, so a value's span follows it through
filters, ``~``, ``join`` and macro calls to the line it lands on.

Nothing here runs during a build: the normal environment, its compiled code and its caches
are untouched, and a map is made only when asked for (and kept by the daemon for the
agent's current output).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import errno
import functools
import gc
import itertools
import os
import re
import sys
import textwrap
import types
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jinja2
import jinja2.runtime
import yaml
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.filters import make_attrgetter
from jinja2.utils import _PassArg, pass_eval_context

from . import graph as g
from . import plan as plans
from .cache import Caches
from .catalog import TrackedCatalog
from .console import cut
from .exceptions import AgentdError, ConfigError, ExplainError
from .output import output_name
from .render import _MACRO_INVOKE, BASE_TEMPLATE, _Environment, _Loader, _Template
from .trace import TrackedMapping, fingerprint, tracing
from .workspace import Workspace, compose, source_line

if TYPE_CHECKING:
    from .build import Engine


# -- where text came from -----------------------------------------------------------------
class Step(NamedTuple):
    """One template line on the way to an output character: the template, its line, and how
    it led to the next step (``extends``, ``block body``, ``include``, ``macro t.table``...;
    "" for the line that emitted the text)."""

    template: str
    line: int
    how: str


class Origin(NamedTuple):
    """A template origin: the section being rendered (None: the agent's base template) and
    the steps from the render's first template to the emitting line, innermost last."""

    section: str | None
    steps: tuple[Step, ...]


class Datum(NamedTuple):
    """A YAML value: its file, the line its node starts on, and its path in the data."""

    file: str
    line: int
    path: str


#: (start, end, origin): characters [start, end) came from origin.
Span = tuple[int, int, Any]


class Traced(str):
    """Text with the origins of its characters: ``t`` template spans, ``d`` data spans, each
    sorted and non-overlapping. Methods templates call keep them; anything else gives a plain
    ``str`` and the enclosing output tag names the template line alone."""

    t: list[Span]
    d: list[Span]

    def strip(self, chars: str | None = None) -> str:
        return remap(self, str.strip(self, chars))

    def lstrip(self, chars: str | None = None) -> str:
        return remap(self, str.lstrip(self, chars))

    def rstrip(self, chars: str | None = None) -> str:
        return remap(self, str.rstrip(self, chars))

    def lower(self) -> str:
        return remap(self, str.lower(self))

    def upper(self) -> str:
        return remap(self, str.upper(self))

    def capitalize(self) -> str:
        return remap(self, str.capitalize(self))

    def title(self) -> str:
        return remap(self, str.title(self))

    def replace(self, old: str, new: str, count: int = -1) -> str:  # type: ignore[override]
        return remap(self, str.replace(self, old, new, count))

    def __add__(self, other: str) -> str:
        return concat((self, other))

    def __radd__(self, other: str) -> str:
        return concat((other, self))


class _Number:
    """Mixin for a YAML number that names its value: ``str()`` of it gets a data span."""

    datum: Datum


class _Int(_Number, int):
    pass


class _Float(_Number, float):
    pass


def traced(text: str, t: list[Span], d: list[Span]) -> Traced:
    out = Traced(text)
    out.t = t
    out.d = d
    return out


def _as_text(value: Any) -> Traced:
    """``str(value)`` with the spans it has: its own, or a number's datum."""
    if isinstance(value, Traced):
        return value
    text = str(value)
    if isinstance(value, _Number) and not isinstance(value, bool):
        return traced(text, [], [(0, len(text), value.datum)])
    return traced(text, [], [])


def concat(items: Iterable[Any]) -> Traced:
    """``"".join`` keeping every piece's spans (Jinja's ``concat`` and ``str_join``)."""
    parts: list[str] = []
    t: list[Span] = []
    d: list[Span] = []
    pos = 0
    for item in items:
        piece = _as_text(item)
        if pos:
            t += [(a + pos, b + pos, o) for a, b, o in piece.t]
            d += [(a + pos, b + pos, o) for a, b, o in piece.d]
        else:
            t += piece.t
            d += piece.d
        parts.append(piece)
        pos += len(piece)
    if len(parts) == 1:
        return parts[0]  # type: ignore[return-value]
    return traced("".join(parts), t, d)


def _contiguous(spans: list[Span]) -> bool:
    return all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))


def _fill(spans: list[Span], length: int, origin: Origin) -> list[Span]:
    """``spans`` with every character they leave out given to ``origin``."""
    out: list[Span] = []
    pos = 0
    for a, b, o in spans:
        if a > pos:
            out.append((pos, a, origin))
        out.append((a, b, o))
        pos = b
    if pos < length:
        out.append((pos, length, origin))
    return out


def _shift(spans: list[Span], offset: int, length: int) -> list[Span]:
    """Spans moved by ``offset`` and clipped to ``[0, length)``."""
    out = []
    for a, b, o in spans:
        a, b = max(a + offset, 0), min(b + offset, length)
        if a < b:
            out.append((a, b, o))
    return out


def _affix(before: str, after: str) -> tuple[int, int]:
    """Lengths of the common prefix and suffix, ignoring case, not overlapping."""
    limit = min(len(before), len(after))
    p = 0
    while p < limit and before[p].lower() == after[p].lower():
        p += 1
    s = 0
    while s < limit - p and before[-1 - s].lower() == after[-1 - s].lower():
        s += 1
    return p, s


def _stretch(spans: list[Span], p: int, s: int, n_before: int, n_after: int) -> list[Span]:
    """Spans of a text whose middle was rewritten: the common prefix ``p`` keeps them, the
    common suffix ``s`` shifts them, the middle maps proportionally."""
    mid_before, mid_after = n_before - p - s, n_after - p - s
    shift = n_after - n_before

    def move(x: int) -> int:
        if x <= p:
            return x
        if x >= n_before - s:
            return x + shift
        return p + (x - p) * mid_after // max(mid_before, 1)

    out = []
    for a, b, o in spans:
        a2, b2 = move(a), move(b)
        if a2 < b2:
            out.append((a2, b2, o))
    return out


def remap(before: Traced, after: str) -> str:
    """The spans of ``before`` carried over to ``after``, a transformation of it (a filter or
    a string method): kept when the characters stay in place (same text, same length: case),
    shifted when one contains the other (trim, quoting), stretched when they share most of a
    prefix and suffix (an escaped character). Otherwise ``after`` is returned plain: it is
    derived from the value without showing it (a fence built from a body's backticks)."""
    if isinstance(after, Traced) or not isinstance(after, str):
        return after
    n_before, n_after = len(before), len(after)
    if after == before or n_after == n_before:
        return traced(after, before.t, before.d)
    at = before.find(after)
    if at >= 0:
        return traced(after, _shift(before.t, -at, n_after), _shift(before.d, -at, n_after))
    at = after.find(before) if n_before else -1
    if at >= 0:
        return traced(after, _shift(before.t, at, n_after), _shift(before.d, at, n_after))
    p, s = _affix(before, after)
    if 2 * (p + s) < min(n_before, n_after):
        return after
    return traced(after, _stretch(before.t, p, s, n_before, n_after), _stretch(before.d, p, s, n_before, n_after))


# -- the tracing environment --------------------------------------------------------------
class _CodeGenerator(CodeGenerator):
    """Jinja's code generator with every output child wrapped in
    ``environment.agentd_out(name, line, ...)`` instead of ``str(...)``, template data too
    (the line given is where it starts: ``agentd_out`` counts the line ends in it)."""

    def visit_Extends(self, node: nodes.Extends, frame: Frame) -> None:
        super().visit_Extends(node, frame)
        self.writeline(f"agentd_extends_line = {node.lineno}")  # a local of root (see ``_Tracer._line``)

    def _output_child_to_const(self, node: nodes.Expr, frame: Frame, finalize: Any) -> str:
        raise nodes.Impossible()  # every piece goes through ``agentd_out``, constants too

    def _output_child_pre(self, node: nodes.Expr, frame: Frame, finalize: Any) -> None:
        self.write(f"environment.agentd_out({self.name!r}, {node.lineno}, ")


class _TracingTemplate(_Template):
    @classmethod
    def _from_namespace(cls, environment: jinja2.Environment, namespace: Any, globals: Any) -> jinja2.Template:
        # ``~`` compiles to the runtime's ``str_join``: joined here, the spans stay.
        namespace["str_join"] = concat
        return super()._from_namespace(environment, namespace, globals)


def _tracing_filter(func: Callable[..., Any]) -> Callable[..., Any]:
    """A filter whose plain-``str`` result gets the spans of its input (``remap``)."""
    skip = 0 if _PassArg.from_obj(func) is None else 1

    @functools.wraps(func)  # (keeps ``jinja_pass_arg``)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = func(*args, **kwargs)
        value = args[skip] if len(args) > skip else None
        if type(result) is str and isinstance(value, Traced):
            return remap(value, result)
        return result

    return wrapper


def _tracing_join(func: Callable[..., Any]) -> Callable[..., Any]:
    @pass_eval_context
    def join(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: str | int | None = None) -> Any:
        items = list(value)
        if attribute is not None:
            items = list(map(make_attrgetter(eval_ctx.environment, attribute), items))
        text = func(eval_ctx, items, d)
        if type(text) is not str:
            return text
        joined = concat(x for i, item in enumerate(items) for x in ((d, item) if i else (item,)))
        return joined if joined == text else text

    return join


class _TracingLoader(_Loader):
    """The workspace's templates, recompiled when their source changed since (this
    environment lives as long as the daemon, beside the normal one)."""

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str | None, Callable[[], bool]]:
        source, filename, _ = super().get_source(environment, template)
        fps = self.workspace.template_fps
        fp = fps.get(template)
        return source, filename, lambda: fps.get(template) == fp


class _TracingEnvironment(_Environment):
    code_generator_class = _CodeGenerator
    template_class = _TracingTemplate
    tracer: _Tracer

    def agentd_out(self, name: str, line: int, value: Any) -> Traced:
        if type(value) is str:  # template text, most of the calls: a span per line it runs over
            frame = sys._getframe(1)
            end = value.find("\n")
            if end < 0 or end == len(value) - 1:
                return traced(value, [(0, len(value), self.tracer.origin(name, line, frame))], [])
            spans: list[Span] = []
            start = 0
            while start < len(value):
                end = value.find("\n", start)
                end = len(value) if end < 0 else end + 1
                spans.append((start, end, self.tracer.origin(name, line, frame)))
                start, line = end, line + 1
            return traced(value, spans, [])
        text = _as_text(value)
        t = text.t
        if t and t[0][0] == 0 and t[-1][1] == len(text) and _contiguous(t):
            return text  # a macro's or an include's output: every character has its origin
        origin = self.tracer.origin(name, line, sys._getframe(1))
        return traced(text, _fill(t, len(text), origin), text.d)


class _Tracer:
    """Turns the live frames of one render into origins (interned: a line inside a loop
    gives the same origin every time)."""

    def __init__(self, env: _TracingEnvironment) -> None:
        self.env = env
        self.section: str | None = None
        self.stop: types.FrameType | None = None
        self._origins: dict[tuple[Any, ...], Origin] = {}
        self._outer: dict[types.FrameType, tuple[Step, ...]] = {}
        self._lines: dict[tuple[types.CodeType, int], int] = {}
        self._include_cached: types.CodeType | None = None

    def origin(self, name: str, line: int, frame: types.FrameType) -> Origin:
        # The frames around a template frame do not change while it runs (Jinja's render
        # functions are generators resumed only by their caller): walked once per frame.
        outer = self._outer.get(frame)
        if outer is None:
            outer = self._outer[frame] = self._walk(name, frame)
        key = (self.section, outer, name, line)
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = Origin(self.section, (*outer, Step(name, line, "")))
        return origin

    def _walk(self, name: str, frame: types.FrameType) -> tuple[Step, ...]:
        """The steps that led to ``frame``, outermost first."""
        steps: list[Step] = []
        inner_code = frame.f_code.co_name
        inner_name = name
        macro: str | None = None
        cached = False
        f = frame.f_back
        while f is not None and f is not self.stop:
            code = f.f_code
            template = f.f_globals.get("__jinja_template__")
            if code is _MACRO_INVOKE:
                macro = getattr(f.f_locals.get("self"), "name", None)
            elif code is self._include_cached:
                cached = True
            elif isinstance(template, jinja2.Template) and template.environment is self.env:
                how = _how(inner_code, inner_name, macro, cached, f)
                steps.append(Step(template.name or "?", self._line(template, f, how), how))
                inner_code, inner_name, macro, cached = code.co_name, template.name or "?", None, False
            f = f.f_back
        return tuple(reversed(steps))

    def _line(self, template: jinja2.Template, frame: types.FrameType, how: str) -> int:
        if how == "extends":  # (Jinja's line table gives the last statement before the parent's call)
            return int(frame.f_locals.get("agentd_extends_line", 0)) or template.get_corresponding_lineno(
                frame.f_lineno
            )
        key = (frame.f_code, frame.f_lineno)
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = template.get_corresponding_lineno(frame.f_lineno)
        return line

    def reset(self) -> None:
        """Forget the frames of the last render (they hold its locals)."""
        self._outer.clear()


def _how(inner_code: str, inner_name: str, macro: str | None, cached: bool, frame: types.FrameType) -> str:
    """How the template frame ``frame`` led to the step inside it."""
    if inner_code == "macro":  # (the body of a ``{% call %}`` block is an unnamed macro, ``caller``)
        return f"macro {macro}" if macro else "call block"
    if inner_code.startswith("block_"):
        return f"block {inner_code[len('block_') :]}"
    if inner_code == "loop":  # a ``{% for ... recursive %}`` calling ``loop(...)``
        return "recursive loop"
    if cached:
        return "include_cached"
    parent = frame.f_locals.get("parent_template")
    if isinstance(parent, jinja2.Template) and parent.name == inner_name:
        return "extends"
    return "include"


# -- traced data ----------------------------------------------------------------------------
def traced_data(value: Any, node: yaml.Node | None, file: str, path: str = "") -> Any:
    """A copy of YAML data whose strings (and numbers) name their file, line and path. The
    nodes come from composing the file again; a value that no longer matches its node (the
    file changed since it was loaded) is left unnamed rather than named wrongly."""
    if isinstance(value, dict):
        keyed = dict(_pairs(node)) if isinstance(node, yaml.MappingNode) else {}
        return {k: traced_data(v, keyed.get(str(k)), file, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        items = node.value if isinstance(node, yaml.SequenceNode) and len(node.value) == len(value) else []
        return [traced_data(v, items[i] if items else None, file, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(node, yaml.ScalarNode):
        return value
    datum = Datum(file, node.start_mark.line + 1, path)
    if isinstance(value, str):
        return traced(value, [], [(0, len(value), datum)]) if node.value == value else value
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    number: _Number = _Int(value) if isinstance(value, int) else _Float(value)
    number.datum = datum
    return number


def _pairs(node: yaml.MappingNode) -> Iterator[tuple[str, yaml.Node]]:
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode):
            yield key.value, value


class _TracedEntries(Mapping[str, Mapping[str, Any]]):
    """The catalog's entries, each made traced the first time a template reads it."""

    def __init__(self, ws: Workspace, traced_source: Callable[[str, Any], Any]) -> None:
        self._ws = ws
        self._traced_source = traced_source
        self._done: dict[str, Mapping[str, Any]] = {}

    def __getitem__(self, agent_id: str) -> Mapping[str, Any]:
        entry = self._done.get(agent_id)
        if entry is None:
            source = self._ws.agents[agent_id]
            data = self._traced_source(source.path, source.data)
            plain = self._ws.catalog_entries[agent_id]
            # (a value the workspace filled in, the name defaulting to the id, is unnamed)
            entry = self._done[agent_id] = {k: data[k] if k in data and data[k] == v else v for k, v in plain.items()}
        return entry

    def __iter__(self) -> Iterator[str]:
        return iter(self._ws.catalog_entries)

    def __len__(self) -> int:
        return len(self._ws.catalog_entries)


# -- maps -----------------------------------------------------------------------------------
class _Layer:
    """One layer of a map's spans, compact (a daemon keeps maps): starts and ends as arrays,
    adjacent spans of one origin joined (a loop's pieces of one line)."""

    __slots__ = ("starts", "ends", "origins")

    def __init__(self, spans: Iterable[Span]) -> None:
        starts, ends, origins = array("l"), array("l"), list[Any]()
        for a, b, o in spans:
            if origins and ends[-1] == a and origins[-1] is o:
                ends[-1] = b
            else:
                starts.append(a)
                ends.append(b)
                origins.append(o)
        self.starts, self.ends, self.origins = starts, ends, origins

    def __iter__(self) -> Iterator[Span]:
        return zip(self.starts, self.ends, self.origins, strict=True)

    def overlapping(self, start: int, end: int) -> list[Span]:
        """The spans with characters in [start, end)."""
        starts, ends, origins = self.starts, self.ends, self.origins
        i = max(bisect.bisect_right(starts, start) - 1, 0)
        out = []
        while i < len(starts) and starts[i] < end:
            if ends[i] > start:
                out.append((starts[i], ends[i], origins[i]))
            i += 1
        return out


#: Per template line, the output line ranges it made, as ``array("l", [first, last, ...])``.
Index = dict[tuple[str, int], "array[int]"]


@dataclasses.dataclass
class SourceMap:
    """One agent's output with the origins of its characters."""

    agent: str
    output: str  # "out/<id>.md"
    text: str
    digest: bytes  # of the output's bytes
    line_starts: array[int]
    t: _Layer
    d: _Layer
    #: Whether the output exists on disk (the map is of what a build would write otherwise).
    on_disk: bool = True
    #: Fingerprints of the texts its trace read (``Explainer._trace``): its line numbers come from them.
    inputs: dict[str, bytes] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, agent: str, output: str, text: Traced) -> SourceMap:
        starts = array("l", [0])
        find = text.find
        at = find("\n")
        while at >= 0 and at + 1 < len(text):
            starts.append(at + 1)
            at = find("\n", at + 1)
        return cls(agent, output, str(text), fingerprint(text.encode()), starts, _Layer(text.t), _Layer(text.d))

    @property
    def lines(self) -> int:
        return len(self.line_starts)

    def _bounds(self, line: int) -> tuple[int, int]:
        start = self.line_starts[line - 1]
        end = self.line_starts[line] if line < len(self.line_starts) else len(self.text)
        return start, end

    def line_text(self, line: int) -> str:
        start, end = self._bounds(line)
        return self.text[start:end].rstrip("\n")

    def _shown(self, layer: _Layer, start: int, end: int) -> list[Span]:
        """The spans that give line [start, end) its visible characters (its line end when it
        has none)."""
        text = self.text
        found = layer.overlapping(start, end)
        visible = [s for s in found if text[max(s[0], start) : min(s[1], end)].strip()]
        return visible or found

    def _contributors(self, line: int) -> dict[Origin, list[int]]:
        """The template origins that wrote line ``line``, with the columns they wrote."""
        start, end = self._bounds(line)
        contributors: dict[Origin, list[int]] = {}
        for a, b, origin in self._shown(self.t, start, end):
            cols = contributors.setdefault(origin, [max(a, start) - start, min(b, end) - start])
            cols[1] = min(b, end) - start
        return contributors

    def explain(self, line: int) -> dict[str, Any]:
        """What made output line ``line`` (1-based)."""
        start, end = self._bounds(line)
        contributors = self._contributors(line)
        data: dict[Datum, None] = {}
        for a, b, datum in self._shown(self.d, start, end):
            if self.text[max(a, start) : min(b, end)].strip():
                data[datum] = None
        section = next((o.section for o in contributors if o.section is not None), None)
        return {
            "output": self.output,
            "line": line,
            "text": self.line_text(line),
            "section": section,
            "templates": [
                {"columns": cols, "block": self._block(origin, line), "steps": origin.steps}
                for origin, cols in contributors.items()
            ],
            "data": list(data),
        }

    def index(self) -> Index:
        """Per template line, the output line ranges it wrote or led to: the lines whose
        explanation has it among its steps (one pass over the spans, not a search per line)."""
        text, starts = self.text, self.line_starts
        blank = [not self.line_text(n).strip() for n in range(1, self.lines + 1)]
        by_origin: dict[Origin, list[int]] = {}  # each origin's lines, ascending (spans are)
        n = 1
        for a, b, origin in self.t:
            while n < len(starts) and starts[n] <= a:
                n += 1
            line = n  # the line span [a, b) starts on; it may run on over the next ones
            while True:
                start, end = self._bounds(line)
                if blank[line - 1] or text[max(a, start) : min(b, end)].strip():
                    lines = by_origin.setdefault(origin, [])
                    if not lines or lines[-1] != line:
                        lines.append(line)
                if b <= end or line == len(starts):
                    break
                line += 1
        # Ranges per origin first, then merged per step: a step on the way to thousands of
        # lines (a section's block) merges a few ranges per origin, not every line.
        hit: dict[tuple[str, int], list[list[int]]] = {}
        for origin, lines in by_origin.items():
            ranges = _ranges(lines)
            for step in origin.steps:
                hit.setdefault((step.template, step.line), []).extend(ranges)
        return {key: array("l", itertools.chain.from_iterable(_union(ranges))) for key, ranges in hit.items()}

    def _block(self, origin: Origin, line: int) -> list[int]:
        """The run of lines around ``line`` that ``origin`` has characters on."""
        first = last = line
        while first > 1 and self._has(origin, first - 1):
            first -= 1
        while last < self.lines and self._has(origin, last + 1):
            last += 1
        return [first, last]

    def _has(self, origin: Origin, line: int) -> bool:
        start, end = self._bounds(line)
        return any(o == origin for _, _, o in self.t.overlapping(start, end))


_BLOCK_SCALAR = re.compile(r"[|>][-+0-9]*\s*$")


def _value_line(text: str, line: int) -> str:
    """The YAML line a value starts on; for a block scalar (``key: >-``) with its first line
    of text, which is what a person recognises."""
    source = source_line(text, line) or ""
    if _BLOCK_SCALAR.search(source):
        source = f"{source.rstrip()} {(source_line(text, line + 1) or '').strip()}"
    return source


def _union(ranges: list[list[int]]) -> list[list[int]]:
    """Line ranges sorted, overlapping and adjacent ones joined."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _ranges(lines: Sequence[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for n in lines:
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return out


# -- the explainer ----------------------------------------------------------------------------
#: Maps an explainer keeps (by agent, least recently used dropped): one is a few MB.
KEPT_MAPS = 16


class Explainer:
    """Source maps for an engine's agents, rendered on demand and kept while the agent's
    output, and every template and source its trace read, stay the same."""

    def __init__(self, engine: Engine, built: bool = False) -> None:
        self.engine = engine
        #: Whether the engine has built (its graph holds what every render read): the reverse
        #: question then visits only the agents a change to the template would re-render.
        self.built = built
        self._env: _TracingEnvironment | None = None
        self._maps: OrderedDict[str, SourceMap] = OrderedDict()
        #: Source texts read by the trace or check under way, by path.
        self._read: dict[str, str] = {}
        #: Per source file: (its data, its text, the traced copy), for ``_traced_source``.
        self._traced: dict[str, tuple[Any, str, Any]] = {}
        #: Per agent: (output digest, inputs, template line -> output line ranges): small, so
        #: kept for every agent the reverse question has visited.
        self._indexes: dict[str, tuple[bytes, dict[str, bytes], Index]] = {}

    def _environment(self) -> _TracingEnvironment:
        if self._env is None:
            normal = self.engine.renderer.env
            env = _TracingEnvironment(
                loader=_TracingLoader(self.engine.workspace),
                undefined=normal.undefined,
                autoescape=False,
                trim_blocks=True,
                lstrip_blocks=True,
                keep_trailing_newline=True,
                auto_reload=True,
                cache_size=-1,
            )
            env.caches = Caches(None)
            env.fingerprints = self.engine.workspace.template_fps
            env.last_ast = {}
            env.concat = concat  # type: ignore[method-assign]
            env.filters.update(normal.filters)
            env.filters = {k: _tracing_filter(f) for k, f in env.filters.items()}
            env.filters["join"] = _tracing_join(normal.filters["join"])
            env.globals.update(normal.globals)
            env.globals["include_cached"] = self._include_cached
            env.tracer = _Tracer(env)
            env.tracer._include_cached = self._include_cached.__code__
            self._env = env
        return self._env

    def _include_cached(self, name: str, **inputs: Any) -> str:
        env = self._environment()
        return env.get_template(name).render(inputs)

    def output_of(self, target: str) -> str:
        """The agent id an output is named by: ``out/x.md`` (relative to the root), ``x.md`` or ``x``."""
        engine = self.engine
        folder, _, name = target.replace("\\", "/").rpartition("/")
        if folder and (engine.config.root / folder).resolve() != engine.config.output_path.resolve():
            raise ConfigError(f"{target}: not in the output folder {engine.config.output_dir}/")
        agent = name[: -len(".md")] if name.endswith(".md") else name
        if agent not in engine.workspace.agents and agent not in engine.workspace.agent_errors:
            known = ", ".join(sorted(engine.workspace.agents)[: plans.KNOWN_SHOWN]) or "none"
            raise ConfigError(f"{target}: no such output; expected out/<agent>.md of an agent ({known})")
        return agent

    def source_map(self, agent: str) -> SourceMap:
        """The map of ``agent``'s output: kept while the output and the texts its line numbers
        come from stay the same."""
        engine = self.engine
        errors = [*engine.agent_errors.get(agent, ()), *filter(None, [engine.workspace.agent_errors.get(agent)])]
        if errors or agent not in engine.plans:
            raise self._refused(agent, errors[0] if errors else None)
        data = self._output_bytes(agent)
        kept = self._maps.get(agent)
        if kept is not None and self._current(data, kept.digest, kept.inputs):
            self._maps.move_to_end(agent)
            return kept
        try:
            text, inputs = self._trace(agent)
        except AgentdError as exc:  # what the build met too (a blocked catalog read...)
            raise self._refused(agent, exc) from None
        source_map = SourceMap.of(agent, f"{engine.config.output_dir}/{output_name(agent)}", text)
        if data is not None and data != source_map.text.encode():
            raise ExplainError(
                f"{source_map.output} is not what its sources give now (edited by hand, or a build "
                "is pending): run `agentd build`, then explain"
            )
        source_map.on_disk = data is not None
        source_map.inputs = inputs
        self._maps[agent] = source_map
        while len(self._maps) > KEPT_MAPS:
            self._maps.popitem(last=False)
        self._indexes[agent] = (source_map.digest, source_map.inputs, source_map.index())
        return source_map

    def _output_bytes(self, agent: str) -> bytes | None:
        """The output on disk; None when there is none. A link there is not followed: agentd
        never reads outside its workspace, and it writes files, not links."""
        path = self.engine.output.path / output_name(agent)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            where = f"{self.engine.config.output_dir}/{output_name(agent)}"
            if exc.errno == errno.ELOOP:
                raise ExplainError(f"{where} is a symbolic link, not an output agentd wrote") from None
            raise ExplainError(f"{where}: cannot read it: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def _current(self, data: bytes | None, digest: bytes, inputs: dict[str, bytes]) -> bool:
        """Whether what was made from an output with ``digest`` still holds."""
        if data is None or fingerprint(data) != digest:
            return False
        self._read = {}
        return self._inputs_now(inputs) == inputs

    def _reverse(self, agent: str) -> Index:
        """The agent's index from template lines to output lines (kept for every agent)."""
        kept = self._indexes.get(agent)
        if kept is not None and self._current(self._output_bytes(agent), kept[0], kept[1]):
            return kept[2]
        self.source_map(agent)
        return self._indexes[agent][2]

    def _text(self, path: str) -> str:
        """A source's text as this trace reads it (its marks give the data's lines)."""
        text = self._read.get(path)
        if text is None:
            text = self._read[path] = self.engine.workspace.source_text(path)
        return text

    def _prune(self) -> None:
        """Forget what was kept for sources and agents that are gone (a daemon runs for weeks)."""
        ws = self.engine.workspace
        live = {a.path for a in ws.agents.values()} | {t.path for t in ws.traits.values()}
        for path in self._traced.keys() - live:
            del self._traced[path]
        for agent in self._indexes.keys() - self.engine.plans.keys():
            del self._indexes[agent]

    def _traced_source(self, path: str, data: Any) -> Any:
        """The traced copy of a source's data: made once per state of the file (a trait is
        read by every agent that has it, an agent's catalog entry by its peers)."""
        text = self._text(path)
        kept = self._traced.get(path)
        if kept is not None and kept[0] is data and kept[1] == text:
            return kept[2]
        copy = traced_data(data, compose(text), path)
        self._traced[path] = (data, text, copy)
        return copy

    def _inputs_now(self, inputs: dict[str, bytes]) -> dict[str, bytes]:
        """The current fingerprint of each text named in ``inputs``."""
        templates = self.engine.workspace.templates
        return {
            key: fingerprint((templates.get(key[2:], "") if key[0] == "t" else self._text(key[2:])).encode())
            for key in inputs
        }

    @staticmethod
    def _refused(agent: str, error: AgentdError | None) -> ExplainError:
        why = f": {str(error).splitlines()[0]}" if error is not None else ""
        return ExplainError(
            f"agent {agent!r} does not build now{why}; its output is its last good one, which explain "
            "cannot map: fix the error first"
        )

    def _trace(self, agent: str) -> tuple[Traced, dict[str, bytes]]:
        """The agent's output rendered traced, and what the render read: every template it
        loaded and every source file it took data from, by the fingerprint of its text now
        (the map holds while they and the output stay the same)."""
        engine = self.engine
        ws = engine.workspace
        env = self._environment()
        tracer = env.tracer
        plan = engine.plans[agent]
        source = plan.agent
        self._read = {}
        self._prune()
        by_data = {id(t.data): t for t in ws.traits.values()}
        traits: dict[str, list[TrackedMapping]] = {}
        for kind, mappings in plan.traits.items():
            traits[kind] = []
            for m in mappings:
                trait = by_data[id(m._data)]
                data = self._traced_source(trait.path, trait.data)
                traits[kind].append(TrackedMapping(data, g.trait_prefix(trait.ref), trait.fps, trait.fp, m.label))
        agent_source = dataclasses.replace(source, data=self._traced_source(source.path, source.data))
        traced_plan = plans.Plan(agent_source, plan.metas, plan.meta_fps, traits)
        relations = engine.inputs.relations
        assert relations is not None
        entries = _TracedEntries(ws, self._traced_source)
        catalog = TrackedCatalog(entries, dict(ws.catalog_fps), ws.catalog_fp, relations, dict(ws.agent_errors))
        context = plans.context(traced_plan, catalog, engine.inputs.trait_kinds_fp)
        tracer.stop = sys._getframe()
        # Tracing allocates a few hundred thousand small tuples that all live until the map is
        # made: the cyclic collector would rescan them over and over, and free none.
        collecting = gc.isenabled()
        gc.disable()
        try:
            with tracing() as loads:  # (the environment records each template it loads)
                contents = []
                for meta in plan.metas:
                    tracer.section = meta["id"]
                    contents.append(env.get_template(meta["template"]).render({**context, "section": meta}))
                tracer.section = None
                context["sections"] = [{**meta, "content": c} for meta, c in zip(plan.metas, contents, strict=True)]
                text = env.get_template(BASE_TEMPLATE).render(context)
        finally:
            tracer.stop = None
            tracer.section = None
            tracer.reset()
            if collecting:
                gc.enable()
        assert isinstance(text, Traced)
        prefix = g.template_node("")
        keys = [f"t:{node[len(prefix) :]}" for node in loads.reads if node.startswith(prefix)]
        keys += [f"f:{path}" for path in self._read]
        return text, self._inputs_now(dict.fromkeys(keys, b""))

    # -- answers ----------------------------------------------------------------------------
    def lines(self, target: str, first: int | None = None, last: int | None = None) -> list[dict[str, Any]]:
        """What made each line ``first..last`` of an output (all of them without ``first``)."""
        source_map = self.source_map(self.output_of(target))
        if first is None:
            first, last = 1, source_map.lines
        elif last is None:
            last = first
        if not 1 <= first <= last <= source_map.lines:
            asked = f"line {first}" if first == last else f"lines {first}-{last}"
            raise ConfigError(f"{source_map.output}: no {asked}; it has lines 1-{source_map.lines}")
        return [self._describe(source_map.explain(n)) for n in range(first, last + 1)]

    def reverse_agents(self, template: str, line: int) -> list[str]:
        """The agents the reverse question about ``template``:``line`` visits: those a change
        to the template would re-render once the engine has built (its graph holds what every
        render read), every agent otherwise."""
        engine = self.engine
        name = self._template_name(template)
        source = engine.workspace.templates[name]
        if not 1 <= line <= source.count("\n") + (not source.endswith("\n")):
            raise ConfigError(f"{template}: no line {line}")
        if self.built:
            return list(engine.affected([engine.config.templates_path / name])["agents"])
        return sorted(engine.plans)

    def prepare(self, agent: str) -> None:
        """Make (or check) the agent's reverse index; an agent that cannot be explained is
        left for ``template`` to report."""
        with contextlib.suppress(AgentdError):
            self._reverse(agent)

    def template(self, template: str, line: int) -> dict[str, Any]:
        """Every output line range template line ``line`` produced, by agent, and the agents
        whose outputs cannot be explained now (``skipped``, with the reason)."""
        engine = self.engine
        name = self._template_name(template)
        outputs, skipped = [], []
        agents = self.reverse_agents(template, line)
        progress = engine.progress
        if progress is not None:
            progress.count(len(agents), "agents")
        for agent in agents:
            if progress is not None:
                progress.advance()
            output = f"{engine.config.output_dir}/{output_name(agent)}"
            try:
                flat = self._reverse(agent).get((name, line))
            except AgentdError as exc:
                skipped.append({"output": output, "reason": str(exc)})
                continue
            if flat:
                outputs.append({"output": output, "lines": [list(flat[i : i + 2]) for i in range(0, len(flat), 2)]})
        return {
            "template": self._template_path(name),
            "line": line,
            "source": source_line(engine.workspace.templates[name], line) or "",
            "outputs": outputs,
            "skipped": skipped,
        }

    def _template_name(self, template: str) -> str:
        ws = self.engine.workspace
        tdir = self.engine.config.templates_dir.rstrip("/") + "/"
        name = template.replace("\\", "/")
        name = name[len(tdir) :] if name.startswith(tdir) else name
        if name not in ws.templates:
            raise ConfigError(f"{template}: no such template under {tdir}")
        return name

    def _template_path(self, name: str) -> str:
        return f"{self.engine.config.templates_dir.rstrip('/')}/{name}"

    def _describe(self, explained: dict[str, Any]) -> dict[str, Any]:
        """An ``explain`` answer in the shape the CLI prints and the socket sends."""
        templates = self.engine.workspace.templates
        out = dict(explained)
        out["templates"] = [
            {
                "template": self._template_path(c["steps"][-1].template),
                "line": c["steps"][-1].line,
                "source": source_line(templates.get(c["steps"][-1].template, ""), c["steps"][-1].line) or "",
                "columns": c["columns"],
                "block": c["block"],
                "chain": [
                    {
                        "template": self._template_path(s.template),
                        "line": s.line,
                        "how": s.how,
                        "source": source_line(templates.get(s.template, ""), s.line) or "",
                    }
                    for s in c["steps"]
                ],
            }
            for c in explained["templates"]
        ]
        texts: dict[str, str] = {}
        for d in explained["data"]:
            if d.file not in texts:
                texts[d.file] = self._text(d.file)
        out["data"] = [
            {"file": d.file, "line": d.line, "path": d.path, "source": _value_line(texts[d.file], d.line)}
            for d in explained["data"]
        ]
        return out


def _checked(request: Mapping[str, Any]) -> tuple[str | None, str | None, int | None, int | None]:
    """(template, output, line, end) of an ``explain`` request, or a ``ConfigError`` saying
    what is wrong with it."""
    template, output = request.get("template"), request.get("output")
    line, end = request.get("line"), request.get("end")
    for key, value, kind in (
        ("template", template, str),
        ("output", output, str),
        ("line", line, int),
        ("end", end, int),
    ):
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {'a string' if kind is str else 'a line number'}, got {value!r}")
    if (template is None) == (output is None):
        raise ConfigError("expected either `output` (with `line` and `end` if wanted) or `template` with `line`")
    if template is not None and line is None:
        raise ConfigError("template: needs `line`, the template line to look up")
    if end is not None and line is None:
        raise ConfigError("end: needs `line`, the first line of the range")
    return template, output, line, end


def visits(explainer: Explainer, request: Mapping[str, Any]) -> list[str]:
    """The agents a reverse request visits (none for a question about an output)."""
    template, _, line, _ = _checked(request)
    return explainer.reverse_agents(template, line) if template is not None and line is not None else []


def answer(explainer: Explainer, request: Mapping[str, Any]) -> dict[str, Any]:
    """The reply to an ``explain`` request, the same in-process and from the daemon:
    ``{"output": "x.md", "line": 12, "end": 14}`` (no line: all of them) gives ``lines``,
    ``{"template": "templates/t.j2", "line": 8}`` gives ``outputs``."""
    template, output, line, end = _checked(request)
    if template is not None and line is not None:
        return explainer.template(template, line)
    assert output is not None
    reply: dict[str, Any] = {"lines": explainer.lines(output, line, end)}
    source_map = explainer.source_map(explainer.output_of(output))
    if not source_map.on_disk:
        reply["note"] = f"{source_map.output} does not exist yet: this is what `agentd build` would write"
    return reply


# -- printing -------------------------------------------------------------------------------
def format_line(answer: Mapping[str, Any], width: int | None = None) -> list[str]:
    """One output line's explanation, for a person: the line, its section, the steps to each
    template line that wrote on it (innermost last) and the YAML values on it, in columns."""
    rows: list[tuple[str, str, str, str]] = []  # label, where, how/path, source
    for n, contributor in enumerate(answer["templates"]):
        *via, last = contributor["chain"]
        rows += [
            ("via" if i == 0 else "", f"{s['template']}:{s['line']}", s["how"], s["source"]) for i, s in enumerate(via)
        ]
        rows.append(("template" if n == 0 else "also", f"{last['template']}:{last['line']}", "", last["source"]))
    rows += [
        ("data" if i == 0 else "", f"{d['file']}:{d['line']}", d["path"], d["source"])
        for i, d in enumerate(answer["data"])
    ]
    where = max((len(r[1]) for r in rows), default=0)
    how = max((len(r[2]) for r in rows), default=0)
    lines = [cut(f"{answer['output']}:{answer['line']}  {answer['text']}", width)]
    lines.append(f"  {'section':<10}{answer['section'] or '(none: the base template)'}")
    heads = [
        f"  {label:<10}{at:<{where}}  {detail:<{how}}  " if how else f"  {label:<10}{at:<{where}}  "
        for label, at, detail, _ in rows
    ]
    if width is None or all(len(h) + len(r[3].strip()) <= width for h, r in zip(heads, rows, strict=True)):
        lines += [(h + r[3].strip()).rstrip() for h, r in zip(heads, rows, strict=True)]
        return lines
    for label, at, detail, source in rows:  # too wide for the terminal: the source below its place
        lines.append(f"  {label:<10}{at}  {detail}".rstrip())
        if source.strip():
            lines.append(cut(f"{'':14}{source.strip()}", width))
    return lines


def format_template(answer: Mapping[str, Any], width: int | None = None) -> list[str]:
    """The output line ranges one template line produced, for a person."""
    head = f"{answer['template']}:{answer['line']}  "
    lines = [head + cut(answer["source"].strip(), None if width is None else width - len(head))]
    if not answer["outputs"]:
        lines.append("  no output line comes from it")
    for entry in answer["outputs"]:
        count = sum(b - a + 1 for a, b in entry["lines"])
        ranges = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in entry["lines"])
        head = f"  {entry['output']}  {count} line{'s' * (count != 1)}: "
        if width is None:
            lines.append(head + ranges)
        else:  # wrapped, never cut: the ranges are the answer
            lines += textwrap.wrap(
                ranges, width, initial_indent=head, subsequent_indent=" " * 6, break_on_hyphens=False
            )
    return lines
