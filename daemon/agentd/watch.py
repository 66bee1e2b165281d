"""File watching with watchfiles: which events matter, and how they are batched.

watchfiles reports *that* paths changed; agentd never trusts the event kind (an editor's
"modify" may be a delete + create + rename dance). Every reported path goes to
``Workspace.refresh``, which reads the disk. This module decides which paths are worth
reporting and accumulates them while a build runs, so changes arriving mid-build cause exactly
one follow-up build and none is lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchfiles import Change, DefaultFilter, awatch

from .config import CONFIG_FILE, Config
from .workspace import TEMPLATE_SUFFIXES, YAML_SUFFIXES

WATCHED_SUFFIXES = frozenset(TEMPLATE_SUFFIXES + YAML_SUFFIXES)


class WorkspaceFilter(DefaultFilter):
    """watchfiles' default ignores (``.git``, swap files, ``~`` backups, JetBrains temp files),
    plus an allowlist: only the extensions agentd reads. That drops the temp files editors and
    tools write that the default lets through — vim's ``4913`` probe, ``sed -i``'s ``sedXXXXXX``,
    ``.goutputstream-*``, ``*.bak``, ``*.orig``, emacs's ``#file#`` — while keeping folders, whose
    creation or deletion must trigger a rescan (events under a folder recreated at once can be
    lost)."""

    def __init__(self, is_known_dir: Callable[[Path], bool]) -> None:
        super().__init__()
        self._is_known_dir = is_known_dir

    def __call__(self, change: Change, path: str) -> bool:
        if not super().__call__(change, path):
            return False
        p = Path(path)
        if p.name.startswith("."):
            return False
        if p.suffix in WATCHED_SUFFIXES:
            return True
        if change == Change.deleted:
            return self._is_known_dir(p)
        return p.is_dir()


@dataclasses.dataclass
class Batch:
    """Everything reported since the last build."""

    paths: set[Path] = dataclasses.field(default_factory=set)
    config_changed: bool = False
    rescan: bool = False  # templates/ or agents/ itself was replaced: watch and read anew
    deletions: bool = False
    received: float = 0.0  # monotonic time of the first event in the batch
    #: Files of agentd's deleted from ``out/`` (``watch_output``), or the folder itself.
    outputs: set[str] = dataclasses.field(default_factory=set)
    outputs_gone: bool = False

    def __bool__(self) -> bool:
        return bool(self.paths or self.config_changed or self.rescan or self.outputs or self.outputs_gone)


class Pending:
    """The accumulator between the watchers (producers) and the build loop (consumer)."""

    def __init__(self) -> None:
        self.batch = Batch()
        self.arrived = asyncio.Event()
        self.batches_seen = 0
        self.events_seen = 0
        self.last_arrival = 0.0

    def add(self, batch: Batch, events: int) -> None:
        if not batch:
            return
        b = self.batch
        if not b:
            b.received = batch.received
        b.paths |= batch.paths
        b.config_changed |= batch.config_changed
        b.rescan |= batch.rescan
        b.deletions |= batch.deletions
        b.outputs |= batch.outputs
        b.outputs_gone |= batch.outputs_gone
        self.batches_seen += 1
        self.events_seen += events
        self.last_arrival = time.monotonic()
        self.arrived.set()

    def take(self) -> Batch:
        batch, self.batch = self.batch, Batch()
        self.arrived.clear()
        return batch

    def wants_settling(self, many: int = 20) -> bool:
        """Deletions and large batches are likely the first part of a multi-step change."""
        return self.batch.deletions or len(self.batch.paths) >= many


def _watch(config: Config, paths: list[Path], watch_filter: Any, stop: asyncio.Event, recursive: bool) -> Any:
    # A folder it may not list would stop watchfiles at once (PermissionError); the workspace
    # reports that folder instead, and the daemon watches anew once it changes.
    return awatch(
        *paths,
        watch_filter=watch_filter,
        debounce=config.debounce_ms,
        step=config.step_ms,
        stop_event=stop,
        recursive=recursive,
        ignore_permission_denied=True,
    )


async def watch_tree(
    config: Config, pending: Pending, stop: asyncio.Event, is_known_dir: Callable[[Path], bool]
) -> None:
    """Watch ``templates/`` and ``agents/`` recursively until ``stop`` is set (``out/`` is
    watched for deletions only: ``watch_output``; agentd's own writes never look like edits)."""
    dirs = [config.templates_path, config.agents_path]
    async for changes in _watch(config, dirs, WorkspaceFilter(is_known_dir), stop, recursive=True):
        batch = Batch(received=time.monotonic())
        for change, path in changes:
            batch.paths.add(Path(path))
            batch.deletions |= change == Change.deleted
        pending.add(batch, len(changes))


def _root_filter(config: Config) -> Callable[[Change, str], bool]:
    names = {CONFIG_FILE, Path(config.templates_dir).parts[0], Path(config.agents_dir).parts[0]}
    return lambda change, path: Path(path).name in names


async def watch_root(config: Config, pending: Pending, stop: asyncio.Event) -> None:
    """Watch the workspace root (not recursively) for ``agentd.toml`` and for ``templates/`` or
    ``agents/`` being replaced wholesale, which silently ends a recursive watch on them."""
    async for changes in _watch(config, [config.root], _root_filter(config), stop, recursive=False):
        batch = Batch(received=time.monotonic())
        for _change, path in changes:
            if Path(path).name == CONFIG_FILE:
                batch.config_changed = True
            else:
                batch.rescan = True
        pending.add(batch, len(changes))


class OutputFilter:
    """Of all that happens in ``out/``, only what agentd must repair: a file it lists (an
    output, the manifest) deleted and still missing, or ``out/`` itself removed. agentd's own
    writes never pass: temp files are not listed, a rename over an output adds it, and an
    exchange (``output._swap``) reports it deleted and added at once, so it exists."""

    def __init__(self, out: Path, listed: Callable[[str], bool]) -> None:
        self._out = str(out)
        self._listed = listed

    def __call__(self, change: Change, path: str) -> bool:
        if change != Change.deleted:
            return False
        if path == self._out:
            return True
        head, name = os.path.split(path)
        return head == self._out and self._listed(name) and not os.path.lexists(path)


async def watch_output(config: Config, pending: Pending, stop: asyncio.Event, listed: Callable[[str], bool]) -> None:
    """Watch ``out/`` (not recursively) for agentd's files being deleted behind its back. Ends
    when ``out/`` itself goes away (a watch on a removed folder never reports again): the
    daemon watches it anew once a build has made it again."""
    out = Path(os.path.abspath(config.output_path))  # as events name it
    async for changes in _watch(config, [out], OutputFilter(out, listed), stop, recursive=False):
        batch = Batch(received=time.monotonic(), deletions=True)
        for _change, path in changes:
            if path == str(out):
                batch.outputs_gone = True
            else:
                batch.outputs.add(os.path.basename(path))
        pending.add(batch, len(changes))
        if batch.outputs_gone:
            return
