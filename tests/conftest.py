"""Shared fixtures: a tiny hand-written workspace (exact assertions) and a copy of the shipped
corpus (realistic sizes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

REPO = Path(__file__).resolve().parent.parent

TINY: dict[str, str] = {
    # the tiny workspace's own contract (the tool has none: no line range, front matter, schema)
    "agentd.toml": """\
        [check]
        min_lines = 1
        front_matter = ["name"]
        agent_schema = "schemas/agent.json"
        trait_schema = "schemas/trait.json"
        """,
    "schemas/agent.json": """\
        {
          "type": "object",
          "additionalProperties": false,
          "required": ["name", "description", "skills"],
          "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "description": {"type": "string"},
            "skills": {"type": "array", "items": {"type": "string"}},
            "notes": {"type": "string"},
            "motto": {"type": "string"},
            "level": {"enum": ["beginner", "intermediate", "expert"]},
            "sections": {"type": "array", "items": {"type": "string"}},
            "traits": {"type": "object"}
          }
        }
        """,
    "schemas/trait.json": """\
        {
          "type": "object",
          "required": ["name", "rule"],
          "properties": {"name": {"type": "string"}, "rule": {"type": "string"}}
        }
        """,
    "templates/base/agent-base.j2": """\
        {% include "base/header.j2" %}
        # {{ agent.name }}
        {% for s in sections %}
        {{ s.content }}
        {% endfor %}
        {% include "base/footer.j2" %}
        """,
    "templates/base/header.j2": """\
        ---
        name: {{ agent.id|yaml_str }}
        ---
        """,
    "templates/base/footer.j2": "-- end of {{ agent.id }} --\n",
    "templates/fragments/list-item.j2": """\
        {% macro bullets(items) -%}
        {% for i in items %}
        - {{ i }}
        {% endfor %}
        {%- endmacro %}
        """,
    "templates/sections/summary.j2": """\
        {% import "fragments/list-item.j2" as l %}
        ## {{ section.number }}. {{ section.title }}
        {{ agent.description }}
        {{ l.bullets(agent.skills) }}
        """,
    "templates/sections/peers.j2": """\
        ## {{ section.number }}. {{ section.title }}
        {% for peer in catalog if peer.id != agent.id %}
        - {{ peer.name }}
        {% endfor %}
        """,
    "templates/sections/traits.j2": """\
        ## {{ section.number }}. {{ section.title }}
        {% for kind, items in traits.items() %}
        {% for trait in items %}
        {% include "traits/" ~ kind ~ "-traits.j2" %}
        {% if trait.get("level", "unrated") == "reckless" %}(reckless){% endif %}
        {% endfor %}
        {% endfor %}
        """,
    "templates/sections/shared.j2": """\
        ## {{ section.number }}. {{ section.title }}
        {% for trait in traits.safety %}
        {{ include_cached("traits/safety-traits.j2", trait=trait) }}
        {% endfor %}
        """,
    "templates/traits/safety-traits.j2": "### {{ trait.name }}\n{{ trait.rule }}\n",
    "agents/alpha.yaml": """\
        name: Alpha
        description: First agent.
        skills: [a1, a2]
        notes: not read by any template
        sections: [summary, peers, traits, shared]
        traits:
          safety: [careful]
        """,
    "agents/beta.yaml": """\
        name: Beta
        description: Second agent.
        skills: [b1]
        sections: [summary, peers, shared]
        traits:
          safety: [careful]
        """,
    "agents/traits/safety/careful.yaml": """\
        name: Careful
        rule: Look before you leap.
        level: high
        note: read by no template
        """,
}


#: One edit of each kind in the tiny workspace, and the sections it must re-render (exactly).
EDIT_KINDS = [
    pytest.param("agents/alpha.yaml", "skills: [a1, a2]", "skills: [a1, a2, a3]", ["alpha/summary"], id="agent-key"),
    pytest.param("agents/alpha.yaml", "not read by any template", "still not read", [], id="unread-key"),
    # a catalog key: every section that lists peers re-renders
    pytest.param(
        "agents/alpha.yaml", "name: Alpha", "name: Alpha Prime", ["alpha/peers", "beta/peers"], id="catalog-entry"
    ),
    pytest.param(
        "templates/sections/summary.j2",
        "{{ agent.description }}",
        "> {{ agent.description }}",
        ["alpha/summary", "beta/summary"],
        id="section-template",
    ),
    # a macro library: only the renders that import it
    pytest.param(
        "templates/fragments/list-item.j2",
        "- {{ i }}",
        "* {{ i }}",
        ["alpha/summary", "beta/summary"],
        id="fragment-macro",
    ),
    # a trait: the renders that used it, through a dynamic include and the L2 cache
    pytest.param(
        "agents/traits/safety/careful.yaml",
        "Look before",
        "Always look before",
        ["alpha/shared", "alpha/traits", "beta/shared"],
        id="trait",
    ),
    # one key of a trait: only the renders that read that key (traits are tracked per key)
    pytest.param(
        "agents/traits/safety/careful.yaml", "level: high", "level: highest", ["alpha/traits"], id="trait-key"
    ),
    pytest.param("agents/traits/safety/careful.yaml", "read by no", "still read by no", [], id="trait-unread-key"),
    # a trait template reached only by a dynamic include
    pytest.param(
        "templates/traits/safety-traits.j2",
        "### ",
        "#### ",
        ["alpha/shared", "alpha/traits", "beta/shared"],
        id="dynamic-include",
    ),
    # base templates: recompose from cached sections, render no section
    pytest.param("templates/base/footer.j2", "-- end of", "-- the end of", [], id="base-template"),
]


def slow_down(template: Path, iterations: int = 1_000_000) -> None:
    """Make a template expensive (~0.5 s per million iterations here): Jinja work that cannot be
    skipped, for tests that need a build to be running."""
    loop = (
        "{% set ns = namespace(x=0) %}{% for i in range("
        + str(iterations)
        + ") %}{% set ns.x = ns.x + i %}{% endfor %}"
    )
    template.write_text(loop + template.read_text())


def set_config(root: Path, line: str) -> None:
    """Add a top-level setting to agentd.toml (before its [check] table, as TOML requires)."""
    path = root / "agentd.toml"
    path.write_text(line + "\n" + (path.read_text() if path.exists() else ""))


def write_files(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A small workspace whose every output line is known."""
    root = tmp_path / "tiny"
    write_files(root, TINY)
    return root


@pytest.fixture(scope="session")
def corpus_copy(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """Factory: a fresh copy of the shipped workspace (templates/, agents/, its agentd.toml and
    the schemas it names)."""

    def make() -> Path:
        root = tmp_path_factory.mktemp("corpus")
        for sub in ("templates", "agents", "schemas"):
            shutil.copytree(REPO / sub, root / sub)
        shutil.copy(REPO / "agentd.toml", root / "agentd.toml")
        return root

    return make


def unprivileged() -> list[str]:
    """A command prefix under which file modes apply: root reads a chmod 000 file anyway, so
    as root agentd runs without the capabilities that let it (``setpriv`` of util-linux)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file modes do not apply")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run the real ``agentd`` command line in a subprocess (``prefix``: a command to run it under)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*prefix, sys.executable, "-m", "agentd", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


class Daemon:
    """A running ``agentd watch`` process and the JSON log events it has printed."""

    def __init__(
        self, proc: asyncio.subprocess.Process, root: Path, stderr: asyncio.StreamReader | None = None
    ) -> None:
        self.proc = proc
        self.root = root
        self.stderr = stderr or proc.stderr
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.stderr is not None
        async for line in self.stderr:
            text = line.decode(errors="replace").rstrip("\n")
            self.raw.append(text)
            try:  # after the journal's priority prefix, if any (``journal=True``)
                self.events.append(orjson.loads(re.sub(r"^<\d>", "", text)))
            except orjson.JSONDecodeError:
                continue
            self._changed.set()

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    @property
    def builds(self) -> list[dict[str, Any]]:
        return self.named("build.finished")

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15, start: int = 0
    ) -> dict[str, Any]:
        """The first event from index ``start`` on that matches; fails after ``timeout`` s."""

        async def scan() -> dict[str, Any]:
            seen = start
            while True:
                for event in self.events[seen:]:
                    if predicate(event):
                        return event
                seen = len(self.events)
                if self.proc.returncode is not None and self._reader.done():
                    raise AssertionError(f"daemon exited ({self.proc.returncode}):\n" + "\n".join(self.raw[-20:]))
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), 0.5)

        try:
            return await asyncio.wait_for(scan(), timeout)
        except TimeoutError:
            raise AssertionError(
                "timed out waiting for an event; last log lines:\n" + "\n".join(self.raw[-20:])
            ) from None

    async def next_build(self, timeout: float = 15) -> dict[str, Any]:
        """Wait for the next ``build.finished`` after the events seen so far."""
        return await self.wait_for(lambda e: e.get("event") == "build.finished", timeout, start=len(self.events))

    async def quiet(self, seconds: float = 0.5, timeout: float = 15) -> None:
        """Wait until the daemon has logged nothing for ``seconds`` (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            count = len(self.events)
            await asyncio.sleep(seconds)
            if len(self.events) == count:
                return
        raise AssertionError("daemon never went quiet")


@contextlib.asynccontextmanager
async def run_daemon(
    root: Path,
    *args: str,
    env: dict[str, str] | None = None,
    nofile: int | None = None,
    prefix: Sequence[str] = (),
    journal: bool = False,
) -> AsyncIterator[Daemon]:
    """Start ``agentd watch`` on ``root``, wait until it is ready, stop it (SIGTERM) on exit.
    ``nofile``: the daemon's file-descriptor limit (RLIMIT_NOFILE); ``prefix``: a command to
    run it under (``setpriv`` ...); ``journal``: its stderr is a pipe named by
    ``$JOURNAL_STREAM``, as journald's stream is under systemd."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    stderr: int = asyncio.subprocess.PIPE
    reader: asyncio.StreamReader | None = None
    if journal:
        read_end, stderr = os.pipe()
        st = os.fstat(stderr)  # both ends are the one pipe inode
        env = {**(env or {}), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        reader = asyncio.StreamReader(limit=2**20)
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb"))
    proc = await asyncio.create_subprocess_exec(
        *prefix,
        sys.executable,
        "-m",
        "agentd",
        "watch",
        "--root",
        str(root),
        "--log-format",
        "json",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=stderr,
        env={**os.environ, **(env or {})},
        preexec_fn=None if nofile is None else limit,
    )
    if journal:
        os.close(stderr)  # the daemon holds the write end; EOF comes when it exits
    daemon = Daemon(proc, root, reader)
    try:
        await daemon.wait_for(lambda e: e.get("event") == "watch.ready", timeout=30)
        yield daemon
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(daemon._reader, 5)


def clean_build(root: Path, dest: Path) -> dict[str, bytes]:
    """The outputs a from-scratch ``agentd build`` of ``root``'s sources produces."""
    from agentd.build import Engine
    from agentd.config import Config

    shutil.rmtree(dest, ignore_errors=True)
    for sub in ("templates", "agents"):
        shutil.copytree(root / sub, dest / sub)
    sections = Config.load(root).sections  # the one setting that shapes outputs
    if sections:
        (dest / "agentd.toml").write_text(f"sections = {list(sections)!r}\n")
    Engine(Config.load(dest), jobs=1).build()  # the plainest path is the oracle
    return read_outputs(dest)


def read_outputs(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "out").glob("*.md"))}


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` forked (from any of its threads) and has not reaped."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return sorted(int(c) for t in tasks for c in (t / "children").read_text().split())


def running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def outlived(pids: list[int], timeout: float = 10) -> list[int]:
    """Those of ``pids`` still running after waiting up to ``timeout`` s for all to end; they
    are killed (a test that fails must not leave them burning a core)."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return alive
