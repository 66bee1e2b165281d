"""The progress line of long work: on a terminal's stderr only, erased when done, never
sharing a line with the daemon's log."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentd.bench import make_workspace
from conftest import REPO, run_cli, slow_down

#: Agents of the synthetic workspace: 1,008 sections (9 each), enough for worker processes.
AGENTS = 112


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("progress") / "ws"
    make_workspace(REPO, root, AGENTS)
    return root


@pytest.fixture
def slow(tiny: Path) -> Path:
    """The tiny workspace, its builds slowed to ~0.5 s: long enough for a line to be drawn."""
    slow_down(tiny / "templates/sections/summary.j2", 500_000)
    return tiny


def on_pty(*args: str, until: str | None = None, timeout: float = 90) -> str:
    """Run ``agentd ARGS`` with stdout and stderr on a new pty; everything the terminal got.
    ``until``: send SIGTERM once it shows."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentd", *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "TERM": "xterm"},
    )
    os.close(slave)
    received = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the pty
                    break
                if not chunk:
                    break
                received += chunk
            if until is not None and until.encode() in received and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return received.decode(errors="replace")


def screen(text: str) -> list[str]:
    """The lines a terminal shows: what a line holds after its last carriage return (every
    one agentd writes starts an erase-line)."""
    return [line.split("\r")[-1].removeprefix("\x1b[2K") for line in text.replace("\r\n", "\n").split("\n")]


def test_cold_build_on_a_tty_shows_progress_then_erases_it(synthetic: Path) -> None:
    """A cold build counts sections on the terminal (thousands separated, workers' results
    included, never backwards) and erases the line before its summary, which nothing follows."""
    text = on_pty("build", "--root", str(synthetic), "--no-cache", "--jobs", "2")
    assert re.search(r"\r\x1b\[2K\[[\d,]+/1,008 sections\] \d+ s", text), text
    counts = [int(n.replace(",", "")) for n in re.findall(r"\[([\d,]+)/1,008 sections\]", text)]
    assert counts == sorted(counts) and counts[-1] > 0  # worker results counted (each draw is 0.1 s apart)
    assert "(2 worker processes)" in text
    summary = text.index(f"agentd: {AGENTS} agents")
    assert text.rindex("sections]") < text.rindex("\x1b[2K", 0, summary) < summary
    assert not [line for line in screen(text) if "sections]" in line]


def test_no_progress_in_a_pipe_or_with_quiet(slow: Path) -> None:
    """Off a terminal nothing but the summary, no carriage return or escape; with -q on a
    terminal nothing at all."""
    piped = run_cli("build", "--root", str(slow), "--no-cache")
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == ""
    assert "\r" not in piped.stdout and "\x1b" not in piped.stdout
    assert on_pty("build", "--root", str(slow), "--no-cache", "-q") == ""


def test_watch_erases_progress_before_every_log_line(slow: Path) -> None:
    """The daemon's first build shows progress on a terminal, and a log line written while it
    is drawn (SIGTERM's, mid-build, shown with -v) erases it first: every log line is on a line
    of its own."""
    text = on_pty(
        "watch", "--root", str(slow), "--no-cache", "--log-format", "console", "--color", "never", "-v",
        until="sections]",
    )  # fmt: skip
    shown = screen(text)
    assert not [line for line in shown if "sections]" in line], shown
    for line in ("starting agentd", "watch.signal", "built 2 agents", "stopping", "stopped after"):
        assert [seen for seen in shown if re.match(rf"\d\d:\d\d:\d\d {line}", seen)], (line, shown)
