"""Jinja2 rendering with dependency tracing (L1 compiled templates, L2 fragments).

One ``Environment`` lives as long as the engine: every template is compiled once, with
``auto_reload=False`` so Jinja never stats files behind our back; a changed template is
recompiled explicitly. Include/import/extends are resolved by name at render time
(``environment.get_template``), so a dependent template's compiled code stays valid when a
template it references changes: only the changed template is recompiled, and the *renders*
that loaded it are invalidated through the graph.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import time
import traceback
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import jinja2
import jinja2.bccache
import jinja2.meta
import jinja2.parser
import jinja2.runtime
import orjson
from jinja2 import nodes

from . import __version__
from . import graph as g
from .cache import Caches, Rendered
from .exceptions import AgentdError, TemplateError
from .trace import MISSING, TrackedMapping, fingerprint, record, tracing
from .workspace import Workspace, source_line

#: The template that composes an agent from its rendered sections.
BASE_TEMPLATE = "base/agent-base.j2"
#: What composes an agent while the workspace has no base template: its sections' content,
#: concatenated in order. Served under the base template's own name, so a render records that
#: name (with no fingerprint: the file is absent) and creating or deleting the file later
#: re-composes every agent like any edit of it.
FALLBACK_BASE = "{% for s in sections %}{{ s.content }}{% endfor %}"


class _Loader(jinja2.BaseLoader):
    """Serves template sources from the workspace's in-memory copy: a template is exactly what
    the last scan read, and nothing outside ``templates/`` can be loaded (names are keys of a
    dict, so ``../`` resolves to nothing)."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str | None, Callable[[], bool]]:
        source = self.workspace.templates.get(template)
        if source is None:
            error = self.workspace.template_errors.get(template)
            if error is not None:  # a copy: each render that meets it sets its own context
                raise copy.copy(error)
            if template == BASE_TEMPLATE:
                return FALLBACK_BASE, None, lambda: True
            raise jinja2.TemplateNotFound(template)
        filename = str(self.workspace.config.templates_path / template)
        return source, filename, lambda: True

    def list_templates(self) -> list[str]:
        return sorted(self.workspace.templates)


class _StoreBytecodeCache(jinja2.BytecodeCache):
    """Jinja's compiled code kept in the persistent store, so a restart compiles nothing that
    did not change. Jinja checks the source checksum and its own bytecode/Python version."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        data = self.store.get_aux(b"bytecode", f"{bucket.key}:{bucket.checksum}".encode())
        if data is not None:
            bucket.bytecode_from_string(data)

    def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        self.store.put_aux(
            b"bytecode", f"{bucket.key}:{bucket.checksum}".encode(), bucket.bytecode_to_string(), bucket.key
        )


#: Includes nested deeper than this end the render: a template that includes itself (directly
#: or through others) would otherwise recurse to Python's limit, every level passing on each
#: piece of text of the levels below it (quadratic): seconds per section, and memory.
MAX_INCLUDE_DEPTH = 100
#: Context variable holding the names included so far, outermost first.
_INCLUDES = "__agentd_includes__"


class _IncludeDepth(Exception):
    """Includes nested past ``MAX_INCLUDE_DEPTH``: the renderer reports a cycle or too deep."""

    def __init__(self, chain: tuple[str, ...]) -> None:
        super().__init__(" -> ".join(chain))
        self.chain = chain


class _MissingMacro(jinja2.UndefinedError):
    """A name an imported template does not define (``l.bullets`` after a rename)."""


class _Template(jinja2.Template):
    """Counts include nesting: an include (or an import with context) is the one way a context
    is made from the including context's variables (``shared``), so the chain travels along
    with them; a top-level render starts a new one."""

    def new_context(
        self,
        vars: dict[str, Any] | None = None,
        shared: bool = False,
        locals: Mapping[str, Any] | None = None,
    ) -> jinja2.runtime.Context:
        if shared and vars is not None:
            chain = (*vars.get(_INCLUDES, ()), self.name or "?")
            if len(chain) > MAX_INCLUDE_DEPTH:
                raise _IncludeDepth(chain)
            # Through ``locals``, which Jinja applies to a copy: ``vars`` may be the including
            # context's own dict.
            locals = {**locals, _INCLUDES: chain} if locals else {_INCLUDES: chain}
        return super().new_context(vars, shared, locals)


class _Environment(jinja2.Environment):
    """Records every template load into the current trace, hits included.

    ``Environment._load_template`` sees every include/import/extends; a loader hook would only
    see cache misses, and a dynamic ``{% include "traits/" ~ kind %}`` would go untracked.
    """

    caches: Caches
    fingerprints: Mapping[str, bytes]
    last_ast: dict[str, nodes.Template]
    template_class = _Template

    def _load_template(self, name: str, globals: Any) -> jinja2.Template:
        # Jinja's own cache key (jinja2/environment.py, Environment._load_template).
        key = (weakref.ref(self.loader), name)
        if self.cache is not None and key in self.cache:
            self.caches.l1_counters.hits += 1
        else:  # never evicted (cache_size=-1): the template is new, changed or broken
            self.caches.l1_counters.misses += 1
            self.caches.l1_counters.expected += 1
        record(g.template_node(name), self.fingerprints.get(name, MISSING))
        return super()._load_template(name, globals)

    def handle_exception(self, source: str | None = None) -> NoReturn:
        if isinstance(sys.exc_info()[1], RecursionError):
            # As it is: Jinja's rewrite of a traceback ~1,000 frames deep costs more than the
            # render, and the renderer reads the compiled frames itself (``_recursion_error``).
            raise  # (called from Jinja's ``except`` block)
        super().handle_exception(source)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        # Keep the AST of each compile so static references cost no second parse.
        ast = super()._parse(source, name, filename)
        if name is not None:
            self.last_ast[name] = ast
        return ast

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and attribute not in _DICT_ATTRS:
            # What Jinja does, without its first step: ``getattr`` on a plain dict finds only
            # dict's own attributes, so for any other name it raised and caught an
            # AttributeError before the item lookup, on every ``x.key`` of the YAML data.
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        if isinstance(obj, TrackedMapping):
            try:
                return obj[attribute]
            except KeyError:
                if attribute in _MAPPING_METHODS:  # agent.get("x", default), trait.items()
                    return getattr(obj, attribute)
                return self.undefined(hint=f"{obj.label} has no key {attribute!r}", obj=obj, name=attribute)
        # Jinja's own steps (``Environment.getattr``), with a useful message for a macro missing
        # from an imported template.
        try:
            return getattr(obj, attribute)
        except AttributeError:
            pass
        try:
            return obj[attribute]
        except (TypeError, LookupError, AttributeError):
            if isinstance(obj, jinja2.environment.TemplateModule):
                return self.undefined(hint=_missing_macro(obj, attribute), obj=obj, name=attribute, exc=_MissingMacro)
            return self.undefined(obj=obj, name=attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, TrackedMapping):
            return self.getattr(obj, argument)
        return super().getitem(obj, argument)


def _missing_macro(module: jinja2.environment.TemplateModule, name: str) -> str:
    macros = sorted(k for k, v in vars(module).items() if isinstance(v, jinja2.runtime.Macro))
    defines = f"it defines: {', '.join(macros)}" if macros else "it defines no macros"
    return f"{module.__name__} has no macro {name!r} ({defines})"


_SLUG_DROP = re.compile(r"[^\w\- ]", re.UNICODE)


def anchor(text: str) -> str:
    """GitHub's heading anchor: lowercase, punctuation dropped, spaces to hyphens."""
    return _SLUG_DROP.sub("", str(text).strip().lower()).replace(" ", "-")


def yaml_str(value: Any) -> str:
    """A YAML-safe scalar (a JSON string is valid YAML) for the front matter."""
    return json.dumps(str(value), ensure_ascii=False)


def cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


_BACKTICKS = re.compile(r"`{3,}")


def fence(body: str) -> str:
    """A code fence longer than any backtick run inside ``body``, so the block cannot end early."""
    longest = max((len(m) for m in _BACKTICKS.findall(str(body))), default=2)
    return "`" * max(3, longest + 1)


def section_title(section_id: str) -> str:
    return " ".join(w.capitalize() for w in section_id.split("-"))


#: The mapping methods a template may call on ``agent`` or a trait (a key of the same name
#: wins: the keys are the data).
_MAPPING_METHODS = frozenset({"get", "items", "keys", "values"})
_DICT_ATTRS = frozenset(dir(dict))


def _input_fp(value: Any) -> bytes:
    fp = getattr(value, "fingerprint", None)
    return fp if isinstance(fp, bytes) else fingerprint(value)


class Renderer:
    """Compiles the workspace's templates and renders sections, fragments and agents."""

    def __init__(self, workspace: Workspace, caches: Caches, graph: g.DepGraph, store: Any = None) -> None:
        self.workspace = workspace
        self.store = store
        self.caches = caches
        self.graph = graph
        env = _Environment(
            loader=_Loader(workspace),
            undefined=jinja2.StrictUndefined,
            autoescape=False,  # Markdown, not HTML
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            auto_reload=False,
            cache_size=-1,  # a plain dict: nothing is evicted behind the graph's back
        )
        if store is not None:
            env.bytecode_cache = _StoreBytecodeCache(store)
        env.caches = caches
        env.fingerprints = workspace.template_fps
        env.last_ast = {}
        env.filters.update(anchor=anchor, yaml_str=yaml_str, cell=cell, fence=fence)
        env.globals.update(
            include_cached=self.include_cached,
            generator={"name": "agentd", "version": __version__},
        )
        self.env = env
        self.compile_errors: dict[str, TemplateError] = {}
        #: (template, seconds) of every top-level render and fragment miss since the last reset:
        #: the per-template metrics. Two ``perf_counter`` calls per render, nothing more.
        self.timings: list[tuple[str, float]] = []

    # -- L1 ---------------------------------------------------------------------------------
    def evict(self, names: set[str]) -> None:
        """Drop the compiled code of changed templates without compiling them again: a render
        that loads one compiles it from the current source (``Engine.build`` lets the workers
        compile first, then calls ``compile``)."""
        cache = self.env.cache
        assert cache is not None
        for name in names:
            cache.pop((weakref.ref(self.env.loader), name), None)
            self.compile_errors.pop(name, None)

    def compile(self, names: set[str]) -> None:
        """(Re)compile the given templates (dropping removed ones) and refresh their static
        references in the graph."""
        cache = self.env.cache
        assert cache is not None
        self.evict(names)
        for name in sorted(names):
            if name not in self.workspace.templates and name not in self.workspace.template_errors:
                continue
            try:
                self.env.get_template(name)
            except jinja2.TemplateSyntaxError as exc:
                self.compile_errors[name] = self._syntax_error(exc)
                continue
            except TemplateError as exc:
                self.compile_errors[name] = exc
                continue
            except RecursionError as exc:  # Jinja's parser, on expressions nested hundreds deep
                self.compile_errors[name] = self._recursion_error(exc, name)
                continue
            self.graph.set_template_refs(name, self._static_refs(name))
        self.caches.l1_entries = len(cache)
        self.caches.l1_bytes = sum(len(self.workspace.templates.get(k[1], "")) for k in cache.keys())

    def _static_refs(self, name: str) -> list[str]:
        """Templates ``name`` names in include/import/extends (``jinja2.meta``). From the AST
        of this compile, or, when the bytecode came from the store (no parse happened), from
        the store too."""
        ast = self.env.last_ast.pop(name, None)
        key = self.workspace.template_fps.get(name, MISSING)
        if ast is None and self.store is not None:
            cached = self.store.get_aux(b"refs", key)
            if cached is not None:
                return list(orjson.loads(cached))
        if ast is None:
            ast = self.env.parse(self.workspace.templates[name], name)
        refs = [r for r in jinja2.meta.find_referenced_templates(ast) if r]
        if self.store is not None:
            self.store.put_aux(b"refs", key, orjson.dumps(refs), name)
        return refs

    # -- L2 ---------------------------------------------------------------------------------
    def include_cached(self, name: str, **inputs: Any) -> str:
        """Render template ``name`` with exactly ``inputs`` as its context, once per distinct
        inputs: a trait's body is the same for every agent that has it.

        The fragment's own trace is merged into the caller's, so a section depends on what its
        fragments read even when they come from the cache.
        """
        parts = [name.encode(), *(k.encode() + _input_fp(v) for k, v in sorted(inputs.items()))]
        key = fingerprint(b"\0".join(parts)).hex()
        hit = self.caches.l2.get(key)
        if hit is None:
            t0 = time.perf_counter()
            with tracing() as trace:
                text = self.env.get_template(name).render(inputs)
            self.timings.append((name, time.perf_counter() - t0))
            hit = Rendered(text.encode(), trace.reads)
            self.caches.l2.put(key, hit)
            self.graph.set_inputs(g.fragment_node(key), trace.reads)
        for node, fp in hit.reads.items():
            record(node, fp)
        return hit.data.decode()

    # -- L3 / composition -----------------------------------------------------------------
    def render(self, name: str, context: dict[str, Any]) -> Rendered:
        """Render template ``name``; errors become ``TemplateError`` located in the template."""
        t0 = time.perf_counter()
        error: TemplateError | None = None
        with tracing() as trace:
            try:
                text = self.env.get_template(name).render(context)
            except AgentdError:
                raise
            except Exception as exc:  # anything a template expression can raise
                error = self._error(exc, name)
        if error is not None:
            # Raised outside the handler, so it does not hold the failed render's frames as
            # its context (a RecursionError's are ~1,000 deep, each with its locals).
            raise error
        self.timings.append((name, time.perf_counter() - t0))
        return Rendered(text.encode(), trace.reads)

    # -- errors ---------------------------------------------------------------------------
    def _error(self, exc: Exception, name: str) -> TemplateError:
        if isinstance(exc, jinja2.TemplateSyntaxError):
            return self._syntax_error(exc)
        if isinstance(exc, RecursionError):
            return self._recursion_error(exc, name)
        if isinstance(exc, _IncludeDepth):
            return self._include_depth_error(exc, name)
        return self._runtime_error(exc, name)

    def _rel(self, filename: str | None, name: str | None) -> tuple[str, str | None]:
        """(path relative to the root, template name) of a template file."""
        tdir = self.workspace.config.templates_path
        if filename:
            path = Path(filename)
            if path.is_relative_to(tdir):
                return self.workspace.rel(path), path.relative_to(tdir).as_posix()
        if name:
            return self.workspace.rel(tdir / name), name
        return self.workspace.config.templates_dir, None

    def _line_of(self, name: str | None, line: int | None) -> str | None:
        return source_line(self.workspace.templates.get(name or "", ""), line)

    def _located(self, name: str | None, line: int | None, what: str) -> TemplateError:
        """An error at ``line`` of template ``name``."""
        path = self._rel(None, name)[0]
        return TemplateError(f"{path}: {what}", path, line, self._line_of(name, line))

    def _syntax_error(self, exc: jinja2.TemplateSyntaxError) -> TemplateError:
        path, name = self._rel(exc.filename, exc.name)
        line, message = exc.lineno, _LEXER_OFFSET.sub("", exc.message or "")
        source = self.workspace.templates.get(name or "")
        unclosed = _unclosed_tag(self.env, source, name, line) if source is not None else None
        if unclosed is not None:
            # Jinja read on past the tag's end: the mistake is where the tag starts.
            opener, closer = _TAG_ENDS[unclosed[1]]
            message = f"{opener!r} on line {unclosed[0]} has no closing {closer!r} (at line {line}: {message})"
            line = unclosed[0]
        return TemplateError(f"{path}: template syntax error: {message}", path, line, self._line_of(name, line))

    def _template_frames(self, exc: BaseException) -> list[tuple[str, str | None, int]]:
        """(path, name, line) of each template frame in the traceback, outermost first. Jinja
        rewrites tracebacks so template code shows its own file and line."""
        tdir = str(self.workspace.config.templates_path)
        frames = []
        for frame, lineno in traceback.walk_tb(exc.__traceback__):
            filename = frame.f_code.co_filename
            if filename.startswith(tdir):
                path, name = self._rel(filename, None)
                frames.append((path, name, lineno))
        return frames

    def _runtime_error(self, exc: Exception, name: str) -> TemplateError:
        frames = self._template_frames(exc)
        path, tname, line = frames[-1] if frames else (*self._rel(None, name), None)
        if isinstance(exc, jinja2.TemplatesNotFound):
            what = f"none of the templates {', '.join(map(repr, exc.templates))} exists under templates/"
        elif isinstance(exc, jinja2.TemplateNotFound):
            what = f"template {exc.name!r} not found; expected a file templates/{exc.name}"
        elif isinstance(exc, _MissingMacro):
            what = str(exc.message)
        elif isinstance(exc, jinja2.UndefinedError):
            what = f"undefined variable: {exc.message}"
        else:
            what = f"{type(exc).__name__}: {exc}"
        return TemplateError(f"{path}: {what}", path, line, self._line_of(tname, line))

    def _include_depth_error(self, exc: _IncludeDepth, name: str) -> TemplateError:
        """Includes nested past the limit: a cycle when the template being included is
        including itself already (reported at its include of the next one), else too deep."""
        chain = exc.chain
        frames = self._template_frames(exc)
        if chain[-1] in chain[:-1]:
            start = len(chain) - 2 - chain[-2::-1].index(chain[-1])
            cycle = _canonical(list(chain[start:-1]))
            # The innermost frame of the cycle's first template is running its include of the next.
            line = next((f[2] for f in reversed(frames) if f[1] == cycle[0]), None)
            return self._located(cycle[0], line, _cycle_words(cycle))
        _, tname, line = frames[-1] if frames else (None, name, None)
        shown = [*chain[:2], "...", *chain[-2:]]
        return self._located(tname, line, f"includes nested more than {MAX_INCLUDE_DEPTH} deep: {' -> '.join(shown)}")

    def _recursion_error(self, exc: RecursionError, name: str) -> TemplateError:
        """Name what repeats at the bottom of the stack: a macro calling itself (or macros
        calling each other), templates including, importing or extending each other, or,
        when nothing repeats, nesting too deep."""
        frames = _compiled_frames(exc, self.env)
        if not frames:
            return self._located(name, _parser_line(exc), "nested too deeply for Jinja to parse")
        counts = Counter(f.key for f in frames)
        key, repeats = counts.most_common(1)[0]
        if repeats < 3:
            # Where the nesting starts: how deep it got depends on the process's stack, and
            # the error must be the same in every render (and worker) that meets it.
            names = _collapse([f.name for f in frames])
            what = f"templates nested too deeply for Python: {' -> '.join(names[:3])} -> ..."
            return self._located(frames[0].name, frames[0].line, what)
        positions = [i for i, f in enumerate(frames) if f.key == key]
        turn = frames[positions[-2] : positions[-1]]  # one turn of the cycle
        calls = [(f.macro, f) for f in turn if f.macro is not None]
        if calls:
            first = min(range(len(calls)), key=lambda i: calls[i][1].key)
            calls = calls[first:] + calls[:first]
            defined: dict[str, str] = {}  # each macro once, in call order: where it is defined
            for macro, f in calls:
                if macro not in defined:
                    defined[macro] = f"{self._rel(None, f.name)[0]}:{self._macro_line(f.name, macro)}"
            where = [f"{m!r} (defined at {d})" for m, d in defined.items()]
            if len(where) == 1:
                what = f"macro {where[0]} calls itself without end"
            else:
                what = f"macros call each other without end: {' -> '.join([*where, repr(calls[0][0])])}"
            return self._located(calls[0][1].name, calls[0][1].line, what)
        if all(f.code in ("root", "block") for f in turn):
            cycle = _canonical(_collapse([f.name for f in turn]))
            line = next(f.line for f in reversed(turn) if f.name == cycle[0])
            return self._located(cycle[0], line, _cycle_words(cycle))
        innermost = frames[-1]
        return self._located(innermost.name, innermost.line, "recursion without end at this line")

    def _macro_line(self, name: str, macro: str) -> int | None:
        """The line of ``{% macro <macro>(...) %}`` in template ``name``."""
        source = self.workspace.templates.get(name)
        if source is None:
            return None
        # Jinja's parser itself: ``env.parse`` would leave this AST for the next compile.
        ast = jinja2.parser.Parser(self.env, source, name).parse()
        return next((n.lineno for n in ast.find_all(nodes.Macro) if n.name == macro), None)


class _Frame(NamedTuple):
    """A frame of compiled template code: its template, what runs (``root``, ``block``,
    ``macro``, ...), the template line and, for a macro, its name."""

    name: str
    code: str
    line: int
    macro: str | None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.name, self.code, self.line)


_MACRO_INVOKE = jinja2.runtime.Macro._invoke.__code__


def _compiled_frames(exc: BaseException, env: jinja2.Environment) -> list[_Frame]:
    """The template frames of a traceback Jinja did not rewrite, outermost first."""
    frames: list[_Frame] = []
    invoked: Any = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        template = frame.f_globals.get("__jinja_template__")
        if not isinstance(template, jinja2.Template) or template.environment is not env:
            if frame.f_code is _MACRO_INVOKE:  # the next frame runs this Macro's body
                invoked = frame.f_locals.get("self")
            continue
        code = frame.f_code.co_name
        macro = invoked.name if code == "macro" and isinstance(invoked, jinja2.runtime.Macro) else None
        code = "block" if code.startswith("block_") else code
        frames.append(_Frame(template.name or "?", code, template.get_corresponding_lineno(lineno), macro))
        invoked = None
    return frames


def _parser_line(exc: BaseException) -> int | None:
    """The line Jinja's parser was reading when it ran out of stack, if it was parsing."""
    line = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        if frame.f_code.co_filename == jinja2.parser.__file__:
            parser = frame.f_locals.get("self")
            if isinstance(parser, jinja2.parser.Parser):
                line = parser.stream.current.lineno
    return line


def _collapse(names: list[str]) -> list[str]:
    """Consecutive frames of one template as one step (a child's block inside its parent's
    root, a macro called from its own template)."""
    return [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]


def _canonical(cycle: list[str]) -> list[str]:
    """The cycle rotated to start at its smallest name: whichever template a render entered it
    by, the error is the same (and reported once)."""
    first = cycle.index(min(cycle))
    return cycle[first:] + cycle[:first]


def _cycle_words(cycle: list[str]) -> str:
    if len(cycle) == 1:
        return f"include cycle: {cycle[0]} includes itself"
    return f"include cycle: {' -> '.join([*cycle, cycle[0]])}"


#: ``{%`` / ``{{`` and what closes them.
_TAG_ENDS = {"block_begin": ("{%", "%}"), "variable_begin": ("{{", "}}")}
#: The character offset Jinja's lexer appends to its messages ("unexpected char '#' at 1268").
_LEXER_OFFSET = re.compile(r" at \d+$")


def _unclosed_tag(env: jinja2.Environment, source: str, name: str | None, error_line: int) -> tuple[int, str] | None:
    """(line, token) of a ``{%`` or ``{{`` that starts before ``error_line`` and was still
    open there, or that ran into another tag's opening: Jinja reads a tag missing its end on
    into the next lines and fails at whatever it finds there."""
    current: tuple[int, str] | None = None  # the tag being read
    ran_into: tuple[int, str] | None = None  # the last tag that read another's "{%" or "{{"
    previous = None
    try:
        for lineno, token, value in env.lexer.tokeniter(source, name):
            if lineno > error_line:
                break
            if token in _TAG_ENDS:
                current = (lineno, token)
            elif token in ("block_end", "variable_end"):
                current = None
            elif current is not None and token == "operator" and previous == "{" and value in ("{", "%"):
                ran_into = current
            previous = value if token == "operator" else None
    except jinja2.TemplateSyntaxError:
        pass  # where the lexer gave up: ``current`` is the tag it was reading
    for tag in (current, ran_into):
        if tag is not None and tag[0] < error_line:
            return tag
    return None
