"""Reading the workspace: nothing outside templates/ and agents/, YAML that cannot blow up or
drop a value silently, and a source that cannot be read as an error of that source, not of the
build."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

from agentd.build import Engine
from agentd.config import Config
from agentd.store import open_store
from agentd.workspace import Workspace
from conftest import clean_build, read_outputs, run_cli, run_daemon, unprivileged

SECRET = "agentd-test-secret-7f3a"


def edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))
    return path


def build(root: Path) -> list[str]:
    """A build as ``agentd build`` runs it (persistent store included); its errors, printed."""
    config = Config.load(root)
    engine = Engine(config, open_store(config))
    try:
        return [str(error) for error in engine.build().errors]
    finally:
        engine.close()
        if engine.store:
            engine.store.close()


def test_a_link_out_of_the_workspace_is_an_error_and_its_target_is_never_read(tiny: Path, tmp_path: Path) -> None:
    """A link to a file or a folder outside templates/ and agents/ is an error naming the link;
    nothing of the target reaches an output, an error or the store, and the rest builds."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "agent.yaml").write_text(f"name: {SECRET}\ndescription: d\nskills: [{SECRET}]\nsections: [summary]\n")
    (outside / "pw.j2").write_text(f"{SECRET}\n")
    # a trait no agent uses: an agent that does not load would hold back its catalog readers
    (tiny / "agents/traits/safety/leak.yaml").symlink_to(outside / "agent.yaml")
    (tiny / "templates/fragments/pw.j2").symlink_to(outside / "pw.j2")
    (tiny / "templates/ext").symlink_to(outside, target_is_directory=True)
    errors = build(tiny)
    why = "outside templates/ and agents/; agentd reads nothing outside them"
    assert sorted(e.splitlines()[0] for e in errors) == [
        f"agents/traits/safety/leak.yaml: a symbolic link to the file {outside / 'agent.yaml'}, {why}",
        f"templates/ext: a symbolic link to the folder {outside}, {why}",
        f"templates/fragments/pw.j2: a symbolic link to the file {outside / 'pw.j2'}, {why}",
    ]
    assert SECRET not in "".join(errors)
    assert sorted(read_outputs(tiny)) == ["alpha.md", "beta.md"]
    written = [p for d in ("out", ".agentd") for p in (tiny / d).rglob("*") if p.is_file()]
    assert written and not [p for p in written if SECRET.encode() in p.read_bytes()]


def test_a_link_inside_the_workspace_works_and_follows_its_target(tiny: Path, tmp_path: Path) -> None:
    """A link to a file inside templates/ or agents/ reads as that file, and an edit of the
    target (which inotify reports for the target alone) rebuilds the link's readers too."""
    (tiny / "agents/gamma.yaml").symlink_to("beta.yaml")
    (tiny / "templates/fragments/bullets.j2").symlink_to("list-item.j2")
    edit(tiny / "templates/sections/summary.j2", "fragments/list-item.j2", "fragments/bullets.j2")
    engine = Engine(Config.load(tiny), jobs=1)
    report = engine.build()
    assert report.ok, report.errors
    assert "- b1\n" in (tiny / "out/gamma.md").read_text()
    target = edit(tiny / "agents/beta.yaml", "skills: [b1]", "skills: [b2]")
    template = edit(tiny / "templates/fragments/list-item.j2", "- {{ i }}", "* {{ i }}")
    report = engine.build([target, template])
    assert report.ok, report.errors
    assert "* b2\n" in (tiny / "out/gamma.md").read_text()
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


def _one_gib_of_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_an_alias_bomb_is_refused_at_its_line_and_the_rest_builds(tiny: Path) -> None:
    """Nine levels of ten aliases (~400 bytes, 10^9 values expanded) are an error at the first
    alias past the budget, in a build capped at 1 GiB of memory; the other agents build."""
    levels = "abcdefghi"
    lines = ["name: Bomb", "description: d", "skills: [x]", "a: &a [" + ",".join(['"lol"'] * 10) + "]"]
    lines += [f"{n}: &{n} [" + ",".join([f"*{p}"] * 10) + "]" for p, n in zip(levels, levels[1:], strict=False)]
    (tiny / "agents/traits/safety/bomb.yaml").write_text("\n".join(lines) + "\n")  # used by none
    result = subprocess.run(
        [sys.executable, "-m", "agentd", "build"],
        cwd=tiny,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_one_gib_of_memory,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    bomb = "agents/traits/safety/bomb.yaml"
    assert f"{bomb}:8:8: aliases expand this document past 100,000 values" in result.stderr
    assert "   8 | e: &e [*d,*d," in result.stderr
    assert sorted(read_outputs(tiny)) == ["alpha.md", "beta.md"]


def test_tab_indentation_and_a_duplicate_key_are_errors_at_their_line(tiny: Path) -> None:
    """A tab used as indentation says so; a repeated key (YAML would drop the first value
    silently) is an error at the repeat, naming the line of the first."""
    edit(tiny / "agents/alpha.yaml", "skills: [a1, a2]", "skills:\n\t- a1\n\t- a2")
    edit(tiny / "agents/traits/safety/careful.yaml", "level: high", "level: high\nrule: Leap.")
    errors = {e.split(":", 1)[0]: e.splitlines() for e in build(tiny)}
    assert errors["agents/alpha.yaml"][:2] == [
        "agents/alpha.yaml: tab characters are not allowed for indentation in YAML; use spaces",
        '  File "agents/alpha.yaml", line 4',
    ]
    careful = "agents/traits/safety/careful.yaml"
    assert errors[careful] == [
        f"{careful}: duplicate key 'rule' (first defined on line 2); YAML would keep only the last",
        f'  File "{careful}", line 4',
        "    rule: Leap.",
    ]


def test_an_unreadable_source_or_folder_is_an_error_of_its_own(tiny: Path) -> None:
    """chmod 000 on a source or a folder fails that file or folder ("permission denied"), not
    the build: no traceback, exit 1, the rest is written; while agents/ itself cannot be
    listed, no output is removed as if its agent had been deleted."""
    prefix = unprivileged()
    trait = tiny / "agents/traits/safety/unused.yaml"
    trait.write_text("name: Unused\nrule: r\n")
    folder = tiny / "templates/extra"
    folder.mkdir()
    (folder / "x.j2").write_text("x\n")
    trait.chmod(0)
    folder.chmod(0)
    try:
        result = run_cli("build", cwd=tiny, prefix=prefix)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.splitlines()
        assert "agents/traits/safety/unused.yaml: cannot read: permission denied" in lines
        assert "templates/extra: cannot list this folder: permission denied; the sources in it are left out" in lines
        assert sorted(read_outputs(tiny)) == ["alpha.md", "beta.md"]
        (tiny / "agents").chmod(0)
        result = run_cli("build", cwd=tiny, prefix=prefix)
        assert result.returncode == 1, result.stderr
        assert "agents: cannot list this folder: permission denied" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        for path in (tiny / "agents", folder, trait):
            path.chmod(0o755)
    assert sorted(read_outputs(tiny)) == ["alpha.md", "beta.md"]


def test_an_unclosed_bracket_or_quote_is_reported_where_it_opens(tiny: Path) -> None:
    """libyaml gives up lines after an unclosed "[" or quote; the error points at the opening."""
    edit(tiny / "agents/alpha.yaml", "name: Alpha", "name: [Alpha")
    edit(tiny / "agents/traits/safety/careful.yaml", "rule: Look", 'rule: "Look')
    errors = {e.split(":", 1)[0]: e.splitlines() for e in build(tiny)}
    assert errors["agents/alpha.yaml"][:3] == [
        "agents/alpha.yaml: malformed YAML: '[' on line 1 has no closing ']' "
        "(at line 2: did not find expected ',' or ']')",
        '  File "agents/alpha.yaml", line 1',
        "    name: [Alpha",
    ]
    careful = "agents/traits/safety/careful.yaml"
    assert errors[careful][0].startswith(f"{careful}: malformed YAML: the quoted text that starts on line 2 is not")
    assert errors[careful][1] == f'  File "{careful}", line 2'


#: An agent whose only section reads no catalog: another agent's broken source never blocks it.
GAMMA = "name: Gamma\ndescription: Reads no catalog.\nskills: [g1]\nsections: [summary]\n"


async def test_two_sources_for_one_agent_under_watch(tiny: Path, tmp_path: Path) -> None:
    """Under `agentd watch`, `x.yml` saved beside `x.yaml` is an error naming both: x keeps its
    last good output and an agent that does not read x's catalog entry still builds; deleting
    either file builds x from the other, and out/ equals a clean build."""
    (tiny / "agents/gamma.yaml").write_text(GAMMA)
    async with run_daemon(tiny) as d:
        before = (tiny / "out/gamma.md").read_bytes()
        start = len(d.events)
        draft = tiny / "gamma.tmp"  # renamed into place: one event, the whole file
        draft.write_text(GAMMA.replace("Reads no catalog.", "The twin."))
        draft.rename(tiny / "agents/gamma.yml")
        build = await d.next_build()
        twins = [e for e in d.events[start:] if e.get("event") == "build.error" and "two sources" in e["message"]]
        assert [(e["path"], e["message"]) for e in twins] == [
            (
                "agents/gamma.yaml",
                "two sources for agent 'gamma': agents/gamma.yaml and agents/gamma.yml "
                "(.yaml and .yml are both read); keep one of them",
            )
        ]
        assert build["written"] == [] and build["removed"] == []
        assert (tiny / "out/gamma.md").read_bytes() == before
        (tiny / "agents/delta.yaml").write_text(GAMMA.replace("Gamma", "Delta"))
        build = await d.next_build()
        assert build["written"] == ["delta.md"]
        (tiny / "agents/gamma.yaml").unlink()
        build = await d.next_build()
        assert build["errors"] == 0
        assert "The twin." in (tiny / "out/gamma.md").read_text()
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


def test_a_worker_replaying_the_journal_sees_the_same_namesakes(tiny: Path) -> None:
    """Workers reach the daemon's state by replaying the files it read: through a second source
    for an agent appearing and the first one going, theirs stays the daemon's."""
    config = Config.load(tiny)
    daemon, worker = Workspace(config), Workspace(config)
    for workspace in (daemon, worker):
        workspace.refresh([config.agents_path])
    daemon.journal = {}

    def state(workspace: Workspace) -> tuple[dict[str, object], list[str]]:
        return {a.id: a.data for a in workspace.agents.values()}, sorted(workspace.agent_errors)

    (tiny / "agents/beta.yml").write_text("name: Beta Two\ndescription: d\nskills: []\n")
    daemon.refresh([tiny / "agents/beta.yml"])
    worker.replay(daemon.journal)
    assert state(worker) == state(daemon) and state(daemon)[1] == ["beta"]
    daemon.journal = {}
    (tiny / "agents/beta.yml").unlink()  # the one listed last: the first is read again after it
    daemon.refresh([tiny / "agents/beta.yml"])
    worker.replay(daemon.journal)
    assert state(worker) == state(daemon) and daemon.agents["beta"].data["name"] == "Beta"
