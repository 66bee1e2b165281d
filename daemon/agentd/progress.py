"""A progress line for long work, ``[4,512/9,000 sections] 38 s``, on a terminal's stderr only.

A cold build of 1,000 agents runs for a minute or more, ``check`` of 100 for seconds; without
a line they are silent. The line is drawn in place (``\\r`` + erase line) by a thread, at most
``1 / REFRESH_S`` times a second and only when its text changed, so the work itself only adds to
a counter (the engine once per agent or worker result), and a caller without a line pays one
``None`` check. It is erased when the work is done: what follows prints on a clean line.

While installed, the line stands in for ``sys.stderr``: any other write there (a log line of
``agentd watch``, a warning) erases it first, and it is drawn again below once the writer has
ended its line, so the two never share one. Nothing at all off a terminal, with ``-q``, or on a
terminal that cannot erase a line (``TERM=dumb``): logs and pipes get no escape codes.

Hand-written: rich and tqdm cost 80-90 ms of imports here, for what is under 200 lines.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any, TextIO, cast

#: Seconds between redraws, at least.
REFRESH_S = 0.1
#: Back to the start of the line and erase it.
ERASE = "\r\x1b[2K"


class Progress:
    """The progress line of one stream, and that stream's stand-in (``write`` erases it first)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.label: str | None = None
        self.unit = ""
        #: What is being counted; None: nothing yet (only a label, if any, is shown).
        self.total: int | None = None
        self.done = 0
        self._started = time.monotonic()
        # Reentrant: a signal handler may write to stderr while this thread is in ``write``.
        self._lock = threading.RLock()
        self._drawn = False  # the line is on the screen
        self._line_start = True  # the last write by anyone else ended its line
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        _alive.add(self)

    # -- the work's side: any thread ------------------------------------------------------------
    def start(self, label: str | None = None) -> None:
        """Begin (again): the elapsed time from now, nothing counted, ``label`` until ``count``."""
        self._started = time.monotonic()
        self.total, self.done, self.label = None, 0, label
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="agentd-progress", daemon=True)
            self._thread.start()

    def count(self, total: int, unit: str) -> None:
        """Count ``total`` ``unit`` from 0 (the elapsed time runs on)."""
        self.done = 0
        self.unit = unit
        self.total = total

    def advance(self, done: int = 1) -> None:
        self.done += done

    def stop(self) -> None:
        """Stop drawing and erase the line."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        with self._lock:
            self._erase()
        self.total = self.label = None

    def elapsed(self) -> int:
        """Whole seconds since ``start``."""
        return int(time.monotonic() - self._started)

    def text(self) -> str:
        seconds = f"{self.elapsed()} s"
        if self.total is not None:
            return f"[{self.done:,}/{self.total:,} {self.unit}] {seconds}"
        return f"[{self.label}] {seconds}" if self.label else ""

    def _run(self) -> None:
        shown = ""
        while not self._stop.wait(REFRESH_S):
            text = self.text()
            with self._lock:
                if text and self._line_start and not (self._drawn and text == shown):
                    self.stream.write(ERASE + text[: self._width() - 1])
                    self.stream.flush()
                    self._drawn, shown = True, text

    def _erase(self) -> None:
        if self._drawn:
            self.stream.write(ERASE)
            self.stream.flush()
            self._drawn = False

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (OSError, ValueError):
            return 80

    # -- the stream's side: stands in for sys.stderr --------------------------------------------
    def write(self, text: str) -> int:
        with self._lock:
            self._erase()
            written = self.stream.write(text)
            if text:
                self._line_start = text.endswith("\n")
            return written

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    def __getattr__(self, name: str) -> Any:  # encoding, errors, buffer ...
        return getattr(self.stream, name)

    def _forked(self) -> None:
        """In a forked child (a worker): the drawing thread is not there and the lock may have
        been held by it; write through, never draw."""
        self._lock = threading.RLock()
        self._thread = None
        self._drawn = False


_alive: weakref.WeakSet[Progress] = weakref.WeakSet()


def _after_fork() -> None:
    for line in list(_alive):
        line._forked()


os.register_at_fork(after_in_child=_after_fork)


def wanted(stream: TextIO, quiet: bool = False) -> bool:
    """A progress line on ``stream``: a terminal that can erase a line, and not ``-q``."""
    return not quiet and stream.isatty() and os.environ.get("TERM") != "dumb"


@contextlib.contextmanager
def progress_line(quiet: bool = False, start: bool = True) -> Iterator[Progress | None]:
    """A progress line on stderr, standing in for ``sys.stderr`` until the block ends (then
    erased); None when there should be none. ``start``: draw from now on (else the caller
    calls ``start`` and ``stop`` around each piece of long work)."""
    stream = sys.stderr
    if not wanted(stream, quiet):
        yield None
        return
    line = Progress(stream)
    sys.stderr = cast(TextIO, line)
    if start:
        line.start()
    try:
        yield line
    finally:
        line.stop()
        sys.stderr = stream
