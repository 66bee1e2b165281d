"""``agentd init``: the starter workspace builds, checks clean and watches; a non-empty folder
is refused without --force; --example reproduces the shipped outputs."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import REPO, read_outputs, run_cli, run_daemon


def test_init_builds_and_checks_clean(tmp_path: Path) -> None:
    """A folder holding only .git/ counts as empty; the starter builds and checks clean."""
    root = tmp_path / "ws"
    (root / ".git").mkdir(parents=True)
    result = run_cli("init", str(root))
    assert result.returncode == 0, result.stderr
    assert "agentd.toml" in result.stdout and "agentd watch" in result.stdout
    umask = os.umask(0)
    os.umask(umask)
    assert (root / "agentd.toml").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (root / ".gitignore").read_text() == "out/\n.agentd/\n"

    build = run_cli("build", "--jobs", "1", cwd=root)
    assert build.returncode == 0, build.stderr
    assert sorted(p.name for p in (root / "out").glob("*.md")) == ["code-reviewer.md", "docs-writer.md"]
    check = run_cli("check", "--strict", cwd=root)
    assert check.returncode == 0, check.stdout


async def test_init_then_watch_follows_a_template_edit(tmp_path: Path) -> None:
    """Editing the starter's macro library under watch rewrites both outputs."""
    root = tmp_path / "ws"
    assert run_cli("init", str(root)).returncode == 0
    output = root / "out" / "code-reviewer.md"
    async with run_daemon(root) as daemon:
        assert "\n- Read the whole diff" in output.read_text()
        start = len(daemon.events)
        lists = root / "templates" / "fragments" / "lists.j2"
        lists.write_text(lists.read_text().replace("- {{ item }}", "* {{ item }}"))
        build = await daemon.wait_for(lambda e: e.get("event") == "build.finished" and e["written"], start=start)
        assert sorted(build["written"]) == ["code-reviewer.md", "docs-writer.md"]
        assert "\n* Read the whole diff" in output.read_text()


def test_init_refuses_a_non_empty_folder_unless_forced(tmp_path: Path) -> None:
    """Exit 2 naming the folder and --force, nothing written; --force overwrites and keeps the rest."""
    root = tmp_path / "ws"
    root.mkdir()
    (root / ".gitignore").write_text("mine\n")  # a dot-file init would overwrite counts
    refused = run_cli("init", str(root))
    assert refused.returncode == 2
    assert str(root) in refused.stderr and "--force" in refused.stderr
    assert sorted(p.name for p in root.iterdir()) == [".gitignore"]

    (root / "notes.txt").write_text("keep\n")
    assert run_cli("init", str(root)).returncode == 2
    forced = run_cli("init", "--force", str(root))
    assert forced.returncode == 0, forced.stderr
    assert ".gitignore  (overwritten)" in forced.stdout
    assert (root / "notes.txt").read_text() == "keep\n"
    assert (root / ".gitignore").read_text() == "out/\n.agentd/\n"
    assert (root / "templates" / "base" / "agent-base.j2").is_file()


def test_init_example_reproduces_the_shipped_outputs(tmp_path: Path) -> None:
    """init --example, then build: byte for byte what this repository's corpus builds."""
    root = tmp_path / "example"
    assert run_cli("init", "--example", str(root)).returncode == 0
    assert run_cli("build", "--jobs", "1", "--no-cache", cwd=root).returncode == 0
    reference = tmp_path / "reference"
    built = run_cli("build", "--root", str(REPO), "--output-dir", str(reference / "out"), "--jobs", "1", "--no-cache")
    assert built.returncode == 0, built.stderr
    shipped = read_outputs(reference)
    assert len(shipped) == len(list((REPO / "agents").glob("*.yaml"))) > 0
    assert read_outputs(root) == shipped
