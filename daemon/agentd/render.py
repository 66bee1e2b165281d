"""Jinja2 rendering with dependency tracing (L1 compiled templates, L2 fragments).

One ``Environment`` lives as long as the engine: every template is compiled once, with
``auto_reload=False`` so Jinja never stats files behind our back; a changed template is
recompiled explicitly. Include/import/extends are resolved by name at render time
(``environment.get_template``), so a dependent template's compiled code stays valid when a
template it references changes: only the changed template is recompiled, and the *renders*
that loaded it are invalidated through the graph.
"""

from __future__ import annotations

import json
import re
import time
import traceback
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jinja2
import jinja2.bccache
import jinja2.meta
import orjson
from jinja2 import nodes

from . import __version__
from . import graph as g
from .cache import Caches, Rendered
from .exceptions import AgentdError, TemplateError
from .trace import MISSING, TrackedMapping, fingerprint, record, tracing
from .workspace import Workspace, source_line


class _Loader(jinja2.BaseLoader):
    """Serves template sources from the workspace's in-memory copy: a template is exactly what
    the last scan read, and nothing outside ``templates/`` can be loaded (names are keys of a
    dict, so ``../`` resolves to nothing)."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    def get_source(self, environment: jinja2.Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        source = self.workspace.templates.get(template)
        if source is None:
            error = self.workspace.template_errors.get(template)
            if error is not None:
                raise error
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


class _Environment(jinja2.Environment):
    """Records every template load into the current trace, hits included.

    ``Environment._load_template`` sees every include/import/extends; a loader hook would only
    see cache misses, and a dynamic ``{% include "traits/" ~ kind %}`` would go untracked.
    """

    caches: Caches
    fingerprints: Mapping[str, bytes]
    last_ast: dict[str, nodes.Template]

    def _load_template(self, name: str, globals: Any) -> jinja2.Template:
        # Jinja's own cache key (jinja2/environment.py, Environment._load_template).
        key = (weakref.ref(self.loader), name)
        if self.cache is not None and key in self.cache:
            self.caches.l1_counters.hits += 1
        else:
            self.caches.l1_counters.misses += 1
        record(g.template_node(name), self.fingerprints.get(name, MISSING))
        return super()._load_template(name, globals)

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
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, TrackedMapping):
            return self.getattr(obj, argument)
        return super().getitem(obj, argument)


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
        with tracing() as trace:
            try:
                text = self.env.get_template(name).render(context)
            except AgentdError:
                raise
            except jinja2.TemplateSyntaxError as exc:
                raise self._syntax_error(exc) from None
            except RecursionError as exc:
                raise self._cycle_error(exc) from None
            except Exception as exc:  # anything a template expression can raise
                raise self._runtime_error(exc, name) from None
        self.timings.append((name, time.perf_counter() - t0))
        return Rendered(text.encode(), trace.reads)

    # -- errors ---------------------------------------------------------------------------
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

    def _syntax_error(self, exc: jinja2.TemplateSyntaxError) -> TemplateError:
        path, name = self._rel(exc.filename, exc.name)
        return TemplateError(
            f"{path}: template syntax error: {exc.message}", path, exc.lineno, self._line_of(name, exc.lineno)
        )

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
        elif isinstance(exc, jinja2.UndefinedError):
            what = f"undefined variable: {exc.message}"
        else:
            what = f"{type(exc).__name__}: {exc}"
        return TemplateError(f"{path}: {what}", path, line, self._line_of(tname, line))

    def _cycle_error(self, exc: RecursionError) -> TemplateError:
        frames = self._template_frames(exc)
        names = [n for _, n, _ in frames]
        seen: dict[str | None, int] = {}
        chain: list[str | None] = names
        for i, n in enumerate(names):
            if n in seen:
                chain = names[seen[n] : i + 1]
                break
            seen[n] = i
        first = frames[0] if frames else (self.workspace.config.templates_dir, None, None)
        # Report at the include in the first template of the cycle.
        start = next((f for f in frames if f[1] == chain[0]), first) if chain else first
        return TemplateError(
            f"{start[0]}: include cycle: {' -> '.join(str(n) for n in chain)}",
            start[0],
            start[2],
            self._line_of(start[1], start[2]),
        )
