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
from conftest import read_outputs


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


def _one_gib_of_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_an_alias_bomb_is_refused_at_its_line_and_the_rest_builds(tiny: Path) -> None:
    """Nine levels of ten aliases (~400 bytes, 10^9 values expanded) are an error at the first
    alias past the budget, in a build capped at 1 GiB of memory; the other agents build."""
    levels = "abcdefghi"
    lines = ["name: Bomb", "description: d", "skills: [x]", "a: &a [" + ",".join(['"lol"'] * 10) + "]"]
    lines += [f"{n}: &{n} [" + ",".join([f"*{p}"] * 10) + "]" for p, n in zip(levels, levels[1:], strict=False)]
    (tiny / "agents/bomb.yaml").write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "agentd", "build"],
        cwd=tiny,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_one_gib_of_memory,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "error: agents/bomb.yaml: aliases expand this document past 100,000 values" in result.stderr
    assert 'File "agents/bomb.yaml", line 8\n    e: &e [*d,*d,' in result.stderr
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
