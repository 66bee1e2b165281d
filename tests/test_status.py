"""`agentd status` and the performance monitor behind it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import orjson

from agentd.config import Config
from agentd.control import socket_path
from conftest import run_cli, run_daemon


def test_no_daemon_exits_3_saying_where_it_looked(tiny: Path) -> None:
    """Without a daemon, status (run from agents/) exits 3, names the workspace's socket and
    suggests a command that starts a daemon for that workspace."""
    result = run_cli("status", cwd=tiny / "agents")
    assert result.returncode == 3
    assert str(socket_path(Config.load(tiny))) in result.stderr
    assert f"agentd --root {tiny} watch" in result.stderr


async def test_healthy_daemon_table(tiny: Path) -> None:
    """A healthy daemon's status is a readable table and exits 0, asked from a subfolder."""
    async with run_daemon(tiny):
        result = await asyncio.to_thread(run_cli, "status", cwd=tiny / "agents" / "traits")
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert "state       idle" in out
        for row in ("L1 ", "L2 ", "L3 ", "L4 ", "slowest templates", "sections/summary.j2"):
            assert row in out, row
        assert "alerts      none" in out and "errors      none" in out
        assert "memory      rss" in out


async def test_errors_exit_1_and_are_listed_with_location(tiny: Path) -> None:
    """When the daemon reports errors, status lists each once with file:line and the agents
    that hit it, and exits 1."""
    async with run_daemon(tiny) as d:
        (tiny / "templates/sections/peers.j2").write_text("{{ oops }\n")
        await d.next_build()
        result = await asyncio.to_thread(run_cli, "status", cwd=tiny)
        assert result.returncode == 1
        errors = result.stdout.split("\nerrors ", 1)[1].split("\nmemory ", 1)[0].splitlines()
        assert errors[0].split() == ["1"] and len(errors) == 3, result.stdout  # the error once, its path once
        assert errors[1].startswith("  templates/sections/peers.j2:1: template syntax error: ")
        assert errors[1].count("peers.j2") == 1 and errors[2] == "    (in 2 agents: alpha, beta)"
        data = orjson.loads((await asyncio.to_thread(run_cli, "status", "--json", cwd=tiny)).stdout)
        assert data["state"] == "error"
        assert {e["location"] for e in data["errors"]} == {"templates/sections/peers.j2:1"}


async def test_json_is_the_stats_reply(tiny: Path) -> None:
    """--json prints the stats reply with the documented top-level keys."""
    async with run_daemon(tiny):
        data = orjson.loads((await asyncio.to_thread(run_cli, "status", "--json", cwd=tiny)).stdout)
        assert {
            "state", "pid", "version", "uptime_s", "builds", "last_build", "caches", "templates",
            "alerts", "errors", "rss_bytes", "peak_rss_bytes", "watcher",
        } <= set(data)  # fmt: skip
        last = data["last_build"]
        for key in ("build_id", "start", "duration_ms", "changed", "agents_rendered", "sections_rendered",
                    "sections_reused", "sections_cut_off", "outputs_written", "outputs_unchanged"):  # fmt: skip
            assert key in last, key


async def test_watch_refreshes(tiny: Path) -> None:
    """--watch draws once, then again after every build (the daemon's events: with --interval 0
    nothing else redraws), until interrupted."""
    async with run_daemon(tiny):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentd", "status", "--watch", "--interval", "0", cwd=tiny,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        out = b""

        async def drawn(builds: int) -> None:
            nonlocal out
            while f"builds      {builds} ".encode() not in out.rsplit(b"\x1b[H\x1b[2J", 1)[-1]:
                chunk = await proc.stdout.read(65536)
                assert chunk, "status --watch exited early"
                out += chunk

        alpha = tiny / "agents/alpha.yaml"
        original = alpha.read_text()
        await asyncio.wait_for(drawn(1), 30)
        for builds, skills in ((2, "[a1, a2, a3]"), (3, "[a1, a2, a4]")):
            alpha.write_text(original.replace("[a1, a2]", skills))
            await asyncio.wait_for(drawn(builds), 30)  # counted, not timed: a loaded machine is slower
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0
        assert out.count(b"\x1b[H\x1b[2J") == 3


async def test_stop_ends_the_daemon_and_a_watching_status(tiny: Path) -> None:
    """`agentd stop` stops the daemon as SIGTERM would (it exits 0, its socket goes) and says
    which; a `status --watch` of it exits 3 saying it stopped; with no daemon, stop exits 3
    naming the socket it tried, and `status --socket-path` still prints that path."""
    path = socket_path(Config.load(tiny))
    async with run_daemon(tiny) as d:
        watching = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agentd", "status", "--watch", cwd=tiny,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert watching.stdout is not None
        assert b"state" in await asyncio.wait_for(watching.stdout.readuntil(b"state"), 30)
        result = await asyncio.to_thread(run_cli, "stop", cwd=tiny)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"stopped agentd (pid {d.proc.pid})\n"
        assert await asyncio.wait_for(d.proc.wait(), 10) == 0
        assert d.named("watch.stop_requested") and not path.exists()
        _, err = await asyncio.wait_for(watching.communicate(), 30)
        assert watching.returncode == 3
        assert f"agentd: the daemon (pid {d.proc.pid}) at {path} stopped" in err.decode()
    again = run_cli("stop", cwd=tiny)
    assert again.returncode == 3 and f"no daemon answers at {path}" in again.stderr
    shown = run_cli("status", "--socket-path", cwd=tiny)
    assert (shown.returncode, shown.stdout) == (0, f"{path}\n")


async def test_slow_template_alert(tiny: Path) -> None:
    """A render over the threshold raises an alert: logged as a warning and listed."""
    async with run_daemon(tiny, env={"AGENTD_SLOW_TEMPLATE_MS": "0"}) as d:
        alert = await d.wait_for(lambda e: e.get("event") == "alert.raised" and e["kind"] == "slow_template")
        assert alert["level"] == "warning" and alert["threshold_ms"] == 0
        data = orjson.loads((await asyncio.to_thread(run_cli, "status", "--json", cwd=tiny)).stdout)
        assert {a["template"] for a in data["alerts"] if a["kind"] == "slow_template"} >= {"sections/summary.j2"}


async def test_low_hit_rate_alert_and_recovery(tiny: Path) -> None:
    """A layer whose recent hit rate falls below the floor raises an alert; it clears when the
    rate recovers. The cold first build does not count."""
    env = {"AGENTD_HIT_RATE_FLOOR": "0.9", "AGENTD_HIT_RATE_WINDOW": "1"}
    async with run_daemon(tiny, env=env) as d:
        assert not d.named("alert.raised")
        summary = tiny / "templates/sections/summary.j2"
        summary.write_text(summary.read_text().replace("{{ agent.description }}", "> {{ agent.description }}"))
        alert = await d.wait_for(
            lambda e: e.get("event") == "alert.raised" and e["kind"] == "low_hit_rate" and e["layer"] == "L3"
        )
        assert alert["hit_rate"] < 0.9
        alpha = tiny / "agents/alpha.yaml"
        alpha.write_text(alpha.read_text().replace("not read by any template", "unread"))
        await d.wait_for(lambda e: e.get("event") == "alert.cleared" and e["key"] == "low_hit_rate:L3")
