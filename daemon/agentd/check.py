"""``agentd check``: quality gates for templates, sources and outputs.

Everything is checked in memory (a fresh ``Engine`` with ``write=False``): nothing is written to
``out/`` and no prior build is needed. Each finding names a file, a 1-based line and column, a
severity and a rule id; rules can be switched off with ``[check] disable = [...]``.

Sources are validated with JSON Schema (``jsonschema``) when the workspace names its schemas
(``[check] agent_schema``/``trait_schema``): the contract becomes a document users can also hand
to their editor's YAML language server, and the validator reports *every* violation with its
path, which we map back to the YAML node's line and column. Hand-written checks would duplicate
a well-kept library and drift from the documentation. The tool ships no schema, line range or
front matter keys of its own: those belong to a workspace's templates, and a workspace that
declares none is held only to what agentd itself interprets.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import jinja2
import jinja2.meta
import networkx as nx
import yaml
from jinja2 import nodes

from . import graph as g
from .build import Engine
from .cache import Layer
from .config import CONFIG_FILE, Config
from .exceptions import BlockedError, ConfigError, DataError, SourceError, TemplateError
from .output import output_name
from .plan import Plan, available_sections, default_sections
from .progress import Progress
from .render import BASE_TEMPLATE, anchor
from .workspace import (
    AliasBomb,
    Unreadable,
    Workspace,
    _Loader,
    mark_position,
    node_at,
    parse_yaml,
    position,
    read_inside,
    trait_ids,
    yaml_mark,
    yaml_problem,
)

if TYPE_CHECKING:  # imported where sources are validated: the daemon's output gates never need it
    import jsonschema

#: rule id -> (severity, what it checks). The README lists the same table.
RULES: dict[str, tuple[str, str]] = {
    "template-syntax": ("error", "a template does not compile"),
    "undeclared-variable": ("error", "a template reads a variable its context does not provide"),
    "undefined-variable": ("error", "a render hit an undefined value (StrictUndefined)"),
    "render-error": ("error", "a render failed for another reason"),
    "missing-template": ("error", "include/import/extends names a template that does not exist"),
    "template-cycle": ("error", "templates include, import or extend each other in a cycle"),
    "unreachable-template": ("warning", "nothing includes, imports, extends or renders this template"),
    "yaml-syntax": ("error", "a source is not valid YAML"),
    "yaml-tag": ("error", "a source uses a tag the safe loader refuses (objects, code)"),
    "duplicate-key": ("error", "a mapping repeats a key (YAML would silently keep the last)"),
    "yaml-alias": ("error", "aliases expand a source past agentd's budget (an alias bomb), or make it recursive"),
    "unreadable-source": ("error", "a source or folder agentd cannot or must not read (permissions, a link outside)"),
    "schema": ("error", "a source breaks the workspace contract (required keys, types, allowed values)"),
    "unknown-section": ("error", "an agent enables a section that has no template"),
    "unknown-trait": ("error", "an agent lists a trait that does not exist"),
    "required-section": ("error", "an agent does not enable a section [check] required_sections demands"),
    "duplicate-source": ("error", "two sources for one agent or trait (x.yaml and x.yml)"),
    "line-count": ("error", "an output is outside the configured line range"),
    "front-matter": ("error", "an output's front matter is missing, does not parse or lacks a key"),
    "section-order": ("error", "an enabled section is missing from the output or out of order"),
    "unbalanced-fence": ("error", "a code fence is never closed"),
    "heading-skip": ("error", "a heading skips a level (## then ####)"),
    "table-columns": ("error", "a table row has a different number of columns than its header"),
    "broken-anchor": ("error", "an internal #anchor link matches no heading"),
    "template-leak": ("error", "template syntax ({{ or {%) outside code blocks and inline code"),
}

#: What each template folder's templates may read (besides Jinja's and agentd's globals).
CONTEXTS: dict[str, frozenset[str]] = {
    "sections": frozenset({"agent", "section", "sections", "traits", "catalog"}),
    "base": frozenset({"agent", "sections", "catalog"}),
    "traits": frozenset({"trait"}),
    "fragments": frozenset(),
}


@dataclasses.dataclass(frozen=True, order=True)
class Finding:
    path: str
    line: int
    column: int
    rule: str
    message: str
    severity: str = "error"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "line": self.line,
            "column": self.column,
            "severity": self.severity,
            "rule": self.rule,
            "message": self.message,
        }

    def format(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.severity} [{self.rule}] {self.message}"


def finding(path: str, line: int | None, column: int | None, rule: str, message: str) -> Finding:
    return Finding(path, line or 1, column or 1, rule, message, RULES[rule][0])


# -- outputs ------------------------------------------------------------------------------------
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
_LINK = re.compile(r"\]\(#([^)\s]+)\)")
_CODE_SPAN = re.compile(r"(`+)(?:.+?)\1")
_PIPE = re.compile(r"(?<!\\)\|")


def check_output(
    rel_path: str, data: bytes, metas: list[dict[str, Any]], config: Config, memory: ScanMemory | None = None
) -> list[Finding]:
    """The output gates for one generated agent (the daemon runs these after every compose,
    with a ``memory`` of what it scanned before)."""
    out: list[Finding] = []
    split = _split(data) if memory is not None else None
    if split is None:
        head = data.decode().splitlines()
        split = len(head), head, []
    count, head, cuts = split
    low, high = config.check_min_lines, config.check_max_lines  # 0: no bound
    if count < low or (high and count > high):
        wanted = f"between {low} and {high}" if low and high else f"at least {low}" if low else f"at most {high}"
        out.append(finding(rel_path, count, 1, "line-count", f"{count} lines; expected {wanted}"))
    body_start = _front_matter(rel_path, head, config, out)
    runs: list[_Run] = [(body_start, None, lambda: head[body_start:])]
    bounds = [offset for _, offset in cuts] + [len(data)]
    for (begin, start), end in zip(cuts, bounds[1:], strict=True):
        key = hashlib.sha1(memoryview(data)[start:end]).digest()
        runs.append((begin, key, functools.partial(_decoded_lines, data, start, end)))
    titles = _scan_markdown(rel_path, runs, out, memory)
    _section_order(rel_path, titles, metas, out)
    return out


def _decoded_lines(data: bytes, start: int, end: int) -> list[str]:
    return data[start:end].decode().splitlines()


#: A run of an output's lines to scan: its first line's index, a key to remember it by (None:
#: not remembered) and its lines (decoded only if it is scanned).
_Run: TypeAlias = "tuple[int, bytes | None, Callable[[], list[str]]]"
#: Where a run begins: the start of a line (after its \n) holding a level-2 heading.
_RUN_START = re.compile(rb"\n(?=## )")
#: Line breaks of ``str.splitlines`` other than \n, in UTF-8: ASCII ones (a single byte is
#: looked for with memchr, 0.005 ms in 540 KB) and the rest (0.3 ms each, so only in non-ASCII).
_ASCII_BREAKS = tuple(c.encode() for c in "\r\x0b\x0c\x1c\x1d\x1e")
_OTHER_BREAKS = tuple(c.encode() for c in "\x85\u2028\u2029")


def _split(data: bytes) -> tuple[int, list[str], list[tuple[int, int]]] | None:
    """An output cut into runs that each begin at a level-2 heading (a section): its line
    count, the lines before the first run (front matter, title), and where each run begins
    (line index, offset). None where it cannot be cut by counting \n (other line breaks; a
    front matter that does not close before the first cut): it is then scanned whole."""
    if any(b in data for b in _ASCII_BREAKS) or (not data.isascii() and any(b in data for b in _OTHER_BREAKS)):
        return None
    cuts: list[tuple[int, int]] = []
    index = counted = 0
    for match in _RUN_START.finditer(data):
        offset = match.start() + 1
        index += data.count(b"\n", counted, offset)
        counted = offset
        cuts.append((index, offset))
    count = index + data.count(b"\n", counted) + (data[-1:] not in (b"", b"\n"))
    head = data[: cuts[0][1] if cuts else len(data)].decode().splitlines()
    if cuts and head[:1] == ["---"] and "---" not in head[1:]:
        return None  # a front matter that goes on past the first cut, or never closes
    return count, head, cuts


@dataclasses.dataclass(frozen=True)
class _Scan:
    """What scanning a run of lines found; line numbers count from 1 at the run's first line."""

    findings: tuple[tuple[int, int, str, str], ...]  # line, column, rule, message
    titles: tuple[tuple[int, str], ...]  # line and text of each level-2 heading
    slugs: str  # every heading's anchor, each after a \n (one string: ~1/4 the memory of a tuple)
    links: tuple[tuple[int, int, str], ...]  # line, column, target
    fence: tuple[str, int, int] | None  # open at the end: char, length, line (0: opened before)
    level: int  # the last heading's level

    @property
    def weight(self) -> int:
        """About what it holds in memory, in bytes."""
        return 400 + len(self.slugs) + 200 * (len(self.findings) + len(self.titles) + len(self.links))


class ScanMemory(Layer[tuple[bytes, Any], _Scan]):
    """What the output gates found in runs of lines they scanned before, by the run's bytes
    and the state it starts in. An edit changes a few sections of each agent it reaches, and
    the daemon checks every output it writes: decoding, splitting and scanning all ~7,000
    lines of each took ~4 ms per agent (400 ms after a 100-agent batch); cutting it into
    sections and hashing them takes ~1 ms, and only the sections not seen before are scanned.
    LRU within ``budget`` bytes (~1.7 MB per 100 agents measured with tracemalloc; its
    estimate ``_Scan.weight`` errs high)."""

    def __init__(self, budget: int = 32 * 1024 * 1024) -> None:
        super().__init__("gates", budget)

    @staticmethod
    def size_of(value: Any) -> int:
        return int(value.weight)


def _front_matter(path: str, lines: list[str], config: Config, out: list[Finding]) -> int:
    """Front matter is required only when the workspace names keys it must carry; one that is
    there must parse (as a mapping) either way: whatever reads the output will choke on it."""
    if not lines or lines[0] != "---":
        if config.check_front_matter:
            out.append(finding(path, 1, 1, "front-matter", "no YAML front matter: the first line must be ---"))
        return 0
    try:
        end = lines.index("---", 1)
    except ValueError:
        out.append(finding(path, 1, 1, "front-matter", "front matter is never closed with ---"))
        return 0
    try:
        data = yaml.load("\n".join(lines[1:end]), Loader=_Loader)
    except yaml.YAMLError as exc:
        line = (mark_position(getattr(exc, "problem_mark", None)) or (0, 0))[0] + 1  # after the ---
        out.append(finding(path, line, 1, "front-matter", f"front matter does not parse: {exc}"))
        return end + 1
    if not isinstance(data, dict):
        out.append(finding(path, 2, 1, "front-matter", "front matter must be a mapping"))
        return end + 1
    for key in config.check_front_matter:
        if data.get(key) in (None, "", []):
            out.append(finding(path, end + 1, 1, "front-matter", f"front matter lacks {key!r}"))
    return end + 1


def _scan_markdown(path: str, runs: list[_Run], out: list[Finding], memory: ScanMemory | None) -> list[tuple[int, str]]:
    """The body's lines, run after run (``check_output``): fences, headings, tables, links, leaked
    template syntax. A run seen before in the same state is taken from ``memory``. Returns
    the level-2 headings as (line, text)."""
    fence: tuple[str, int, int] | None = None  # char, length, opening line
    level = 0
    titles: list[tuple[int, str]] = []
    slugs: list[str] = []
    links: list[tuple[int, int, str]] = []
    for begin, key, lines in runs:
        # A run begins at a heading, which ends any table: only an open fence and the last
        # heading's level carry over into it.
        state = (fence[:2] if fence else None, level)
        scan = memory.get((key, state)) if memory is not None and key is not None else None
        if scan is None:
            scan = _scan_run(lines(), *state)
            if memory is not None and key is not None:
                memory.put((key, state), scan)
        out += [finding(path, begin + n, column, rule, message) for n, column, rule, message in scan.findings]
        titles += [(begin + n, text) for n, text in scan.titles]
        slugs += scan.slugs.split("\n")[1:]
        links += [(begin + n, column, target) for n, column, target in scan.links]
        if scan.fence is None or scan.fence[2]:
            fence = scan.fence and (scan.fence[0], scan.fence[1], begin + scan.fence[2])
        level = scan.level
    if fence is not None:
        out.append(finding(path, fence[2], 1, "unbalanced-fence", f"code fence {fence[0] * fence[1]} is never closed"))
    anchors: dict[str, int] = {}
    for slug in slugs:
        count = anchors.get(slug)
        anchors[slug] = 0 if count is None else count + 1
        if count is not None:
            anchors[f"{slug}-{count + 1}"] = 0
    for number, col, target in links:
        if target not in anchors:
            out.append(
                finding(path, number, col, "broken-anchor", f"link to #{target}, but no heading has that anchor")
            )
    return titles


def _scan_run(lines: list[str], fence_open: tuple[str, int] | None, previous_level: int) -> _Scan:
    """One pass over a run of lines, starting inside a fence (``fence_open``) or not."""
    fence: tuple[str, int, int] | None = (*fence_open, 0) if fence_open else None
    findings: list[tuple[int, int, str, str]] = []
    titles: list[tuple[int, str]] = []
    slugs: list[str] = []
    links: list[tuple[int, int, str]] = []
    table: int | None = None  # columns of the table being read
    for number, raw in enumerate(lines, 1):
        first = raw.lstrip(" ")[:1]  # most lines are decided by their first character
        m = _FENCE.match(raw) if first in ("`", "~") else None
        if fence is not None:
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= fence[1] and not m.group(2).strip():
                fence = None
            continue
        if m:
            fence = (m.group(1)[0], len(m.group(1)), number)
            table = None
            continue
        if first == "|":
            columns = len(_PIPE.findall(raw.strip())) - 1
            if table is None:
                table = columns
            elif columns != table:
                message = f"table row has {columns} columns; its header has {table}"
                findings.append((number, 1, "table-columns", message))
        else:
            table = None
        h = _HEADING.match(raw) if first == "#" else None
        if h:
            level = len(h.group(1))
            if previous_level and level > previous_level + 1:
                message = f"heading level {level} follows level {previous_level}"
                findings.append((number, 1, "heading-skip", message))
            previous_level = level
            if level == 2:
                titles.append((number, h.group(2)))
            slugs.append(anchor(h.group(2)))
        if "{" not in raw and "](#" not in raw:
            continue
        plain = _CODE_SPAN.sub("", raw) if "`" in raw else raw
        for link in _LINK.finditer(plain):
            links.append((number, link.start() + 1, link.group(1)))
        for token in ("{{", "{%"):
            col = plain.find(token)
            if col >= 0:
                message = f"{token} outside a code block: unrendered template syntax?"
                findings.append((number, col + 1, "template-leak", message))
                break
    return _Scan(tuple(findings), tuple(titles), "".join("\n" + s for s in slugs), tuple(links), fence, previous_level)


def _section_order(path: str, titles: list[tuple[int, str]], metas: list[dict[str, Any]], out: list[Finding]) -> None:
    """Each enabled section's ``## N. Title`` heading (the one ``section.anchor`` links to)
    must be there, in order. Only for an output that uses that convention for at least one of
    its sections: templates that title their sections otherwise leave nothing to look for."""
    found = {text: line for line, text in titles}
    headings = [f"{meta['number']}. {meta['title']}" for meta in metas]
    if not any(text in found for text in headings):
        return
    last = 0
    for meta, text in zip(metas, headings, strict=True):
        line = found.get(text)
        if line is None:
            out.append(
                finding(path, 1, 1, "section-order", f"section {meta['id']!r} is enabled but '## {text}' is missing")
            )
        elif line < last:
            out.append(finding(path, line, 1, "section-order", f"section {meta['id']!r} ('## {text}') is out of order"))
        else:
            last = line


# -- the checker --------------------------------------------------------------------------------
#: Rules of findings made while reading a source: the build's error for that file says the same.
_READ_RULES = frozenset({"yaml-syntax", "yaml-tag", "duplicate-key", "yaml-alias", "unreadable-source"})


class Checker:
    def __init__(self, config: Config, progress: Progress | None = None) -> None:
        self.config = config
        self.root = config.root
        #: Told what is checked as it is: the build's sections, then sources, then outputs.
        self.progress = progress
        self._validators: dict[str, jsonschema.protocols.Validator | None] = {}

    def run(self) -> list[Finding]:
        # Before the build: a schema setting that does not work is a usage error, at once.
        self._validators = {kind: self._validator(kind) for kind in ("agent", "trait")}
        outputs: dict[str, tuple[bytes, Plan]] = {}

        def keep(agent_id: str, data: bytes, plan: Plan) -> list[Any]:
            outputs[agent_id] = (data, plan)
            return []

        with Engine(self.config, output_check=keep, progress=self.progress) as engine:
            report = engine.build(write=False)
        found: list[Finding] = []
        found += self._templates(engine, report.errors)
        found += self._sources(engine)
        found += _build_errors(report.errors, found)
        if self.progress is not None:
            self.progress.count(len(outputs), "outputs")
        for agent_id, (data, plan) in sorted(outputs.items()):
            rel = f"{self.config.output_dir}/{output_name(agent_id)}"
            found += check_output(rel, data, plan.metas, self.config)
            if self.progress is not None:
                self.progress.advance()
        disabled = set(self.config.check_disable)
        return sorted({f for f in found if f.rule not in disabled})

    # -- templates ----------------------------------------------------------------------------
    def _templates(self, engine: Engine, errors: Iterable[Any]) -> list[Finding]:
        ws, env = engine.workspace, engine.renderer.env
        out: list[Finding] = []
        refs = nx.DiGraph()
        ref_lines: dict[tuple[str, str], int] = {}
        compile_errors = {**engine.renderer.compile_errors, **ws.template_errors}
        unread = _unread(ws)  # reported by ``_sources``
        for _name, error in sorted(compile_errors.items()):
            if error.path in unread:
                continue
            message = error.message.split(": ", 1)[-1].removeprefix("template syntax error: ")
            out.append(finding(error.path, error.line, 1, "template-syntax", message))
        for name in sorted(set(ws.templates) - set(compile_errors)):
            rel = f"{self.config.templates_dir}/{name}"
            ast = env.parse(ws.templates[name], name)
            refs.add_node(name)
            out += self._undeclared(rel, name, ast, env)
            for ref, line in _static_refs(ast):
                if ref is None:
                    continue
                if ref not in ws.templates:
                    out.append(
                        finding(
                            rel,
                            line,
                            1,
                            "missing-template",
                            f"{ref!r} does not exist under {self.config.templates_dir}/",
                        )
                    )
                else:
                    refs.add_edge(name, ref)
                    ref_lines.setdefault((name, ref), line)
        out += self._cycles(refs, ref_lines)
        out += self._unreachable(engine, refs)
        for error in errors:
            if _error_path(error) in unread:
                continue
            if isinstance(error, TemplateError) and error.path.startswith(self.config.templates_dir):
                if any(f.rule == "template-syntax" and f.path == error.path for f in out):
                    continue
                rule = "undefined-variable" if "undefined variable" in error.message else "render-error"
                message = error.message.split(": ", 1)[-1] + (f" (while {error.context})" if error.context else "")
                out.append(finding(error.path, error.line, 1, rule, message))
        return out

    def _undeclared(self, rel: str, name: str, ast: nodes.Template, env: jinja2.Environment) -> list[Finding]:
        folder = name.split("/", 1)[0] if "/" in name else ""
        allowed = CONTEXTS.get(folder, frozenset().union(*CONTEXTS.values())) | set(env.globals) | _assigned(ast)
        out = []
        for var in sorted(jinja2.meta.find_undeclared_variables(ast) - allowed):
            line = min((n.lineno for n in ast.find_all(nodes.Name) if n.name == var and n.ctx == "load"), default=1)
            expected = ", ".join(sorted(CONTEXTS.get(folder, ()))) or "only macro arguments and globals"
            out.append(
                finding(
                    rel,
                    line,
                    1,
                    "undeclared-variable",
                    f"{var!r} is not in the context of {folder or 'this'} templates ({expected})",
                )
            )
        return out

    def _cycles(self, refs: nx.DiGraph, ref_lines: dict[tuple[str, str], int]) -> list[Finding]:
        out = []
        for component in nx.strongly_connected_components(refs):
            start = min(component)
            if len(component) == 1 and not refs.has_edge(start, start):
                continue
            cycle = nx.find_cycle(refs.subgraph(component), source=start)
            chain = " -> ".join([u for u, _ in cycle] + [cycle[-1][1]])
            first = cycle[0]
            out.append(
                finding(
                    f"{self.config.templates_dir}/{first[0]}",
                    ref_lines.get(first, 1),
                    1,
                    "template-cycle",
                    f"cycle: {chain}",
                )
            )
        return out

    def _unreachable(self, engine: Engine, refs: nx.DiGraph) -> list[Finding]:
        roots = {BASE_TEMPLATE} | {m["template"] for p in engine.plans.values() for m in p.metas}
        # Templates renders actually loaded (dynamic includes, include_cached) count as reached.
        roots |= {g.template_name(n) for n in engine.graph.g if g.is_template(n) and any(
            not g.is_template(s) for s in engine.graph.g.successors(n))}  # fmt: skip
        reached = set()
        for root in roots & set(refs):
            reached |= {root} | nx.descendants(refs, root)
        return [
            finding(
                f"{self.config.templates_dir}/{name}",
                1,
                1,
                "unreachable-template",
                "nothing includes, imports, extends or renders this template",
            )
            for name in sorted(set(refs) - reached)
        ]

    # -- sources ------------------------------------------------------------------------------
    def _sources(self, engine: Engine) -> list[Finding]:
        """Every source the build read (never through a link out of the workspace), and every
        one or every folder it could not read."""
        ws = engine.workspace
        out = [finding(rel, 1, 1, "unreadable-source", why) for rel, why in _unread(ws).items()]
        sections = set(available_sections(ws))
        traits = set(ws.traits) | set(ws.trait_errors)
        defaults = default_sections(engine.config, ws)
        sources = [
            (path, kind[0])
            for path in sorted(ws.files())
            if (kind := ws.classify(path)) is not None and kind[0] != "template" and path not in ws.unreadable
        ]
        if self.progress is not None:  # ~20 ms each with a schema: 6 s at N = 300
            self.progress.count(len(sources), "sources")
        for path, what in sources:
            out += self._source(ws, path, what, sections, traits, defaults)
            if self.progress is not None:
                self.progress.advance()
        return out

    def _validator(self, kind: str) -> jsonschema.protocols.Validator | None:
        """The JSON Schema validator the workspace names for ``kind`` sources (None: none is
        named). Read like a source: never from outside the workspace."""
        key = f"{kind}_schema"
        rel = getattr(self.config, f"check_{key}")
        if not rel:
            return None
        setting = f"{CONFIG_FILE} [check] {key}"
        try:
            raw = read_inside(self.root, rel)
        except Unreadable as exc:
            raise ConfigError(f"{setting} = {rel!r}: {exc}") from None
        if raw is None:
            raise ConfigError(f"{rel}: no such file (named by {setting})")
        try:
            schema = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{rel}: not JSON: {exc} (named by {setting})") from None
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = key_path(exc.absolute_path)
            raise ConfigError(f"{rel}: not a valid JSON Schema: {where}: {exc.message} (named by {setting})") from None
        return jsonschema.Draft202012Validator(schema)

    def _source(
        self, ws: Workspace, path: Path, kind: str, sections: set[str], traits: set[str], defaults: list[str]
    ) -> list[Finding]:
        rel = ws.rel(path)
        try:
            raw = ws.read_source(path)
        except Unreadable as exc:
            return [finding(rel, 1, 1, "unreadable-source", str(exc))]
        if raw is None:
            return []
        text = raw.decode("utf-8", errors="replace")
        try:
            # Loaded first: it refuses an alias bomb, which every walk below would expand.
            data = parse_yaml(text, allow_duplicate_keys=True)  # ``_duplicates`` finds them all
            root = yaml.compose(text, Loader=_Loader)
        except AliasBomb as exc:
            return [_yaml_finding(rel, exc.problem_mark, "yaml-alias", str(exc.problem))]
        except yaml.constructor.ConstructorError as exc:
            message = f"{exc.problem}: sources are data, loaded with the safe loader only"
            return [_yaml_finding(rel, exc.problem_mark, "yaml-tag", message)]
        except yaml.MarkedYAMLError as exc:
            mark, unclosed = yaml_mark(exc)
            return [_yaml_finding(rel, mark, "yaml-syntax", unclosed or yaml_problem(exc, text))]
        out = list(_duplicates(rel, root))
        if not isinstance(data, dict):
            return [
                *out,
                finding(rel, 1, 1, "schema", f"expected a mapping at the top level, got {type(data).__name__}"),
            ]
        validator = self._validators.get(kind)
        for error in validator.iter_errors(data) if validator is not None else ():
            out.append(_schema_finding(rel, root, error))
        if kind == "agent":
            out += _references(rel, root, data, sections, traits)
            enabled = data.get("sections", defaults)
            for required in self.config.check_required_sections:
                if isinstance(enabled, list) and required not in enabled:
                    line, col = position(*node_at(root, ["sections"])) or (1, 1)
                    message = f"sections: {required!r} is required by [check] required_sections but not enabled"
                    out.append(finding(rel, line, col, "required-section", message))
        return out


def _build_errors(errors: Iterable[Any], found: list[Finding]) -> list[Finding]:
    """Source errors only the build meets (an ``id`` that is not the file name, ``sections`` or
    ``traits`` of the wrong shape, an agent left with no sections, two sources for one name):
    agentd's own contract, checked with or without a schema. Not where a finding above says
    the same (a file that does not read or parse, a finding at the same line), nor an error
    that only follows from another (``DataError.rule`` empty)."""
    read = {f.path for f in found if f.rule in _READ_RULES}
    located = {(f.path, f.line) for f in found}
    out = []
    for error in errors:
        if not isinstance(error, DataError) or isinstance(error, BlockedError) or not error.rule:
            continue
        if error.path in read or (error.path, error.line or 1) in located:
            continue
        message = error.message.removeprefix(f"{error.path}: ")
        out.append(finding(error.path, error.line, error.column, error.rule, message))
    return out


def _unread(ws: Workspace) -> dict[str, str]:
    """Workspace path -> why agentd could not read it: sources, folders, folder links."""
    unread = {ws.rel(path): why for path, why in ws.unreadable.items()}
    unread.update({error.path: error.message.split(": ", 1)[-1] for error in ws.folder_errors.values()})
    return unread


def _error_path(error: Any) -> str | None:
    return error.path if isinstance(error, SourceError) else None


def _assigned(ast: nodes.Template) -> set[str]:
    """Every name the template itself binds anywhere (set, import, macro, for). Jinja's own
    analysis treats each block as a scope of its own, so a child template's top-level imports
    look undeclared inside its blocks although they work at render time; reads before the
    binding are still caught by StrictUndefined when rendering."""
    names = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
    names |= {n.target for n in ast.find_all(nodes.Import)}
    for imp in ast.find_all(nodes.FromImport):
        names |= {alias if isinstance(alias, str) else alias[1] for alias in imp.names}
    names |= {m.name for m in ast.find_all(nodes.Macro)}
    return names


def _static_refs(ast: nodes.Template) -> Iterator[tuple[str | None, int]]:
    """(template name, line) of every include/import/extends; None for a dynamic name. A list
    (``{% include ["a", "b"] %}``) counts as missing only if none of it exists: yields its first."""
    for node in ast.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        target = node.template  # type: ignore[attr-defined]
        if isinstance(node, nodes.Include) and node.ignore_missing:
            continue
        if isinstance(target, nodes.Const) and isinstance(target.value, str):
            yield target.value, node.lineno
        else:
            yield None, node.lineno


def _yaml_finding(rel: str, mark: Any, rule: str, message: str) -> Finding:
    return finding(rel, *mark_position(mark) or (1, 1), rule, message)


def _duplicates(rel: str, node: yaml.Node | None) -> Iterator[Finding]:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    line, column = position(key) or (1, 1)
                    first = seen[key.value]
                    message = f"duplicate key {key.value!r} (first on line {first}); YAML keeps only the last one"
                    yield finding(rel, line, column, "duplicate-key", message)
                else:
                    seen[key.value] = key.start_mark.line + 1
            yield from _duplicates(rel, value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _duplicates(rel, item)


_YAML_TYPES = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
               "array": "a list", "object": "a mapping", "null": "nothing"}  # fmt: skip
_PY_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
             dict: "a mapping", type(None): "nothing"}  # fmt: skip


def key_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _schema_finding(rel: str, root: yaml.Node | None, error: jsonschema.ValidationError) -> Finding:
    parts = list(error.absolute_path)
    node, key_node = node_at(root, parts)
    where = node
    got = _PY_TYPES.get(type(error.instance), type(error.instance).__name__)
    v, value = error.validator, error.validator_value
    if v == "enum":
        message = f"expected one of {'|'.join(map(str, value))}, got {error.instance!r}"
    elif v == "type":
        wanted = " or ".join(_YAML_TYPES.get(t, t) for t in ([value] if isinstance(value, str) else value))
        message = f"expected {wanted}, got {got}"
    elif v == "required":
        missing = re.match(r"'(.+)' is a required property", error.message)
        message = f"missing required key {missing.group(1) if missing else error.message!r}"
    elif v == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        allowed = ", ".join(error.schema.get("properties", {}))
        message = f"unknown key {', '.join(map(repr, extra))}; expected one of: {allowed}"
        extra_node = next((k for k, _ in getattr(where, "value", []) if getattr(k, "value", None) in extra), None)
        where = extra_node or where
    elif v == "minItems":
        message = f"expected at least {value} item(s), got {len(error.instance)}"
    elif v == "minLength":
        message = "expected a non-empty string"
    elif v == "uniqueItems":
        message = "expected unique items"
    elif v == "pattern":
        message = f"expected to match {value}, got {error.instance!r}"
    else:
        message = error.message
    line, column = position(where, key_node, root) or (1, 1)
    return finding(rel, line, column, "schema", f"{key_path(parts)}: {message}")


def _references(
    rel: str, root: yaml.Node | None, data: dict[str, Any], sections: set[str], traits: set[str]
) -> list[Finding]:
    out = []

    def at(parts: list[Any]) -> tuple[int, int]:
        return position(*node_at(root, parts)) or (1, 1)

    listed = data.get("sections")
    if isinstance(listed, list):
        for i, section in enumerate(listed):
            if isinstance(section, str) and section not in sections:
                line, col = at(["sections", i])
                expected = ", ".join(sorted(sections))
                message = f"sections[{i}]: no template sections/{section}.j2; expected one of: {expected}"
                out.append(finding(rel, line, col, "unknown-section", message))
    listed_traits = data.get("traits")
    if isinstance(listed_traits, dict):
        for kind, ids in listed_traits.items():
            for i, trait_id in enumerate(ids if isinstance(ids, list) else []):
                if isinstance(trait_id, str) and f"{kind}/{trait_id}" not in traits:
                    known = ", ".join(trait_ids(traits, kind))
                    line, col = at(["traits", kind, i])
                    message = f"traits.{kind}[{i}]: no trait {trait_id!r}; expected one of: {known or '(none)'}"
                    out.append(finding(rel, line, col, "unknown-trait", message))
    return out
