"""Writing ``out/``: atomic, byte-compared, and never touching a file agentd did not make.

A manifest (``out/.agentd-manifest.json``) lists every file agentd generated with the digest of
what it wrote and the file's size and mtime right after writing. Only listed files are ever
replaced or removed; a user's own file that happens to sit where an output would go is
reported, not overwritten. Size + mtime say whether a file is still exactly what agentd wrote
(as git's index does) without reading and hashing 540 KB per agent on every restart.

The manifest is saved once per build; a process killed before that (a cold build, new agents
coming in) leaves outputs it does not list. So each new output is first noted in a journal
(``out/.agentd-manifest.journal``), just before the rename that puts it in place, by whichever
process writes it (the daemon's writer thread, a worker): the next run takes a journaled file as
its own while it is still exactly the file written (size, mtime and inode), and a file put there
since stays the user's.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import orjson

from .exceptions import OutputError, WriteError
from .skeleton import Piece, joined
from .trace import fingerprint

MANIFEST = ".agentd-manifest.json"
OUTPUT_SUFFIX = ".md"


def output_name(agent_id: str) -> str:
    """The file an agent is written to, in the output folder."""
    return agent_id + OUTPUT_SUFFIX


def output_agent(name: str) -> str | None:
    """The agent whose output ``name`` is; None for any other file."""
    return name[: -len(OUTPUT_SUFFIX)] if name.endswith(OUTPUT_SUFFIX) else None


JOURNAL = ".agentd-manifest.journal"
_TEMP_SUFFIX = ".tmp"
#: Replaced outputs kept for unlinking later, at most (see ``OutputDir.replaced``).
MAX_REPLACED = 64
_MANIFEST_VERSION = 2

#: What ``OutputDir.write_file`` did: (written, [size, mtime_ns]), or why it could not.
WriteOutcome: TypeAlias = "tuple[bool, list[int]] | OutputError | OSError"


class OutputChanged(Exception):
    """The file a write was to copy unchanged ranges from is no longer the one agentd wrote
    (see ``write_atomic``): the caller composes from bytes instead."""


def write_atomic(
    path: Path,
    data: bytes | Sequence[Piece],
    swap: bool = False,
    old: list[str] | None = None,
    source: list[int] | None = None,
    journal: Callable[[os.stat_result], None] | None = None,
) -> os.stat_result:
    """Write via a temp file in the same folder and a rename: a reader sees the old bytes or the
    new ones, never a partial file. No fsync: outputs are regenerable, and an fsync per file
    would cost more than rendering it. Returns the new file's stat (the rename keeps it).

    ``data``: the bytes, or pieces (``Skeleton.splice``): bytes, and (start, end) ranges of the
    file at ``path`` copied from it, which must still have the [size, mtime_ns] ``source``
    (else ``OutputChanged``, nothing written).
    ``swap``: replace an existing file by exchanging the two names and unlinking the old bytes
    (see ``_swap``) instead of renaming over it; for outputs only, never for the manifest.
    ``old``: collect the old bytes' (hidden, temp) name there instead of unlinking them now.
    ``journal``: called with the new file's stat before it is put in place."""
    src = -1
    if not isinstance(data, bytes):
        src = _open_source(path, source)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
        try:
            try:
                for piece in [data] if isinstance(data, bytes) else data:
                    if isinstance(piece, bytes):
                        _write_all(fd, piece)
                    else:
                        _copy_range(src, fd, *piece)
                os.fchmod(fd, 0o644 & ~_UMASK)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if journal is not None:
                journal(st)
            if not (swap and _swap(tmp, path)):
                os.replace(tmp, path)
            elif old is not None:
                old.append(tmp)
            else:
                os.unlink(tmp)  # the old bytes, now under the temp name
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    finally:
        if src >= 0:
            os.close(src)
    return st


def _open_source(path: Path, expected: list[int] | None) -> int:
    """The file ranges are copied from, opened (a rename over it now leaves what we copy
    alone) and checked to be the one agentd wrote."""
    try:
        src = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise OutputChanged(str(path)) from None
    st = os.fstat(src)
    if expected is None or [st.st_size, st.st_mtime_ns] != expected:
        os.close(src)
        raise OutputChanged(str(path))
    return src


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    """Append ``src``'s bytes [start, end) to ``dst``: in the kernel where it can
    (``copy_file_range``: no copy through Python's memory), else read and written."""
    global _COPY_FILE_RANGE
    while start < end:
        if _COPY_FILE_RANGE is not None:
            try:
                copied = _COPY_FILE_RANGE(src, dst, end - start, start)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                _COPY_FILE_RANGE = None  # this kernel or filesystem cannot: stop asking
                continue
        else:
            chunk = os.pread(src, end - start, start)
            _write_all(dst, chunk)
            copied = len(chunk)
        if not copied:  # the source is shorter than its stat said: changed under us
            raise OutputChanged("the file being copied from got shorter")
        start += copied


#: ``os.copy_file_range`` (Linux): None where the platform or, once it fails so, the
#: filesystem does not have it.
_COPY_FILE_RANGE: Callable[..., int] | None = getattr(os, "copy_file_range", None)


def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a libc without it (glibc < 2.28)
        return None


_RENAMEAT2 = _renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _swap(src: str, dst: Path) -> bool:
    """Atomically exchange ``src`` and ``dst`` (both must exist); False where that cannot be
    done (no ``renameat2``, a filesystem without RENAME_EXCHANGE, ``dst`` just removed), and
    the caller renames over ``dst`` instead.

    Why: ext4 (``auto_da_alloc``, on by default; btrfs does the like) makes a rename *over an
    existing file* allocate and start writing back the new file's blocks inside the rename, a
    guard for programs that skip fsync. Measured here for a 540 KB output: 0.36 ms per
    ``os.replace``, 0.04 ms for the exchange plus the unlink. The guard buys nothing for
    outputs: a file a crash left short fails the manifest's size check and is written again.
    The manifest itself keeps the plain rename."""
    global _RENAMEAT2
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        _RENAMEAT2 = None  # the kernel or filesystem cannot: stop asking
    return False


def _is_own_name(name: str) -> bool:
    """A name agentd could have written in the folder: no path, no temp or hidden file."""
    return bool(name) and not name.startswith(".") and "/" not in name and "\0" not in name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: Read once, at import: ``os.umask`` can only be read by setting it, which is process-wide
#: and would race with files created by other threads (the writer thread, SQLite).
_UMASK = _umask()


class OutputDir:
    """The output folder and its manifest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.manifest_path = path / MANIFEST
        self.journal_path = path / JOURNAL
        #: name -> [digest hex, size, mtime_ns] of what agentd last wrote there.
        self.files: dict[str, list[Any]] = self._load_manifest()
        # Saved at once if a killed process left a journal: its files are listed from then on.
        self._dirty = self._adopt_journal()
        #: Replaced outputs not unlinked yet (None: unlinked as they are replaced). Unlinking
        #: 540 KB costs as much as writing it (0.12 ms: freeing its pages); a worker process
        #: leaves that until its batch is done (``remove_replaced``), for up to MAX_REPLACED.
        self.replaced: list[str] | None = None

    def _load_manifest(self) -> dict[str, list[Any]]:
        try:
            data = orjson.loads(self.manifest_path.read_bytes())
        except (FileNotFoundError, NotADirectoryError):  # none yet, or out/ is not a folder
            return {}
        except orjson.JSONDecodeError:
            # A damaged manifest only costs us the right to delete stale outputs: we start a
            # new one rather than guess which files were ours.
            return {}
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict):
            return {}
        # Version 1 kept a digest only: the files are still ours, their state is unknown.
        return {str(k): v if isinstance(v, list) and len(v) == 3 else ["", -1, -1] for k, v in files.items()}

    def _journal(self, name: str, digest: bytes, st: os.stat_result) -> None:
        """Note a new output (not in the manifest) before it is put in place. One append per
        new file, from any process (``O_APPEND``: lines never interleave); an output agentd
        replaces is listed already."""
        line = orjson.dumps([name, digest.hex(), st.st_size, st.st_mtime_ns, st.st_ino]) + b"\n"
        fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, line)
        finally:
            os.close(fd)

    def _adopt_journal(self) -> bool:
        """List the journaled outputs that are still exactly the file written (size, mtime and
        inode); True when there was a journal (to be removed once the manifest is saved)."""
        try:
            data = self.journal_path.read_bytes()
        except OSError:  # none (the usual case), or not ours to read
            return False
        for line in data.splitlines():
            try:
                name, digest, *stat = orjson.loads(line)
            except (orjson.JSONDecodeError, TypeError, ValueError):
                continue  # a line the kill cut short: its file was not renamed into place yet
            if not (isinstance(name, str) and isinstance(digest, str) and _is_own_name(name)):
                continue
            if name in self.files or len(stat) != 3:
                continue
            try:
                st = os.lstat(self.path / name)
            except OSError:
                continue
            if [st.st_size, st.st_mtime_ns, st.st_ino] == stat:
                self.files[name] = [digest, st.st_size, st.st_mtime_ns]
        return True

    def owns(self, name: str) -> bool:
        return name in self.files

    def unchanged_since_written(self, name: str, digest: bytes) -> bool:
        """The file is agentd's, holds the output with ``digest``, and nobody touched it since."""
        entry = self.files.get(name)
        if entry is None or entry[0] != digest.hex():
            return False
        try:
            st = os.stat(self.path / name)
        except OSError:
            return False
        return [st.st_size, st.st_mtime_ns] == entry[1:]

    def write(self, name: str, data: bytes, digest: bytes | None = None) -> bool:
        """``write_file`` + ``record`` in one call; True if the file was written. ``digest``
        identifies the content (the composition digest, or ``fingerprint(data)``)."""
        digest = digest or fingerprint(data)
        written, stat = self.write_file(name, data, digest, self.files.get(name))
        self.record(name, digest, stat)
        return written

    def write_error(self, name: str, exc: OSError, action: str = "write") -> WriteError:
        """``exc`` as the error of output ``name``: which file, and what the system said."""
        code = errno.errorcode.get(exc.errno or 0)
        detail = f"{exc.strerror or exc}" + (f" ({code})" if code else "")
        culprit = os.fsdecode(exc.filename) if exc.filename is not None else None
        if isinstance(exc, (FileExistsError, NotADirectoryError)) and not self.path.is_dir():
            detail = f"{self.path} is not a folder"
        elif culprit is not None and Path(culprit).parent != self.path:  # not the file or its temp
            detail += f": {culprit}"
        return WriteError(f"{self.path.name}/{name}: cannot {action} it: {detail}")

    def writable(self) -> bool:
        """Whether a file can be created in the folder now (it is created if missing): a failed
        write is tried again once this holds. A probe named like a temp file of the manifest,
        so that ``sweep`` removes it should this process die before it does."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{MANIFEST}.", suffix=_TEMP_SUFFIX)
        except OSError:
            return False
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return True

    def lost_manifest(self) -> bool:
        """The manifest was deleted under agentd: True, and it is written again at the next
        save (a process killed after that must still know its outputs)."""
        if self.manifest_path.exists():
            return False
        self._dirty = True
        return True

    def write_file(
        self, name: str, data: bytes | Sequence[Piece], digest: bytes, entry: list[Any] | None
    ) -> tuple[bool, list[int]]:
        """Write ``name`` unless it already holds these bytes (safe in another thread: it
        touches no shared state; ``record`` enters the result in the manifest). ``entry``: the
        manifest's entry for ``name`` (None: not agentd's). ``data``: bytes, or pieces
        (``write_atomic``) whose ranges are of the file as ``entry`` says agentd wrote it
        (``OutputChanged`` if it is not). Returns (written, [size, mtime_ns]).

        A file still as agentd wrote it (size + mtime) is known by its entry's digest; any other
        is compared with the new bytes, read only when the sizes are equal. What the system
        refuses (permissions, a full disk) is a ``WriteError`` naming the file."""
        if not isinstance(data, bytes) and (whole := joined(data)) is not None:
            data = whole  # nothing to copy
        try:
            return self._write_file(name, data, digest, entry)
        except OSError as exc:
            raise self.write_error(name, exc) from None

    def _write_file(
        self, name: str, data: bytes | Sequence[Piece], digest: bytes, entry: list[Any] | None
    ) -> tuple[bool, list[int]]:
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / name
        try:
            st = os.stat(target)
        except FileNotFoundError:
            st = None
        if st is None:
            if not isinstance(data, bytes):
                raise OutputChanged(name)
            journal = None if entry is not None else functools.partial(self._journal, name, digest)
            st = write_atomic(target, data, journal=journal)
            return True, [st.st_size, st.st_mtime_ns]
        if entry is None:
            raise OutputError(
                f"{self.path.name}/{name} exists and was not generated by agentd; "
                "move it away (agentd never overwrites a file it did not write)"
            )
        if [st.st_size, st.st_mtime_ns] == entry[1:]:
            same = entry[0] == digest.hex()
        elif not isinstance(data, bytes):
            raise OutputChanged(name)
        else:
            same = st.st_size == len(data) and target.read_bytes() == data
        if not same:
            st = write_atomic(target, data, swap=True, old=self.replaced, source=entry[1:])
            if self.replaced is not None and len(self.replaced) >= MAX_REPLACED:
                self.remove_replaced()  # bounded: a batch of 1,000 would double out/ on disk
        return not same, [st.st_size, st.st_mtime_ns]

    def remove_replaced(self) -> None:
        """Unlink the replaced outputs kept by ``write_file``."""
        while self.replaced:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.replaced.pop())

    def sweep(self, older_than_s: float = 60.0) -> list[str]:
        """Remove temp files of agentd's outputs that a killed process left behind (a write
        cut short, or a replaced output not yet unlinked); only those untouched for
        ``older_than_s``, so another agentd's write in progress is never taken away."""
        removed = []
        cutoff = time.time() - older_than_s
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            return []
        for entry in entries:
            name = entry.name
            if not (name.startswith(".") and name.endswith(_TEMP_SUFFIX)):
                continue
            output = name[1:].rsplit(".", 2)[0]  # ".<output>.<random>.tmp"
            if output not in self.files and output != MANIFEST:
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed.append(name)
        return removed

    def record(self, name: str, digest: bytes, stat: list[int]) -> None:
        """Enter a written file in the manifest (saved by ``save``)."""
        entry = [digest.hex(), *stat]
        if self.files.get(name) != entry:
            self.files[name] = entry
            self._dirty = True

    def remove(self, name: str) -> bool:
        """Delete a generated file (only if the manifest says agentd made it). One the system
        will not let go of stays listed (``WriteError``)."""
        if name not in self.files:
            return False
        try:
            (self.path / name).unlink()
            removed = True
        except FileNotFoundError:
            removed = False
        except OSError as exc:
            raise self.write_error(name, exc, "remove") from None
        del self.files[name]
        self._dirty = True
        return removed

    def save(self) -> None:
        """Write the manifest if it changed, with what the journal holds (a write whose record
        a failure skipped), then drop the journal. ``WriteError``: saved next time."""
        if not self._dirty:
            return
        journaled = self._adopt_journal()
        body = {"version": _MANIFEST_VERSION, "generator": "agentd", "files": dict(sorted(self.files.items()))}
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(self.manifest_path, orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n")
            if journaled:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.journal_path)
        except OSError as exc:
            raise self.write_error(MANIFEST, exc) from None
        self._dirty = False
