"""The persistent cache: rendered sections and compositions that survive a restart.

A constructive-trace store (as in Shake or Bazel): for every render it keeps the *list* of
inputs the render read (its dependency record), and the output under a key that fingerprints
those inputs' values plus agentd's version, Jinja2's version and the configuration. On startup
the engine recomputes the fingerprints of the recorded inputs; if the key exists, the render is
reused without running. A store written by another version, Jinja2 or config never matches.

SQLite (standard library) in WAL mode, not a folder of files. Measured side by side on this
machine (900 blobs of 60 KB, median of 5): reads 35.5 ms from SQLite vs 34.1 ms from files,
writes 172 ms in one SQLite transaction vs 137 ms as temp-file + rename each. Speed is a wash;
SQLite wins on what matters here: a dependency record and its output change in one atomic
transaction (files need two renames and can be seen half-updated), concurrent writers (a daemon
and an ``agentd build``) are serialised by its locking instead of racing on renames, 9,000
entries at N = 1,000 stay one indexed file instead of a directory fan-out, and a damaged store
is one file to set aside.

Every blob carries its own checksum: a corrupt row is a miss; a corrupt or truncated database
is set aside (``*.corrupt-<time>``) with a warning and rebuilt, and so is a SQLite file agentd
did not write (``*.foreign-<time>``: never adopted); only the newest set-aside copy is kept. A
store an earlier agentd wrote in another format is replaced. Anything else SQLite or the OS
reports (a full disk, an I/O error, an ``.agentd`` that cannot be created) says nothing about
what the store holds: it is kept, the build goes on without it (one warning) and the next
build tries it again. Never a crash, never wrong output. Each unit keeps its newest
KEEP_VERSIONS renders (each write drops the older ones of the units it wrote), so the store's
size follows the workspace, not its history.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from . import __version__, statedir
from .cache import Rendered
from .config import Config
from .trace import fingerprint

STORE_FILE = f"{statedir.STATE_DIR}/cache.sqlite3"
#: 2: blobs and aux rows name their unit / slot, so that superseded versions can be dropped.
#: 3: a composition's layout names its skeleton and every gap in order (``compose.Layout``).
#: 4: a blob's data is its last column. SQLite keeps a 60 KB row's tail in a chain of overflow
#: pages that it can only walk in order, so a digest stored after the data cost a walk through
#: all of them.
FORMAT = "4"
_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
#: Every table an agentd store has had (format 1 had no ``deps`` and ``aux``).
_TABLES = frozenset({"meta", "deps", "blobs", "aux"})
_SCHEMA = """
CREATE TABLE IF NOT EXISTS deps (unit TEXT PRIMARY KEY, reads BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (key BLOB PRIMARY KEY, unit TEXT NOT NULL, digest BLOB NOT NULL,
                                  reads BLOB NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS aux (key BLOB PRIMARY KEY, slot TEXT NOT NULL, data BLOB NOT NULL,
                                digest BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS blobs_digest ON blobs (digest);
CREATE INDEX IF NOT EXISTS blobs_unit ON blobs (unit);
CREATE INDEX IF NOT EXISTS aux_slot ON aux (slot);
"""
#: What a stored parse has been checked for: bumped when parsing refuses more (2: duplicate
#: keys, alias expansion), so a parse stored before is never taken as passing the new checks.
_PARSE_RULES = b"\0rules-2"
#: Versions kept per render unit (a section, a composition) and per aux slot (a source file's
#: parse, a template's bytecode): the current one and the one before, so an undo is served
#: from the store. Older ones are superseded for good; without this the store grew by every
#: render ever made (6 MB per section-template edit at N = 100: 3.4 GB after a day of probing
#: here, and SQLite's inserts slowed from 1 to 30 ms per batch as it grew).
KEEP_VERSIONS = 2
#: Deletes every version of a unit but the newest KEEP_VERSIONS (INSERT OR REPLACE gives a
#: re-written row a new, highest rowid: rowid order is write order).
_TRIM = (
    "DELETE FROM {table} WHERE {column}=?1 AND rowid NOT IN "
    "(SELECT rowid FROM {table} WHERE {column}=?1 ORDER BY rowid DESC LIMIT ?2)"
)


class _OtherFormat(sqlite3.DatabaseError):
    """The store was written by an agentd with another schema."""


class _Foreign(sqlite3.DatabaseError):
    """A SQLite database agentd did not write: set aside, never adopted (adopting it would
    write agentd's tables into someone else's file)."""


#: SQLite's primary result codes that say the file itself is damaged or not a database. Any
#: other error (SQLITE_FULL for a full disk, SQLITE_IOERR_* for a failed write, SQLITE_CANTOPEN,
#: SQLITE_READONLY) is about the disk, not the store's contents.
_DAMAGE = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def _damaged(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _DAMAGE


def _reason(exc: BaseException) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    return f"{exc} ({name})" if name else str(exc)


def exact_json(value: Any) -> bytes | None:
    """``value`` as JSON if JSON holds it exactly (dates, sets, non-string keys: None): how a
    parse is kept in the store, and handed from a parsing worker to the engine."""
    try:
        dumped = orjson.dumps(value)
    except TypeError:
        return None
    return dumped if orjson.loads(dumped) == value else None


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


#: How long a writer waits for another process's transaction (SQLite's busy timeout).
_TIMEOUT_S = 10


def _begin(db: sqlite3.Connection, wait: bool) -> bool:
    """Start a write transaction; without ``wait``, False at once if another writer has one.
    Waiting polls every millisecond: SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20,
    25 ... ms between tries, so a writer queued behind a 20 ms transaction (a worker's batch)
    slept ~13 ms past its end."""
    deadline = time.monotonic() + _TIMEOUT_S
    db.execute("PRAGMA busy_timeout=0")
    try:
        while True:
            try:
                db.execute("BEGIN IMMEDIATE")
                return True
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or (wait and time.monotonic() > deadline):
                    raise
                if not wait:
                    return False
            time.sleep(0.001)
    finally:
        db.execute(f"PRAGMA busy_timeout={_TIMEOUT_S * 1000}")


def input_key(stamp: bytes, unit: str, reads: dict[str, bytes]) -> bytes:
    h = hashlib.blake2b(stamp, digest_size=20)
    h.update(unit.encode())
    for node in sorted(reads):
        h.update(b"\0" + node.encode() + b"\1" + reads[node])
    return h.digest()


def render_stamp(config: Config) -> bytes:
    """What a stored render also depends on besides its traced inputs: agentd's code, Jinja2's
    and the settings that shape rendering. A store written under another stamp never matches."""
    import jinja2

    return fingerprint(
        [__version__, jinja2.__version__, config.templates_dir, config.agents_dir, list(config.sections)]
    )


def _format(db: sqlite3.Connection, tables: set[str]) -> str | None:
    """The store format recorded in ``meta``; FORMAT for an empty database (a new store)."""
    if not tables:
        return FORMAT
    if "meta" not in tables:
        return None
    try:
        row = db.execute("SELECT value FROM meta WHERE key='format'").fetchone()
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_ERROR:
            return None  # a table named meta without agentd's columns
        raise
    return None if row is None else str(row[0])


def open_store(config: Config, warn: Callable[..., Any] | None = None) -> Store | None:
    # The stamp when first needed: importing Jinja2 for its version took ~16 ms before a cold
    # build could start parsing in other processes (it is imported later, while they parse).
    return Store(config.root, functools.partial(render_stamp, config), warn) if config.cache else None


class Store:
    """One workspace's store. All methods swallow database errors into a set-aside + fresh
    store: the cache is an optimisation, never a reason to fail a build."""

    def __init__(self, root: Path, stamp: bytes | Callable[[], bytes], warn: Callable[..., Any] | None = None) -> None:
        self.root = root
        self.path = root / STORE_FILE
        self._stamp = stamp
        self._warn = warn or (lambda *a, **k: None)
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple[str, bytes, Rendered]] = []
        self._pending_aux: dict[bytes, tuple[str, bytes]] = {}
        self.hits = 0
        self.misses = 0
        self.corrupt_rows = 0
        #: Unusable for a reason other than damage (full disk, I/O error, no folder): every call
        #: is a miss or a dropped write until the next ``flush(wait=True)``, the end of a build.
        self._paused = False
        #: A warning was given and no write has succeeded since: one warning per episode.
        self._warned = False

    @property
    def stamp(self) -> bytes:
        """``render_stamp``: what every key also fingerprints."""
        if not isinstance(self._stamp, bytes):
            self._stamp = self._stamp()
        return self._stamp

    # -- connection ---------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            statedir.ensure(self.root)
            statedir.create_private(self.path)
            try:
                self._db = self._open()
            except _OtherFormat as exc:  # an earlier agentd's store: nothing in it can match
                self._remove()
                self._warn("cache.reset", path=str(self.path), reason=str(exc))
                self._db = self._reopen()
            except _Foreign as exc:
                self._set_aside(exc, "foreign")
                self._db = self._reopen()
            except sqlite3.DatabaseError as exc:
                if not _damaged(exc):
                    raise
                self._set_aside(exc, "corrupt")
                self._db = self._reopen()
        return self._db

    def _reopen(self) -> sqlite3.Connection:
        statedir.create_private(self.path)
        return self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        try:
            # 16 KB pages, not 4 KB, in a new store (an existing one keeps its own): a section is
            # ~60 KB, and a transaction of 500 of them took 37-43 instead of 53-59 ms (SQLite's
            # own microbenchmark here: 4, 8, 16, 32, 64 KB; 16 KB wrote fastest at the same size).
            db.execute("PRAGMA page_size=16384")
            # What the file is, before anything writes to it (WAL mode rewrites its header).
            tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            tables = {n for n in tables if not n.startswith("sqlite_")}
            found = _format(db, tables)
            if found is None or not tables <= _TABLES:
                raise _Foreign(f"not an agentd store: tables {', '.join(sorted(tables))}, no agentd format record")
            if found != FORMAT:
                raise _OtherFormat(f"written in store format {found}, this agentd reads format {FORMAT}")
            db.execute("PRAGMA journal_mode=WAL")
            # No fsync, not even at checkpoints (NORMAL fsyncs there): a cold build writes tens of
            # MB of renders, and those fsyncs were a tenth of its time.
            # The store is a cache: a process crash loses nothing (the OS has the data); an OS
            # crash or power loss may damage it, and damage is caught (row checksums, a
            # malformed file set aside) and only costs renders, never output.
            db.execute("PRAGMA synchronous=OFF")
            if not tables >= _TABLES:
                # One transaction: a store is either empty or complete with its format record
                # (IMMEDIATE: another process creating it at the same time waits, then no-ops).
                db.executescript(
                    f"BEGIN IMMEDIATE; {_META};{_SCHEMA}"
                    f"INSERT OR IGNORE INTO meta VALUES ('format', '{FORMAT}'); COMMIT;"
                )
        except BaseException:
            db.close()
            raise
        return db

    def _drop_connection(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
            self._db = None

    def _remove(self) -> None:
        self._drop_connection()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                Path(f"{self.path}{suffix}").unlink()

    def _set_aside(self, exc: BaseException, kind: str) -> None:
        """Move a damaged or foreign store out of the way (kept for inspection: the newest one
        only, so a store that keeps breaking never fills the disk) and start a new one."""
        self._drop_connection()
        folder, name = self.path.parent, self.path.name
        for old in folder.glob(f"{name}.*-*"):
            if old.name.startswith((f"{name}.corrupt-", f"{name}.foreign-")):
                with contextlib.suppress(OSError):
                    old.unlink()
        aside = f"{self.path}.{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            if source.exists():
                with contextlib.suppress(OSError):
                    os.replace(source, f"{aside}{suffix}")
        self._warn("cache.set_aside", path=str(self.path), reason=_reason(exc), moved_to=aside)

    def _pause(self, exc: BaseException) -> None:
        """Go on without the store until the end of this build (see ``_paused``): it is kept as
        it is. A full disk is not damage; setting the store aside would not free any space."""
        self._paused = True
        self._pending, self._pending_aux = [], {}
        if not self._warned:
            self._warned = True
            self._warn(
                "cache.unavailable",
                path=str(self.path),
                reason=_reason(exc),
                effect="building without the persistent cache (the store is kept as it is)",
            )

    def _guard(self, action: Callable[[sqlite3.Connection], Any], default: Any) -> Any:
        if self._paused:
            return default
        try:
            return action(self._connect())
        except OSError as exc:  # .agentd or the store file cannot be made
            self._pause(exc)
            return default
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                return default  # another writer holds it for longer than our timeout: skip once
            if _damaged(exc):
                self._set_aside(exc, "corrupt")
            else:
                self._pause(exc)
            return default

    def abandon(self) -> None:
        """In a forked child: forget the parent's connection without touching it (closing it
        here could disturb the parent's locks); the child opens its own."""
        self._db = None
        self._pending, self._pending_aux = [], {}

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- lookups ------------------------------------------------------------------------------
    def recorded_inputs(self, unit: str) -> list[str] | None:
        """The inputs ``unit`` ("section:a/s", "compose:a") read when it last ran."""

        def run(db: sqlite3.Connection) -> list[str] | None:
            row = db.execute("SELECT reads FROM deps WHERE unit=?", (unit,)).fetchone()
            return list(orjson.loads(row[0])) if row else None

        return self._guard(run, None)  # type: ignore[no-any-return]

    def lookup(self, unit: str, current: Callable[[str], bytes | None], data: bool = True) -> Rendered | None:
        """The stored output of ``unit`` if every input it read still has the same value.
        ``data=False``: only its digest and reads (the bytes are checked when they are read)."""
        nodes = self.recorded_inputs(unit)
        if nodes is None:
            self.misses += 1
            return None
        reads: dict[str, bytes] = {}
        for node in nodes:
            fp = current(node)
            if fp is None:
                self.misses += 1
                return None
            reads[node] = fp
        key = input_key(self.stamp, unit, reads)

        def run(db: sqlite3.Connection) -> Rendered | None:
            if not data:
                row = db.execute("SELECT digest FROM blobs WHERE key=?", (key,)).fetchone()
                return None if row is None else Rendered(b"", reads, bytes(row[0]))
            row = db.execute("SELECT data, digest FROM blobs WHERE key=?", (key,)).fetchone()
            if row is None:
                return None
            blob, digest = bytes(row[0]), bytes(row[1])
            if _digest(blob) != digest:  # a damaged row is a miss, and goes away
                self.corrupt_rows += 1
                self._warn("cache.corrupt_row", unit=unit)
                db.execute("DELETE FROM blobs WHERE key=?", (key,))
                return None
            return Rendered(blob, reads, digest)

        found = self._guard(run, None)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found  # type: ignore[no-any-return]

    def blobs_by_digest(self, digests: list[bytes]) -> dict[bytes, bytes]:
        """Stored bytes by their checksum: content-addressed, so any row with that checksum
        holds exactly those bytes (a damaged one is skipped)."""

        def run(db: sqlite3.Connection) -> dict[bytes, bytes]:
            found = {}
            for digest in digests:  # one indexed lookup each: 2.5x faster than IN (...) GROUP BY
                row = db.execute("SELECT data FROM blobs WHERE digest=? LIMIT 1", (digest,)).fetchone()
                if row is not None and _digest(bytes(row[0])) == digest:
                    found[digest] = bytes(row[0])
            return found

        return self._guard(run, {}) if digests else {}

    # -- writes -------------------------------------------------------------------------------
    #: Queued renders written per transaction: a build that re-renders thousands of sections
    #: must not hold them all in memory until it ends.
    FLUSH_EVERY = 256

    def put(self, unit: str, rendered: Rendered) -> None:
        """Queue a render; ``flush`` writes the queue in one transaction. Past FLUSH_EVERY
        queued, each put tries to write them *if no other process is writing*: worker
        processes share the store, and one waiting for another's transaction is not rendering. Past
        4x FLUSH_EVERY it waits, to bound memory."""
        if self._paused:
            return
        self._pending.append((unit, input_key(self.stamp, unit, rendered.reads), rendered))
        if len(self._pending) >= self.FLUSH_EVERY:
            self.flush(wait=len(self._pending) >= 4 * self.FLUSH_EVERY)

    # -- restart accelerators: parsed sources, compiled templates ---------------------------------
    # Keyed by the content they derive from (plus the stamp). At 100 agents these save ~0.35 s
    # of YAML parsing and ~0.1 s of template compilation on every start.
    def _aux_key(self, kind: bytes, key: bytes) -> bytes:
        return hashlib.blake2b(self.stamp + b"\0" + kind + b"\0" + key, digest_size=20).digest()

    def get_aux(self, kind: bytes, key: bytes) -> bytes | None:
        full = self._aux_key(kind, key)

        def run(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT data, digest FROM aux WHERE key=?", (full,)).fetchone()
            if row is None or _digest(bytes(row[0])) != bytes(row[1]):
                return None
            return bytes(row[0])

        return self._guard(run, None)  # type: ignore[no-any-return]

    def put_aux(self, kind: bytes, key: bytes, data: bytes, slot: str) -> None:
        """Queue derived data; ``slot`` names what it derives from (a file), whose older
        versions it supersedes."""
        if self._paused:
            return
        self._pending_aux[self._aux_key(kind, key)] = (f"{kind.decode()}:{slot}", data)

    def get_parsed(self, raw_fp: bytes) -> Any:
        """A source's parsed YAML, by the fingerprint of its bytes."""
        data = self.get_aux(b"yaml", raw_fp + _PARSE_RULES)
        return orjson.loads(data) if data is not None else None

    def has_parsed(self, raw_fp: bytes) -> bool:
        """Whether a parse of these bytes is stored (without loading it)."""
        full = self._aux_key(b"yaml", raw_fp + _PARSE_RULES)

        def run(db: sqlite3.Connection) -> bool:
            return db.execute("SELECT 1 FROM aux WHERE key=?", (full,)).fetchone() is not None

        return bool(self._guard(run, False))

    def put_parsed(self, raw_fp: bytes, dumped: bytes, path: str) -> None:
        """Keep a parse of ``path``: ``dumped`` from ``exact_json``."""
        self.put_aux(b"yaml", raw_fp + _PARSE_RULES, dumped, path)

    def flush(self, wait: bool = True) -> None:
        """Write the queued renders in one transaction. ``wait=False``: only if the store is
        not locked by another writer right now (else they stay queued). A waiting flush ends a
        build (or a worker's batch): after it, a paused store is tried again."""
        if self._paused:
            self._paused = not wait
            return
        if not self._pending and not self._pending_aux:
            return
        pending, aux = self._pending, self._pending_aux

        def run(db: sqlite3.Connection) -> bool:
            if not _begin(db, wait):
                return False
            try:
                db.executemany(
                    "INSERT OR REPLACE INTO aux VALUES (?, ?, ?, ?)",
                    [(k, slot, v, _digest(v)) for k, (slot, v) in aux.items()],
                )
                db.executemany(
                    "INSERT OR REPLACE INTO deps VALUES (?, ?)",
                    [(unit, orjson.dumps(sorted(r.reads))) for unit, _, r in pending],
                )
                db.executemany(
                    "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?, ?)",
                    [
                        (key, unit, r.digest or _digest(r.data), orjson.dumps(sorted(r.reads)), r.data)
                        for unit, key, r in pending
                    ],
                )
                trim = [
                    ("blobs", "unit", {unit for unit, _, _ in pending}),
                    ("aux", "slot", {s for s, _ in aux.values()}),
                ]
                for table, column, names in trim:
                    sql = _TRIM.format(table=table, column=column)
                    db.executemany(sql, [(name, KEEP_VERSIONS) for name in sorted(names)])
                db.execute("COMMIT")
                self._warned = False  # written again: the next failure is news
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            return True

        # Written, or dropped (a damaged store set aside, or locked by another writer for
        # longer than _TIMEOUT_S): either way no longer queued. The cache never fails a build.
        if self._guard(run, True):
            self._pending, self._pending_aux = [], {}

    # -- maintenance --------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        def run(db: sqlite3.Connection) -> dict[str, Any]:
            units, blobs, size, aux = db.execute(
                "SELECT (SELECT count(*) FROM deps), (SELECT count(*) FROM blobs), "
                "(SELECT coalesce(sum(length(data)), 0) FROM blobs), (SELECT count(*) FROM aux)"
            ).fetchone()
            return {"units": units, "blobs": blobs, "blob_bytes": size, "parsed_and_compiled": aux}

        data = self._guard(run, {"units": 0, "blobs": 0, "blob_bytes": 0, "parsed_and_compiled": 0})
        files = [Path(f"{self.path}{s}") for s in ("", "-wal", "-shm")]
        data["file_bytes"] = sum(p.stat().st_size for p in files if p.exists())
        data.update(
            path=str(self.path), format=FORMAT, hits=self.hits, misses=self.misses, corrupt_rows=self.corrupt_rows
        )
        return data  # type: ignore[no-any-return]

    def clear(self) -> None:
        self._remove()
