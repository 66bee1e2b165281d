"""systemd integration: the notify protocol on a real datagram socket, SIGHUP, the unit."""

from __future__ import annotations

import asyncio
import io
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import orjson
import pytest

from agentd.log import is_journal
from agentd.notify import Notifier
from agentd.service import escape_path, unit_text
from conftest import REPO, run_cli, run_daemon, set_config, slow_down


class NotifySink:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    async def wait_for(self, key: str, count: int = 1, timeout: float = 15) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while sum(key in m for m in self.drain()) < count:
            if loop.time() > deadline:
                raise AssertionError(f"no {key} in {self.messages}")
            await asyncio.sleep(0.02)

    def kinds(self) -> list[str]:
        order = ("READY", "RELOADING", "STOPPING", "WATCHDOG", "EXTEND_TIMEOUT_USEC")
        return [next((k for k in order if k in m), "STATUS") for m in self.drain()]


async def test_notify_sequence(tiny: Path, tmp_path: Path) -> None:
    """EXTEND_TIMEOUT_USEC while the first build runs, READY after it, STATUS per build,
    WATCHDOG pings, RELOADING, EXTEND_TIMEOUT_USEC then READY on SIGHUP, STOPPING on SIGTERM —
    in that order."""
    slow_down(tiny / "templates/sections/summary.j2", 200_000)
    sink = NotifySink(str(tmp_path / "notify.sock"))
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"}
    async with run_daemon(tiny, env=env) as d:
        await sink.wait_for("READY")
        ready = next(m for m in sink.messages if "READY" in m)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(d.proc.pid)
        assert ready["STATUS"].startswith("idle: 1 builds")
        await sink.wait_for("WATCHDOG", count=3)  # every 0.1 s, from the event loop
        alpha = tiny / "agents/alpha.yaml"
        alpha.write_text(alpha.read_text().replace("skills: [a1, a2]", "skills: [a1]"))
        await d.next_build()
        await sink.wait_for("STATUS", count=2)  # the one in READY, then one per build
        assert any("2 builds" in m.get("STATUS", "") for m in sink.messages)
        d.proc.send_signal(signal.SIGHUP)
        await sink.wait_for("READY", count=2)
        reloading = next(m for m in sink.messages if "RELOADING" in m)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        d.proc.terminate()
        assert await asyncio.wait_for(d.proc.wait(), 10) == 0
    await sink.wait_for("STOPPING")
    extend = next(m for m in sink.messages if "EXTEND_TIMEOUT_USEC" in m)
    assert int(extend["EXTEND_TIMEOUT_USEC"]) >= 10_000_000
    kinds = [k for k in sink.kinds() if k != "WATCHDOG"]
    # Only while systemd waits for READY=1: before the first, between RELOADING and the second.
    first_ready, reloading = kinds.index("READY"), kinds.index("RELOADING")
    assert kinds[0] == "EXTEND_TIMEOUT_USEC" and "EXTEND_TIMEOUT_USEC" not in kinds[first_ready:reloading]
    assert "EXTEND_TIMEOUT_USEC" in kinds[reloading:]
    kinds = [k for k in kinds if k != "EXTEND_TIMEOUT_USEC"]
    assert kinds[0] == "READY"
    assert kinds.index("RELOADING") < len(kinds) - 1 - kinds[::-1].index("READY") < kinds.index("STOPPING")
    assert kinds[-1] == "STOPPING"


async def test_abstract_namespace_socket(tiny: Path) -> None:
    """A NOTIFY_SOCKET starting with @ is the abstract namespace."""
    name = f"agentd-test-{os.getpid()}"
    sink = NotifySink("\0" + name)
    async with run_daemon(tiny, env={"NOTIFY_SOCKET": "@" + name}):
        await sink.wait_for("READY")


def test_notifier_without_socket_is_a_no_op() -> None:
    """Outside systemd nothing is sent and nothing fails."""
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    n.ready("x")
    n.stopping()


async def test_sighup_recompiles_everything_and_rebuilds(tiny: Path) -> None:
    """SIGHUP re-reads the configuration, recompiles every template and rebuilds."""
    async with run_daemon(tiny) as d:
        set_config(tiny, 'output_dir = "reloaded"')
        await d.wait_for(lambda e: e.get("event") == "config.reloaded")  # the watcher saw it too
        await d.next_build()
        d.proc.send_signal(signal.SIGHUP)
        await d.wait_for(lambda e: e.get("event") == "watch.reloaded", start=len(d.events))
        build = d.builds[-1]
        assert build["sections_rendered"] + build["sections_restored"] == 7  # valid renders come from the store
        assert build["caches"]["L1"]["misses"] == 9  # every template compiled anew
        assert (tiny / "reloaded/alpha.md").exists()


# -- the journal ---------------------------------------------------------------------------------


async def test_journal_lines_have_priorities_lead_keys_and_capped_lists(tiny: Path) -> None:
    """On the stream $JOURNAL_STREAM names, every line starts with its sd-daemon priority, then
    event, level and timestamp; lists in build lines stop at 20 names and a count."""
    beta = (tiny / "agents/beta.yaml").read_text()
    for i in range(23):  # 25 agents
        (tiny / f"agents/extra-{i:02d}.yaml").write_text(beta)
    env = {"AGENTD_SLOW_TEMPLATE_MS": "0"}  # warm builds raise warnings
    async with run_daemon(tiny, "--jobs", "1", env=env, journal=True) as d:
        alpha = tiny / "agents/alpha.yaml"
        alpha.write_text(alpha.read_text().replace("skills: [a1, a2]", "skills: [a1]"))
        await d.next_build()
        (tiny / "templates/sections/peers.j2").write_text("{{ oops }\n")
        await d.next_build()
    lines = {orjson.loads(line[3:])["event"]: line for line in d.raw}
    for event, level, priority in (
        ("watch.ready", "info", "<6>"), ("build.finished", "info", "<6>"),
        ("alert.raised", "warning", "<4>"), ("build.error", "error", "<3>"),
    ):  # fmt: skip
        assert lines[event].startswith(f'{priority}{{"event":"{event}","level":"{level}","timestamp":"'), lines[event]
    cold = d.builds[0]
    assert cold["outputs_written"] == 25 and cold["sections_rendered"] == 76
    for key, total in (("agents_rendered", 25), ("written", 25), ("rendered", 76)):
        assert len(cold[key]) == 21 and cold[key][-1] == f"... {total - 20} more", key


def test_only_the_stream_journal_stream_names_is_the_journal(tmp_path: Path) -> None:
    """A stream is the journal only when its device and inode are $JOURNAL_STREAM's: not
    another file, not a malformed or empty value, not a stream without a descriptor."""
    with open(tmp_path / "a", "w") as a, open(tmp_path / "b", "w") as b:
        st = os.fstat(a.fileno())
        value = f"{st.st_dev}:{st.st_ino}"
        assert is_journal(a, value)
        assert not is_journal(b, value)
        for other in ("", None, "12", f"{st.st_dev}:x"):
            assert not is_journal(a, other)
        assert not is_journal(io.StringIO(), value)


# -- the unit ------------------------------------------------------------------------------------


def test_shipped_unit_is_the_generated_one() -> None:
    """systemd/agentd@.service is exactly what the code generates (one source of truth)."""
    assert (REPO / "systemd/agentd@.service").read_text() == unit_text()


def test_unit_has_the_promised_settings() -> None:
    """Type=notify, watchdog, reload by SIGHUP, restart with start limits, runtime dir, JSON logs."""
    text = unit_text()
    for line in (
        "Type=notify", "WatchdogSec=30", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
        "StartLimitBurst=5", "RuntimeDirectory=agentd", "Environment=AGENTD_LOG_FORMAT=json",
        "ExecStart=/usr/bin/env agentd watch --root %f", "RestartPreventExitStatus=2 4",
        "SyslogIdentifier=agentd", "TimeoutStartSec=30",
    ):  # fmt: skip
        assert line in text.splitlines(), line


def _verify(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # Verify an instance (a template alone is not a loadable unit).
    target = tmp_path / "agentd@tmp-ws.service"
    shutil.copy(unit, target)
    return subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the shipped unit without a warning."""
    result = _verify(REPO / "systemd/agentd@.service", tmp_path)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_service_install_writes_the_unit(tiny: Path, tmp_path: Path) -> None:
    """`agentd service install --no-start` writes a unit that runs this interpreter, names the
    README of its agentd as documentation, and says how to start the workspace's instance."""
    result = run_cli("service", "install", "--no-start", cwd=tiny, env={"XDG_CONFIG_HOME": str(tmp_path / "cfg")})
    assert result.returncode == 0, result.stderr
    unit = tmp_path / "cfg/systemd/user/agentd@.service"
    assert f"ExecStart={sys.executable} -m agentd watch --root %f" in unit.read_text()
    docs = next(line for line in unit.read_text().splitlines() if line.startswith("Documentation="))
    readme = Path(unquote(urlparse(docs.removeprefix("Documentation=").replace("%%", "%")).path))
    assert readme.read_text().startswith("# agentd\n")
    instance = shlex.quote(f"agentd@{escape_path(tiny)}.service")  # \x2d in it: pasted into bash as is
    assert f"systemctl --user enable --now {instance}" in result.stdout
    if shutil.which("systemd-analyze"):
        verified = _verify(unit, tmp_path)
        assert verified.returncode == 0 and verified.stderr.strip() == "", verified.stderr


def test_service_print(tiny: Path) -> None:
    """--print shows the unit without installing anything."""
    result = run_cli("service", "install", "--print", cwd=tiny)
    assert result.returncode == 0 and "Type=notify" in result.stdout


@pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="systemd-escape is not installed")
@pytest.mark.parametrize("path", ["/home/me/agents", "/srv/my agents/x.y", "/tmp/.hidden/ü-ber", "/"])
def test_escape_matches_systemd_escape(path: str) -> None:
    """Instance names are escaped exactly like `systemd-escape --path`."""
    expected = subprocess.run(["systemd-escape", "--path", path], capture_output=True, text=True).stdout.strip()
    assert escape_path(Path(path)) == expected
