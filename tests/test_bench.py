"""`agentd bench`: synthetic workspaces are valid, and a short run reports every measure."""

from __future__ import annotations

import re
from pathlib import Path

import orjson

from agentd.bench import make_workspace
from agentd.build import Engine
from agentd.config import Config
from conftest import REPO, run_cli


def test_synthetic_workspace_is_valid_and_cross_referenced(tmp_path: Path) -> None:
    """N agents derived from the corpus build cleanly, every handoff names an existing agent,
    and ids, names and versions differ between generations."""
    ids = make_workspace(REPO, tmp_path / "ws", 19)
    assert len(ids) == len(set(ids)) == 19
    root = tmp_path / "ws"
    for agent_id in ids:
        text = (root / "agents" / f"{agent_id}.yaml").read_text()
        assert f"id: {agent_id}\n" in text
        for target in re.findall(r"\n\s+- agent: (\S+)", text):
            assert target in ids, (agent_id, target)
    names = {re.search(r"^name: (.*)$", (root / "agents" / f"{i}.yaml").read_text(), re.M).group(1) for i in ids}  # type: ignore[union-attr]
    assert len(names) == 19
    report = Engine(Config.load(root)).build(write=False)
    assert report.ok, report.errors
    assert len(report.sections_rendered) == 19 * 9


def test_bench_reports_every_measure(tmp_path: Path) -> None:
    """`agentd bench` runs end to end and writes the documented JSON report (with the fewest
    trials it takes: --quick is the same run with 6)."""
    output = tmp_path / "bench.json"
    result = run_cli("bench", "--agents", "10", "--trials", "2", "--output", str(output), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "N = 10 agents" in result.stdout and "save->output" in result.stdout
    report = orjson.loads(output.read_text())
    assert {"cpu", "cores", "python", "packages"} <= set(report["machine"])
    (size,) = report["sizes"]
    assert size["agents"] == 10
    assert set(size["cold_build_ms"]) >= {
        "naive_fresh_environment_per_agent",
        "agentd_build_jobs_1",
        "agentd_build_jobs_auto",
        "jobs_speedup",
        "agentd_build_warm_cache",
    }
    assert size["daemon_warm_restart"]["sections_rendered"] == 0
    assert list(size["edits"]) == [
        "one key of one agent", "one section template", "one trait", "one fragment macro", "the base template",
    ]  # fmt: skip
    for label, edit in size["edits"].items():  # the cheap one-key edit gets a real p95
        assert edit["save_to_output"]["n"] == (20 if label == "one key of one agent" else 2)
        assert edit["save_to_output"]["p50_ms"] > 0
        assert {"sections_rendered", "outputs_written", "oracle_ms", "vs_oracle", "naive_full_rebuild_ms"} <= set(edit)
    for label, edit in size["edits"].items():  # template edits also timed with --jobs 1, side by side
        assert ("save_to_output_jobs_1" in edit) == (label != "one key of one agent")
    assert size["edits"]["one key of one agent"]["sections_rendered"] == 1
    assert size["edits"]["the base template"]["sections_rendered"] == 0
    assert size["peak_rss_bytes"] > 0 and set(size["hit_rates"]) == {"L1", "L2", "L3", "L4"}
    assert set(size["sessions"]) == {"authoring agents", "mixed"}
    for session in size["sessions"].values():
        assert session["saves"] > 20 and set(session["hit_rates"]) == {"L1", "L2", "L3", "L4"}
    assert "hit rates, editing session 'mixed'" in result.stdout
