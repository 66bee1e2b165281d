"""The status socket: newline-delimited JSON over a Unix socket, plus the workspace lock.

One request object per line (``{"command": "stats"}``), one reply per request:
``{"protocol": 1, "ok": true, "result": ...}`` or ``{"protocol": 1, "ok": false, "error":
{"code": ..., "message": ...}}``; an ``id`` in the request is echoed back. Modelled on
watchman's JSON protocol. Only the daemon's own user may talk to it: the folder is 0700, the
socket 0600 (bound under umask 077) and peers of another uid are refused (``SO_PEERCRED``).
A bounded number of clients is served at once (the next one gets a ``busy`` reply and is
closed) and a client silent for ``client_idle_timeout`` is closed, so clients can never take
the daemon's file descriptors; if the process runs out of them anyway, accepting waits (logged
once a minute at most) until some are free.

A ``subscribe`` request turns a connection into a stream of events, like watchman's: event
lines (``{"event": NAME, ...}``, never an ``ok`` key) interleave with the replies to whatever the
client asks afterwards. Everything a subscriber is sent is queued and written by its own task,
so one that does not read delays no one; it is dropped once ``SUBSCRIBER_BACKLOG_BYTES`` wait
unread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import socket
import stat
import struct
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from . import statedir
from .config import Config
from .exceptions import AlreadyRunning, ControlError, RequestError

PROTOCOL = 1
#: sun_path is 108 bytes on Linux, NUL included.
MAX_SOCKET_PATH = 107
LOCK_FILE = f"{statedir.STATE_DIR}/watch.lock"
#: Pending connections the kernel queues while the daemon is not accepting.
BACKLOG = 128
#: How long accepting waits after running out of file descriptors before trying again.
ACCEPT_RETRY_S = 0.5
#: A failing accept is logged at most this often (a shortage comes and goes as clients leave).
ACCEPT_LOG_EVERY_S = 60.0

#: The request that turns a connection into an event stream (its reply lists the events).
SUBSCRIBE = "subscribe"
#: A subscriber is dropped (closed) once this much waits for it unread (events, and replies to
#: what it asked meanwhile), beyond what the kernel and the transport already buffer.
SUBSCRIBER_BACKLOG_BYTES = 1_000_000  # 1 MB: SI, as agentd prints sizes
#: On shutdown, how long subscribers get to take what was queued for them before they are closed.
SUBSCRIBER_FLUSH_S = 2.0

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
Send = Callable[[bytes], Awaitable[None]]


# -- where ------------------------------------------------------------------------------------
def runtime_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_RUNTIME_DIR/agentd``, or a 0700 folder of our own under the temp dir."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_RUNTIME_DIR")
    if base and Path(base).is_dir():
        return Path(base) / "agentd"
    return Path(tempfile.gettempdir()) / f"agentd-{os.getuid()}"


def socket_path(config: Config, environ: Mapping[str, str] | None = None) -> Path:
    """The socket for ``config``'s workspace: ``config.socket`` when set, otherwise named after
    the workspace path (its name plus a hash, so two workspaces never collide)."""
    if config.socket:
        path = Path(config.socket).expanduser()
        path = path if path.is_absolute() else config.root / path
        if len(str(path).encode()) > MAX_SOCKET_PATH:
            raise ControlError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes (the AF_UNIX limit)")
        return path
    folder = runtime_dir(environ)
    digest = hashlib.sha256(str(config.root).encode()).hexdigest()[:12]
    path = folder / f"{config.root.name[:40]}-{digest}.sock"
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        path = folder / f"{digest}.sock"
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        path = Path(tempfile.gettempdir()) / f"agentd-{os.getuid()}" / f"{digest}.sock"
    return path


# -- the workspace lock -------------------------------------------------------------------------
class WorkspaceLock:
    """``flock`` on ``.agentd/watch.lock``: one daemon per workspace. The kernel drops the lock
    when the process dies, so a crash never leaves it stuck. When ``.agentd`` cannot hold it
    (a file in the way, no permission), the workspace folder itself is locked instead and
    ``fallback`` says why."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / LOCK_FILE
        self.fallback: str | None = None
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            statedir.ensure(self.root)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            # The folder is the fallback, not the rule: NFS emulates flock with POSIX locks, and
            # an exclusive one needs a descriptor open for writing, which a folder cannot have.
            self.fallback = str(exc)
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (os.read(fd, 64).decode(errors="replace").strip() if self.fallback is None else "") or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"another agentd watch (pid {holder}) is already running on {self.root}; "
                "stop it first, or ask it with `agentd status`"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise ControlError(f"cannot lock {self.path if self.fallback is None else self.root}: {exc}") from None
        if self.fallback is None:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            if self.fallback is None:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


# -- the server ---------------------------------------------------------------------------------
def _check_folder(folder: Path) -> None:
    if not folder.exists():
        old = os.umask(0o077)
        try:
            folder.mkdir(parents=True, mode=0o700, exist_ok=True)
        finally:
            os.umask(old)
    st = folder.stat()
    if st.st_uid != os.getuid():
        raise ControlError(f"refusing to use {folder}: it is owned by uid {st.st_uid}, not by you (uid {os.getuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ControlError(
            f"refusing to use {folder}: it is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            "expected 0700"
        )


def _is_live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
    return True


def _clear_stale(path: Path) -> bool:
    """Remove a socket left by a crashed daemon; refuse to touch a live one or a non-socket.
    (asyncio's ``create_unix_server`` would silently unlink whatever is there.)"""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"refusing to replace {path}: it exists and is not a socket")
    if _is_live(path):
        raise AlreadyRunning(f"another agentd daemon is serving {path}")
    path.unlink()
    return True


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", data)
    return int(uid)


def encode_reply(ok: bool, payload: Any, request_id: Any = None) -> bytes:
    reply: dict[str, Any] = {"protocol": PROTOCOL, "ok": ok}
    if request_id is not None:
        reply["id"] = request_id
    reply["result" if ok else "error"] = payload
    return orjson.dumps(reply, default=str) + b"\n"


def error_reply(code: str, message: str, request_id: Any = None) -> bytes:
    return encode_reply(False, {"code": code, "message": message}, request_id)


def parse_request(line: bytes) -> dict[str, Any]:
    try:
        request = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise RequestError("bad_json", f"request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise RequestError("bad_request", f"a request is a JSON object, got {type(request).__name__}")
    command = request.get("command")
    if not isinstance(command, str):
        raise RequestError("bad_request", 'a request needs a "command" string, e.g. {"command": "ping"}')
    return request


class Subscriber:
    """A subscribed connection: its lines (events, and replies to what it asks meanwhile) are
    queued and written in order by its own task (``pump``), so a client that does not read
    holds up only itself; the server drops it once ``SUBSCRIBER_BACKLOG_BYTES`` wait."""

    def __init__(self, writer: asyncio.StreamWriter, events: frozenset[str]) -> None:
        self.writer = writer
        self.events = events
        #: Bytes queued and not yet handed to the transport.
        self.backlog = 0
        self.finishing = False
        self.dropped = False
        #: The task serving the connection (the server waits for it on shutdown).
        self.task: asyncio.Task[Any] | None = asyncio.current_task()
        self._lines: deque[bytes] = deque()
        self._more = asyncio.Event()

    def put(self, line: bytes) -> bool:
        """Queue a line; False (nothing queued) when it would pass the backlog bound."""
        if self.backlog + len(line) > SUBSCRIBER_BACKLOG_BYTES:
            return False
        self._lines.append(line)
        self.backlog += len(line)
        self._more.set()
        return True

    def finish(self) -> None:
        """Write what is queued, then end (the daemon is stopping)."""
        self.finishing = True
        self._more.set()

    def drop(self) -> None:
        self.dropped = True
        self._lines.clear()
        self._more.set()
        self.writer.transport.abort()

    async def pump(self) -> None:
        while not self.dropped:
            while self._lines and not self.dropped:
                line = self._lines.popleft()
                self.backlog -= len(line)
                self.writer.write(line)
                await self.writer.drain()  # unbounded wait: the backlog bound is what limits it
            if self.finishing:
                return
            self._more.clear()
            await self._more.wait()


class ControlServer:
    """Serves one handler over the socket; each client is served in its own task, so a slow
    command (``rebuild``, ``verify``) never stalls the others. Accepting is its own loop, not
    ``asyncio.start_unix_server``: when descriptors run out, asyncio's loop logs a traceback
    for every failed accept and re-arms itself once per failure, flooding the log."""

    def __init__(
        self,
        path: Path,
        handler: Handler,
        max_request_bytes: int,
        log: Any,
        max_clients: int = 64,
        idle_timeout: float = 60.0,
    ) -> None:
        self.path = path
        self.handler = handler
        self.limit = max_request_bytes
        self.log = log
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.stale_replaced = False
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._subscribers: set[Subscriber] = set()
        self._inode: int | None = None

    async def start(self) -> None:
        _check_folder(self.path.parent)
        self.stale_replaced = _clear_stale(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            listener.bind(str(self.path))
        except BaseException:
            listener.close()
            raise
        finally:
            os.umask(old)
        listener.listen(BACKLOG)
        listener.setblocking(False)
        os.chmod(self.path, 0o600)
        self._inode = self.path.stat().st_ino
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept_loop(listener), name="socket-accept")

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._listener is not None:
            self._listener.close()
        for sub in self._subscribers:
            sub.finish()
        serving = [sub.task for sub in self._subscribers if sub.task is not None]
        if serving:  # each gets what was queued for it (the last event: the daemon stopping)
            await asyncio.wait(serving, timeout=SUBSCRIBER_FLUSH_S)
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(self._clients, timeout=2)
        # Only remove the socket if it is still ours (not one a successor bound since).
        with contextlib.suppress(FileNotFoundError):
            if self._inode is not None and self.path.stat().st_ino == self._inode:
                self.path.unlink()

    async def _accept_loop(self, listener: socket.socket) -> None:
        """Accept clients for as long as the server runs. Out of descriptors (or any other
        accept error), it logs (once a minute at most), waits and tries again: the pending
        clients stay queued in the kernel until a descriptor is free."""
        loop = asyncio.get_running_loop()
        logged_at, unlogged = -ACCEPT_LOG_EVERY_S, 0
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:
                if time.monotonic() - logged_at < ACCEPT_LOG_EVERY_S:
                    unlogged += 1
                else:
                    self.log.warning(
                        "socket.accept_failed",
                        error=str(exc),
                        clients=len(self._clients),
                        retry_s=ACCEPT_RETRY_S,
                        failures_since_last_logged=unlogged,
                    )
                    logged_at, unlogged = time.monotonic(), 0
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            if len(self._clients) >= self.max_clients:
                _refuse(conn, self.max_clients)
                continue
            task = asyncio.create_task(self._client(conn))
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

    async def _client(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=self.limit)
        except OSError:
            conn.close()
            return
        await self._serve(reader, writer)

    def publish(self, event: dict[str, Any]) -> None:
        """Send an event (``{"event": NAME, ...}``) to every subscriber that asked for it; one
        too far behind is dropped instead (never waited for)."""
        if not self._subscribers:
            return
        line = orjson.dumps(event, default=str) + b"\n"
        for sub in list(self._subscribers):
            if event["event"] in sub.events:
                self._queue(sub, line)

    def _queue(self, sub: Subscriber, line: bytes) -> None:
        if sub.dropped or sub.put(line):
            return
        self._subscribers.discard(sub)
        self.log.warning("socket.subscriber_dropped", backlog_bytes=sub.backlog, limit_bytes=SUBSCRIBER_BACKLOG_BYTES)
        sub.drop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sub: Subscriber | None = None

        async def send(data: bytes) -> None:
            writer.write(data)
            await self._drain(writer)

        try:
            uid = peer_uid(writer)
            if uid is not None and uid != os.getuid():
                self.log.warning("socket.refused", peer_uid=uid)
                await send(error_reply("forbidden", f"peer uid {uid} is not this daemon's uid {os.getuid()}"))
                return
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        line = await self._read_line(reader, send)
                except TimeoutError:
                    writer.write(error_reply("idle_timeout", f"no request for {self.idle_timeout:g} s; closing"))
                    return
                if line is None:
                    return
                if not line.strip():
                    continue
                reply, events = await self._answer(line)
                if events is None:
                    await send(reply)
                    continue
                sub = Subscriber(writer, events)
                self._subscribers.add(sub)
                sub.put(reply)
                await self._stream(reader, sub)
                return
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            if sub is not None:
                self._subscribers.discard(sub)
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await writer.wait_closed()
            writer.transport.abort()  # a peer that reads nothing must not keep its descriptor

    async def _stream(self, reader: asyncio.StreamReader, sub: Subscriber) -> None:
        """A subscribed connection, until the peer goes, is dropped or the daemon stops: no
        idle timeout (it is a stream); requests are still answered, in line with the events.
        A peer that closes only its sending side (``socat -t``) keeps receiving events."""

        async def send(data: bytes) -> None:
            self._queue(sub, data)

        pump = asyncio.create_task(sub.pump())
        reading: asyncio.Task[bytes | None] | None = asyncio.create_task(self._read_line(reader, send))
        try:
            while not sub.dropped:
                await asyncio.wait({pump} | ({reading} if reading else set()), return_when=asyncio.FIRST_COMPLETED)
                if pump.done():
                    pump.result()  # a peer gone raises here (ConnectionError)
                    return
                assert reading is not None and reading.done()
                line, reading = reading.result(), None
                if line is None:
                    continue  # half-closed: events still go out
                if line.strip():
                    reply, events = await self._answer(line)
                    if events is not None:  # subscribing again replaces the list of events
                        sub.events = events
                    await send(reply)
                reading = asyncio.create_task(self._read_line(reader, send))
        finally:
            for task in (pump, reading):
                if task is not None:
                    task.cancel()

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        """Wait for a reply to leave, for at most the idle timeout (a client that sends
        requests and never reads replies is closed)."""
        async with asyncio.timeout(self.idle_timeout):
            await writer.drain()

    async def _read_line(self, reader: asyncio.StreamReader, send: Send) -> bytes | None:
        """The next request line; an over-long one is answered with an error and skipped."""
        while True:
            try:
                line = await reader.readuntil(b"\n")
                return line
            except asyncio.IncompleteReadError as exc:
                return exc.partial if exc.partial.strip() else None
            except asyncio.LimitOverrunError as exc:
                await self._discard_line(reader, exc.consumed)
                await send(error_reply("too_large", f"request line longer than {self.limit} bytes"))

    @staticmethod
    async def _discard_line(reader: asyncio.StreamReader, consumed: int) -> None:
        await reader.readexactly(consumed)
        while True:
            try:
                await reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await reader.readexactly(exc.consumed)

    async def _answer(self, line: bytes) -> tuple[bytes, frozenset[str] | None]:
        """The reply, and for an accepted ``subscribe`` the events it asked for (its result's
        ``events``: the handler checks the names)."""
        request_id = None
        try:
            request = parse_request(line)
            request_id = request.get("id")
            result = await self.handler(request)
            events = frozenset(result["events"]) if request["command"] == SUBSCRIBE else None
            return encode_reply(True, result, request_id), events
        except RequestError as exc:
            return error_reply(exc.code, exc.message, request_id), None
        except Exception as exc:  # a bug must cost one reply, never the daemon
            self.log.exception("socket.internal_error")
            return error_reply("internal", f"{type(exc).__name__}: {exc}", request_id), None


def _refuse(conn: socket.socket, cap: int) -> None:
    """One line to a client over the cap, then close: a plain non-blocking send (a few dozen
    bytes into an empty socket buffer), so a refusal holds its descriptor for no time."""
    with conn, contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(error_reply("busy", f"the daemon is serving {cap} clients already (max_clients); try again"))


# -- the client ---------------------------------------------------------------------------------
class Client:
    """One connection to a daemon: requests and their replies, and for a subscriber the events
    between them (``agentd status --watch``)."""

    def __init__(self, path: Path, timeout: float | None = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except BaseException:
            self.sock.close()
            raise
        self._buffer = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, command: str, **args: Any) -> None:
        self.sock.sendall(orjson.dumps({"command": command, **args}) + b"\n")

    def receive(self, timeout: float | None) -> dict[str, Any]:
        """The next line, a reply or an event; ``TimeoutError`` when none comes within
        ``timeout`` s (None: wait), ``ConnectionError`` when the daemon closed the connection."""
        while b"\n" not in self._buffer:
            self.sock.settimeout(timeout)
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionAbortedError("the daemon closed the connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message = orjson.loads(line)
        if not isinstance(message, dict):
            raise ValueError(f"not a reply or an event: {line[:200]!r}")
        return message


def result_of(reply: dict[str, Any]) -> Any:
    """A reply's result; ``RequestError`` for an error reply."""
    if not reply.get("ok"):
        error = reply.get("error") or {}
        raise RequestError(error.get("code", "error"), error.get("message", "request failed"))
    return reply["result"]


def request(path: Path, command: str, timeout: float | None = 10.0, **args: Any) -> Any:
    """Send one request and return its result; raise ``RequestError`` for an error reply and
    ``OSError`` when nothing answers (``timeout``: per wait, None for none)."""
    with Client(path, timeout) as client:
        client.send(command, **args)
        return result_of(client.receive(timeout))


def wait_stopped(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` is gone (or a zombie nobody reaped yet) within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except ProcessLookupError:
            return True
        except (OSError, IndexError):  # no /proc (not Linux): kill() alone decides
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
