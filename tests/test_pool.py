"""Warm worker processes: parallel batches equal a clean build, and workers follow every change."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from agentd.bench import make_workspace
from agentd.config import Config
from agentd.output import MANIFEST
from agentd.render import BASE_TEMPLATE
from agentd.store import Store, render_stamp
from agentd.trace import fingerprint
from conftest import REPO, clean_build, outlived, read_outputs, run_cli, run_daemon


@pytest.fixture
def many(tmp_path: Path) -> Path:
    """24 agents derived from the corpus: one section template edit is a batch of 24 renders."""
    root = tmp_path / "ws"
    make_workspace(REPO, root, 24)
    return root


def workers_of(pid: int) -> list[int]:
    """The daemon's worker processes (its children)."""
    tasks = Path(f"/proc/{pid}/task").iterdir()  # any of its threads may have forked them
    return sorted(int(c) for t in tasks for c in (t / "children").read_text().split())


async def started_workers(pid: int, count: int = 2, timeout: float = 10) -> list[int]:
    """The daemon's workers once ``count`` are running (they start right after ``watch.ready``)."""
    async with asyncio.timeout(timeout):
        while len(found := workers_of(pid)) < count:
            await asyncio.sleep(0.05)
    return found


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


async def test_workers_follow_every_change_between_parallel_batches(many: Path, tmp_path: Path) -> None:
    """Changes built in the daemon's own process (a one-agent edit, a new agent, a deleted one)
    reach the workers before their next batch: every parallel build equals a clean build."""
    trouble = many / "templates/sections/troubleshooting.j2"
    async with run_daemon(many, "--jobs", "2") as d:
        pids = await started_workers(d.proc.pid)
        # Read only by one agent's troubleshooting section: rendered here, not by the workers.
        edit(many / "agents/api-design-0001.yaml", "severity: critical", "severity: high")
        assert (await d.next_build())["workers"] == 0
        (many / "agents/api-design-0000.yaml").unlink()
        assert (await d.next_build())["outputs_removed"] == 1
        source = (many / "agents/ml-evaluation-0001.yaml").read_text()
        (many / "agents/ml-evaluation-0009.yaml").write_text(source.replace("ml-evaluation-0001", "ml-evaluation-0009"))
        await d.next_build()
        edit(trouble, "#### Symptoms", "#### Symptoms seen")
        build = await d.next_build()
        assert build["workers"] == 2 and build["sections_rendered"] == 24 and build["errors"] == 0
        assert read_outputs(many) == clean_build(many, tmp_path / "oracle")
        # A trait edit: workers drop their cached fragments of it.
        edit(many / "agents/traits/safety/change-approval.yaml", "name: Change Approval Gate", "name: Approval Gate")
        build = await d.next_build()
        assert build["workers"] == 2 and build["errors"] == 0
        assert read_outputs(many) == clean_build(many, tmp_path / "oracle")
        assert workers_of(d.proc.pid) == pids  # the same warm processes all along
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


async def test_a_killed_worker_costs_speed_not_output(many: Path, tmp_path: Path) -> None:
    """When a worker dies, the batch is finished in the daemon, outputs equal a clean build,
    and a new pool is started for the next batch."""
    trouble = many / "templates/sections/troubleshooting.j2"
    async with run_daemon(many, "--jobs", "2") as d:
        first = await started_workers(d.proc.pid)
        os.kill(first[0], signal.SIGKILL)
        await asyncio.sleep(0.2)
        edit(trouble, "#### Symptoms", "#### Symptoms seen")
        build = await d.next_build()
        assert build["errors"] == 0 and build["sections_rendered"] == 24
        assert read_outputs(many) == clean_build(many, tmp_path / "oracle")
        second = workers_of(d.proc.pid)
        assert len(second) == 2 and first[0] not in second
        edit(trouble, "#### Symptoms seen", "#### Symptoms noted")
        build = await d.next_build()
        assert build["workers"] == 2
        assert read_outputs(many) == clean_build(many, tmp_path / "oracle")


async def test_jobs_one_starts_no_workers(many: Path) -> None:
    """`--jobs 1` renders everything in the daemon's own process."""
    async with run_daemon(many, "--jobs", "1") as d:
        assert workers_of(d.proc.pid) == []
        edit(many / "templates/sections/troubleshooting.j2", "#### Symptoms", "#### Symptoms seen")
        assert (await d.next_build())["workers"] == 0


def test_cold_build_parses_and_renders_in_workers_byte_identically(many: Path, tmp_path: Path) -> None:
    """`agentd build --jobs 2` (sources parsed and sections rendered in workers, stored) writes
    what a sequential build writes, and a second run parses and renders nothing."""
    result = run_cli("build", "--jobs", "2", cwd=many)
    assert result.returncode == 0, result.stderr
    assert "216 sections rendered" in result.stdout and "(2 worker processes)" in result.stdout
    assert read_outputs(many) == clean_build(many, tmp_path / "oracle")
    # What the workers parsed is in the store: the next start parses no YAML.
    store = Store(many, render_stamp(Config.load(many)))
    assert all(store.has_parsed(fingerprint(p.read_bytes())) for p in (many / "agents").rglob("*.yaml"))
    again = run_cli("build", "--jobs", "2", "--root", str(many))
    assert "0 sections rendered" in again.stdout, again.stdout


def test_parse_ahead_gives_what_parsing_here_gives(many: Path) -> None:
    """Sources parsed ahead (two worker processes and the caller) are exactly what parsing them
    here gives, each with the JSON the store keeps when JSON holds it exactly (a date: no
    JSON); a source that does not parse is left out, for the workspace to report."""
    import datetime
    import multiprocessing

    import yaml

    from agentd.store import exact_json
    from agentd.workspace import ParseAhead

    (many / "agents" / "dated.yaml").write_text("id: dated\nname: Dated\nreleased: 2024-05-01\n")
    (many / "agents" / "broken.yaml").write_text("id: broken\nname: [unclosed\n")
    parsing = ParseAhead.start(Config.load(many), 3)
    assert parsing is not None
    found = parsing.result()
    assert not multiprocessing.active_children()
    paths = sorted((many / "agents").rglob("*.yaml"))
    assert len(found) == len(paths) - 1
    for path in paths:
        raw = path.read_bytes()
        if path.name == "broken.yaml":
            assert fingerprint(raw) not in found
            continue
        value, dumped = found[fingerprint(raw)]
        assert value == yaml.safe_load(raw), path
        assert dumped == exact_json(value), path
    value, dumped = found[fingerprint((many / "agents" / "dated.yaml").read_bytes())]
    assert value["released"] == datetime.date(2024, 5, 1) and dumped is None


def test_parse_ahead_not_taken_leaves_no_process(many: Path) -> None:
    """A build that fails before it takes the parse stops the parsing processes at once."""
    import multiprocessing

    from agentd.workspace import ParseAhead

    parsing = ParseAhead.start(Config.load(many), 3)
    assert parsing is not None and len(multiprocessing.active_children()) == 2
    parsing.close()
    assert not multiprocessing.active_children()


def test_parse_ahead_processes_die_with_a_killed_parent(tmp_path: Path) -> None:
    """A parser whose result waits in a full pipe for a parent killed by SIGKILL exits too
    (before, it stayed blocked in its write for ever)."""
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from agentd.workspace import ParseAhead\n"
        "big = b'notes: ' + b'x' * 100_000 + b'\\n'\n"  # 4 of them: more than a pipe holds
        "ParseAhead([(f'agents/a{i}.yaml', Path('a.yaml'), big) for i in range(4)], 1, Path.read_bytes)\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline() == "started\n"
        parsers = workers_of(parent.pid)
        assert len(parsers) == 1
    finally:
        parent.kill()
        parent.wait()
    assert outlived(parsers) == [], "the parser outlived its parent"


def test_fork_refused_falls_back_to_working_in_process(
    corpus_copy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """When the system refuses to fork (process limits: simulated, as root ignores
    RLIMIT_NPROC) the second YAML parser and the second worker, the ones started are stopped,
    parsing and rendering happen in-process, the build equals a clean build, and the engine
    says why (`workers.unavailable` at the CLI)."""
    import multiprocessing
    from multiprocessing.context import ForkProcess

    from agentd.build import Engine

    started: list[str] = []
    start = ForkProcess.start

    def refuse_the_second_of_each_kind(self: ForkProcess) -> None:
        kind = "worker" if self.name == "agentd-worker" else "parser"
        started.append(kind)
        if started.count(kind) == 2:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        start(self)

    monkeypatch.setattr(ForkProcess, "start", refuse_the_second_of_each_kind)
    root = corpus_copy()
    engine = Engine(Config.load(root), jobs=3)  # two parsers (the engine is the third)
    report = engine.build()
    assert report.ok and report.workers == 0
    assert sorted(started) == ["parser", "parser", "worker", "worker"]
    assert engine.pool_error and "rendering in-process" in engine.pool_error
    assert not multiprocessing.active_children()
    assert read_outputs(root) == clean_build(root, tmp_path / "oracle")


def test_workers_compose_and_write_what_they_render(many: Path, tmp_path: Path) -> None:
    """Workers compose and write the agents of a parallel batch (cold, then a template edit):
    outputs equal a clean build, the sections' bytes never reach the engine's process, and
    no temp file of a replaced output is left in out/ once the workers stop."""
    from agentd.build import Engine

    engine = Engine(Config.load(many), jobs=2)
    try:
        report = engine.build()
        assert report.workers == 2 and len(report.written) == 24 and len(engine.caches.l3) == 0
        assert read_outputs(many) == clean_build(many, tmp_path / "oracle1")
        trouble = many / "templates/sections/troubleshooting.j2"
        edit(trouble, "#### Symptoms", "#### Symptoms seen")
        report = engine.build([trouble])
        assert report.workers == 2 and len(report.written) == 24 and len(engine.caches.l3) == 0
        assert read_outputs(many) == clean_build(many, tmp_path / "oracle2")
    finally:
        engine.close()
    assert sorted(p.name for p in (many / "out").iterdir() if p.name.startswith(".")) == [MANIFEST]


def test_an_output_edited_by_hand_is_composed_by_the_engine(many: Path, tmp_path: Path) -> None:
    """A worker takes an agent's other sections from its output only while that file is as
    agentd wrote it: after a hand edit that shifts every section, the engine composes that
    agent itself (its sections come back to it) and every output equals a clean build."""
    from agentd.build import Engine

    engine = Engine(Config.load(many), jobs=2)
    try:
        engine.build()
        target = many / "out/api-design-0001.md"
        target.write_text(target.read_text().replace("---\n", "---\nhand_edited: true\n", 1))
        trouble = many / "templates/sections/troubleshooting.j2"
        edit(trouble, "#### Symptoms", "#### Symptoms seen")
        report = engine.build([trouble])
        assert report.workers == 2 and len(report.written) == 24
        assert {agent for agent, _ in engine.caches.l3.keys()} == {"api-design-0001"}
        assert read_outputs(many) == clean_build(many, tmp_path / "oracle")
    finally:
        engine.close()


def test_an_output_changed_while_a_worker_writes_it_is_composed_by_the_engine(
    many: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When someone writes to an output between a worker's check and its write (the worker
    copies the unchanged bytes from that file), the worker leaves the agent to the engine,
    which composes it from bytes: every output equals a clean build."""
    from agentd.build import Engine

    engine = Engine(Config.load(many), jobs=2)
    write_file = engine.output.write_file

    def meddling(name: str, data: Any, digest: bytes, entry: Any) -> Any:
        if not isinstance(data, bytes):  # about to copy from the file: another writer is first
            with (engine.output.path / name).open("ab") as fh:
                fh.write(b"meddled\n")
        return write_file(name, data, digest, entry)

    monkeypatch.setattr(engine.output, "write_file", meddling)  # the workers inherit it
    try:
        engine.build()
        trouble = many / "templates/sections/troubleshooting.j2"
        edit(trouble, "#### Symptoms", "#### Symptoms seen")
        report = engine.build([trouble])
        assert report.workers == 2 and len(report.written) == 24
        assert len({agent for agent, _ in engine.caches.l3.keys()}) == 24  # all came back
        assert read_outputs(many) == clean_build(many, tmp_path / "oracle")
    finally:
        engine.close()


def test_a_worker_never_overwrites_a_users_file(many: Path, tmp_path: Path) -> None:
    """A file of the user's where a worker would write an output is left alone and reported
    (file and reason), exactly as when the engine writes; the other outputs are written."""
    from agentd.build import Engine

    (many / "out").mkdir(exist_ok=True)
    mine = many / "out/api-design-0001.md"
    mine.write_text("my notes\n")
    engine = Engine(Config.load(many), jobs=2)
    try:
        report = engine.build()
    finally:
        engine.close()
    assert report.workers == 2 and len(report.written) == 23
    assert [str(e) for e in report.errors] == [
        "out/api-design-0001.md exists and was not generated by agentd; "
        "move it away (agentd never overwrites a file it did not write)"
    ]
    assert mine.read_text() == "my notes\n"
    clean = clean_build(many, tmp_path / "oracle")
    assert {k: v for k, v in read_outputs(many).items() if k != mine.name} == {
        k: v for k, v in clean.items() if k != mine.name
    }


def test_workers_compose_right_after_a_restart(many: Path, tmp_path: Path) -> None:
    """The store keeps where each composition's sections sit and each agent's skeleton, so the
    first batch after a restart is composed by the workers too, without rendering a skeleton:
    the new engine renders nothing to start, never holds a section's bytes, and its outputs
    equal a clean build."""
    from agentd.build import Engine

    config = Config.load(many)
    first = Engine(config, Store(many, render_stamp(config)), jobs=2)
    try:
        first.build()
    finally:
        first.close()
    engine = Engine(config, Store(many, render_stamp(config)), jobs=2)
    try:
        assert engine.build().sections_rendered == []
        engine.start_pool()  # as the daemon does once ready
        trouble = many / "templates/sections/troubleshooting.j2"
        edit(trouble, "#### Symptoms", "#### Symptoms seen")
        report = engine.build([trouble])
        assert report.workers == 2 and len(report.written) == 24 and len(engine.caches.l3) == 0
        assert BASE_TEMPLATE not in {name for name, _ in report.timings}  # skeletons: the store's
        assert read_outputs(many) == clean_build(many, tmp_path / "oracle")
    finally:
        engine.close()


def test_workers_compose_an_undo_served_from_the_store(many: Path, tmp_path: Path) -> None:
    """After an undo, sections whose earlier render the store holds are not rendered again and
    are not in the current output either: the worker composing their agent reads them from the
    store, so the engine still never holds a section's bytes, and outputs equal a clean build."""
    from agentd.build import Engine

    config = Config.load(many)
    engine = Engine(config, Store(many, render_stamp(config)), jobs=2)
    badge = many / "templates/fragments/badge.j2"
    trouble = many / "templates/sections/troubleshooting.j2"
    original = badge.read_text()
    try:
        engine.build()
        edit(badge, "`level: {{ value }}`", "`level {{ value }}`")
        engine.build([badge])
        edit(trouble, "#### Symptoms", "#### Symptoms seen")  # also imports the badge macros
        engine.build([trouble])
        badge.write_text(original)  # undo: most of its readers are in the store as they were
        report = engine.build([badge])
        assert report.workers == 2 and report.sections_restored > 0 and report.sections_rendered
        assert len(engine.caches.l3) == 0
        assert read_outputs(many) == clean_build(many, tmp_path / "oracle")
    finally:
        engine.close()


def test_a_template_the_workers_compile_is_compiled_here_after_the_batch(many: Path, tmp_path: Path) -> None:
    """The warm workers compile an edited template before this process does (it compiles its
    own copy once they have rendered the batch): afterwards it still knows what the new
    version includes, and its own next render of that template uses the new version."""
    from agentd.build import Engine

    extra = many / "templates/fragments/extra-checks.j2"
    extra.write_text("- extra check\n")
    engine = Engine(Config.load(many), jobs=2)
    try:
        engine.build()
        trouble = many / "templates/sections/troubleshooting.j2"
        # Never taken here: only the static analysis of this compile knows the include.
        edit(
            trouble,
            "#### Symptoms",
            '{% if agent.get("unset") %}{% include "fragments/extra-checks.j2" %}{% endif %}#### Signs',
        )
        report = engine.build([trouble])
        assert report.workers == 2 and len(report.written) == 24 and report.errors == []
        readers = engine.affected([extra])["sections"]
        assert len(readers) == 24 and all(s.endswith("/troubleshooting") for s in readers)
        # One agent's key, read by its troubleshooting section: rendered in this process.
        edit(many / "agents/api-design-0001.yaml", "severity: critical", "severity: high")
        report = engine.build([many / "agents/api-design-0001.yaml"])
        assert report.workers == 0 and report.written == ["api-design-0001.md"]
        assert read_outputs(many) == clean_build(many, tmp_path / "oracle")
    finally:
        engine.close()


def test_a_syntax_error_the_workers_meet_first_is_reported_as_in_one_process(many: Path, tmp_path: Path) -> None:
    """A template that no longer compiles, sent to the warm workers before this process
    compiles it, gives exactly the errors a one-process build gives (file, line, the line),
    keeps every output, and the fix is built as a clean build would."""
    from agentd.build import Engine

    engine = Engine(Config.load(many), jobs=2)
    try:
        engine.build()
        before = read_outputs(many)
        trouble = many / "templates/sections/troubleshooting.j2"
        edit(trouble, "#### Symptoms", "{% if %}#### Symptoms")
        report = engine.build([trouble])
        assert report.workers == 2 and report.written == []
        one_process = Engine(Config.load(many), jobs=1).build(write=False)
        assert [str(e) for e in report.errors] == [str(e) for e in one_process.errors]
        assert 'File "templates/sections/troubleshooting.j2", line' in str(report.errors[0])
        assert "{% if %}#### Symptoms" in str(report.errors[0])
        assert read_outputs(many) == before
        edit(trouble, "{% if %}#### Symptoms", "#### Signs")
        report = engine.build([trouble])
        assert report.workers == 2 and report.errors == [] and len(report.written) == 24
        assert read_outputs(many) == clean_build(many, tmp_path / "oracle")
    finally:
        engine.close()


async def test_verify_in_the_daemon_leaves_no_extra_workers(many: Path) -> None:
    """``verify`` builds with an engine of its own, which forks workers for a batch this big:
    they stop when it returns, leaving the daemon only its own pool."""
    async with run_daemon(many, "--jobs", "2") as d:
        pids = await started_workers(d.proc.pid)
        result = await asyncio.to_thread(run_cli, "verify", cwd=many)
        assert result.returncode == 0, result.stderr
        assert outlived([p for p in workers_of(d.proc.pid) if p not in pids], timeout=2) == []
        assert workers_of(d.proc.pid) == pids


def test_graph_without_a_daemon_stops_its_workers(many: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``agentd graph --no-daemon`` (and ``affected``) close the engine they build with: no
    worker it forked is left running in this process."""
    import multiprocessing

    from agentd.cli import main

    monkeypatch.setenv("AGENTD_JOBS", "2")
    for argv in (
        ["graph", "--no-daemon"],
        ["affected", "--no-daemon", str(many / "templates/sections/troubleshooting.j2")],
    ):
        assert main(["--quiet", "--root", str(many), *argv]) == 0
        assert multiprocessing.active_children() == []


def test_a_failed_verify_stops_its_workers(many: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine of ``verify`` is closed by ``with``, not when the garbage collector gets to
    it: a build that fails after forking leaves no workers behind its exception."""
    import multiprocessing

    from agentd.compose import Composer
    from agentd.verify import verify

    def fail(self: Composer, *args: Any) -> None:
        assert multiprocessing.active_children()  # the batch went to workers
        raise RuntimeError("stop")

    monkeypatch.setattr(Composer, "finish_writes", fail)
    with pytest.raises(RuntimeError) as caught:  # the traceback holds the build's frames
        verify(Config.load(many, {"jobs": 2}))
    assert caught.value.__traceback__ is not None
    assert multiprocessing.active_children() == []


def test_the_pool_does_not_import_the_engine() -> None:
    """Workers are driven through ``pool.Work``: the pool knows nothing of ``build.py``."""
    import subprocess
    import sys

    code = 'import agentd.pool, sys; assert "agentd.build" not in sys.modules, "agentd.build imported"'
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO / "daemon")})
