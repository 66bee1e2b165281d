"""``agentd explain``: every output line traced to its section, template line (and the steps to
it) and YAML values; checked by editing what it names and rebuilding."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from agentd.build import Engine
from agentd.config import Config
from agentd.exceptions import ConfigError, ExplainError
from agentd.sourcemap import Explainer, answer
from conftest import TINY, read_outputs, run_cli, run_daemon, write_files


def build(root: Path) -> None:
    with Engine(Config.load(root), jobs=1) as engine:
        report = engine.build()
    assert not report.errors, report.errors


@contextmanager
def explainer(root: Path) -> Iterator[Explainer]:
    with Engine(Config.load(root), jobs=1) as engine:
        engine.load()
        yield Explainer(engine)


def steps(line: dict[str, Any], n: int = 0) -> list[tuple[str, int, str]]:
    return [(s["template"], s["line"], s["how"]) for s in line["templates"][n]["chain"]]


def data(line: dict[str, Any]) -> list[tuple[str, int, str]]:
    return [(d["file"], d["line"], d["path"]) for d in line["data"]]


def test_tiny_lines_name_their_section_template_steps_and_data(tiny: Path) -> None:
    """Each line names its section, the include/macro/include_cached steps to the template line
    that wrote it (innermost last) and the YAML values on it, other agents' and traits' too."""
    build(tiny)
    with explainer(tiny) as ex:
        lines = {a["line"]: a for a in ex.lines("out/alpha.md")}
    assert lines[2]["section"] is None
    assert steps(lines[2]) == [
        ("templates/base/agent-base.j2", 1, "include"),
        ("templates/base/header.j2", 2, ""),
    ]
    assert lines[7]["text"] == "- a1"
    assert lines[7]["section"] == "summary"
    assert steps(lines[7]) == [
        ("templates/sections/summary.j2", 4, "macro bullets"),
        ("templates/fragments/list-item.j2", 3, ""),
    ]
    assert data(lines[7]) == [("agents/alpha.yaml", 3, "skills[0]")]
    assert data(lines[8]) == [("agents/alpha.yaml", 3, "skills[1]")]
    assert data(lines[12]) == [("agents/beta.yaml", 1, "name")]  # through the catalog
    # a dynamic include, and a trait's values
    assert steps(lines[15]) == [
        ("templates/sections/traits.j2", 4, "include"),
        ("templates/traits/safety-traits.j2", 1, ""),
    ]
    assert data(lines[16]) == [("agents/traits/safety/careful.yaml", 2, "rule")]
    assert steps(lines[20]) == [
        ("templates/sections/shared.j2", 3, "include_cached"),
        ("templates/traits/safety-traits.j2", 2, ""),
    ]
    assert lines[20]["section"] == "shared"
    assert lines[7]["templates"][0]["source"] == "- {{ i }}"
    assert lines[7]["data"][0]["source"] == "skills: [a1, a2]"


def test_reverse_lists_exactly_the_lines_whose_steps_name_the_template_line(tiny: Path) -> None:
    """``--template T:N`` lists every output line (in every agent) whose explanation has T:N
    among its steps, and no other."""
    build(tiny)
    with explainer(tiny) as ex:
        forward: dict[tuple[str, int], set[tuple[str, int]]] = {}
        for agent in ("alpha", "beta"):
            for line in ex.lines(agent):
                for contributor in line["templates"]:
                    for step in contributor["chain"]:
                        forward.setdefault((step["template"], step["line"]), set()).add((line["output"], line["line"]))
        assert ("templates/fragments/list-item.j2", 3) in forward
        for (template, n), expected in forward.items():
            reply = ex.template(template, n)
            listed = {(o["output"], x) for o in reply["outputs"] for a, b in o["lines"] for x in range(a, b + 1)}
            assert listed == expected, (template, n)
        assert ex.template("templates/fragments/list-item.j2", 1)["outputs"] == []  # `{% macro %}` prints nothing


STRESS = {
    "templates/sections/stress.j2": """\
        {% from "fragments/stress.j2" import box, listing with context %}
        {% raw %}{{ not a tag }}{% endraw %}
        {%- set greeting -%}
        Hello {{ agent.name }}!
        {%- endset %}
        {{ greeting|upper }}
        {% filter indent(2) %}
        one
        two {{ agent.id }}
        {% endfilter %}
        {% call(item) listing(["a", agent.id]) %}* {{ item|title }} *{% endcall %}
        {{ box(agent.description|truncate(9)) }}
        {% with x = agent.name ~ "/" ~ agent.id %}{{ x|replace("/", " | ") }}{% endwith %}
        {% for n in [[1, [2]], [3]] recursive %}[{{ n[0] }}{% if n[1:] %}{{ loop(n[1:]) }}{% endif %}]{% endfor %}
        {{ agent.id|center(12) }}|{{ agent.description|wordwrap(6) }}
        {% include ["missing.j2", "fragments/stress-inc.j2"] ignore missing %}
        {{ [agent.id, agent.name]|join(", ") }} {{ agent.id ~ 42 }} {{ agent.name[:2] }}
        {% set ns = namespace(n=0) %}{% for c in agent.id %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}
        """,
    "templates/fragments/stress.j2": """\
        {% macro box(text) -%}
        +{{ "-" * (text|length + 2) }}+
        | {{ text }} |
        {%- endmacro %}
        {% macro listing(items) -%}
        {% for it in items %}
        {{ caller(it) }} ({{ agent.id }})
        {% endfor %}
        {%- endmacro %}
        """,
    "templates/fragments/stress-inc.j2": "included for {{ agent.name }}\n",
}


def test_jinja_constructs_trace_to_the_bytes_the_build_writes(tiny: Path) -> None:
    """raw, set and filter blocks, call blocks, with, recursive loops, an include list, joins,
    ``~`` and slices render traced to exactly what the build wrote, each line naming how it
    was reached."""
    write_files(tiny, STRESS)
    source = tiny / "agents" / "alpha.yaml"
    source.write_text(source.read_text().replace("sections: [summary,", "sections: [stress, summary,"))
    build(tiny)
    with explainer(tiny) as ex:
        lines = {a["text"]: a for a in ex.lines("alpha")}  # refused if a byte differed
    assert steps(lines["* A * (alpha)"]) == [
        ("templates/sections/stress.j2", 11, "macro listing"),
        ("templates/fragments/stress.j2", 7, "call block"),
        ("templates/sections/stress.j2", 11, ""),
    ]
    assert data(lines["{{ not a tag }}HELLO ALPHA!"]) == [("agents/alpha.yaml", 1, "name")]
    assert data(lines["| First agent. |"]) == [("agents/alpha.yaml", 2, "description")]
    looped = lines["Alpha | alpha[1[2]][3]   alpha    |First"]
    assert ("templates/sections/stress.j2", 14, "recursive loop") in [
        step for n in range(len(looped["templates"])) for step in steps(looped, n)
    ]
    assert data(lines["agent."]) == [("agents/alpha.yaml", 2, "description")]  # wrapped onto a line of its own
    assert steps(lines["included for Alpha"])[0] == ("templates/sections/stress.j2", 16, "include")
    # joined and ``~`` keep their values; a slice (a Python operation) is not followed
    assert data(lines["alpha, Alpha alpha42 Al"]) == [("agents/alpha.yaml", 1, "name")]


# -- the corpus: edit what explain names, rebuild, look ------------------------------------
_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}")


def _literal_end(source: str) -> int | None:
    """Where a marker goes to extend the literal text of a template line: after its last
    literal text, or after a closing ``}}`` that ends the line; None when neither exists."""
    if source.count("{") != source.count("}"):
        return None  # a tag that continues on another line
    end = None
    pos = 0
    for match in [*_TAG.finditer(source), None]:
        stop = match.start() if match else len(source)
        if source[pos:stop].strip():
            end = pos + len(source[pos:stop].rstrip())
        pos = match.end() if match else pos
    if end is None and source.rstrip().endswith("}}"):
        end = len(source.rstrip())
    return end


def _picks(ex: Explainer, per_agent: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    picked = []
    for agent in sorted(ex.engine.plans):
        count = ex.source_map(agent).lines
        for n in rng.sample(range(1, count + 1), per_agent):
            (line,) = ex.lines(agent, n)
            if line["text"].strip():
                picked.append(line)
    return picked


def _mark_templates(root: Path, picked: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[int], str]]:
    """Append a marker to the literal text of the template line named first for each picked
    line (one marker per template line); return (line, its block, marker) to look for."""
    markers: dict[tuple[str, int], str] = {}
    checks = []
    for line in picked:
        contributor = line["templates"][0]
        for step in contributor["chain"][:-1]:
            if step["how"] == "extends":
                assert step["source"].lstrip().startswith("{% extends"), step
        if _literal_end(contributor["source"]) is None:
            continue
        marker = markers.setdefault((contributor["template"], contributor["line"]), f"QZM{len(markers)}X")
        checks.append((line, contributor["block"], marker))
    for (template, n), marker in markers.items():
        path = root / template
        lines = path.read_text().split("\n")
        at = _literal_end(lines[n - 1])
        assert at is not None
        lines[n - 1] = lines[n - 1][:at] + marker + lines[n - 1][at:]
        path.write_text("\n".join(lines))
    return checks


def _compose(text: str) -> yaml.Node:
    node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert node is not None
    return node


def _node(root: yaml.Node, path: str) -> yaml.Node:
    node = root
    for key, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", path):
        if index:
            assert isinstance(node, yaml.SequenceNode)
            node = node.value[int(index)]
        else:
            assert isinstance(node, yaml.MappingNode)
            node = next(v for k, v in node.value if k.value == key)
    return node


def _mark_data(root: Path, picked: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """Check each named value starts on the line named, then put a marker after every word of
    each string value (one marker per value); return (line, marker) to look for."""
    texts: dict[str, str] = {}
    trees: dict[str, yaml.Node] = {}
    edits: dict[str, dict[str, str]] = {}  # file -> path -> marker
    checks = []
    for line in picked:
        for d in line["data"]:
            text = texts.setdefault(d["file"], (root / d["file"]).read_text())
            node = _node(trees.setdefault(d["file"], _compose(text)), d["path"])
            assert node.start_mark.line + 1 == d["line"], d
            if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str":
                continue
            if re.match(r"(id|traits|sections)\b", d["path"]):
                continue  # names the file or other sources: changing it is another mistake
            marker = edits.setdefault(d["file"], {}).setdefault(d["path"], f"qzd{sum(map(len, edits.values()))}x")
            checks.append((line, marker))
    for file, paths in edits.items():
        text = texts[file]
        spans = []
        for path, marker in paths.items():
            node = _node(trees[file], path)
            old = text[node.start_mark.index : node.end_mark.index]
            new = re.sub(r"(\S+)", rf"\1{marker}", str(yaml.safe_load(old)))
            tail = "\n" if old.endswith("\n") else ""  # a block scalar ends with its line
            spans.append((node.start_mark.index, node.end_mark.index, json.dumps(new, ensure_ascii=False) + tail))
        for start, end, replacement in sorted(spans, reverse=True):
            text = text[:start] + replacement + text[end:]
        (root / file).write_text(text)
    return checks


def test_editing_what_explain_names_changes_that_output_line(corpus_copy: Callable[[], Path]) -> None:
    """For random lines of every shipped agent: a marker appended to the literal text of the
    template line explain names shows on that line (or in the block that template line wrote
    there), and a marker put into each YAML value it names (which starts on the line it says)
    shows on that line too, after a rebuild."""
    root = corpus_copy()
    build(root)
    with explainer(root) as ex:
        picked = _picks(ex, per_agent=12, seed=19)
    template_checks = _mark_templates(root, picked)
    data_checks = _mark_data(root, picked)
    assert len(template_checks) >= 60 and len(data_checks) >= 60, "too few lines to check"
    build(root)
    outputs = {name: data.decode().split("\n") for name, data in read_outputs(root).items()}
    for line, (first, last), marker in template_checks:
        out = outputs[line["output"].split("/")[-1]]
        assert any(marker in text for text in [out[line["line"] - 1], *out[first - 1 : last]]), line
    for line, marker in data_checks:
        new = outputs[line["output"].split("/")[-1]][line["line"] - 1]
        assert marker in new.lower(), (line["output"], line["line"], marker, new)


# -- refusals -------------------------------------------------------------------------------
def test_an_output_edited_by_hand_or_an_agent_that_does_not_build_is_refused(tiny: Path) -> None:
    """Explain maps only what the sources give now: a hand-edited output, a link in its place,
    an agent whose source does not load and one whose render it blocks are refused, saying why."""
    build(tiny)
    out = tiny / "out" / "alpha.md"
    saved = out.read_text()
    out.write_text(saved.replace("First agent.", "Edited by hand."))
    with explainer(tiny) as ex:
        with pytest.raises(ExplainError, match=r"out/alpha.md is not what its sources give now"):
            ex.lines("alpha", 6)
        reverse = ex.template("templates/fragments/list-item.j2", 3)  # the others are still answered
        assert reverse["outputs"] == [{"output": "out/beta.md", "lines": [[7, 7]]}]
        assert [s["output"] for s in reverse["skipped"]] == ["out/alpha.md"]
    outside = tiny.parent / "elsewhere.md"
    outside.write_text(saved)
    out.unlink()
    out.symlink_to(outside)  # never followed: agentd reads nothing outside the workspace
    with explainer(tiny) as ex:
        with pytest.raises(ExplainError, match=r"out/alpha.md is a symbolic link"):
            ex.lines("alpha", 6)
        with pytest.raises(ConfigError, match=r"templates/alpha.md: not in the output folder out/"):
            answer(ex, {"output": "templates/alpha.md", "line": 1})
    out.unlink()
    out.write_text(saved)
    (tiny / "agents" / "beta.yaml").write_text("name: [unclosed\n")
    with explainer(tiny) as ex:
        with pytest.raises(ExplainError, match=r"agent 'beta' does not build now: agents/beta.yaml: malformed"):
            ex.lines("beta", 1)
        with pytest.raises(ExplainError, match=r"agent 'alpha' does not build now: blocked by agents/beta.yaml:1"):
            ex.lines("alpha", 1)
    (tiny / "agents" / "beta.yaml").write_text(TINY["agents/beta.yaml"].replace("        ", ""))
    with explainer(tiny) as ex:
        with pytest.raises(ConfigError, match=r"no line 99; it has lines 1-"):
            answer(ex, {"output": "alpha.md", "line": 99})
        with pytest.raises(ConfigError, match=r"no such output"):
            answer(ex, {"output": "gamma.md", "line": 1})
        with pytest.raises(ConfigError, match=r"line: expected a line number"):
            answer(ex, {"output": "alpha.md", "line": "7"})
    out.unlink()  # never built: what a build would write, said so
    with explainer(tiny) as ex:
        reply = answer(ex, {"output": "out/alpha.md", "line": 6})
    assert reply["lines"][0]["text"] == "First agent."
    assert "does not exist yet" in reply["note"]


# -- the command and the daemon --------------------------------------------------------------
def test_cli_prints_a_person_readable_answer_and_json_lines(tiny: Path) -> None:
    """``agentd explain out/alpha.md:7`` prints the section, steps, template and data; with
    ``--format json`` one object per output line; usage mistakes exit 2 saying what to give."""
    build(tiny)
    human = run_cli("explain", "out/alpha.md:7", "--no-daemon", cwd=tiny)
    assert human.returncode == 0, human.stderr
    assert human.stdout.splitlines() == [
        "out/alpha.md:7  - a1",
        "  section   summary",
        "  via       templates/sections/summary.j2:4     macro bullets  {{ l.bullets(agent.skills) }}",
        "  template  templates/fragments/list-item.j2:3                 - {{ i }}",
        "  data      agents/alpha.yaml:3                 skills[0]      skills: [a1, a2]",
    ]
    js = run_cli("explain", "alpha:6-8", "--format", "json", "--no-daemon", cwd=tiny)
    assert js.returncode == 0, js.stderr
    objects = [orjson.loads(x) for x in js.stdout.splitlines()]
    assert [o["line"] for o in objects] == [6, 7, 8]
    reverse = run_cli("explain", "--template", "templates/fragments/list-item.j2:3", "--no-daemon", cwd=tiny)
    assert reverse.stdout.splitlines()[1:] == ["  out/alpha.md  2 lines: 7-8", "  out/beta.md  1 line: 7"]
    for args, said in [
        (["explain"], "give an output"),
        (["explain", "alpha:0"], "no line 0"),
        (["explain", "--template", "fragments/list-item.j2"], "expected TEMPLATE:LINE"),
    ]:
        bad = run_cli(*args, "--no-daemon", cwd=tiny)
        assert bad.returncode == 2 and said in bad.stderr, (args, bad.stderr)


async def test_the_daemon_answers_from_the_map_of_the_current_output(tiny: Path) -> None:
    """The socket's ``explain`` (a line, and the reverse) gives what the command gives
    in-process, and after an edit under watch that moves lines, the map of the new output."""
    from agentd.control import request, socket_path

    async with run_daemon(tiny) as daemon:
        path = socket_path(Config.load(tiny))
        reply = request(path, "explain", output="alpha.md", line=7, timeout=30)
        reverse = request(path, "explain", template="templates/traits/safety-traits.j2", line=2, timeout=30)
        with explainer(tiny) as ex:
            assert reply["lines"] == orjson.loads(orjson.dumps(ex.lines("alpha", 7)))
            assert reverse == ex.template("templates/traits/safety-traits.j2", 2)
        assert [o["output"] for o in reverse["outputs"]] == ["out/alpha.md", "out/beta.md"]
        again = request(path, "explain", output="alpha.md", line=7, timeout=30)
        assert again == reply
        template = tiny / "templates" / "sections" / "summary.j2"
        template.write_text("{# a new first line #}\n" + template.read_text())
        await daemon.next_build()
        moved = request(path, "explain", output="alpha.md", line=7, timeout=30)
        assert steps(moved["lines"][0]) == [
            ("templates/sections/summary.j2", 5, "macro bullets"),
            ("templates/fragments/list-item.j2", 3, ""),
        ]
        bad = run_cli("explain", "alpha:500", cwd=tiny)
        assert bad.returncode == 2 and "no line 500" in bad.stderr
