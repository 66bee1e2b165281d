"""The status socket: a real daemon, a real Unix socket, every reply and every refusal."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from agentd.config import Config
from agentd.control import MAX_SOCKET_PATH, SUBSCRIBER_BACKLOG_BYTES, ControlServer, request, socket_path
from conftest import clean_build, read_outputs, run_cli, run_daemon, set_config, slow_down


async def ask(path: Path, *lines: bytes, timeout: float = 10) -> list[dict]:
    """Send raw request lines on one connection; return one parsed reply per line."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=1 << 24), timeout)
    replies = []
    try:
        for line in lines:
            writer.write(line)
            await writer.drain()
            replies.append(orjson.loads(await asyncio.wait_for(reader.readline(), timeout)))
    finally:
        writer.close()
    return replies


def sock_of(root: Path) -> Path:
    return socket_path(Config.load(root))


async def test_every_command_and_reply_shape(tiny: Path) -> None:
    """ping, status, stats, rebuild, affected, verify and graph answer with protocol/ok/result;
    an id is echoed; ping names the workspace and its output folder."""
    async with run_daemon(tiny) as d:
        path = sock_of(tiny)
        replies = await ask(
            path,
            b'{"command": "ping", "id": 7}\n',
            b'{"command": "status"}\n',
            b'{"command": "stats"}\n',
            b'{"command": "affected", "paths": ["templates/sections/peers.j2"]}\n',
            b'{"command": "rebuild", "agents": ["alpha"]}\n',
            b'{"command": "rebuild"}\n',
            b'{"command": "verify"}\n',
            b'{"command": "graph", "format": "dot"}\n',
        )
        assert all(r["protocol"] == 1 and r["ok"] for r in replies), replies
        ping, status, stats, affected, rebuild_one, rebuild_all, verify, graph = (r["result"] for r in replies)
        assert replies[0]["id"] == 7
        root = tiny.resolve()
        assert ping == {
            "pong": True,
            "pid": d.proc.pid,
            "root": str(root),
            "output_path": str(root / "out"),
            "version": "0.1.0",
        }
        assert status["state"] == "idle" and status["pid"] == d.proc.pid and status["builds"] == 1
        for key in ("state", "pid", "version", "uptime_s", "builds", "last_build", "caches", "templates",
                    "alerts", "errors", "rss_bytes", "peak_rss_bytes", "watcher"):  # fmt: skip
            assert key in stats, key
        assert sorted(stats["caches"]) == ["L1", "L2", "L3", "L4"]
        for layer in stats["caches"].values():
            assert {"entries", "bytes", "hits", "misses", "evictions", "hit_rate"} <= set(layer)
        assert stats["caches"]["L3"]["entries"] == 7 and stats["rss_bytes"] > 0
        assert set(stats["templates"]["sections/summary.j2"]) == {"renders", "p50_ms", "p95_ms", "max_ms"}
        assert affected == {"agents": ["alpha", "beta"], "sections": ["alpha/peers", "beta/peers"], "errors": []}
        assert rebuild_one["sections_rendered"] == 4 and rebuild_one["agents_rendered"] == ["alpha"]
        assert rebuild_all["sections_rendered"] == 7
        assert verify["ok"] is True and verify["output_dir"] == "out" and verify["diffs"] == {}
        assert graph["format"] == "dot" and graph["graph"].startswith("digraph agentd {")
        assert stats["requests"] == {"ping": 1, "status": 1, "stats": 1}  # counted as they come


async def test_subscribe_streams_the_logged_builds_and_errors(tiny: Path) -> None:
    """A subscriber gets build.started/build.finished after an edit (the log's records), one
    build.error for a broken template every agent renders, build.error_fixed and
    build.errors_cleared once fixed, replies in line with the events, and watch.stopping then the
    end of the stream when the daemon stops."""
    async with run_daemon(tiny) as d:
        reader, writer = await asyncio.open_unix_connection(str(sock_of(tiny)), limit=1 << 24)

        async def until(name: str) -> list[dict]:
            lines = []
            while not lines or lines[-1].get("event") != name:
                lines.append(orjson.loads(await asyncio.wait_for(reader.readline(), 15)))
            return lines

        writer.write(b'{"command": "subscribe", "id": "s"}\n')
        assert orjson.loads(await asyncio.wait_for(reader.readline(), 10)) == {
            "protocol": 1,
            "ok": True,
            "id": "s",
            "result": {
                "subscribed": True,
                "events": [
                    "build.started",
                    "build.error",
                    "build.error_fixed",
                    "build.finished",
                    "build.errors_cleared",
                    "watch.stopping",
                ],
            },
        }
        alpha = tiny / "agents/alpha.yaml"
        alpha.write_text(alpha.read_text().replace("[a1, a2]", "[a1, a2, a3]"))
        started, finished = await until("build.finished")
        assert started == {"event": "build.started", "build_id": finished["build_id"], "changed": ["agents/alpha.yaml"]}
        logged = next(e for e in d.builds if e["build_id"] == finished["build_id"])
        assert finished == {k: v for k, v in logged.items() if k not in ("level", "timestamp")}
        assert finished["sections_rendered"] == 1 and finished["errors"] == 0 and "ok" not in finished

        peers = tiny / "templates/sections/peers.j2"
        good = peers.read_text()
        peers.write_text("{{ oops }\n")
        broken = await until("build.finished")
        (error,) = [e for e in broken if e["event"] == "build.error"]
        assert (error["path"], error["line"], error["build_id"]) == (
            "templates/sections/peers.j2",
            1,
            broken[-1]["build_id"],
        )
        assert error["message"].startswith("template syntax error") and broken[-1]["errors"] == 1
        peers.write_text(good)
        fixed = await until("build.finished")
        events = ["build.started", "build.error_fixed", "build.errors_cleared", "build.finished"]
        assert [e["event"] for e in fixed] == events
        assert fixed[1]["location"] == "templates/sections/peers.j2:1"
        assert fixed[2]["previous_errors"] == 1 and fixed[-1]["errors"] == 0

        writer.write(b'{"command": "ping", "id": 2}\n')
        pong = orjson.loads(await asyncio.wait_for(reader.readline(), 10))
        assert pong["id"] == 2 and pong["result"]["pid"] == d.proc.pid
        d.proc.terminate()
        assert (await until("watch.stopping"))[-1] == {"event": "watch.stopping", "pid": d.proc.pid}
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, not reset
        assert await asyncio.wait_for(d.proc.wait(), 10) == 0
        writer.close()


async def test_a_subscriber_that_does_not_read_is_dropped(tiny: Path) -> None:
    """A subscriber that reads nothing while asking for more and more never holds up another
    client or a build, and is dropped once its unread backlog passes the bound."""
    async with run_daemon(tiny) as d:
        path = sock_of(tiny)
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"command": "subscribe"}\n' + b'{"command": "stats"}\n' * 100)
        await writer.drain()
        # Its replies fill the socket buffers: the daemon writes no more to it, and carries on.
        assert (await ask(path, b'{"command": "ping"}\n'))[0]["ok"]
        alpha = tiny / "agents/alpha.yaml"
        alpha.write_text(alpha.read_text().replace("[a1, a2]", "[a1, a2, a3]"))
        await d.next_build()
        assert not d.named("socket.subscriber_dropped")
        size = len(orjson.dumps(await asyncio.to_thread(request, path, "stats")))  # about one reply

        async def flood() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(4 * SUBSCRIBER_BACKLOG_BYTES // (10 * size)):
                    writer.write(b'{"command": "stats"}\n' * 10)
                    await writer.drain()
                    if d.named("socket.subscriber_dropped"):
                        return

        await asyncio.wait_for(flood(), 60)
        dropped = await d.wait_for(lambda e: e.get("event") == "socket.subscriber_dropped")
        assert dropped["level"] == "warning" and dropped["limit_bytes"] == SUBSCRIBER_BACKLOG_BYTES
        assert (await ask(path, b'{"command": "ping"}\n'))[0]["ok"]
        assert d.proc.returncode is None
        writer.close()


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"this is not json\n", "bad_json"),
        (b"[1, 2]\n", "bad_request"),
        (b'{"no": "command"}\n', "bad_request"),
        (b'{"command": 42}\n', "bad_request"),
        (b'{"command": "explode"}\n', "unknown_command"),
        (b'{"command": "affected"}\n', "bad_request"),
        (b'{"command": "affected", "paths": "agents/alpha.yaml"}\n', "bad_request"),
        (b'{"command": "affected", "paths": [1]}\n', "bad_request"),
        (b'{"command": "affected", "paths": ["README.md"]}\n', "bad_request"),
        (b'{"command": "rebuild", "agents": ["nobody"]}\n', "bad_request"),
        (b'{"command": "graph", "format": "svg"}\n', "bad_request"),
        (b'{"command": "subscribe", "events": ["build.done"]}\n', "bad_request"),
        (b'{"command": "' + b"x" * 70_000 + b'"}\n', "too_large"),
    ],
    ids=[
        "malformed",
        "not-object",
        "no-command",
        "command-type",
        "unknown",
        "missing-arg",
        "arg-type",
        "arg-item-type",
        "foreign-path",
        "unknown-agent",
        "graph-format",
        "unknown-event",
        "oversized",
    ],  # fmt: skip
)
async def test_bad_requests_get_error_replies_and_the_daemon_lives_on(tiny: Path, line: bytes, code: str) -> None:
    """Every malformed request gets an error reply with a code and message; the same
    connection keeps working afterwards."""
    async with run_daemon(tiny):
        bad, ping = await ask(sock_of(tiny), line, b'{"command": "ping"}\n')
        assert bad["protocol"] == 1 and bad["ok"] is False
        assert bad["error"]["code"] == code and bad["error"]["message"]
        assert ping["ok"] is True


async def test_fifty_clients_during_a_rebuild(tiny: Path) -> None:
    """50 concurrent clients get prompt answers while a slow rebuild is running."""
    slow_down(tiny / "templates/sections/summary.j2")
    async with run_daemon(tiny) as d:
        path = sock_of(tiny)
        rebuild = asyncio.create_task(ask(path, b'{"command": "rebuild"}\n', timeout=60))
        await d.wait_for(lambda e: e.get("event") == "build.started", start=len(d.events))
        started = time.monotonic()
        replies = await asyncio.gather(
            *(ask(path, b'{"command": "stats"}\n', b'{"command": "ping"}\n') for _ in range(50))
        )
        answered_in = time.monotonic() - started
        assert all(r["ok"] for pair in replies for r in pair)
        assert {pair[0]["result"]["state"] for pair in replies} == {"building"}
        assert not rebuild.done(), f"the rebuild finished before the clients were answered ({answered_in:.2f} s)"
        (result,) = await rebuild
        assert result["ok"] and result["result"]["sections_rendered"] == 7


async def test_socket_and_folder_permissions(tiny: Path, tmp_path: Path) -> None:
    """The socket folder is 0700 and the socket 0600, owned by us."""
    async with run_daemon(tiny, env={"XDG_RUNTIME_DIR": str(tmp_path)}):
        path = next((tmp_path / "agentd").glob("*.sock"))
        assert stat.S_IMODE((tmp_path / "agentd").stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.stat().st_uid == os.getuid()


def test_default_socket_path_is_per_workspace_and_short(tmp_path: Path) -> None:
    """Two workspaces never share a socket, and the path fits sun_path even for deep roots."""
    a, b = tmp_path / "ws", tmp_path / "other" / "ws"
    a.mkdir()
    b.mkdir(parents=True)
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    pa, pb = socket_path(Config.load(a), env), socket_path(Config.load(b), env)
    assert pa != pb and pa.parent == tmp_path / "agentd" and pa.name.startswith("ws-")
    deep = tmp_path.joinpath(*(["d" * 50] * 4))
    deep.mkdir(parents=True)
    assert len(str(socket_path(Config.load(deep), {"XDG_RUNTIME_DIR": str(deep)}))) <= MAX_SOCKET_PATH
    fallback = socket_path(Config.load(a), {})
    assert fallback.parent.name == f"agentd-{os.getuid()}"


async def test_socket_flag_and_env(tiny: Path, tmp_path: Path) -> None:
    """--socket on watch and status, and AGENTD_SOCKET, choose the socket."""
    custom = tmp_path / "s" / "custom.sock"
    async with run_daemon(tiny, "--socket", str(custom)):
        assert custom.exists()
        result = await asyncio.to_thread(run_cli, "status", "--json", "--socket", str(custom), cwd=tiny)
        assert result.returncode == 0 and orjson.loads(result.stdout)["state"] == "idle"
        result = await asyncio.to_thread(run_cli, "status", "--json", cwd=tiny, env={"AGENTD_SOCKET": str(custom)})
        assert result.returncode == 0


async def test_group_writable_folder_is_refused(tiny: Path, tmp_path: Path) -> None:
    """A socket folder others can write to is refused with exit 2 and a reason."""
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)
    result = await asyncio.to_thread(run_cli, "watch", "--socket", str(folder / "s.sock"), cwd=tiny)
    assert result.returncode == 2 and "writable by group or others" in result.stderr


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to create a folder owned by another user")
async def test_foreign_owned_folder_is_refused(tiny: Path, tmp_path: Path) -> None:
    """A socket folder owned by someone else is refused."""
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    result = await asyncio.to_thread(run_cli, "watch", "--socket", str(folder / "s.sock"), cwd=tiny)
    assert result.returncode == 2 and "owned by uid 65534" in result.stderr


async def test_stale_socket_is_replaced(tiny: Path, tmp_path: Path) -> None:
    """A socket file left by a crashed daemon (nobody listening) is replaced."""
    path = tmp_path / "run" / "s.sock"
    path.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens
    async with run_daemon(tiny, "--socket", str(path)) as d:
        assert d.named("socket.stale_replaced")
        assert (await ask(path, b'{"command": "ping"}\n'))[0]["ok"]


async def test_a_non_socket_file_is_never_removed(tiny: Path, tmp_path: Path) -> None:
    """A regular file where the socket should go is left alone and startup fails."""
    path = tmp_path / "run" / "s.sock"
    path.parent.mkdir(mode=0o700)
    path.write_text("precious\n")
    result = await asyncio.to_thread(run_cli, "watch", "--socket", str(path), cwd=tiny)
    assert result.returncode == 2 and "not a socket" in result.stderr
    assert path.read_text() == "precious\n"


async def test_second_instance_is_refused(tiny: Path, tmp_path: Path) -> None:
    """A second daemon on the same workspace exits 4 and leaves the live socket alone, even
    when told to use another socket path."""
    async with run_daemon(tiny) as d:
        path = sock_of(tiny)
        for extra in ([], ["--socket", str(tmp_path / "x.sock")]):
            result = await asyncio.to_thread(run_cli, "watch", *extra, cwd=tiny)
            assert result.returncode == 4
            assert f"already running on {tiny}" in result.stderr and str(d.proc.pid) in result.stderr
        assert (await ask(path, b'{"command": "ping"}\n'))[0]["result"]["pid"] == d.proc.pid


async def test_live_socket_of_another_workspace_is_not_stolen(tiny: Path, tmp_path: Path) -> None:
    """A daemon pointed at a socket another daemon serves refuses to start (exit 4)."""
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    path = tmp_path / "run" / "shared.sock"
    async with run_daemon(tiny, "--socket", str(path)):
        result = await asyncio.to_thread(run_cli, "watch", "--socket", str(path), cwd=other)
        assert result.returncode == 4 and "another agentd daemon is serving" in result.stderr
        assert (await ask(path, b'{"command": "ping"}\n'))[0]["ok"]


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
async def test_peer_of_another_uid_is_refused(tiny: Path, tmp_path: Path) -> None:
    """A client running as another uid gets a `forbidden` reply (SO_PEERCRED)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="agentd-peer-"))  # pytest's tmp_path is 0700: unreachable for nobody
    folder.chmod(0o755)
    path = folder / "s.sock"
    async with run_daemon(tiny, "--socket", str(path)) as d:
        path.chmod(0o666)  # let the other user reach the socket at all
        # The daemon answers a refused peer at once and hangs up: the request may then meet a
        # closed socket (EPIPE), the reply is still there to read.
        client = (
            "import contextlib, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])\n"
            "with contextlib.suppress(BrokenPipeError):\n"
            '    s.sendall(b\'{"command": "stats"}\\n\')\n'
            "print(s.recv(4096).decode())\n"
        )
        # The test's own interpreter may live where uid 65534 cannot reach (a venv under /root).
        python = shutil.which("python3", path="/usr/bin:/usr/local/bin:/bin")
        if python is None:
            pytest.skip("no system python3 that another user can run")
        result = await asyncio.to_thread(
            subprocess.run,
            [python, "-c", client, str(path)],
            user=65534,
            group=65534,
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        reply = orjson.loads(result.stdout)
        assert reply["ok"] is False and reply["error"]["code"] == "forbidden"
        assert d.named("socket.refused")
    folder.rmdir()


async def test_sigterm_removes_the_socket(tiny: Path) -> None:
    """A clean shutdown removes its socket and releases the workspace."""
    async with run_daemon(tiny) as d:
        path = sock_of(tiny)
        assert path.exists()
        d.proc.terminate()
        assert await asyncio.wait_for(d.proc.wait(), 10) == 0
        assert not path.exists()
    async with run_daemon(tiny):  # the lock was released: a new daemon starts
        assert path.exists()


class _Log:
    """The event names an in-process server logs."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def warning(self, event: str, **fields: object) -> None:
        self.events.append(event)

    info = exception = warning


async def _pong(request: dict) -> dict:
    return {"pong": True}


async def _served(path: Path, tries: int = 200) -> dict:
    """A ping's reply once the server has a free slot (a client that left frees its slot when
    the server has seen it go)."""
    for _ in range(tries):
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b'{"command": "ping"}\n')
        with contextlib.suppress(ConnectionError):  # a refused client may find it closed: the reply is there
            await writer.drain()
        reply = orjson.loads(await asyncio.wait_for(reader.readline(), 10))
        writer.close()
        if reply["ok"]:
            return reply
        await asyncio.sleep(0.02)
    raise AssertionError(f"never served: {reply}")


async def test_clients_beyond_the_cap_get_a_busy_reply(tmp_path: Path) -> None:
    """Past max_clients, a new client gets one `busy` error line and is closed; the connected
    clients keep working, and a slot that frees up serves the next client."""
    path = tmp_path / "s.sock"
    server = ControlServer(path, _pong, 65536, _Log(), max_clients=2)
    await server.start()
    try:
        held = [await asyncio.open_unix_connection(str(path)) for _ in range(2)]
        for reader, writer in held:
            writer.write(b'{"command": "ping"}\n')
            assert orjson.loads(await asyncio.wait_for(reader.readline(), 10))["ok"]
        reader, writer = await asyncio.open_unix_connection(str(path))
        reply = orjson.loads(await asyncio.wait_for(reader.readline(), 10))
        assert reply["ok"] is False and reply["error"]["code"] == "busy" and "2 clients" in reply["error"]["message"]
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed
        writer.close()
        reader, writer = held[0]
        writer.write(b'{"command": "ping"}\n')
        assert orjson.loads(await asyncio.wait_for(reader.readline(), 10))["ok"]
        writer.close()
        assert (await _served(path))["result"] == {"pong": True}
        held[1][1].close()
    finally:
        await server.close()


async def test_idle_clients_are_disconnected(tmp_path: Path) -> None:
    """A client silent for client_idle_timeout gets an `idle_timeout` line and is closed, which
    frees its slot for the next client."""
    path = tmp_path / "s.sock"
    server = ControlServer(path, _pong, 65536, _Log(), max_clients=1, idle_timeout=0.2)
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        reply = orjson.loads(await asyncio.wait_for(reader.readline(), 10))
        assert reply["ok"] is False and reply["error"]["code"] == "idle_timeout"
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert (await _served(path))["ok"]
    finally:
        await server.close()


async def test_running_out_of_descriptors_is_survived(tiny: Path, tmp_path: Path) -> None:
    """Idle clients that take every descriptor the daemon may open: the failing accept is
    logged once (no flood), an edit meanwhile is reported as an error naming the cause and the
    daemon keeps running; once the clients leave it serves the socket again and the next edit
    builds outputs equal to a clean build."""
    set_config(tiny, "max_clients = 1000")  # no cap below the descriptor limit
    path = tmp_path / "s.sock"
    async with run_daemon(tiny, "--jobs", "1", "--socket", str(path), nofile=40) as d:
        clients = []
        for _ in range(60):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                client.connect(str(path))
            clients.append(client)
        await d.wait_for(lambda e: e.get("event") == "socket.accept_failed")
        alpha = tiny / "agents/alpha.yaml"
        alpha.write_text(alpha.read_text().replace("[a1, a2]", "[a1, a2, a3]"))
        await d.wait_for(
            lambda e: e.get("event") == "build.error" and "Too many open files" in str(e.get("message")),
            start=len(d.events),
        )
        await asyncio.sleep(1)  # the accept loop retries meanwhile (and the failed build is retried)
        assert d.proc.returncode is None
        assert len(d.named("socket.accept_failed")) == 1
        assert len(d.raw) < 40, "\n".join(d.raw[-20:])
        for client in clients:
            client.close()
        assert (await ask(path, b'{"command": "ping"}\n'))[0]["ok"]
        alpha.write_text(alpha.read_text().replace("[a1, a2, a3]", "[a1, a2, a4]"))
        await d.wait_for(lambda e: e.get("event") == "build.finished" and e["errors"] == 0, start=len(d.events))
        assert d.proc.returncode is None
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")
