"""Getting composed outputs onto disk: the writer thread, and the removal of stale outputs.

Writing an output is mostly system calls that release the GIL (temp file, write or copy,
exchange), so a thread writes while the build renders and composes the next agents. What the
outputs hold is composed around a skeleton (``skeleton.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from .config import Config
from .exceptions import OutputError, WriteError
from .output import OutputChanged, OutputDir, WriteOutcome, output_agent
from .skeleton import Piece
from .workspace import Workspace

K = TypeVar("K")


class Writer(Generic[K]):
    """Outputs written by one thread, in order; each handed over with a key (what its caller
    needs to record it) that comes back with its outcome."""

    #: Outputs handed to the thread and not yet on disk, at most (each may hold 540 KB).
    MAX_PENDING = 4

    def __init__(self, output: OutputDir) -> None:
        self._output = output
        self._thread: ThreadPoolExecutor | None = None
        self._pending: list[tuple[K, Future[tuple[bool, list[int]]]]] = []

    def submit(self, key: K, name: str, data: bytes | Sequence[Piece], digest: bytes, entry: list[Any] | None) -> None:
        """Queue an output (``OutputDir.write_file``); waits while MAX_PENDING are queued."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="agentd-write")
        if len(self._pending) >= self.MAX_PENDING:
            self._pending[-self.MAX_PENDING][1].exception()  # wait for it, not for its result
        self._pending.append((key, self._thread.submit(self._output.write_file, name, data, digest, entry)))

    def drain(self) -> Iterator[tuple[K, WriteOutcome | None]]:
        """Wait for the queued writes, in order: each key with its outcome, None when the file
        changed since it was checked (``OutputChanged``: write all its bytes instead)."""
        pending, self._pending = self._pending, []
        for key, future in pending:
            try:
                outcome: WriteOutcome | None = future.result()
            except OutputChanged:
                outcome = None
            except (OutputError, OSError) as exc:
                outcome = exc
            yield key, outcome

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown()
            self._thread = None


class StaleOutputs:
    """Removes the outputs of agents that are gone. It walks the manifest (O(agents)), so only
    when the set of agents changed since the last walk."""

    def __init__(self) -> None:
        self._checked: tuple[bytes, tuple[str, ...]] | None = None

    def remove(
        self, config: Config, ws: Workspace, output: OutputDir
    ) -> tuple[list[str], list[str], dict[str, WriteError] | None]:
        """Remove them: the files removed, the agents whose outputs are gone, and the files
        that could not be removed (None: nothing walked)."""
        if config.agents_path in ws.unlisted:  # which agents exist is unknown: keep all
            return [], [], None
        agent_set = (ws.catalog_fp, tuple(sorted(ws.agent_errors)))
        if agent_set == self._checked:
            return [], [], None
        self._checked = agent_set
        existing = set(ws.agents) | set(ws.agent_errors)
        removed: list[str] = []
        gone: list[str] = []
        errors: dict[str, WriteError] = {}
        for name in sorted(output.files):
            agent_id = output_agent(name)
            if agent_id is not None and agent_id not in existing:
                try:
                    if output.remove(name):
                        removed.append(name)
                except WriteError as exc:
                    errors[name] = exc
                    self._checked = None  # walk again next build
                    continue
                gone.append(agent_id)
        return removed, gone, errors
