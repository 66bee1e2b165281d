"""The watch daemon: ``startup()`` -> loop -> ``shutdown()``, like uvicorn's ``Server``.

One ``asyncio.Event`` (``should_exit``) stops everything: signal handlers set it and the
watchers' ``awatch(stop_event=...)`` calls end with it. Builds run in a worker thread
(``asyncio.to_thread``): Jinja rendering is CPU-bound, but CPython hands the GIL to the event
loop every switch interval (5 ms), so watch events are collected and the status socket answers
while a build runs. Builds are serialised by one lock (watch events, socket ``rebuild``, SIGHUP).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from . import __version__
from .build import Engine
from .check import Finding, ScanMemory, check_output
from .config import Config
from .console import error_key
from .control import SUBSCRIBE, ControlServer, WorkspaceLock, socket_path
from .exceptions import AgentdError, BuildFailed, ConfigError, ExplainError, RequestError, WriteError
from .log import get_logger
from .notify import Notifier
from .output import MANIFEST, output_name
from .plan import Plan, check_agents
from .progress import Progress
from .report import BuildReport
from .sourcemap import Explainer, answer, visits
from .status import LISTED, Monitor, error_fields
from .store import open_store
from .verify import VerifyResult, verify
from .watch import Batch, Pending, watch_output, watch_root, watch_tree

COMMANDS = ("ping", "status", "stats", "rebuild", "affected", "verify", "graph", "explain", SUBSCRIBE, "stop")

#: What ``subscribe`` streams: the log lines of the same names, as they are logged (``_emit``).
EVENTS = (
    "build.started",
    "build.error",
    "build.error_fixed",
    "build.finished",
    "build.errors_cleared",
    "watch.stopping",
)

#: A settle never holds a build back longer than this, however busy the disk is.
MAX_SETTLE_S = 2.0

#: A build the environment stopped is retried after 1 s, then twice as long each time, up to this.
MAX_RETRY_S = 30.0

#: Until READY=1, systemd is asked every ``EXTEND_EVERY_S`` for ``EXTEND_BY_S`` more (see
#: ``Server._extending_start``).
EXTEND_EVERY_S = 10.0
EXTEND_BY_S = 30.0


class WriteRetry:
    """When to build again, with no edit to wait for, while writes fail (``WriteError``:
    permissions, a full disk, ``out/`` not a folder). ``out/`` is probed every ``PROBE_S`` by
    creating a file there (a few system calls): while it refuses, no build runs to fail the same
    way, and once it takes files the retry runs at once. A failure the probe cannot see (one
    file, a full disk) is retried after a delay that doubles up to ``MAX_S``."""

    PROBE_S = 0.5
    MAX_S = 60.0

    def __init__(self) -> None:
        self.failing = False
        self._delay = self.PROBE_S
        self._due = 0.0
        self._refused = False

    def record(self, failed: bool) -> None:
        """After every build: whether a write of it failed."""
        if not failed:
            self.failing = False
            self._delay = self.PROBE_S
            return
        if self.failing:
            self._delay = min(self._delay * 2, self.MAX_S)
        self.failing = True
        self._due = time.monotonic() + self._delay
        self._refused = False

    def timeout(self) -> float | None:
        """How long the daemon may wait for an edit before probing (None: for ever)."""
        return self.PROBE_S if self.failing else None

    def due(self, writable: bool) -> bool:
        """Whether to retry now, given a probe of ``out/``."""
        if not writable:
            self._refused = True
            return False
        return self._refused or time.monotonic() >= self._due


class Server:
    """A running ``agentd watch`` for one workspace."""

    def __init__(
        self, config: Config, overrides: Mapping[str, Any] | None = None, progress: Progress | None = None
    ) -> None:
        self.config = config
        #: The progress line of full builds (the first, a rescan, a reload), on a terminal.
        self.progress = progress
        self._overrides = dict(overrides or {})  # CLI flags: they still win after a reload
        self.engine = self._new_engine(config)
        self.pending = Pending()
        self.should_exit = asyncio.Event()
        self.monitor = Monitor(config)
        self.notifier = Notifier()
        self.lock = WorkspaceLock(config.root)
        self.socket_path = socket_path(config)
        self.log = get_logger()
        self.control = ControlServer(
            self.socket_path,
            self.handle_request,
            config.max_request_bytes,
            self.log,
            max_clients=config.max_clients,
            idle_timeout=config.client_idle_timeout,
        )
        self.last_report: BuildReport | None = None
        #: Socket requests served, by command (``stats``' ``requests``).
        self.requests: Counter[str] = Counter()
        self._build_lock = asyncio.Lock()
        #: Source maps for ``explain``, made on demand (``sourcemap.py``).
        self._explainer: Explainer | None = None
        self._ready = False
        self._known_dirs: set[Path] = set()
        self._tree_stop = asyncio.Event()
        self._out_stop = asyncio.Event()
        self._out_watch: tuple[Path, asyncio.Task[None]] | None = None
        self.retry = WriteRetry()
        self._watchers: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._builds_since_gc = 0
        #: The last build was stopped by the environment (see ``_build_failed``).
        self._engine_failed = False
        self._retry_s = 0.0
        self._retrying = False

    @staticmethod
    def _new_engine(config: Config) -> Engine:
        """An engine whose every changed output goes through the output gates of ``check``."""
        log = get_logger()
        out = config.output_dir

        memory = ScanMemory()

        def gate(agent_id: str, data: bytes, plan: Plan) -> list[Finding]:
            return check_output(f"{out}/{output_name(agent_id)}", data, plan.metas, config, memory)

        return Engine(config, open_store(config, warn=log.warning), output_check=gate)

    def _replace_engine(self, config: Config) -> None:
        self.engine.close()
        if self.engine.store:
            self.engine.store.close()
        self.engine = self._new_engine(config)

    # -- lifecycle --------------------------------------------------------------------------
    def run(self) -> int:
        return asyncio.run(self.serve())

    async def serve(self) -> int:
        self.lock.acquire()  # before anything else: a second daemon must not touch the socket
        if self.lock.fallback:
            self.log.warning("watch.lock_fallback", path=str(self.lock.path), reason=self.lock.fallback)
        try:
            self._install_signal_handlers()
            await self.startup()
            await self.main_loop()
        finally:
            await self.shutdown()
            self.lock.release()
        return 0

    async def startup(self) -> None:
        self.log.info(
            "watch.starting",
            root=str(self.config.root),
            pid=os.getpid(),
            socket=str(self.socket_path),
            step_ms=self.config.step_ms,
            debounce_ms=self.config.debounce_ms,
        )
        async with self._extending_start():
            # The socket first (status answers "starting"), then the watchers, then the first
            # build: an edit made during the first build is queued, not missed.
            await self.control.start()
            if self.control.stale_replaced:
                self.log.warning("socket.stale_replaced", socket=str(self.socket_path))
            await self._start_watchers(root_too=True)
            await self._build(None)
        self.notifier.ready(self.monitor.one_line())
        self._ready = True
        if self.notifier.watchdog_interval:
            self._spawn(self._watchdog(self.notifier.watchdog_interval / 2))
        agents = self.last_report.agents if self.last_report else 0
        self.log.info("watch.ready", root=str(self.config.root), agents=agents, socket=str(self.socket_path))
        async with self._build_lock:  # workers forked now, from current state: no edit waits for them
            self._start_workers()

    async def main_loop(self) -> None:
        while not self.should_exit.is_set():
            await _first(self.pending.arrived, self.should_exit, timeout=self.retry.timeout())
            if self.should_exit.is_set():
                break
            if not self.pending.arrived.is_set():  # no edit: writes failed, out/ is probed
                if self.retry.due(self.engine.output.writable()):
                    await self._build(set())
                continue
            await self._settle()
            await self._apply(self.pending.take())

    async def shutdown(self) -> None:
        self.monitor.state = "stopping"
        self.notifier.stopping()
        self._emit("info", "watch.stopping", pid=os.getpid())
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
        await self.control.close()
        async with self._build_lock:
            self.engine.close()
        if self.engine.store:
            self.engine.store.close()
        self.log.info("watch.stopped", builds=self.monitor.builds)

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
        tree = watch_tree(self.config, self.pending, stop, self._is_known_dir)
        self._watchers.append(asyncio.create_task(self._guard(tree), name="watch-tree"))
        if root_too:
            root = watch_root(self.config, self.pending, self.should_exit)
            self._watchers.append(asyncio.create_task(self._guard(root), name="watch-root"))
        await _let_watchers_start()

    async def _watch_output(self) -> None:
        """Watch ``out/`` for agentd's files deleted behind its back, once a build has made it
        (again: a watch ends with its folder; ``watch_output``)."""
        out = self.config.output_path
        if self._out_watch is not None and self._out_watch[0] == out and not self._out_watch[1].done():
            return
        self._out_stop.set()  # a watch of another folder (the configuration changed)
        if not out.is_dir():
            return
        self._out_stop = stop = asyncio.Event()
        self._spawn(self._mirror(self.should_exit, stop))

        def listed(name: str) -> bool:
            return name in self.engine.output.files or name == MANIFEST

        watch = watch_output(self.config, self.pending, stop, listed)
        task = asyncio.create_task(self._guard_output(watch), name="watch-output")
        self._watchers = [t for t in self._watchers if not t.done()] + [task]
        self._out_watch = (out, task)
        await _let_watchers_start()  # before "ready": a deletion right after it is seen

    async def _guard_output(self, coro: Any) -> None:
        """A watch of ``out/`` that could not start is logged; if ``out/`` went away meanwhile,
        its outputs are restored (and it is watched again) as when it is seen going."""
        try:
            await coro
        except Exception as exc:
            if not self.should_exit.is_set():
                self.log.warning("watch.watcher_failed", path=str(self.config.output_path), error=str(exc))
                if not self.config.output_path.is_dir():
                    self.pending.add(Batch(outputs_gone=True, received=time.monotonic()), 0)

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
        # A folder with an error of its own (unreadable, a link out) holds no file read.
        return path in self._known_dirs or path in self.engine.workspace.folder_errors

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
        restored = await self._restore_outputs(batch)
        if (batch.config_changed and await self._reload_config()) or batch.rescan:
            await self._start_watchers(root_too=False)
            await self._build(None)
        elif batch.paths or restored:
            if not batch.paths.isdisjoint(self.engine.workspace.unlisted):
                # A folder that could not be listed has no watch inside (watchfiles skipped
                # it): it changed (readable again?), so watch anew before reading it.
                await self._start_watchers(root_too=False)
            await self._build(batch.paths)

    async def _restore_outputs(self, batch: Batch) -> list[str]:
        """Have the next build write again the files of agentd's deleted from ``out/``."""
        if not (batch.outputs or batch.outputs_gone):
            return []
        async with self._build_lock:
            restored = self.engine.restore_outputs(None if batch.outputs_gone else batch.outputs)
        if restored:
            self.log.warning("output.missing", files=_capped(restored))
        return restored

    async def _reload_config(self) -> bool:
        """Re-read ``agentd.toml``; True when the workspace must be rebuilt."""
        config = self._read_config()
        if config is None or config == self.config:
            return False
        changed = [
            f.name for f in dataclasses.fields(config) if getattr(config, f.name) != getattr(self.config, f.name)
        ]
        self.log.info("config.reloaded", changed=changed)
        await self._adopt(config)
        return True

    def _read_config(self) -> Config | None:
        """The configuration as it is on disk now (CLI flags still win); None, logged, if bad."""
        try:
            return Config.load(self.config.root, self._overrides)
        except ConfigError as exc:
            self.log.error("config.error", error=str(exc))
            return None

    async def _adopt(self, config: Config) -> None:
        """Switch to ``config`` with a fresh engine (every template recompiled), between builds."""
        async with self._build_lock:
            self.config = config
            self.monitor.config = config
            self._replace_engine(config)

    async def _build(self, paths: set[Path] | None, restore: bool = True) -> BuildReport:
        async with self._build_lock:
            self.monitor.state = "building"
            build_id = self.engine.new_build_id()
            with structlog.contextvars.bound_contextvars(build_id=build_id):
                changed = sorted(self.engine.workspace.rel(p) for p in paths or ())
                self._emit("info", "build.started", changed=_capped(changed))
                try:
                    report = await asyncio.to_thread(self._run_build, paths, build_id, restore)
                except OSError as exc:
                    report = self._build_failed(exc, build_id)
                else:
                    self._freeze_heap()
                    if self._ready:  # a pool lost to a dead worker or a rebuild: start it again now
                        self._start_workers()
                    self._known_dirs = self.engine.known_dirs()
                errors_before = self.last_report.errors if self.last_report else []
                self.last_report = report
                self.retry.record(any(isinstance(e, WriteError) for e in report.errors))
                await self._watch_output()
                self.monitor.record_build(report, [f for fs in self.engine.findings.values() for f in fs])
                self.monitor.record_watch(self.pending.batches_seen, self.pending.events_seen)
                self._log_report(report, errors_before)
            if self._ready:  # before READY=1 the READY message itself carries the status
                self.notifier.status(self.monitor.one_line())
            return report

    def _run_build(self, paths: set[Path] | None, build_id: str, restore: bool) -> BuildReport:
        """In the build thread. An engine a build failed in may have stopped half-way through
        its bookkeeping: the next build starts from a fresh one (renders come from the store)."""
        if self._engine_failed:
            self._replace_engine(self.config)
            paths = None
        # Only full builds: an edit's build is over in well under a second.
        progress = self.progress if paths is None else None
        self.engine.progress = progress
        if progress is not None:
            progress.start()
        try:
            report = self.engine.build(paths, build_id=build_id, restore=restore)
        finally:
            if progress is not None:
                progress.stop()
        self._engine_failed = False
        self._retry_s = 0.0
        return report

    def _build_failed(self, exc: OSError, build_id: str) -> BuildReport:
        """A build the environment stopped (no file descriptors left, a full disk): reported as
        the build's error, outputs left as they were, and retried until the resource is back
        (no edit needed), at growing intervals so a lasting shortage logs a few lines."""
        self._engine_failed = True
        self._retry_s = min(self._retry_s * 2 or 1.0, MAX_RETRY_S)
        error = BuildFailed(f"build stopped: {exc}; outputs are kept as they were; retrying in {self._retry_s:g} s")
        if not self._retrying:
            self._retrying = True
            self._spawn(self._retry_build())
        return BuildReport(build_id=build_id, started=time.time(), errors=[error])

    async def _retry_build(self) -> None:
        try:
            while self._engine_failed and not self.should_exit.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.should_exit.wait(), self._retry_s)
                if not self.should_exit.is_set() and self._engine_failed:
                    await self._build(None)
        finally:
            self._retrying = False

    def _start_workers(self) -> None:
        self.engine.start_pool()
        if self.engine.pool_error:
            self.log.warning("workers.unavailable", error=self.engine.pool_error)
            self.engine.pool_error = None

    #: Builds between full collections of the frozen heap (see ``_freeze_heap``).
    FULL_GC_EVERY = 100

    def _freeze_heap(self) -> None:
        """Keep the cyclic garbage collector off what survives a build. The engine's caches,
        graph and parsed sources are ~300,000 tracked objects at 1,000 agents, and a full
        collection walks them all (~100 ms measured), stalling whichever save it lands on.
        ``gc.freeze`` moves them out of its reach (https://docs.python.org/3/library/gc.html#gc.freeze);
        only what later builds allocate is scanned. Frozen objects freed by reference counting
        go as usual; cycles among them wait for the full collection every ``FULL_GC_EVERY``
        builds. Forked workers inherit a frozen heap, so their collections do not copy its pages.
        """
        self._builds_since_gc += 1
        if self._builds_since_gc >= self.FULL_GC_EVERY:
            gc.unfreeze()
            self._builds_since_gc = 0
        gc.collect()
        gc.freeze()

    def _log_report(self, report: BuildReport, errors_before: list[AgentdError]) -> None:
        """One line per rebuild, from the monitor's record of it (plus the lists, capped); before
        it, one per error of the build before that is gone (and one when all are), and one per
        distinct error (``group_errors``: a mistake every agent hits is one, listing them)."""
        now = [error_fields(e) for e in report.errors]
        current = {error_key(e) for e in now}
        for fields in map(error_fields, errors_before):
            if error_key(fields) not in current:
                gone = {k: fields[k] for k in ("path", "line", "column", "location", "message")}
                self._emit("info", "build.error_fixed", **gone)
        if errors_before and not report.errors:
            self._emit("info", "build.errors_cleared", previous_errors=len(errors_before))
        for fields in now:
            self._emit("error", "build.error", **fields)
        last = _capped_fields(self.monitor.last_build or {})
        last.pop("build_id", None)  # bound in the context already
        last.pop("findings", None)  # a count there; the findings themselves below
        self._emit(
            "info",
            "build.finished",
            **last,
            rendered=_capped(report.sections_rendered),
            written=_capped(report.written),
            removed=_capped(report.removed),
            findings=_capped([f.format() for f in report.findings]),
        )

    def _emit(self, level: str, event: str, **fields: Any) -> None:
        """Log a line and send the same record to the socket's subscribers (with what the log
        context binds: the build id), so the two can never disagree."""
        getattr(self.log, level)(event, **fields)
        self.control.publish({"event": event, **structlog.contextvars.get_contextvars(), **fields})

    # -- signals ----------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._handle_exit, sig)
        loop.add_signal_handler(signal.SIGUSR1, lambda: self._spawn(self.verify()))
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))

    def _handle_exit(self, sig: signal.Signals) -> None:
        if self.should_exit.is_set():
            if sig == signal.SIGINT:  # a second Ctrl-C: the user will not wait
                self.log.warning("watch.forced_exit", signal=sig.name)
                os._exit(1)
            return
        self.log.info("watch.signal", signal=sig.name)
        self.should_exit.set()

    async def reload(self) -> None:
        """SIGHUP: re-read the configuration, recompile every template, rebuild (systemd's
        ``ExecReload``). A build in flight finishes first."""
        self.notifier.reloading()
        self.log.info("watch.reloading")
        async with self._extending_start():
            await self._adopt(self._read_config() or self.config)
            await self._start_watchers(root_too=False)
            await self._build(None)
        self.notifier.ready(self.monitor.one_line())
        self.log.info("watch.reloaded")

    @contextlib.asynccontextmanager
    async def _extending_start(self) -> AsyncIterator[None]:
        """Keep systemd waiting for READY=1 while the first build (or a reload's) runs: a cold
        build of a large workspace outlasts any fixed ``TimeoutStartSec=``. The requests come
        from the event loop, so a start that hangs stops asking and still times out."""
        if not self.notifier.enabled:
            yield
            return

        async def extend() -> None:
            while True:
                self.notifier.extend_timeout(EXTEND_BY_S)
                await asyncio.sleep(EXTEND_EVERY_S)

        task = asyncio.create_task(extend())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watchdog(self, every: float) -> None:
        """WATCHDOG=1 from the event loop itself: if the loop blocks, the pings stop and systemd
        restarts us."""
        while not self.should_exit.is_set():
            self.notifier.watchdog()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.should_exit.wait(), every)

    async def verify(self) -> VerifyResult:
        """A clean build in a temporary folder, compared with ``out/`` (on demand), once the
        build in flight is done: ``out/`` is half written during one."""
        async with self._build_lock:
            config = self.config
        result = await asyncio.to_thread(verify, config)
        log = self.log.info if result.ok else self.log.warning
        log("verify.finished", **_capped_fields(result.to_dict()))  # the reply to `verify` has them all
        return result

    # -- the status socket ------------------------------------------------------------------
    async def handle_request(self, request: dict[str, Any]) -> Any:
        command = request["command"]
        handler = getattr(self, f"_cmd_{command}", None) if command in COMMANDS else None
        if handler is None:
            raise RequestError(
                "unknown_command", f"unknown command {command!r}; expected one of: {', '.join(COMMANDS)}"
            )
        self.requests[command] += 1
        return await handler(request)

    async def _cmd_ping(self, request: dict[str, Any]) -> Any:
        # Which workspace, and where it writes: a client checks it asked the right daemon.
        return {
            "pong": True,
            "pid": os.getpid(),
            "root": str(self.config.root),
            "output_path": str(self.config.output_path),
            "version": __version__,
        }

    async def _cmd_status(self, request: dict[str, Any]) -> Any:
        return {**self.monitor.summary(), "socket": str(self.socket_path)}

    async def _cmd_stats(self, request: dict[str, Any]) -> Any:
        return {**self.monitor.stats(self.engine), "socket": str(self.socket_path), "requests": dict(self.requests)}

    async def _cmd_rebuild(self, request: dict[str, Any]) -> Any:
        agents = _string_list(request, "agents", required=False)
        if agents is not None:
            ws = self.engine.workspace
            try:
                check_agents(agents, [*ws.agents, *ws.agent_errors])
            except ConfigError as exc:
                raise RequestError("bad_request", str(exc)) from None
        async with self._build_lock:
            if agents is None:
                self._replace_engine(self.config)  # from scratch: every template and section
            else:
                self.engine.forget(agents)
        report = await self._build(None, restore=False)  # rendered anew, not taken from the store
        return {
            **(self.monitor.last_build or {}),
            "written": report.written,
            "errors": [error_fields(e) for e in report.errors],
        }

    def _current_errors(self) -> list[dict[str, Any]]:
        """The last build's errors, for commands that report on its state (``agentd`` prints
        them as a build in-process would)."""
        return [error_fields(e) for e in self.last_report.errors] if self.last_report else []

    async def _cmd_affected(self, request: dict[str, Any]) -> Any:
        paths = _string_list(request, "paths", required=True) or []
        resolved = [Path(p) if Path(p).is_absolute() else self.config.root / p for p in paths]
        async with self._build_lock:  # the graph is only consistent between builds
            try:
                return {**self.engine.affected(resolved), "errors": self._current_errors()}
            except ConfigError as exc:
                raise RequestError("bad_request", str(exc)) from None

    async def _cmd_verify(self, request: dict[str, Any]) -> Any:
        result = await self.verify()
        return {**result.to_dict(), "output_dir": self.config.output_dir, "diffs": result.diffs}

    async def _cmd_graph(self, request: dict[str, Any]) -> Any:
        fmt = request.get("format", "json")
        if fmt not in ("json", "dot"):
            raise RequestError("bad_request", f"format: expected 'json' or 'dot', got {fmt!r}")
        graph = self.engine.graph
        async with self._build_lock:  # consistent only between builds; big: exported off the loop
            exported = await asyncio.to_thread(graph.to_json if fmt == "json" else graph.to_dot)
        return {"format": fmt, "graph": exported, "errors": self._current_errors()}

    async def _cmd_explain(self, request: dict[str, Any]) -> Any:
        """From the maps kept for the agents' current outputs, made on the first question
        about each (off the loop, between builds: the engine's state must hold still while it
        renders). The reverse question makes them one agent at a time, so a save is built
        between two of them rather than after all; the answer is then checked against the
        state of the last build in one go (and the agents that build changed, traced again)."""
        async with self._build_lock:
            explainer = self._explainer
            if explainer is None or explainer.engine is not self.engine:
                explainer = self._explainer = Explainer(self.engine, built=True)
            agents = await self._explain_step(visits, explainer, request)
        for agent in agents:
            async with self._build_lock:
                if explainer.engine is not self.engine:  # a reload replaced the engine
                    break
                await asyncio.to_thread(explainer.prepare, agent)
        async with self._build_lock:
            if explainer.engine is not self.engine:
                explainer = self._explainer = Explainer(self.engine, built=True)
            return await self._explain_step(answer, explainer, request)

    async def _explain_step(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call`` in a worker thread, its refusals as the socket's errors."""
        try:
            return await asyncio.to_thread(call, *args)
        except ConfigError as exc:
            raise RequestError("bad_request", str(exc)) from None
        except ExplainError as exc:
            raise RequestError("cannot_explain", str(exc)) from None

    async def _cmd_subscribe(self, request: dict[str, Any]) -> Any:
        # The control server streams; this checks which events, and says which it will send.
        events = _string_list(request, "events", required=False) or list(EVENTS)
        unknown = sorted(set(events) - set(EVENTS))
        if unknown:
            raise RequestError("bad_request", f"unknown event(s): {', '.join(unknown)}; expected: {', '.join(EVENTS)}")
        return {"subscribed": True, "events": [e for e in EVENTS if e in events]}

    async def _cmd_stop(self, request: dict[str, Any]) -> Any:
        """Like SIGTERM: the build in flight finishes, then the daemon exits 0. The reply is
        written before anything else runs (this returns without waiting)."""
        self.log.info("watch.stop_requested")
        self.should_exit.set()
        return {"stopping": True, "pid": os.getpid(), "graceful_timeout": self.config.graceful_timeout}


async def _let_watchers_start() -> None:
    """Let new watcher tasks reach their first await: their inotify watches are then in place
    (``awatch`` sets them up before it first waits)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def _first(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until any of ``events`` is set (or ``timeout`` seconds have passed)."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waiters, return_exceptions=True)


def _capped(items: list[str]) -> list[str]:
    """The one place lists in log lines and events are cut: the first ``LISTED`` names
    and ``"... N more"``, so the field keeps its type (a list of strings) for ``jq``."""
    if len(items) <= LISTED:
        return items
    return [*items[:LISTED], f"... {len(items) - LISTED} more"]


def _capped_fields(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` with every list in it capped, for a log line."""
    return {k: _capped(v) if isinstance(v, list) else v for k, v in record.items()}


def _string_list(request: dict[str, Any], key: str, required: bool) -> list[str] | None:
    value = request.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise RequestError("bad_request", f"{key}: expected a non-empty list of strings, got {value!r}")
    return value
