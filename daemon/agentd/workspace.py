"""The workspace on disk, held in memory: template sources, agent sources, traits, catalog.

``refresh(paths)`` re-reads the given paths (files or folders, existing or not: the disk
decides what changed, never the event kind; the whole workspace is its two folders) and
returns a ``Delta``: the graph input nodes whose fingerprint changed, so the builder can
invalidate exactly their readers.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import yaml

from . import graph as g
from ._child import Child, detach_signals, fork, stop
from .config import Config
from .exceptions import DataError, SourceError, TemplateError
from .store import exact_json
from .trace import MISSING, fingerprint

if TYPE_CHECKING:
    import multiprocessing.connection
    import multiprocessing.process

try:  # libyaml's loader is ~10x faster than the pure-Python one
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _Loader = yaml.SafeLoader

TEMPLATE_SUFFIXES = (".j2", ".jinja", ".jinja2")
YAML_SUFFIXES = (".yaml", ".yml")
TRAITS_DIR = "traits"

#: The agent keys other agents see through ``catalog``: a change to any other key of an agent
#: never re-renders another agent.
CATALOG_KEYS = ("id", "name", "description", "domain", "tags", "handoffs")


@dataclasses.dataclass
class AgentSource:
    id: str
    path: str
    data: dict[str, Any]
    fps: dict[str, bytes]
    fp: bytes
    catalog_entry: dict[str, Any]
    catalog_fp: bytes


@dataclasses.dataclass
class TraitSource:
    ref: str  # "<kind>/<id>"
    kind: str
    id: str
    path: str
    data: dict[str, Any]
    fps: dict[str, bytes]  # per top-level key: a render depends on the keys it read
    fp: bytes


@dataclasses.dataclass
class Delta:
    """What one scan or refresh changed."""

    nodes: set[str] = dataclasses.field(default_factory=set)
    templates: set[str] = dataclasses.field(default_factory=set)  # names added/changed/removed
    agents: set[str] = dataclasses.field(default_factory=set)  # ids added/changed/removed
    membership: bool = False  # the set of agents, traits or templates changed

    def __bool__(self) -> bool:
        return bool(self.nodes or self.templates or self.agents or self.membership)

    def update(self, other: Delta) -> None:
        self.nodes |= other.nodes
        self.templates |= other.templates
        self.agents |= other.agents
        self.membership |= other.membership


#: Aliases may expand a document to this many values (nodes), or to as many as it has
#: characters when that is more: a document without aliases always fits. PyYAML builds one
#: shared object per anchor, so the expansion is not paid while parsing but later, by every
#: walk of the value (fingerprinting, the JSON the store keeps, rendering): 9 levels of 10
#: aliases in 400 bytes are 10^9 values there. Go's yaml.v3 and SnakeYAML bound the same way.
MAX_EXPANDED_NODES = 100_000
_ANCHOR = re.compile(r"&([0-9A-Za-z_-]+)")  # the names libyaml and PyYAML accept
_ALIAS = re.compile(r"\*([0-9A-Za-z_-]+)")
_MERGE_TAG = "tag:yaml.org,2002:merge"


class AliasBomb(yaml.MarkedYAMLError):
    """A document whose aliases expand past the budget, or that contains itself."""


class DuplicateKey(yaml.MarkedYAMLError):
    """A mapping that repeats a key: YAML keeps the last value and drops the first silently."""

    def __init__(self, key: str, first_line: int, mark: yaml.Mark) -> None:
        super().__init__(problem=f"duplicate key {key!r}", problem_mark=mark)
        self.key = key
        self.first_line = first_line


class _StrictLoader(_Loader):  # type: ignore[misc]
    """The safe loader, refusing duplicate keys. The check rides on ``flatten_mapping``,
    which the constructor calls once for every mapping before building it."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        #: Mappings that had ``<<`` merge keys: flattened, they hold the merged keys next to
        #: their own, and a second flatten (as the source of another merge) must not count
        #: an override as a repeat.
        self._merged: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if id(node) not in self._merged:
            try:  # the common case, in one set: no key text repeats and no merge
                keys = {key.value for key, _value in node.value}
                plain = len(keys) == len(node.value) and "<<" not in keys
            except TypeError:  # a collection as a key
                plain = False
            if not plain:
                self._check_keys(node)
        super().flatten_mapping(node)

    def _check_keys(self, node: yaml.MappingNode) -> None:
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key_node, _value in node.value:
            if key_node.tag == _MERGE_TAG:
                self._merged.add(id(node))
            elif isinstance(key_node, yaml.ScalarNode):  # the same text and tag: the same key
                first = seen.setdefault((key_node.tag, key_node.value), key_node)
                if first is not key_node:
                    raise DuplicateKey(key_node.value, first.start_mark.line + 1, key_node.start_mark)


def parse_yaml(text: str, allow_duplicate_keys: bool = False) -> Any:
    """Parse YAML with the safe loader only (data is data, never objects or code), refusing a
    document whose aliases expand it past the budget (``AliasBomb``) and, unless
    ``allow_duplicate_keys``, one that repeats a key (``DuplicateKey``). Raises ``yaml.YAMLError``."""
    loader = (_Loader if allow_duplicate_keys else _StrictLoader)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        # Aliases expand only when a name is both anchored and aliased: most files need no walk.
        anchors = set(_ANCHOR.findall(text))
        if anchors and not anchors.isdisjoint(_ALIAS.findall(text)):
            _check_expansion(node, text, max(MAX_EXPANDED_NODES, len(text)))
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node, text: str, budget: int) -> None:
    """Count the values ``root`` holds once every alias is expanded (each shared node once, so
    this costs the document's size, not the expansion's) and refuse past ``budget``."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # on the current path: reaching one again is a cycle

    def size(node: yaml.Node) -> int:
        key = id(node)
        known = sizes.get(key)
        if known is not None:
            return known
        if key in open_nodes:
            raise AliasBomb(
                problem="an alias refers to a collection that contains it; a source must be "
                "a tree of values, not a recursive structure",
                problem_mark=_alias_mark(node, text),
            )
        total = 1
        if isinstance(node, yaml.SequenceNode | yaml.MappingNode):
            open_nodes.add(key)
            children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
            for child in children:
                total += size(child)
            open_nodes.discard(key)
        if total > budget:
            raise AliasBomb(
                problem=f"aliases expand this document past {budget:,} values (each *alias repeats "
                "everything its &anchor holds); agentd refuses it to protect its memory: write "
                "the values out or repeat them less",
                problem_mark=_alias_mark(node, text),
            )
        sizes[key] = total
        return total

    try:
        size(root)
    except RecursionError:
        raise AliasBomb(
            problem="collections nested too deeply to count its aliases", problem_mark=root.start_mark
        ) from None


def _alias_mark(node: yaml.Node, text: str) -> yaml.Mark:
    """The first alias inside ``node``'s text (where the expansion happens), else its start."""
    start, end = node.start_mark, node.end_mark
    found = _ALIAS.search(text, start.index + 1, max(end.index, start.index + 1))
    if found is None:
        return start
    line = text.count("\n", 0, found.start())
    column = found.start() - (text.rfind("\n", 0, found.start()) + 1)
    return yaml.Mark(start.name, found.start(), line, column, None, 0)


TAB_MESSAGE = "tab characters are not allowed for indentation in YAML; use spaces"


def yaml_problem(exc: yaml.MarkedYAMLError, text: str) -> str:
    """What is wrong, in a template author's words: a tab where YAML expects indentation is
    reported by libyaml as "found character that cannot start any token"."""
    mark = exc.problem_mark or exc.context_mark
    problem = exc.problem or ""
    if isinstance(exc, yaml.scanner.ScannerError) and mark is not None:
        line = source_line(text, mark.line + 1) or ""
        indent = line[: len(line) - len(line.lstrip(" \t"))]
        at_tab = line[mark.column : mark.column + 1] == "\t"
        if at_tab or "tab character" in problem or ("\t" in indent and "cannot start any token" in problem):
            return TAB_MESSAGE
    if isinstance(exc, DuplicateKey):
        return f"duplicate key {exc.key!r} (first defined on line {exc.first_line}); YAML would keep only the last"
    return exc.problem or "invalid YAML"


#: What libyaml was still reading when it gave up at a later line: the mistake is where that
#: starts (an unclosed "[", "{" or quote), as with a Jinja tag missing its end.
_UNCLOSED = {
    "while parsing a flow sequence": "'[' on line {line} has no closing ']'",
    "while parsing a flow mapping": "'{{' on line {line} has no closing '}}'",
    "while scanning a quoted scalar": "the quoted text that starts on line {line} is not closed",
}


def yaml_mark(exc: yaml.MarkedYAMLError) -> tuple[Any, str | None]:
    """Where the mistake is, and, when that is an unclosed bracket or quote found lines later,
    what to say about it."""
    start, end = exc.context_mark, exc.problem_mark
    unclosed = _UNCLOSED.get(exc.context or "")
    if unclosed and start is not None and end is not None and start.line < end.line:
        return start, unclosed.format(line=start.line + 1) + f" (at line {end.line + 1}: {exc.problem})"
    return end or start, None


def load_yaml(text: str, path: str) -> Any:
    """``parse_yaml`` with duplicate keys refused; a ``DataError`` at the mistake's line."""
    try:
        return parse_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark, unclosed = yaml_mark(exc)
        line, column = mark_position(mark) or (None, None)
        problem = yaml_problem(exc, text)
        if isinstance(exc, DuplicateKey | AliasBomb) or problem == TAB_MESSAGE:
            message = f"{path}: {problem}"
        elif unclosed:
            message = f"{path}: malformed YAML: {unclosed}"
        else:
            context = f" ({exc.context})" if exc.context else ""
            message = f"{path}: malformed YAML: {problem}{context}"
        raise DataError(message, path, line, source_line(text, line), column=column) from None
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: malformed YAML: {exc}", path) from None


class ParseAhead:
    """Agent and trait sources parsed in forked worker processes while the caller goes on
    (importing, compiling templates): a cold ``--jobs`` build parses ~3.5 ms of YAML per agent
    on one core otherwise. ``result()`` gives parsed values by the fingerprint of the source's
    bytes; a source that does not parse is left out (the workspace parses it again and reports
    the error with its line).

    The caller is one of the parsers: ``jobs - 1`` workers start at once, and when the caller
    is ready it takes sources from the same queue until none is left, so all of them run out of
    work together. (A ``ProcessPoolExecutor`` with ``jobs`` workers left one core idle while the
    caller, slowed by the workers, was still compiling; its executor thread, which hands
    workers their next task, waits for the caller's GIL.)"""

    #: Forking pays off from this many sources to parse.
    MIN_FILES = 16

    def __init__(
        self, items: list[tuple[str, Path, bytes | None]], workers: int, read: Callable[[Path], bytes | None]
    ) -> None:
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self._items = items
        self._read = read  # ``Workspace.read_source``: nothing outside the workspace is read
        self._next = context.Value("q", 0)  # the next source to parse, for whoever is free
        self._workers: list[Child] = []
        try:
            for _ in range(workers):
                fork(context, self._serve, "agentd-parse", self._workers)
        except OSError:  # fork() refused part-way (process limits): stop the ones that started
            self.close()
            raise

    @classmethod
    def start(cls, config: Config, jobs: int, store: Any = None) -> ParseAhead | None:
        """Start parsing the sources ``store`` does not hold parsed already; None when there
        are too few to be worth it."""
        if jobs < 2:
            return None
        workspace = Workspace(config)
        paths = workspace.agent_paths()
        items: list[tuple[str, Path, bytes | None]]
        if store is not None and store.path.exists():
            items = []
            for path in paths:
                try:
                    raw = workspace.read_source(path)
                except Unreadable:  # the workspace reads it again and reports why not
                    continue
                if raw is not None and not store.has_parsed(fingerprint(raw)):
                    items.append((workspace.rel(path), path, raw))
            store.close()  # never carry an open SQLite connection across fork()
        else:  # nothing stored to skip: whichever process parses a source reads it
            items = [(workspace.rel(path), path, None) for path in paths]
        if len(items) < cls.MIN_FILES:
            return None
        try:
            return cls(items, jobs - 1, workspace.read_source)
        except OSError:  # no processes to be had: the workspace parses them in-process
            return None

    def _take(self, worker: bool = False) -> list[tuple[bytes, Any, bytes | None]]:
        """Parse sources from the shared queue until it is empty: (fingerprint of the bytes,
        value, ``exact_json(value)``). A worker sends the JSON alone when it is exact: 2x
        cheaper to load than to unpickle, and the store keeps those bytes as they are."""
        out: list[tuple[bytes, Any, bytes | None]] = []
        while True:
            with self._next.get_lock():
                index = self._next.value
                self._next.value = index + 1
            if index >= len(self._items):
                return out
            rel, path, raw = self._items[index]
            try:
                raw = self._read(path) if raw is None else raw
                if raw is None:
                    continue
                value = load_yaml(raw.decode("utf-8"), rel)
            except Exception:  # the workspace reads and parses it again, and reports why not
                continue
            dumped = exact_json(value)
            out.append((fingerprint(raw), None if worker and dumped is not None else value, dumped))

    def _serve(
        self,
        conn: multiprocessing.connection.Connection,
        parent_ends: list[multiprocessing.connection.Connection],
        parent: int,
    ) -> None:
        detach_signals(parent, parent_ends)
        try:
            conn.send(self._take(worker=True))
        except OSError:  # the parent is gone (or stopped us): nobody wants the result
            pass
        conn.close()

    def result(self) -> dict[bytes, tuple[Any, bytes | None]]:
        """Parsed sources by the fingerprint of their bytes: (value, ``exact_json(value)``)."""
        parsed = {fp: (value, dumped) for fp, value, dumped in self._take()}
        for conn, _proc in self._workers:
            try:
                found = conn.recv()
            except (EOFError, OSError):  # a worker died: what it took is parsed in-process
                continue
            for fp, value, dumped in found:
                parsed[fp] = (orjson.loads(dumped) if value is None else value, dumped)
        self.close()
        return parsed

    def close(self) -> None:
        """Stop the workers: after ``result()`` they have nothing left to do; before it (a
        failed start, a build that raised) their work is not wanted."""
        stop(self._workers, None)


def decode_text(raw: bytes, rel: str, error: type[SourceError]) -> str:
    """A source file's bytes as text, or ``error`` at the line and column of the first byte
    that is not UTF-8 (a byte offset means nothing in an editor)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad, reason = exc.start, exc.reason
    # (Raised outside the handler: the error is kept, and must not keep the file's bytes.)
    start = raw.rfind(b"\n", 0, bad) + 1
    line = raw.count(b"\n", 0, bad) + 1
    column = len(raw[start:bad].decode("utf-8", "replace")) + 1
    end = raw.find(b"\n", bad)
    raise error(
        f"{rel}: not UTF-8 text: byte 0x{raw[bad]:02x} at line {line}, column {column} ({reason}); "
        "save the file as UTF-8",
        rel,
        line,
        raw[start : end if end >= 0 else len(raw)].decode("utf-8", "replace"),
        column=column,
    )


#: Opening a source never blocks (a FIFO named x.yaml) nor adopts a terminal.
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


class Unreadable(Exception):
    """A source agentd cannot or must not read; the message says why, in a user's words."""


#: A file as one read saw it: its bytes, why it could not be read, or None (no such file).
Read = bytes | Unreadable | None


#: What ``Workspace._raw`` keeps of a source to read again whatever its bytes (no fingerprint
#: is empty): the remaining one of two sources for a name, which was not loaded.
_RELOAD = b""


def _unreadable_fp(reason: str) -> bytes:
    """What ``Workspace._raw`` keeps of a file it could not read (never a content's fingerprint:
    another domain of the hash), so that it is read again once it changes."""
    return hashlib.blake2b(reason.encode(), digest_size=16, person=b"agentd:unread").digest()


def _read_fd(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _real_path(fd: int, path: Path) -> str:
    """Where the open file ``fd`` really is: every link on the way resolved, by the kernel,
    for the file actually opened (no window for a link to be swapped in)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # no /proc: resolve the name instead
        return os.path.realpath(path)


def _read_opened(fd: int, path: Path, expected: str | None) -> bytes | None:
    """The bytes of the file opened as ``fd`` (closed here), when it is a regular file whose
    real path is ``expected``; None for a folder or a file found elsewhere."""
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode) or _real_path(fd, path) != expected:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise Unreadable("cannot read: not a regular file")
        return _read_fd(fd)
    except OSError as exc:
        _cannot_read(exc)
        return None
    finally:
        os.close(fd)


def _cannot_read(exc: OSError) -> None:
    """Nothing for a file that is not there (any more); otherwise why it cannot be read."""
    if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        return
    if isinstance(exc, PermissionError):
        raise Unreadable("cannot read: permission denied") from None
    raise Unreadable(f"cannot read: {(exc.strerror or str(exc)).lower()}") from None


def read_inside(root: Path, rel: str) -> bytes | None:
    """The bytes of the file a setting names (``rel``: relative to the workspace root), read
    only when it really is inside the root, as sources are: a path out of it (``..``, an
    absolute path elsewhere) or a symbolic link out (whose target is never opened) raises
    ``Unreadable``. None: no such file."""
    top = os.path.realpath(root)
    lexical = os.path.normpath(os.path.join(root, rel))
    if not lexical.startswith(os.path.normpath(root) + os.sep) and not lexical.startswith(top + os.sep):
        raise Unreadable(f"{lexical} is outside the workspace {root}; agentd reads nothing outside it")
    real = os.path.realpath(lexical)
    if not real.startswith(top + os.sep):
        raise Unreadable(f"a symbolic link to {real}, outside the workspace; agentd reads nothing outside it")
    try:
        fd = os.open(real, _OPEN_FLAGS | os.O_NOFOLLOW)
    except OSError as exc:
        _cannot_read(exc)
        return None
    return _read_opened(fd, Path(real), real)  # a link swapped in since: nothing read


def source_line(text: str, line: int | None) -> str | None:
    if not line:
        return None
    lines = text.splitlines()
    return lines[line - 1] if 0 < line <= len(lines) else None


def compose(text: str) -> yaml.Node | None:
    """The YAML node tree (with line/column marks), or None when the text does not parse."""
    try:
        return yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return None


def node_at(root: yaml.Node | None, keys: Iterable[str | int]) -> tuple[yaml.Node | None, yaml.Node | None]:
    """The deepest node along ``keys`` (mapping keys / sequence indexes) and, when the last step
    was a mapping key, that key's node."""
    node, key_node = root, None
    for key in keys:
        if isinstance(node, yaml.MappingNode) and isinstance(key, str):
            match = next(((k, v) for k, v in node.value if k.value == key), None)
            if match is None:
                break
            key_node, node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node, key_node = node.value[key], None
        else:
            break
    return node, key_node


def trait_ids(refs: Iterable[str], kind: str) -> list[str]:
    """The ids of the traits of one kind among references ``kind/id``, sorted (what an unknown
    trait's message offers)."""
    return sorted(ref.split("/", 1)[1] for ref in refs if ref.startswith(f"{kind}/"))


def position(*candidates: yaml.Node | None) -> tuple[int, int] | None:
    """1-based (line, column) of the first node given that exists."""
    node = next((n for n in candidates if n is not None), None)
    return mark_position(node.start_mark) if node is not None else None


def mark_position(mark: yaml.Mark | None) -> tuple[int, int] | None:
    """1-based (line, column) of a YAML mark (PyYAML counts from 0); None without one."""
    return (mark.line + 1, mark.column + 1) if mark is not None else None


def locate(text: str, keys: Iterable[str | int]) -> int | None:
    """The 1-based line of the YAML node at ``keys``, or of its deepest existing ancestor. Only
    used on the error path: composing is slower than loading."""
    node, key_node = node_at(compose(text), keys)
    where = position(key_node, node)
    return where[0] if where else None


class Workspace:
    """In-memory mirror of ``templates/`` and ``agents/``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = config.root
        self.templates: dict[str, str] = {}
        self.template_fps: dict[str, bytes] = {}
        self.template_errors: dict[str, TemplateError] = {}
        self.agents: dict[str, AgentSource] = {}
        #: Each agent's catalog entry and its fingerprint, kept beside ``agents`` (same keys,
        #: same order) so a build does not walk every agent to assemble the catalog.
        self.catalog_entries: dict[str, dict[str, Any]] = {}
        self.catalog_fps: dict[str, bytes] = {}
        self._catalog_fp: bytes | None = None
        self.agent_errors: dict[str, DataError] = {}  # id -> why its source did not load
        self.traits: dict[str, TraitSource] = {}
        self.trait_errors: dict[str, DataError] = {}  # ref -> why
        self._raw: dict[Path, bytes] = {}  # last-seen fingerprint of each file's bytes
        #: Parsed YAML by the fingerprint of its bytes (the persistent store, when there is one).
        self.parsed_cache: Any = None
        #: Parses done ahead by worker processes (a cold ``--jobs`` build), by the same key.
        self.prefetched: dict[bytes, tuple[Any, bytes | None]] = {}
        #: When set, every file (re-)read is recorded here: path -> bytes (None: gone). Worker
        #: processes replay it to reach exactly this state (``pool.py``).
        self.journal: dict[Path, Read] | None = None
        #: Sources that could not be read -> why (their errors are the agent's, trait's or
        #: template's own); folders that could not be listed, and links to folders outside the
        #: workspace: errors of their own, no source to pin them on.
        self.unreadable: dict[Path, str] = {}
        self.folder_errors: dict[Path, SourceError] = {}
        self.unlisted: set[Path] = set()  # folders that could not be listed
        #: Sources that are symbolic links -> their targets (workspace paths), and back: an
        #: edit of a target is reported for the target only, and its links must follow.
        self._links: dict[Path, Path] = {}
        self._linked: dict[Path, set[Path]] = {}
        #: Sources that became the only one of their name (its namesake went) during this
        #: refresh: read again at its end (see ``_apply_file``).
        self._reload: set[Path] = set()
        self._roots = self._real_roots()

    # -- paths ----------------------------------------------------------------------------
    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def classify(self, path: Path) -> tuple[str, str] | None:
        """``("template", name)``, ``("agent", id)``, ``("trait", ref)`` or None for a file
        agentd does not read (editor temp files, other extensions)."""
        tdir, adir = self.config.templates_path, self.config.agents_path
        if path.name.startswith("."):
            return None
        if path.suffix in TEMPLATE_SUFFIXES and path.is_relative_to(tdir):
            return "template", path.relative_to(tdir).as_posix()
        if path.suffix in YAML_SUFFIXES and path.is_relative_to(adir):
            parts = path.relative_to(adir).parts
            if len(parts) == 1:
                return "agent", path.stem
            if len(parts) == 3 and parts[0] == TRAITS_DIR:
                return "trait", f"{parts[1]}/{Path(parts[2]).stem}"
        return None

    def files(self) -> list[Path]:
        """Every file read by the last scan or refresh (absolute paths)."""
        return list(self._raw)

    def _disk_files(self, top: Path) -> set[Path]:
        """Every file under ``top`` (or ``top`` itself). Links to folders are not followed
        (a link out of the workspace is reported); folders that cannot be listed are."""
        self._forget_folders(top)
        try:
            mode = os.stat(top).st_mode
        except OSError:
            return set()
        if not stat.S_ISDIR(mode):
            return {top}
        if top not in self._root_paths and os.path.realpath(top) != self._expected(top):
            self._folder_link(top)  # a link to a folder, or inside one
            return set()
        found: set[Path] = set()
        for dirpath, dirnames, filenames in os.walk(top, onerror=self._unlistable):
            kept = []
            for name in dirnames:
                if not name.startswith("."):
                    sub = os.path.join(dirpath, name)
                    if os.path.islink(sub):
                        self._folder_link(Path(sub))
                    else:
                        kept.append(name)
            dirnames[:] = kept
            found.update(Path(dirpath, f) for f in filenames)
        return found

    # -- reading: never outside the workspace -----------------------------------------------
    @property
    def _root_paths(self) -> tuple[Path, Path]:
        return self.config.templates_path, self.config.agents_path

    def _real_roots(self) -> list[tuple[str, str]]:
        """templates/ and agents/ as configured and as they really are (each may be a link)."""
        return [(str(p), os.path.realpath(p)) for p in self._root_paths]

    def _expected(self, path: Path) -> str | None:
        """The real path of a workspace path when no link lies on its way below the roots."""
        text = str(path)
        for lexical, real in self._roots:
            if text == lexical or text.startswith(lexical + os.sep):
                return real + text[len(lexical) :]
        return None

    def _inside(self, real: str) -> str | None:
        """The workspace path of a real path inside templates/ or agents/ (else None)."""
        for lexical, root in self._roots:
            if real == root or real.startswith(root + os.sep):
                return lexical + real[len(root) :]
        return None

    def _outside(self, real: str, what: str) -> str:
        dirs = f"{self.config.templates_dir}/ and {self.config.agents_dir}/"
        return f"a symbolic link to {what} {real}, outside {dirs}; agentd reads nothing outside them"

    def read_source(self, path: Path) -> bytes | None:
        """A source's bytes; None when there is no such file (gone, a folder, a dangling link,
        or reached through a link to a folder: not followed). Raises ``Unreadable`` for one
        agentd cannot or must not read: a link out of templates/ and agents/ (whose target it
        does not even open), no permission, not a regular file."""
        found = self._open_source(path)
        return found[0] if found is not None else None

    def _open_source(self, path: Path) -> tuple[bytes, str | None] | None:
        """``read_source``, plus the target (a workspace path) when the file is a link."""
        try:
            fd = os.open(path, _OPEN_FLAGS | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # the file itself is a symbolic link
                return self._open_link(path)
            _cannot_read(exc)
            return None
        # A plain file's real path is the one expected unless a folder link is on the way (or
        # it was renamed or deleted since): one readlink, no walk of the path.
        data = _read_opened(fd, path, self._expected(path))
        return None if data is None else (data, None)

    def _open_link(self, path: Path) -> tuple[bytes, str | None] | None:
        """A source that is a symbolic link: read when it leads to a file inside templates/ or
        agents/; a target outside them is not even opened (it may be a device or a FIFO)."""
        if os.path.realpath(path.parent) != self._expected(path.parent):
            return None  # inside a linked folder: not followed
        real = os.path.realpath(path)
        target = self._inside(real)
        if target is None:
            if not os.path.lexists(real) or os.path.isdir(real):
                return None  # dangling, as any missing file; a folder: the walk reports it
            raise Unreadable(self._outside(real, "the file"))
        try:
            fd = os.open(real, _OPEN_FLAGS | os.O_NOFOLLOW)
        except OSError as exc:
            _cannot_read(exc)
            return None
        # A link swapped in on the way since it was resolved: nothing to read.
        data = _read_opened(fd, Path(real), real)
        return None if data is None else (data, target)

    def source_text(self, rel: str) -> str:
        """A source's text on disk now, "" when it cannot be read (to locate an error in it)."""
        try:
            raw = self.read_source(self.root / rel)
        except Unreadable:
            return ""
        return raw.decode("utf-8", errors="replace") if raw is not None else ""

    def _folder_error(self, path: Path, message: str) -> None:
        rel = self.rel(path)
        kind = TemplateError if path.is_relative_to(self.config.templates_path) else DataError
        self.folder_errors[path] = kind(f"{rel}: {message}", rel)

    def _folder_link(self, path: Path) -> None:
        """A link to a folder is not followed; one leading out of the workspace is an error
        (a link inside, as ever, is ignored)."""
        real = os.path.realpath(path)
        if os.path.islink(path) and self._inside(real) is None:
            self._folder_error(path, self._outside(real, "the folder"))

    def _unlistable(self, exc: OSError) -> None:
        if isinstance(exc, FileNotFoundError | NotADirectoryError) or exc.filename is None:
            return  # gone meanwhile
        path = Path(exc.filename)
        self.unlisted.add(path)
        why = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc)).lower()
        self._folder_error(path, f"cannot list this folder: {why}; the sources in it are left out")

    def _forget_folders(self, top: Path) -> None:
        """Before ``top`` is listed again."""
        if self.folder_errors:
            for path in [p for p in self.folder_errors if p.is_relative_to(top)]:
                del self.folder_errors[path]
                self.unlisted.discard(path)

    def _set_link(self, path: Path, target: str | None) -> None:
        old = self._links.pop(path, None)
        if old is not None:
            self._linked[old].discard(path)
            if not self._linked[old]:
                del self._linked[old]
        if target is not None:
            self._links[path] = Path(target)
            self._linked.setdefault(Path(target), set()).add(path)

    # -- loading --------------------------------------------------------------------------
    def refresh(self, paths: Iterable[Path]) -> Delta:
        """Re-read ``paths`` (files or folders; deleted ones included) and report changes."""
        delta = Delta()
        broken = set(self.agent_errors)
        candidates: set[Path] = set()
        known = self._raw
        for path in paths:
            path = Path(os.path.abspath(path))
            if path in self._root_paths:
                self._roots = self._real_roots()
            try:
                mode = os.stat(path).st_mode
            except OSError:
                mode = 0
            if path in known or (mode and not stat.S_ISDIR(mode)):
                candidates.add(path)
                if not stat.S_ISDIR(mode):
                    continue
            # A folder (or something that was one): everything under it, on disk and known.
            candidates |= self._disk_files(path)
            candidates |= {p for p in known if p.is_relative_to(path)}
        if self._linked:  # a link's target changed: so did the link
            for path in list(candidates):
                candidates |= self._linked.get(path, set())
        for path in sorted(candidates):
            kind = self.classify(path)
            if kind is not None:
                self._refresh_file(path, kind, delta)
        while self._reload:
            path = self._reload.pop()
            if (kind := self.classify(path)) is not None:
                self._refresh_file(path, kind, delta)
        self._broken_changed(broken, delta)
        return delta

    def replay(self, journal: dict[Path, Read]) -> Delta:
        """Apply file contents read by another process's ``refresh`` (its ``journal``)."""
        delta = Delta()
        broken = set(self.agent_errors)
        for path in sorted(journal):
            kind = self.classify(path)
            if kind is not None:
                self._apply_file(path, kind, delta, journal[path])
        while self._reload:  # (the parent read it again, so its bytes are in the journal)
            path = self._reload.pop()
            if path in journal and (kind := self.classify(path)) is not None:
                self._apply_file(path, kind, delta, journal[path])
        self._broken_changed(broken, delta)
        return delta

    def _broken_changed(self, before: set[str], delta: Delta) -> None:
        """An agent source that stops or starts loading changes what reading the catalog does
        for every reader (``TrackedCatalog`` stops a render that reads where a broken agent
        belongs), even when it changes no entry: a new file that does not load, a broken one
        deleted. Compared by ids, so any way a source comes to not load counts."""
        if before != self.agent_errors.keys():
            changed = before ^ self.agent_errors.keys()
            delta.nodes.update([g.CATALOG, g.RELATIONS, *(g.catalog_node(a) for a in changed)])

    def agent_paths(self) -> list[Path]:
        """Every agent and trait source on disk (for parsing ahead)."""
        return [p for p in sorted(self._disk_files(self.config.agents_path)) if self.classify(p) is not None]

    def _refresh_file(self, path: Path, kind: tuple[str, str], delta: Delta) -> None:
        raw: Read
        try:
            raw, target = self._open_source(path) or (None, None)
        except Unreadable as exc:
            raw, target = Unreadable(str(exc)), None
        self._set_link(path, target)
        if self.journal is not None:
            self.journal[path] = raw
        self._apply_file(path, kind, delta, raw)

    def _apply_file(self, path: Path, kind: tuple[str, str], delta: Delta, raw: Read) -> None:
        if self.unreadable:
            self.unreadable.pop(path, None)
        if raw is None:
            if self._raw.pop(path, None) is not None:
                namesake = self._namesake(kind, path)
                if namesake is None:
                    self._forget(kind, path, delta)
                else:  # one of two sources for a name went: the other one is read again
                    self._raw[namesake] = _RELOAD
                    self._reload.add(namesake)
                    delta.membership = True
            return
        if isinstance(raw, Unreadable):
            self.unreadable[path] = str(raw)
            fp = _unreadable_fp(str(raw))
        else:
            fp = fingerprint(raw)
        if self._raw.get(path) == fp:
            return
        is_new = path not in self._raw
        self._raw[path] = fp
        if is_new:
            delta.membership = True
        what, name = kind
        if what == "template":
            self._load_template(name, path, raw, fp, delta)
        elif (namesake := self._namesake(kind, path)) is not None:
            self._twins(kind, sorted([path, namesake]), delta)
        elif what == "agent":
            self._load_agent(name, path, raw, delta)
        else:
            self._load_trait(name, path, raw, delta)

    def _namesake(self, kind: tuple[str, str], path: Path) -> Path | None:
        """The other source of the same agent or trait (``x.yaml`` beside ``x.yml``), if any."""
        if kind[0] == "template":
            return None
        for suffix in YAML_SUFFIXES:
            other = path.with_suffix(suffix)
            if other != path and other in self._raw:
                return other
        return None

    def _twins(self, kind: tuple[str, str], paths: list[Path], delta: Delta) -> None:
        """Two sources for one agent or trait: neither loads (which one was meant is not for
        agentd to guess) until one of them goes. An agent keeps its last good output meanwhile,
        as with any source that does not load."""
        what, name = kind
        first, second = (self.rel(p) for p in paths)
        noun = "agent" if what == "agent" else "trait"
        error = DataError(
            f"{first}: two sources for {noun} {name!r}: {first} and {second} (.yaml and .yml are both "
            "read); keep one of them",
            first,
        )
        error.rule = "duplicate-source"
        if what == "agent":
            self.agent_errors[name] = error
            self._set_agent(name, None, delta)
        else:
            self.trait_errors[name] = error
            self._set_trait(name, None, delta)

    def _forget(self, kind: tuple[str, str], path: Path, delta: Delta) -> None:
        what, name = kind
        delta.membership = True
        if what == "template":
            self.templates.pop(name, None)
            self.template_fps.pop(name, None)
            self.template_errors.pop(name, None)
            delta.templates.add(name)
            delta.nodes.add(g.template_node(name))
        elif what == "agent":
            self._set_agent(name, None, delta)
            self.agent_errors.pop(name, None)
        else:
            self._set_trait(name, None, delta)
            self.trait_errors.pop(name, None)

    def _load_template(self, name: str, path: Path, raw: bytes | Unreadable, fp: bytes, delta: Delta) -> None:
        delta.templates.add(name)
        delta.nodes.add(g.template_node(name))
        self.template_fps[name] = fp
        self.template_errors.pop(name, None)
        if isinstance(raw, Unreadable):
            self.templates.pop(name, None)
            self.template_errors[name] = TemplateError(f"{self.rel(path)}: {raw}", self.rel(path))
            return
        try:
            self.templates[name] = decode_text(raw, self.rel(path), TemplateError)
        except TemplateError as exc:  # the name stays known: renders that load it fail with this
            self.templates.pop(name, None)
            self.template_errors[name] = exc.with_traceback(None)

    def _decode_yaml(self, path: Path, raw: bytes | Unreadable) -> Any:
        rel = self.rel(path)
        if isinstance(raw, Unreadable):
            raise DataError(f"{rel}: {raw}", rel)
        text = decode_text(raw, rel, DataError)
        raw_fp = self._raw.get(path) or fingerprint(raw)
        found = self.prefetched.pop(raw_fp, None)
        if found is not None:  # parsed ahead (``ParseAhead``)
            data, dumped = found
        elif self.parsed_cache and (data := self.parsed_cache.get_parsed(raw_fp)) is not None:
            dumped = None  # kept already
        else:
            data = load_yaml(text, rel)
            dumped = exact_json(data) if self.parsed_cache else None
        if dumped is not None and self.parsed_cache and isinstance(data, dict):
            self.parsed_cache.put_parsed(raw_fp, dumped, rel)
        if not isinstance(data, dict):
            raise DataError(
                f"{rel}: expected a mapping of keys at the top level, got {type(data).__name__}",
                rel,
                1,
                source_line(text, 1),
            )
        for key in data:
            if not isinstance(key, str):
                line = locate(text, [])
                raise DataError(f"{rel}: top-level keys must be strings, got {key!r}", rel, line)
        declared = data.get("id")
        if declared is not None and declared != path.stem:
            line = locate(text, ["id"])
            raise DataError(
                f"{rel}: id {declared!r} does not match the file name; expected {path.stem!r}",
                rel,
                line,
                source_line(text, line),
            )
        return data

    def _load_agent(self, agent_id: str, path: Path, raw: bytes | Unreadable, delta: Delta) -> None:
        try:
            data = self._decode_yaml(path, raw)
        except DataError as exc:
            self.agent_errors[agent_id] = exc
            self._set_agent(agent_id, None, delta)
            delta.agents.add(agent_id)
            return
        self.agent_errors.pop(agent_id, None)
        data.setdefault("id", agent_id)
        fps = {k: fingerprint(v) for k, v in data.items()}
        entry = {k: data.get(k) for k in CATALOG_KEYS}
        entry["name"] = entry["name"] or agent_id
        agent = AgentSource(
            agent_id,
            self.rel(path),
            data,
            fps,
            fingerprint(data),
            entry,
            fingerprint(entry),
        )
        self._set_agent(agent_id, agent, delta)

    def _set_agent(self, agent_id: str, new: AgentSource | None, delta: Delta) -> None:
        old = self.agents.get(agent_id)
        if new is None:
            self.agents.pop(agent_id, None)
            self.catalog_entries.pop(agent_id, None)
            self.catalog_fps.pop(agent_id, None)
        else:
            self.agents[agent_id] = new
            self.catalog_entries[agent_id] = new.catalog_entry
            self.catalog_fps[agent_id] = new.catalog_fp
        if (old is None) != (new is None):
            self._catalog_fp = None
            delta.nodes.add(g.CATALOG)
        delta.agents.add(agent_id)
        changed = _changed_keys(old.fps if old else {}, new.fps if new else {})
        delta.nodes.update(g.key_node(agent_id, k) for k in changed)
        if (old.catalog_fp if old else MISSING) != (new.catalog_fp if new else MISSING):
            delta.nodes.add(g.catalog_node(agent_id))
        if (old is None) != (new is None) or {"tags", "handoffs"} & set(changed):
            delta.nodes.add(g.RELATIONS)

    def _load_trait(self, ref: str, path: Path, raw: bytes | Unreadable, delta: Delta) -> None:
        try:
            data = self._decode_yaml(path, raw)
        except DataError as exc:
            self.trait_errors[ref] = exc
            self._set_trait(ref, None, delta)
            return
        self.trait_errors.pop(ref, None)
        kind, trait_id = ref.split("/", 1)
        data.setdefault("id", trait_id)
        data.setdefault("kind", kind)
        fps = {k: fingerprint(v) for k, v in data.items()}
        self._set_trait(ref, TraitSource(ref, kind, trait_id, self.rel(path), data, fps, fingerprint(data)), delta)

    def _set_trait(self, ref: str, new: TraitSource | None, delta: Delta) -> None:
        old = self.traits.pop(ref, None)
        if new is not None:
            self.traits[ref] = new
        if (old is None) != (new is None):
            delta.membership = True
            delta.nodes.add(g.TRAIT_KINDS)
        changed = _changed_keys(old.fps if old else {}, new.fps if new else {})
        delta.nodes.update(g.trait_key_node(ref, k) for k in changed)
        # Agents listing this trait must be re-resolved: it may have appeared or broken.
        delta.agents.update(a.id for a in self.agents.values() if ref in _trait_refs(a.data))

    # -- derived --------------------------------------------------------------------------
    def catalog_ids(self) -> list[str]:
        return sorted(self.agents)

    @property
    def catalog_fp(self) -> bytes:
        """Fingerprint of the set of agent ids (recomputed only when it changes: store lookups
        ask for it once per recorded input)."""
        if self._catalog_fp is None:
            self._catalog_fp = fingerprint(self.catalog_ids())
        return self._catalog_fp


def _changed_keys(old: dict[str, bytes], new: dict[str, bytes]) -> list[str]:
    """Top-level keys whose value changed, appeared or went, plus "*" (read by a render that
    iterated the mapping) when there is any."""
    changed = [k for k in old.keys() | new.keys() if old.get(k, MISSING) != new.get(k, MISSING)]
    return [*changed, "*"] if changed else []


def _trait_refs(data: dict[str, Any]) -> set[str]:
    traits = data.get("traits")
    refs: set[str] = set()
    if isinstance(traits, dict):
        for kind, ids in traits.items():
            if isinstance(ids, list):
                refs.update(f"{kind}/{i}" for i in ids if isinstance(i, str))
    return refs
