"""The watch daemon: ``startup()`` -> loop -> ``shutdown()``, like uvicorn's ``Server``.

One ``asyncio.Event`` (``should_exit``) stops everything: signal handlers set it and the
watchers' ``awatch(stop_event=...)`` calls end with it. Builds run in a worker thread
(``asyncio.to_thread``): Jinja rendering is CPU-bound and holds the GIL in bursts, but the event
loop keeps turning between them, so watch events are collected while a build runs and produce
exactly one follow-up build.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from .build import BuildReport, Engine
from .config import Config
from .exceptions import AgentdError, ConfigError, SourceError
from .log import get_logger
from .verify import verify
from .watch import Batch, Pending, watch_root, watch_tree

#: A settle never holds a build back longer than this, however busy the disk is.
MAX_SETTLE_S = 2.0


class Server:
    """A running ``agentd watch`` for one workspace."""

    def __init__(self, config: Config, overrides: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self._overrides = dict(overrides or {})  # CLI flags: they still win after a reload
        self.engine = Engine(config)
        self.pending = Pending()
        self.should_exit = asyncio.Event()
        self.state = "starting"
        self.builds = 0
        self.last_report: BuildReport | None = None
        self.log = get_logger()
        self._known_dirs: set[Path] = set()
        self._tree_stop = asyncio.Event()
        self._watchers: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()

    # -- lifecycle --------------------------------------------------------------------------
    def run(self) -> int:
        return asyncio.run(self.serve())

    async def serve(self) -> int:
        self._install_signal_handlers()
        await self.startup()
        try:
            await self.main_loop()
        finally:
            await self.shutdown()
        return 0

    async def startup(self) -> None:
        self.log.info(
            "watch.starting",
            root=str(self.config.root),
            pid=os.getpid(),
            step_ms=self.config.step_ms,
            debounce_ms=self.config.debounce_ms,
        )
        # Watch first, then build: an edit made during the first build is queued, not missed.
        await self._start_watchers(root_too=True)
        await self._build(None)
        self.log.info(
            "watch.ready", root=str(self.config.root), agents=self.last_report.agents if self.last_report else 0
        )

    async def main_loop(self) -> None:
        while not self.should_exit.is_set():
            await _first(self.pending.arrived, self.should_exit)
            if self.should_exit.is_set():
                break
            await self._settle()
            await self._apply(self.pending.take())

    async def shutdown(self) -> None:
        self.state = "stopping"
        self.log.info("watch.stopping")
        self.should_exit.set()
        self._tree_stop.set()
        tasks = self._watchers + list(self._background)
        if tasks:
            done, late = await asyncio.wait(tasks, timeout=self.config.graceful_timeout)
            for task in late:
                task.cancel()
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    self.log.error("watch.task_failed", error=repr(task.exception()))
        self.log.info("watch.stopped", builds=self.builds)

    # -- watching ---------------------------------------------------------------------------
    async def _start_watchers(self, root_too: bool) -> None:
        """(Re)start the recursive watcher; the root watcher runs for the whole session."""
        self._tree_stop.set()
        old = [t for t in self._watchers if t.get_name() == "watch-tree"]
        if old:
            await asyncio.wait(old, timeout=self.config.graceful_timeout)
        self._watchers = [t for t in self._watchers if t not in old]
        # The tree watcher's stop event follows should_exit; a restart sets it on its own.
        self._tree_stop = asyncio.Event()
        stop = self._tree_stop
        self._spawn(self._mirror(self.should_exit, stop))
        self._watchers.append(
            asyncio.create_task(
                self._guard(watch_tree(self.config, self.pending, stop, self._is_known_dir)), name="watch-tree"
            )
        )
        if root_too:
            self._watchers.append(
                asyncio.create_task(
                    self._guard(watch_root(self.config, self.pending, self.should_exit)), name="watch-root"
                )
            )
        # Let the watchers reach their first await: their inotify watches are then in place.
        for _ in range(3):
            await asyncio.sleep(0)

    async def _guard(self, coro: Any) -> None:
        """A watcher that dies (its folder vanished) is logged and re-armed by a rescan."""
        try:
            await coro
        except Exception as exc:  # watchfiles raises plain errors for vanished paths
            if not self.should_exit.is_set():
                self.log.warning("watch.watcher_failed", error=str(exc))
                await asyncio.sleep(self.config.settle_ms / 1000)
                self.pending.add(Batch(rescan=True, received=time.monotonic()), 0)

    @staticmethod
    async def _mirror(source: asyncio.Event, target: asyncio.Event) -> None:
        await _first(source, target)
        target.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _is_known_dir(self, path: Path) -> bool:
        return path in self._known_dirs

    async def _settle(self) -> None:
        """Hold a batch that deletes or touches many files until the disk is quiet for
        ``settle_ms``: a ``git checkout`` arrives in several batches, vim renames the file away
        before writing it anew. A plain save builds at once."""
        if not self.pending.wants_settling():
            return
        quiet = self.config.settle_ms / 1000
        deadline = time.monotonic() + MAX_SETTLE_S
        while not self.should_exit.is_set():
            wait = self.pending.last_arrival + quiet - time.monotonic()
            if wait <= 0 or time.monotonic() >= deadline:
                return
            await asyncio.sleep(min(wait, deadline - time.monotonic()))

    # -- building ---------------------------------------------------------------------------
    async def _apply(self, batch: Batch) -> None:
        if batch.config_changed and not await self._reload_config():
            return
        if batch.rescan or batch.config_changed:
            await self._start_watchers(root_too=False)
            await self._build(None)
        else:
            await self._build(batch.paths)

    async def _reload_config(self) -> bool:
        """Re-read ``agentd.toml``; True when the workspace must be rebuilt."""
        try:
            config = Config.load(self.config.root, self._overrides)
        except ConfigError as exc:
            self.log.error("config.error", error=str(exc))
            return False
        if config == self.config:
            return False
        self.log.info(
            "config.reloaded",
            changed=[
                f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(self.config, f.name)
            ],
        )
        self.config = config
        self.engine = Engine(config)
        return True

    async def _build(self, paths: set[Path] | None) -> BuildReport:
        self.state = "building"
        build_id = self.engine.new_build_id()
        with structlog.contextvars.bound_contextvars(build_id=build_id):
            self.log.info("build.started", changed=sorted(self.engine.workspace.rel(p) for p in paths or ()))
            report = await asyncio.to_thread(self.engine.build, paths, build_id=build_id)
            self.builds += 1
            self.last_report = report
            self._known_dirs = self.engine.known_dirs()
            self._log_report(report)
        self.state = "error" if report.errors else "idle"
        return report

    def _log_report(self, report: BuildReport) -> None:
        for error in report.errors:
            self.log.error("build.error", **_error_fields(error))
        self.log.info(
            "build.finished",
            changed=report.changed,
            agents=report.agents,
            sections_rendered=len(report.sections_rendered),
            sections_reused=report.sections_reused,
            sections_cut_off=report.sections_cut_off,
            rendered=_capped(report.sections_rendered),
            agents_composed=_capped(report.agents_composed),
            written=_capped(report.written),
            unchanged=len(report.unchanged),
            removed=report.removed,
            errors=len(report.errors),
            caches={k: {"hits": c.hits, "misses": c.misses} for k, c in report.caches.items()},
            duration_ms=round(report.duration_ms, 2),
        )

    # -- signals ----------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._handle_exit, sig)
        loop.add_signal_handler(signal.SIGUSR1, lambda: self._spawn(self.verify()))

    def _handle_exit(self, sig: signal.Signals) -> None:
        if self.should_exit.is_set():
            if sig == signal.SIGINT:  # a second Ctrl-C: the user will not wait
                self.log.warning("watch.forced_exit", signal=sig.name)
                os._exit(1)
            return
        self.log.info("watch.signal", signal=sig.name)
        self.should_exit.set()

    async def verify(self) -> dict[str, object]:
        """A clean build in a temporary folder, compared with ``out/`` (on demand)."""
        result = await asyncio.to_thread(verify, self.config)
        log = self.log.info if result.ok else self.log.warning
        log("verify.finished", **result.to_dict())
        return result.to_dict()


async def _first(*events: asyncio.Event) -> None:
    """Wait until any of ``events`` is set."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waiters, return_exceptions=True)


#: Lists in a log line beyond this length are cut (a cold build of 1,000 agents renders 9,000
#: sections; the counts are logged in full).
LOG_LIST_LIMIT = 50


def _capped(items: list[str]) -> list[str]:
    if len(items) <= LOG_LIST_LIMIT:
        return items
    return [*items[:LOG_LIST_LIMIT], f"... {len(items) - LOG_LIST_LIMIT} more"]


def _error_fields(error: AgentdError) -> dict[str, Any]:
    if isinstance(error, SourceError):
        return {
            "path": error.path,
            "line": error.line,
            "location": error.location,
            "message": error.message,
            "source_line": error.source_line.strip() if error.source_line else None,
            "context": error.context,
            "text": str(error),
        }
    return {"message": str(error), "text": str(error)}
