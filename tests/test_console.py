"""`agentd watch` in a terminal: short lines, each error once as a block, colour as asked.

The daemon runs with its stdin, stdout and stderr on a real pseudo-terminal, as in a shell, and
the test reads what a person would see from the master side."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_cli

ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

#: The block a typo in a section template all eight agents render prints (the tiny workspace,
#: grown to eight by ``eight_agents``).
TYPO_BLOCK = """\
templates/sections/summary.j2:3:10: undefined variable: agent has no key 'descripton'
   3 | {{ agent.descripton }}
     |          ^^^^^^^^^^
  (in 8 agents: alpha, beta, beta-1, beta-2, beta-3, …)
"""


def eight_agents(root: Path) -> None:
    """Six more agents like beta, so a shared mistake is hit by eight."""
    beta = (root / "agents/beta.yaml").read_text()
    for i in range(1, 7):
        (root / f"agents/beta-{i}.yaml").write_text(beta)


class Terminal:
    """``agentd watch`` on a pseudo-terminal 120 columns wide; ``text`` is what it showed."""

    def __init__(self, root: Path, *args: str, env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentd", "watch", "--root", str(root), *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.raw = b""

    @property
    def text(self) -> str:
        return self.raw.decode(errors="replace").replace("\r\n", "\n")

    @property
    def plain(self) -> str:
        return ESCAPE.sub("", self.text)

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """The first match of ``pattern`` in what was shown without colour (reading more until
        it appears); fails after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.plain, re.MULTILINE)
            if found:
                return found
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"{pattern!r} never shown; the terminal shows:\n{self.plain[-3000:]}")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], min(timeout, 0.5))
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: every writer of the slave side is gone
            return False
        self.raw += chunk
        return bool(chunk)

    def stop(self) -> int:
        """SIGINT, as Ctrl-C sends it (to the daemon only: a worker forked a moment before
        would relay it as a second one); the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(AssertionError):
            self.wait_for(r"^\d\d:\d\d:\d\d stopped after", timeout=15)
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            os.close(self.master)


@contextlib.contextmanager
def terminal(root: Path, *args: str, **env: str) -> Iterator[Terminal]:
    """A watching daemon on a terminal, ready; stopped with Ctrl-C afterwards."""
    base = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    term = Terminal(root, *args, env={**base, **env})
    try:
        term.wait_for(r"watching .* — Ctrl-C to stop")
        yield term
    finally:
        term.stop()


def replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_a_rebuild_is_one_short_line_and_a_shared_error_one_block(tiny: Path) -> None:
    """On a terminal each rebuild is one line of at most 100 columns; a typo all 8 agents hit is
    one block (caret under the name, the agents listed), named in one line while it stays, then
    "fixed:"; `agentd build` prints the same block once."""
    eight_agents(tiny)
    summary = tiny / "templates/sections/summary.j2"
    with terminal(tiny, "--color", "always") as term:
        replace(summary, "{{ agent.description }}", "{{ agent.descripton }}")
        term.wait_for(r"^\d\d:\d\d:\d\d templates/sections/summary\.j2: .*1 error")
        replace(tiny / "agents/alpha.yaml", "skills: [a1, a2]", "skills: [a1, a2, a3]")
        term.wait_for(r"^\d\d:\d\d:\d\d agents/alpha\.yaml: .*1 error")
        replace(summary, "{{ agent.descripton }}", "{{ agent.description }}")
        term.wait_for(r"^\d\d:\d\d:\d\d templates/sections/summary\.j2: 1 section rendered, \d+ reused, 1 written \(")
    assert term.proc.returncode == 0
    shown = term.plain
    assert TYPO_BLOCK in shown and shown.count("agent has no key") == 2, shown  # the block, then "still:"
    assert "\nstill: templates/sections/summary.j2:3:10: undefined variable" in shown
    assert re.search(r"^\d\d:\d\d:\d\d fixed: templates/sections/summary\.j2:3$", shown, re.MULTILINE)
    assert re.search(r"^\d\d:\d\d:\d\d watching \S*/tiny \(8 agents\) — Ctrl-C to stop$", shown, re.MULTILINE)
    assert "build_id" not in shown and "{'" not in shown  # no key=value dumps
    assert max(len(line) for line in shown.splitlines()) <= 100, shown
    assert "\x1b[" in term.text  # --color always

    replace(summary, "{{ agent.description }}", "{{ agent.descripton }}")
    build = run_cli("build", cwd=tiny)
    assert build.returncode == 1 and build.stderr == TYPO_BLOCK


@pytest.mark.parametrize(
    ("args", "env"), [((), {"NO_COLOR": "1"}), (("--color", "never"), {})], ids=["NO_COLOR", "never"]
)
def test_no_color_and_color_never_write_no_escape_codes(tiny: Path, args: tuple[str, ...], env: dict[str, str]) -> None:
    """NO_COLOR (https://no-color.org) and --color never keep colour off on a terminal."""
    with terminal(tiny, *args, **env) as term:
        pass
    assert term.proc.returncode == 0 and "\x1b" not in term.text, term.text
