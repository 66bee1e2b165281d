"""`agentd verify`: a clean build in a temporary folder, diffed against out/."""

from __future__ import annotations

from pathlib import Path

import orjson

from conftest import run_cli


def test_fresh_build_verifies(tiny: Path) -> None:
    """Right after a build, verify exits 0 and says how many files it compared."""
    run_cli("build", cwd=tiny)
    result = run_cli("verify", cwd=tiny)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: out/ matches a clean build (2 files)" in result.stdout


def test_differences_are_listed(tiny: Path) -> None:
    """Edited, deleted and stale outputs each exit 1 and are named; a user's file is ignored."""
    run_cli("build", cwd=tiny)
    (tiny / "out/alpha.md").write_text("hand edit\n")
    (tiny / "out/beta.md").unlink()
    (tiny / "out/notes.md").write_text("mine\n")
    result = run_cli("verify", cwd=tiny)
    assert result.returncode == 1
    assert "differs: out/alpha.md" in result.stdout and "+++ clean build/alpha.md" in result.stdout
    assert "missing: out/beta.md" in result.stdout
    assert "notes.md" not in result.stdout


def test_stale_output_after_source_deleted(tiny: Path) -> None:
    """An output whose agent source is gone (no rebuild since) is reported stale."""
    run_cli("build", cwd=tiny)
    (tiny / "agents/beta.yaml").unlink()
    data = orjson.loads(run_cli("verify", "--json", cwd=tiny).stdout)
    assert data["stale"] == ["beta.md"] and data["ok"] is False


def test_source_edit_without_rebuild_is_detected(tiny: Path) -> None:
    """Editing a template after the last build makes out/ differ from a clean build."""
    run_cli("build", cwd=tiny)
    footer = tiny / "templates/base/footer.j2"
    footer.write_text(footer.read_text().replace("end of", "finale of"))
    data = orjson.loads(run_cli("verify", "--json", cwd=tiny).stdout)
    assert data["differing"] == ["alpha.md", "beta.md"]
    assert not (tiny / "out/.agentd-verify").exists()
