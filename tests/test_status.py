"""`agentd status` and the performance monitor behind it."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

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
    """A healthy daemon's status is a readable table and exits 0, asked from a subfolder:
    sections the store gave back count as reused, the last build's age is shown, sizes are in
    SI units; --json prints the stats reply with the documented keys, its peak RSS never below
    the current one."""
    assert run_cli("build", cwd=tiny).returncode == 0  # the daemon's first build comes from the store
    async with run_daemon(tiny):
        result = await asyncio.to_thread(run_cli, "status", cwd=tiny / "agents" / "traits")
        assert result.returncode == 0, result.stderr
        out = result.stdout
        assert "state       idle" in out
        assert re.search(
            r"^builds      1  last 1-[0-9a-f]{8} \d+s ago: [\d.]+ ms, 0 rendered / 7 reused \(7 from the store\)",
            out,
            re.M,
        ), out
        for row in ("L1 ", "L2 ", "L3 ", "L4 "):
            assert row in out, row
        assert "alerts      none" in out and "errors      none" in out
        assert re.search(r"^memory      rss [\d.]+ MB \(peak [\d.]+ MB\)", out, re.M), out
        assert "KB" not in out and "KiB" not in out
        data = orjson.loads((await asyncio.to_thread(run_cli, "status", "--json", cwd=tiny)).stdout)
        assert {
            "state", "pid", "version", "uptime_s", "builds", "last_build", "last_build_age_s", "caches",
            "templates", "alerts", "errors", "rss_bytes", "peak_rss_bytes", "watcher",
        } <= set(data)  # fmt: skip
        last = data["last_build"]
        for key in ("build_id", "start", "duration_ms", "changed", "agents_rendered", "sections_rendered",
                    "sections_reused", "sections_restored", "sections_cut_off", "outputs_written",
                    "outputs_unchanged"):  # fmt: skip
            assert key in last, key
        assert last["sections_restored"] == 7 and data["last_build_age_s"] >= 0
        assert 0 < data["rss_bytes"] <= data["peak_rss_bytes"]


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


async def test_slow_template_alert_not_on_a_cold_build(tiny: Path) -> None:
    """The slow-template threshold skips the cold first build; a render over it in a later
    build raises an alert, logged as a warning and listed with its value."""
    async with run_daemon(tiny, env={"AGENTD_SLOW_TEMPLATE_MS": "0"}) as d:
        assert not d.named("alert.raised")  # logged before watch.ready, had there been any
        alpha = tiny / "agents/alpha.yaml"
        alpha.write_text(alpha.read_text().replace("skills: [a1, a2]", "skills: [a1]"))
        alert = await d.wait_for(lambda e: e.get("event") == "alert.raised" and e["kind"] == "slow_template")
        assert alert["level"] == "warning" and alert["threshold_ms"] == 0
        data = orjson.loads((await asyncio.to_thread(run_cli, "status", "--json", cwd=tiny)).stdout)
        assert {a["template"] for a in data["alerts"] if a["kind"] == "slow_template"} == {"sections/summary.j2"}


async def test_low_hit_rate_alert_judges_a_full_window_of_avoidable_misses(tiny: Path) -> None:
    """A hit-rate alert counts only lookups that could have hit (here: fragments the memory
    budget dropped, not those whose inputs changed), waits for a full window, shows its
    current rate, and clears when the rate recovers."""
    # Two 600 kB trait bodies (L2 fragments) and a 1 MB budget: each pushes the other out.
    careful = tiny / "agents/traits/safety/careful.yaml"
    careful.write_text(careful.read_text().replace("Look before you leap.", "x" * 600_000))
    bold = tiny / "agents/traits/safety/bold.yaml"
    bold.write_text("name: Bold\nrule: " + "y" * 600_000 + "\n")
    beta = tiny / "agents/beta.yaml"
    beta.write_text(beta.read_text().replace("safety: [careful]", "safety: [bold]"))
    env = {
        "AGENTD_MEMORY_BUDGET_MB": "1", "AGENTD_HIT_RATE_LAYERS": "L2",
        "AGENTD_HIT_RATE_WINDOW": "2", "AGENTD_HIT_RATE_FLOOR": "0.6",
    }  # fmt: skip
    shared = tiny / "templates/sections/shared.j2"
    async with run_daemon(tiny, "--jobs", "1", env=env) as d:

        async def edit_shared(n: int) -> dict[str, Any]:
            shared.write_text(shared.read_text() + f"{{# edit {n} #}}\n")  # both fragments looked up again
            return await d.next_build()

        def l2_alerts() -> list[dict[str, Any]]:
            return [e for e in d.events if e.get("key") == "low_hit_rate:L2"]

        build = await edit_shared(1)
        assert build["caches"]["L2"] == {"hits": 0, "misses": 2, "expected": 0}
        assert not l2_alerts()  # one build of a window of two
        await edit_shared(2)
        raised = await d.wait_for(lambda e: e.get("event") == "alert.raised" and e["layer"] == "L2")
        assert (raised["hit_rate"], raised["builds"]) == (0.0, 2)
        # bold shrinks: its fragment's inputs changed, so that miss is expected and not counted
        bold.write_text("name: Bold\nrule: short\n")
        build = await d.next_build()
        assert build["caches"]["L2"] == {"hits": 0, "misses": 1, "expected": 1}
        await edit_shared(3)  # both fit now: careful misses (dropped earlier), bold hits
        data = orjson.loads((await asyncio.to_thread(run_cli, "status", "--json", cwd=tiny)).stdout)
        (alert,) = [a for a in data["alerts"] if a["key"] == "low_hit_rate:L2"]
        assert alert["hit_rate"] == 0.5 and alert["since"] == raised["since"]
        await edit_shared(4)
        cleared = await d.wait_for(lambda e: e.get("event") == "alert.cleared")
        assert cleared["key"] == "low_hit_rate:L2" and cleared["hit_rate"] == 0.75
        assert [e["event"] for e in l2_alerts()] == ["alert.raised", "alert.cleared"]
