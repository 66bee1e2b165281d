"""The command line as a user runs it: exit codes, summaries and located error messages."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from agentd.config import Config
from agentd.control import request, socket_path
from conftest import run_cli, run_daemon, set_config


def test_build_writes_outputs_and_prints_a_summary(tiny: Path) -> None:
    """`agentd build` exits 0, writes out/<id>.md and says what it did."""
    result = run_cli("build", "--root", str(tiny))
    assert result.returncode == 0, result.stderr
    assert (tiny / "out/alpha.md").exists() and (tiny / "out/beta.md").exists()
    assert "2 agents, 7 sections rendered" in result.stdout
    assert "2 written, 0 unchanged, 0 removed" in result.stdout
    assert "cache hits: L1" in result.stdout and "time:" in result.stdout


def test_a_hand_written_workspace_builds_and_checks_clean(tmp_path: Path) -> None:
    """One section template and one short agent, no agentd.toml, no base template: `agentd
    build` writes the section as the agent and `agentd check` finds nothing (the tool assumes
    no sections, line range, front matter or schema of its own)."""
    root = tmp_path / "hello"
    (root / "templates/sections").mkdir(parents=True)
    (root / "agents").mkdir()
    (root / "templates/sections/hello.j2").write_text(
        "## Hello {{ agent.name }}\n\n{% for line in agent.greetings %}\n- {{ line }}\n{% endfor %}\n"
    )
    (root / "agents/greeter.yaml").write_text(
        "# A first agent.\n"
        "name: Greeter\n"
        "description: Says hello.\n"
        "greetings:\n"
        "  - Good morning\n"
        "  - Good afternoon\n"
        "  - Good evening\n"
        "owner: me\n"
        "version: 1\n"
        "notes: none\n"
    )
    build = run_cli("build", cwd=root)
    assert build.returncode == 0, build.stdout + build.stderr
    assert (root / "out/greeter.md").read_text() == (
        "## Hello Greeter\n\n- Good morning\n- Good afternoon\n- Good evening\n"
    )
    check = run_cli("check", "--strict", cwd=root)
    assert (check.returncode, check.stdout) == (0, "agentd check: no findings\n")


def test_second_build_reports_unchanged(tiny: Path) -> None:
    """Running build twice leaves every output unchanged and untouched."""
    run_cli("build", "--root", str(tiny))
    mtime = (tiny / "out/alpha.md").stat().st_mtime_ns
    result = run_cli("build", "--root", str(tiny))
    assert "0 written, 2 unchanged" in result.stdout
    assert (tiny / "out/alpha.md").stat().st_mtime_ns == mtime


def test_root_defaults_to_current_directory(tiny: Path) -> None:
    """Without --root, the current directory is the workspace."""
    result = run_cli("build", cwd=tiny)
    assert result.returncode == 0 and (tiny / "out/alpha.md").exists()


def test_a_subfolder_finds_its_workspace(tiny: Path) -> None:
    """From agents/ (or deeper), build walks up to the workspace and writes its out/."""
    result = run_cli("build", cwd=tiny / "agents" / "traits")
    assert result.returncode == 0, result.stderr
    assert (tiny / "out/alpha.md").exists() and not (tiny / "agents/out").exists()


def test_agentd_toml_marks_a_workspace_with_other_folder_names(tmp_path: Path, tiny: Path) -> None:
    """A folder holding agentd.toml is a workspace even when its templates live elsewhere."""
    (tiny / "templates").rename(tiny / "tpl")
    set_config(tiny, 'templates_dir = "tpl"')
    (tiny / "tpl" / "deep").mkdir()
    result = run_cli("build", cwd=tiny / "tpl" / "deep")
    assert result.returncode == 0, result.stderr
    assert (tiny / "out/alpha.md").exists()


def test_global_options_go_before_or_after_the_command(tmp_path: Path, tiny: Path) -> None:
    """--root/-C, -q and --color are accepted before the subcommand as well as after it."""
    before = run_cli("-C", str(tiny), "-q", "--color", "never", "build", cwd=tmp_path)
    assert before.returncode == 0, before.stderr
    assert before.stdout == "" and (tiny / "out/alpha.md").exists()
    after = run_cli("build", "--root", str(tiny), cwd=tmp_path)
    assert after.returncode == 0 and "2 unchanged" in after.stdout
    assert run_cli("--root", str(tiny), "-q", "-v", "build").returncode == 2


def test_not_a_workspace_is_a_usage_error(tmp_path: Path) -> None:
    """A folder without templates/ and agents/ exits 2 with a message saying what is missing."""
    result = run_cli("build", "--root", str(tmp_path))
    assert result.returncode == 2
    assert "templates" in result.stderr and "agentd workspace" in result.stderr
    found_none = run_cli("build", cwd=tmp_path)
    assert found_none.returncode == 2 and "agentd init" in found_none.stderr


def test_unknown_flag_is_a_usage_error(tiny: Path) -> None:
    """Bad flags exit 2."""
    assert run_cli("build", "--frobnicate", cwd=tiny).returncode == 2


def test_bad_config_is_a_usage_error(tiny: Path) -> None:
    """An unknown agentd.toml setting exits 2 naming it."""
    set_config(tiny, 'output_dirr = "x"')
    result = run_cli("build", cwd=tiny)
    assert result.returncode == 2 and "output_dirr" in result.stderr


def test_config_precedence_flag_env_file(tiny: Path) -> None:
    """CLI flag beats AGENTD_* beats agentd.toml."""
    set_config(tiny, 'output_dir = "from-file"')
    run_cli("build", cwd=tiny)
    assert (tiny / "from-file/alpha.md").exists()
    run_cli("build", cwd=tiny, env={"AGENTD_OUTPUT_DIR": "from-env"})
    assert (tiny / "from-env/alpha.md").exists()
    run_cli("build", "--output-dir", "from-flag", cwd=tiny, env={"AGENTD_OUTPUT_DIR": "from-env"})
    assert (tiny / "from-flag/alpha.md").exists()


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"),
    [
        (
            "agents/alpha.yaml",
            "skills: [a1, a2]",
            "skills: [a1, a2",
            [
                # where the "[" opens, not where libyaml gave up
                "agents/alpha.yaml:3:9: malformed YAML: '[' on line 3 has no closing ']'",
                "   3 | skills: [a1, a2\n     |         ^\n",
                "blocked by agents/alpha.yaml:3: agent 'alpha' does not load",  # beta lists its peers
                "(in agent beta)",
            ],
        ),
        (
            "templates/sections/traits.j2",
            "## {{",
            '{% import "fragments/list-itemz.j2" as l %}\n## {{',
            [
                "templates/sections/traits.j2:1:12: template 'fragments/list-itemz.j2' not found",
                '   1 | {% import "fragments/list-itemz.j2" as l %}\n     |            ^^^^^^^^^^^^^^^^^^^^^^^\n',
                "(in agent alpha)",
            ],
        ),
        (
            "templates/sections/traits.j2",
            '-traits.j2" %}',
            '-traits.j2" }',
            [
                "templates/sections/traits.j2:4:44: template syntax error: unexpected '}'",
                '   4 | {% include "traits/" ~ kind ~ "-traits.j2" }\n',
            ],
        ),
        (
            "templates/sections/traits.j2",
            "{{ section.title }}",
            "{{ section.title }} {{ agent.descriptoin }}",
            [
                "templates/sections/traits.j2:1:55: undefined variable: agent has no key 'descriptoin'",
                "   1 | ## {{ section.number }}. {{ section.title }} {{ agent.descriptoin }}\n",
                " ^^^^^^^^^^^\n  (in agent alpha)\n",
            ],
        ),
        (
            "agents/alpha.yaml",
            "safety: [careful]",
            "safety: [careful, reckless]",
            [
                "agents/alpha.yaml:7:21: unknown trait 'reckless' of kind 'safety'; expected one of: careful",
                "   7 | safety: [careful, reckless]\n     |                   ^^^^^^^^\n",
            ],
        ),
        (
            "agents/alpha.yaml",
            "sections: [summary, peers, traits, shared]",
            "sections: [summary, peers, trait, shared]",
            [
                "agents/alpha.yaml:5:28: unknown section 'trait'; expected one of: peers, shared, summary, traits",
                "   5 | sections: [summary, peers, trait, shared]\n",
            ],
        ),
        (
            "agents/alpha.yaml",
            "name: Alpha",
            "id: alfa\nname: Alpha",
            [
                "agents/alpha.yaml:1:5: id 'alfa' does not match the file name; expected 'alpha'",
                "   1 | id: alfa\n     |     ^^^^\n",
                "blocked by agents/alpha.yaml:1: agent 'alpha' does not load",
            ],
        ),
    ],
    ids=[
        "malformed-yaml",
        "missing-template",
        "syntax-error",
        "undefined-variable",
        "unknown-trait",
        "unknown-section",
        "id-mismatch",
    ],
)
def test_error_names_file_line_and_expectation(tiny: Path, file: str, old: str, new: str, expected: list[str]) -> None:
    """Each error case exits 1 with file:line:col, the offending line with a caret under the
    mistake, what was expected and the agent whose build met it; the other agent is still built,
    unless alpha's source does not load: beta, which lists alpha among its peers, is then
    reported blocked by it (once)."""
    _replace(tiny / file, old, new)
    result = run_cli("build", cwd=tiny)
    assert result.returncode == 1
    for fragment in expected:
        assert fragment in result.stderr, result.stderr
    blocked = result.stderr.count("blocked by")
    assert (tiny / "out/beta.md").exists() == (blocked == 0) and blocked <= 1


def test_include_cycle_is_reported(tiny: Path) -> None:
    """An include cycle is an error naming the cycle, not a crash."""
    (tiny / "templates/fragments/a.j2").write_text('{% include "fragments/b.j2" %}\n')
    (tiny / "templates/fragments/b.j2").write_text('{% include "fragments/a.j2" %}\n')
    _replace(tiny / "templates/sections/peers.j2", "## {{", '{% include "fragments/a.j2" %}\n## {{')
    result = run_cli("build", cwd=tiny)
    assert result.returncode == 1
    assert "include cycle: fragments/a.j2 -> fragments/b.j2 -> fragments/a.j2" in result.stderr


def test_python_dash_m_and_help(tiny: Path) -> None:
    """`python -m agentd --help` explains the commands; each command has --help."""
    top = run_cli("--help")
    assert top.returncode == 0
    for command in ("build", "graph", "affected"):
        assert command in top.stdout
        sub = run_cli(command, "--help")
        assert sub.returncode == 0 and "--root" in sub.stdout


def test_graph_json_has_static_and_traced_edges(tiny: Path) -> None:
    """`agentd graph --format json` exports template refs and traced reads."""
    result = run_cli("graph", "--format", "json", cwd=tiny)
    assert result.returncode == 0, result.stderr
    graph = orjson.loads(result.stdout)
    edges = {(e["source"], e["target"], e["type"]) for e in graph["edges"]}
    assert ("template:fragments/list-item.j2", "template:sections/summary.j2", "static") in edges
    # the dynamic include static analysis cannot see, recorded from the render
    assert ("template:traits/safety-traits.j2", "section:alpha/traits", "traced") in edges
    assert ("key:alpha:skills", "section:alpha/summary", "traced") in edges
    assert ("section:alpha/summary", "compose:alpha", "traced") in edges
    assert not (tiny / "out").exists()


def test_graph_dot(tiny: Path) -> None:
    """The default DOT export is a digraph Graphviz can read."""
    result = run_cli("graph", cwd=tiny)
    assert result.returncode == 0
    assert result.stdout.startswith("digraph agentd {")
    assert '"template:traits/safety-traits.j2" -> "section:alpha/traits";' in result.stdout


def test_affected_lists_agents_and_sections(tiny: Path) -> None:
    """`agentd affected` answers which renders a change to a file would redo."""
    result = run_cli("affected", "templates/traits/safety-traits.j2", "--json", cwd=tiny)
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout) == {
        "agents": ["alpha", "beta"],
        "sections": ["alpha/shared", "alpha/traits", "beta/shared"],
    }
    text = run_cli("affected", "templates/sections/peers.j2", cwd=tiny).stdout
    assert text == "agents (2):\n  alpha\n  beta\nsections (2):\n  alpha/peers\n  beta/peers\n"


def test_affected_rejects_foreign_paths(tiny: Path) -> None:
    """A path agentd does not read is a usage error, not an empty answer."""
    result = run_cli("affected", "README.md", cwd=tiny)
    assert result.returncode == 2 and "not a template, agent or trait file" in result.stderr


async def test_commands_answer_through_a_running_daemon(tiny: Path, tmp_path: Path) -> None:
    """affected, verify, graph and rebuild print the same through the daemon as in-process
    (--no-daemon), with the same exit codes; the daemon's request counters show which one
    answered; a daemon that writes elsewhere is not asked to verify; a daemon of another
    workspace is refused."""
    async with run_daemon(tiny):
        path = socket_path(Config.load(tiny))
        (tiny / "out/beta.md").write_text("edited by hand\n")  # outputs are not watched: it stays
        cases = [
            (("affected", "--root", str(tiny), "sections/peers.j2"), tiny / "templates"),  # relative to here
            (("affected", "../templates/sections/peers.j2"), tiny / "agents"),  # `..` folded
            (("affected", "--json", "templates/traits/safety-traits.j2"), tiny),
            (("verify",), tiny),
            (("verify", "--json"), tiny),
            (("graph", "--format", "json"), tiny),
            (("graph",), tiny),
            (("rebuild", "nobody"), tiny),
        ]
        for args, cwd in cases:
            via, here = await asyncio.gather(
                asyncio.to_thread(run_cli, *args, cwd=cwd), asyncio.to_thread(run_cli, *args, "--no-daemon", cwd=cwd)
            )
            assert (via.returncode, via.stdout, via.stderr) == (here.returncode, here.stdout, here.stderr), args
            assert via.returncode == {"verify": 1, "rebuild": 2}.get(args[0], 0), via.stderr
            if args == ("verify",):
                assert "differs: out/beta.md\n--- out/beta.md\n+++ clean build/beta.md" in via.stdout
        assert "unknown agent(s): nobody; known: alpha, beta" in via.stderr
        requests = (await asyncio.to_thread(request, path, "stats"))["requests"]
        assert requests == {"ping": 8, "affected": 3, "verify": 2, "graph": 2, "rebuild": 1, "stats": 1}

        rebuilt = await asyncio.to_thread(run_cli, "rebuild", "alpha", cwd=tiny)
        assert rebuilt.returncode == 0, rebuilt.stderr
        assert rebuilt.stdout.startswith("agentd: 2 agents, 4 sections rendered, 3 reused\n")
        everything = await asyncio.to_thread(run_cli, "rebuild", cwd=tiny)
        assert everything.stdout.startswith("agentd: 2 agents, 7 sections rendered, 0 reused\n")
        assert "1 written, 1 unchanged" in everything.stdout  # the hand-edited output, and only it
        elsewhere = await asyncio.to_thread(run_cli, "verify", "--output-dir", "elsewhere", cwd=tiny)
        assert elsewhere.returncode == 1 and "working in-process" in elsewhere.stderr
        assert "missing: elsewhere/alpha.md" in elsewhere.stdout
        requests = (await asyncio.to_thread(request, path, "stats"))["requests"]
        assert requests["rebuild"] == 3 and requests["verify"] == 2

        other = tmp_path / "other"
        shutil.copytree(tiny, other)
        refused = await asyncio.to_thread(run_cli, "graph", "--socket", str(path), cwd=other)
        assert refused.returncode == 2 and f"serves {tiny.resolve()}, not {other.resolve()}" in refused.stderr


def test_rebuild_without_a_daemon(tiny: Path) -> None:
    """Without a daemon, rebuild re-renders every section (or AGENT's) from scratch, though a
    build just filled the persistent cache, and writes only outputs whose bytes changed; an
    unknown agent id exits 2 naming the known ones."""
    assert run_cli("build", cwd=tiny).returncode == 0
    mtime = (tiny / "out/alpha.md").stat().st_mtime_ns
    result = run_cli("rebuild", cwd=tiny)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        "agentd: 2 agents, 7 sections rendered, 0 reused\n  outputs: 0 written, 2 unchanged"
    )
    one = run_cli("rebuild", "alpha", cwd=tiny)
    assert one.returncode == 0 and one.stdout.startswith("agentd: 2 agents, 4 sections rendered, 3 reused\n")
    assert (tiny / "out/alpha.md").stat().st_mtime_ns == mtime
    unknown = run_cli("rebuild", "alpha", "nobody", cwd=tiny)
    assert unknown.returncode == 2 and "unknown agent(s): nobody; known: alpha, beta" in unknown.stderr


def test_version_and_did_you_mean(tiny: Path) -> None:
    """-V prints the version; a mistyped command or agentd.toml key exits 2 suggesting the
    closest real one."""
    version = run_cli("-V")
    assert version.returncode == 0 and version.stdout.startswith("agentd ")
    typo = run_cli("buidl", cwd=tiny)
    assert typo.returncode == 2 and "did you mean 'build'?" in typo.stderr
    set_config(tiny, 'output_dirr = "x"')
    (tiny / "agentd.toml").write_text((tiny / "agentd.toml").read_text().replace("min_lines", "min_line"))
    config = run_cli("build", cwd=tiny)
    assert config.returncode == 2
    assert "output_dirr (did you mean 'output_dir'?)" in config.stderr
    assert "[check] min_line (did you mean 'min_lines'?)" in config.stderr


def test_json_is_an_alias_of_format_json(tiny: Path) -> None:
    """--format json is the one spelling everywhere; --json prints the same."""
    for command in (["verify"], ["affected", "agents/alpha.yaml"], ["graph"], ["check"]):
        spelled = run_cli(*command, "--format", "json", "--no-daemon" if command[0] != "check" else "-q", cwd=tiny)
        alias = run_cli(*command, "--json", "--no-daemon" if command[0] != "check" else "-q", cwd=tiny)
        assert spelled.stdout == alias.stdout and spelled.stdout.lstrip().startswith("{"), command


def test_a_closed_pipe_ends_quietly(tiny: Path) -> None:
    """When stdout's reader is gone (`agentd ... | head -1`), agentd exits 141 as git does,
    with no traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "agentd", "affected", "--no-daemon", "templates/sections/peers.j2"],
            cwd=tiny, stdout=write, stderr=subprocess.PIPE, text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write)
    assert result.returncode == 141 and result.stderr == ""
