"""`agentd check`: one failing fixture per rule, with its exact location and message."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentd.check import RULES, ScanMemory, check_output
from agentd.config import Config
from conftest import REPO, run_cli, run_daemon, set_config


def check(root: Path, *args: str) -> tuple[int, list[dict]]:
    result = run_cli("check", "--format", "json", *args, cwd=root)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, orjson.loads(result.stdout)["findings"]


def where(findings: list[dict], rule: str) -> list[tuple[str, int, int, str]]:
    return [(f["path"], f["line"], f["column"], f["message"]) for f in findings if f["rule"] == rule]


def replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def test_clean_workspace_has_no_findings(tiny: Path) -> None:
    """The fixture workspace is clean: exit 0, nothing reported, nothing written."""
    code, findings = check(tiny)
    assert (code, findings) == (0, [])
    assert not (tiny / "out").exists()


def test_shipped_corpus_is_clean(corpus_copy) -> None:  # type: ignore[no-untyped-def]
    """The shipped workspace passes every gate its agentd.toml sets (schemas, line range)."""
    root = corpus_copy()
    result = run_cli("check", "--strict", cwd=root)
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip() == "agentd check: no findings"


# -- templates ---------------------------------------------------------------------------------


def test_template_syntax(tiny: Path) -> None:
    """A syntax error is reported at its line."""
    replace(tiny / "templates/sections/summary.j2", "{{ agent.description }}", "{{ agent.description }")
    code, findings = check(tiny)
    assert code == 1
    assert where(findings, "template-syntax") == [("templates/sections/summary.j2", 3, 1, "unexpected '}'")]


def test_undeclared_variable_static_and_undefined_at_render(tiny: Path) -> None:
    """A variable outside the documented context is found statically and at render time."""
    replace(tiny / "templates/sections/peers.j2", "{% for peer", "{{ mystery }}\n{% for peer")
    _, findings = check(tiny)
    assert where(findings, "undeclared-variable") == [
        (
            "templates/sections/peers.j2",
            2,
            1,
            "'mystery' is not in the context of sections templates (agent, catalog, section, sections, traits)",
        )
    ]
    undefined = where(findings, "undefined-variable")
    assert ("templates/sections/peers.j2", 2) in {(p, line) for p, line, _, _ in undefined}
    assert any("'mystery' is undefined" in m for *_, m in undefined)


def test_undefined_key_at_render_time(tiny: Path) -> None:
    """StrictUndefined: a missing key of the agent is an error naming the key, reported once
    for every agent whose render met it (the message names no agent)."""
    replace(tiny / "templates/sections/peers.j2", "{{ section.title }}", "{{ section.title }} {{ agent.colour }}")
    _, findings = check(tiny)
    assert where(findings, "undefined-variable") == [
        (
            "templates/sections/peers.j2",
            1,
            1,
            "undefined variable: agent has no key 'colour' (while rendering section 'peers' of agent 'alpha' "
            "(agents/alpha.yaml), and 1 more)",
        ),
    ]


def test_render_error(tiny: Path) -> None:
    """Any other failure of a template expression is a render error at its line."""
    replace(tiny / "templates/sections/traits.j2", "{% for kind", "{{ 1 / 0 }}\n{% for kind")
    _, findings = check(tiny)
    assert [(p, line) for p, line, _, _ in where(findings, "render-error")] == [("templates/sections/traits.j2", 2)]
    assert "ZeroDivisionError: division by zero" in where(findings, "render-error")[0][3]


def test_missing_template(tiny: Path) -> None:
    """An import of a template that does not exist is reported where it is written."""
    replace(tiny / "templates/sections/summary.j2", '"fragments/list-item.j2"', '"fragments/nope.j2"')
    _, findings = check(tiny)
    assert where(findings, "missing-template") == [
        ("templates/sections/summary.j2", 1, 1, "'fragments/nope.j2' does not exist under templates/")
    ]


def test_template_cycle(tiny: Path) -> None:
    """Templates including each other in a cycle are reported once, with the cycle."""
    (tiny / "templates/fragments/a.j2").write_text('x\n{% include "fragments/b.j2" %}\n')
    (tiny / "templates/fragments/b.j2").write_text('{% include "fragments/a.j2" %}\n')
    _, findings = check(tiny)
    assert where(findings, "template-cycle") == [
        ("templates/fragments/a.j2", 2, 1, "cycle: fragments/a.j2 -> fragments/b.j2 -> fragments/a.j2")
    ]


def test_unreachable_template_is_a_warning(tiny: Path) -> None:
    """A template nothing reaches is a warning: exit 0, or 1 with --strict."""
    (tiny / "templates/fragments/orphan.j2").write_text("{% macro x() %}x{% endmacro %}\n")
    code, findings = check(tiny)
    assert code == 0
    assert findings == [
        {
            "path": "templates/fragments/orphan.j2",
            "line": 1,
            "column": 1,
            "severity": "warning",
            "rule": "unreachable-template",
            "message": "nothing includes, imports, extends or renders this template",
        }
    ]
    assert check(tiny, "--strict")[0] == 1


def test_templates_cannot_reach_outside_templates(tiny: Path) -> None:
    """`../` in an include name finds nothing: only files under templates/ load."""
    replace(tiny / "templates/sections/peers.j2", "{% for peer", '{% include "../agents/alpha.yaml" %}\n{% for peer')
    _, findings = check(tiny)
    assert where(findings, "missing-template") == [
        ("templates/sections/peers.j2", 2, 1, "'../agents/alpha.yaml' does not exist under templates/")
    ]


# -- sources -----------------------------------------------------------------------------------


def test_yaml_syntax(tiny: Path) -> None:
    """Malformed YAML is located by line and column: an unclosed "[" where it opens."""
    replace(tiny / "agents/alpha.yaml", "skills: [a1, a2]", "skills: [a1, a2")
    _, findings = check(tiny)
    assert [(p, line) for p, line, _, _ in where(findings, "yaml-syntax")] == [("agents/alpha.yaml", 3)]


def test_unsafe_yaml_tag_is_refused_and_not_run(tiny: Path, tmp_path: Path) -> None:
    """A Python object tag is refused by the safe loader; nothing is executed."""
    marker = tmp_path / "pwned"
    replace(
        tiny / "agents/alpha.yaml",
        "notes: not read by any template",
        f'notes: !!python/object/apply:os.system ["touch {marker}"]',
    )
    _, findings = check(tiny)
    (path, line, col, message) = where(findings, "yaml-tag")[0]
    assert (path, line, col) == ("agents/alpha.yaml", 4, 8)
    assert "could not determine a constructor for the tag" in message
    assert not marker.exists()
    assert run_cli("build", cwd=tiny).returncode == 1 and not marker.exists()


def test_duplicate_key(tiny: Path) -> None:
    """PyYAML silently keeps the last duplicate key: check reports it."""
    replace(tiny / "agents/beta.yaml", "skills: [b1]", "skills: [b1]\nname: Beta Again")
    _, findings = check(tiny)
    assert where(findings, "duplicate-key") == [
        ("agents/beta.yaml", 4, 1, "duplicate key 'name' (first on line 1); YAML keeps only the last one")
    ]


def run_checker(root: Path) -> list[tuple[str, int, int, str, str]]:
    """``agentd check`` in-process: (path, line, column, rule, message) of each finding."""
    from agentd.check import Checker

    return [(f.path, f.line, f.column, f.rule, f.message) for f in Checker(Config.load(root)).run()]


def test_yaml_alias(tiny: Path) -> None:
    """Aliases that expand a source past the budget are refused at the first alias of the
    collection that crosses it, before any walk of the value could expand them."""
    levels = "abcdef"  # 10^6 values
    lines = ["a: &a [" + ",".join(["1"] * 10) + "]"]
    lines += [f"{n}: &{n} [" + ",".join([f"*{p}"] * 10) + "]" for p, n in zip(levels, levels[1:], strict=False)]
    (tiny / "agents/bomb.yaml").write_text("\n".join(lines) + "\n")
    [(path, line, column, message)] = [(p, ln, c, m) for p, ln, c, r, m in run_checker(tiny) if r == "yaml-alias"]
    assert (path, line, column) == ("agents/bomb.yaml", 5, 8)
    assert message.startswith("aliases expand this document past 100,000 values")


def test_unreadable_source(tiny: Path, tmp_path: Path) -> None:
    """A link out of templates/ and agents/ is reported, and nothing of its target is read."""
    secret = tmp_path / "secret.yaml"
    secret.write_text("name: agentd-test-secret\n")
    (tiny / "agents/traits/safety/leak.yaml").symlink_to(secret)
    findings = run_checker(tiny)
    assert "agentd-test-secret" not in repr(findings)
    message = f"a symbolic link to the file {secret}, outside templates/ and agents/; agentd reads nothing outside them"
    assert [f for f in findings if f[3] == "unreadable-source"] == [
        ("agents/traits/safety/leak.yaml", 1, 1, "unreadable-source", message)
    ]


def test_schema_violations(tiny: Path) -> None:
    """Wrong values, wrong types, missing and unknown keys are each located with a key path."""
    replace(tiny / "agents/alpha.yaml", "skills: [a1, a2]", "skills: [a1, 2]\nlevel: guru\ncolour: red")
    replace(tiny / "agents/beta.yaml", "description: Second agent.\n", "")
    _, findings = check(tiny)
    assert where(findings, "schema") == [
        ("agents/alpha.yaml", 3, 14, "skills[1]: expected a string, got an integer"),
        ("agents/alpha.yaml", 4, 8, "level: expected one of beginner|intermediate|expert, got 'guru'"),
        (
            "agents/alpha.yaml",
            5,
            1,
            "(top level): unknown key 'colour'; expected one of: id, name, description, skills, notes, motto, level, "
            "sections, traits",
        ),
        ("agents/beta.yaml", 1, 1, "(top level): missing required key 'description'"),
    ]


def test_without_a_schema_only_what_agentd_interprets_is_checked(tiny: Path) -> None:
    """With no schema configured, keys agentd does not read are the templates' business, while
    its own (`id`, `sections`) are still checked, at their line."""
    replace(tiny / "agentd.toml", 'agent_schema = "schemas/agent.json"', "")
    replace(tiny / "agents/alpha.yaml", "skills: [a1, a2]", "skills: [a1, 2]\ncolour: red")
    replace(tiny / "agents/beta.yaml", "skills: [b1]", "skills: [b1]\nid: gamma")
    replace(tiny / "agents/alpha.yaml", "sections: [summary, peers, traits, shared]", "sections: summary")
    code, findings = check(tiny)
    assert code == 1
    assert [(f["path"], f["line"], f["rule"], f["message"]) for f in findings if f["severity"] == "error"] == [
        ("agents/alpha.yaml", 6, "schema", "sections: expected a list of section names"),
        ("agents/beta.yaml", 4, "schema", "id 'gamma' does not match the file name; expected 'beta'"),
    ]


@pytest.mark.parametrize(
    ("setting", "make", "expected"),
    [
        ("../outside.json", None, "agentd.toml [check] agent_schema = '../outside.json': "),
        ("linked.json", "link", "agentd.toml [check] agent_schema = 'linked.json': a symbolic link to "),
        ("missing.json", None, "missing.json: no such file (named by agentd.toml [check] agent_schema)"),
        ("broken.json", '{"type": ', "broken.json: not JSON: Expecting value: line 2 column 1"),
    ],
    ids=["dot-dot", "link-out", "missing", "not-json"],
)
def test_a_schema_setting_names_a_json_file_inside_the_workspace(
    tiny: Path, tmp_path: Path, setting: str, make: str | None, expected: str
) -> None:
    """A schema path out of the workspace (`..`, a link: never opened), a missing file or one
    that is not JSON is a usage error naming the setting or the file."""
    outside = tmp_path / "outside.json"
    outside.write_text('{"type": "object"}\n')
    if make == "link":
        (tiny / setting).symlink_to(outside)
    elif make is not None:
        (tiny / setting).write_text(make + "\n")
    replace(tiny / "agentd.toml", 'agent_schema = "schemas/agent.json"', f"agent_schema = {setting!r}")
    result = run_cli("check", cwd=tiny)
    assert result.returncode == 2
    assert result.stderr.startswith(f"agentd: error: {expected}"), result.stderr


def test_unknown_section_and_trait(tiny: Path) -> None:
    """References to sections and traits that do not exist point at the list item."""
    replace(tiny / "agents/alpha.yaml", "sections: [summary, peers, traits, shared]", "sections: [summary, peer]")
    replace(tiny / "agents/beta.yaml", "safety: [careful]", "safety: [careful, reckless]")
    _, findings = check(tiny)
    assert where(findings, "unknown-section") == [
        (
            "agents/alpha.yaml",
            5,
            21,
            "sections[1]: no template sections/peer.j2; expected one of: peers, shared, summary, traits",
        )
    ]
    assert where(findings, "unknown-trait") == [
        ("agents/beta.yaml", 6, 21, "traits.safety[1]: no trait 'reckless'; expected one of: careful")
    ]


def test_required_section(tiny: Path) -> None:
    """[check] required_sections: every agent must enable them."""
    replace(tiny / "agentd.toml", "[check]", '[check]\nrequired_sections = ["traits"]')
    _, findings = check(tiny)
    assert where(findings, "required-section") == [
        ("agents/beta.yaml", 4, 11, "sections: 'traits' is required by [check] required_sections but not enabled")
    ]


def test_yml_sources_count_and_two_sources_for_one_name_are_an_error(tiny: Path) -> None:
    """`.yml` agents and traits are read like `.yaml` ones; a trait (or agent) that has both is
    an error naming the two files, in `check` and in `build`."""
    (tiny / "agents/gamma.yml").write_text(
        "name: Gamma\ndescription: Third.\nskills: [g1]\nsections: [traits]\ntraits:\n  safety: [bold]\n"
    )
    (tiny / "agents/traits/safety/bold.yml").write_text("name: Bold\nrule: Leap when sure.\n")
    assert run_cli("build", cwd=tiny).returncode == 0
    assert "### Bold\nLeap when sure.\n" in (tiny / "out/gamma.md").read_text()
    (tiny / "agents/traits/safety/careful.yml").write_text("name: Also careful\nrule: Look twice.\n")
    message = (
        "two sources for trait 'safety/careful': agents/traits/safety/careful.yaml and "
        "agents/traits/safety/careful.yml (.yaml and .yml are both read); keep one of them"
    )
    _, findings = check(tiny)
    assert [(f["path"], f["rule"], f["message"]) for f in findings if f["severity"] == "error"] == [
        ("agents/traits/safety/careful.yaml", "duplicate-source", message)
    ]
    build = run_cli("build", cwd=tiny)
    assert build.returncode == 1 and f"agents/traits/safety/careful.yaml: {message}\n" in build.stderr


# -- outputs -----------------------------------------------------------------------------------


def test_line_count(tiny: Path) -> None:
    """An output outside the configured range is reported (range from agentd.toml)."""
    replace(tiny / "agentd.toml", "min_lines = 1", "min_lines = 1\nmax_lines = 12")
    _, findings = check(tiny)
    assert where(findings, "line-count") == [
        ("out/alpha.md", 23, 1, "23 lines; expected between 1 and 12"),
        ("out/beta.md", 18, 1, "18 lines; expected between 1 and 12"),
    ]


def test_front_matter(tiny: Path) -> None:
    """Front matter must parse and carry the configured keys."""
    replace(tiny / "agentd.toml", 'front_matter = ["name"]', 'front_matter = ["name", "model"]')
    _, findings = check(tiny)
    assert where(findings, "front-matter") == [
        ("out/alpha.md", 3, 1, "front matter lacks 'model'"),
        ("out/beta.md", 3, 1, "front matter lacks 'model'"),
    ]


def test_front_matter_is_optional_unless_keys_are_required(tiny: Path) -> None:
    """With no front matter keys configured, an output may have none; one that is there must
    still parse."""
    replace(tiny / "agentd.toml", 'front_matter = ["name"]', "")
    (tiny / "templates/base/header.j2").write_text("")
    assert check(tiny) == (0, [])
    (tiny / "templates/base/header.j2").write_text("---\nname: [{{ agent.id }}\n---\n")
    _, findings = check(tiny)
    assert [(p, line, m.split(":")[0]) for p, line, _, m in where(findings, "front-matter")] == [
        ("out/alpha.md", 3, "front matter does not parse"),
        ("out/beta.md", 3, "front matter does not parse"),
    ]


def test_section_order(tiny: Path) -> None:
    """Every enabled section must appear, in order."""
    replace(tiny / "templates/base/agent-base.j2", "{% for s in sections %}", "{% for s in sections|reverse %}")
    _, findings = check(tiny)
    assert [(line, m) for p, line, _, m in where(findings, "section-order") if p == "out/alpha.md"] == [
        (5, "section 'shared' ('## 4. Shared') is out of order"),
        (10, "section 'traits' ('## 3. Traits') is out of order"),
        (14, "section 'peers' ('## 2. Peers') is out of order"),
    ]


FOOTERS = {
    "unbalanced-fence": ("```text\nnever closed\n", ("out/alpha.md", 23, 1, "code fence ``` is never closed")),
    "heading-skip": ("###### Too deep\n", ("out/alpha.md", 23, 1, "heading level 6 follows level 3")),
    "table-columns": (
        "| a | b |\n| --- | --- |\n| 1 |\n",
        ("out/alpha.md", 25, 1, "table row has 1 columns; its header has 2"),
    ),
    "broken-anchor": (
        "See [there](#nowhere).\n",
        ("out/alpha.md", 23, 11, "link to #nowhere, but no heading has that anchor"),
    ),
    "template-leak": (
        'Oops {{ "{{" }} name }}\n',
        ("out/alpha.md", 23, 6, "{{ outside a code block: unrendered template syntax?"),
    ),
}


@pytest.mark.parametrize("rule", sorted(FOOTERS))
def test_markdown_structure(tiny: Path, rule: str) -> None:
    """Each Markdown gate fires at the exact line of the offending output."""
    footer, expected = FOOTERS[rule]
    (tiny / "templates/base/footer.j2").write_text(footer)
    _, findings = check(tiny)
    assert where(findings, rule)[0] == expected


def test_template_syntax_in_code_is_legitimate(tiny: Path) -> None:
    """{{ in fenced code and inline code is real content (Helm, Ansible), not a leak."""
    (tiny / "templates/base/footer.j2").write_text(
        "{% raw %}Use `{{ .Values.image }}` here.\n\n```yaml\nimage: {{ .Values.image }}\n{% if x %}\n```\n{% endraw %}"
    )
    assert check(tiny) == (0, [])


def test_disabled_rules(tiny: Path) -> None:
    """A rule listed under [check] disable is not reported."""
    (tiny / "templates/base/footer.j2").write_text("See [there](#nowhere).\n")
    replace(tiny / "agentd.toml", "[check]", '[check]\ndisable = ["broken-anchor"]')
    assert check(tiny) == (0, [])


def test_json_output_is_stable(tiny: Path) -> None:
    """The JSON report has a fixed shape and order."""
    (tiny / "templates/fragments/orphan.j2").write_text("x\n")
    replace(tiny / "agents/alpha.yaml", "skills: [a1, a2]", "skills: [a1, a2]\nlevel: guru")
    result = run_cli("check", "--format", "json", cwd=tiny)
    assert result.returncode == 1
    assert orjson.loads(result.stdout) == {
        "findings": [
            {"path": "agents/alpha.yaml", "line": 4, "column": 8, "severity": "error", "rule": "schema",
             "message": "level: expected one of beginner|intermediate|expert, got 'guru'"},
            {"path": "templates/fragments/orphan.j2", "line": 1, "column": 1, "severity": "warning",
             "rule": "unreachable-template", "message": "nothing includes, imports, extends or renders this template"},
        ],
        "summary": {"errors": 1, "warnings": 1, "files": 2},
    }  # fmt: skip
    assert result.stdout == run_cli("check", "--format", "json", cwd=tiny).stdout


def test_text_output_groups_by_file(tiny: Path) -> None:
    """Text output: a header per file, one path:line:col line per finding, a summary."""
    replace(tiny / "agents/alpha.yaml", "skills: [a1, a2]", "skills: [a1, a2]\nlevel: guru")
    result = run_cli("check", cwd=tiny)
    assert result.returncode == 1
    assert result.stdout == (
        "agents/alpha.yaml\n"
        "  agents/alpha.yaml:4:8: error [schema] level: expected one of beginner|intermediate|expert, got 'guru'\n"
        "\n1 error(s), 0 warning(s) in 1 file(s)\n"
    )


def test_every_rule_has_a_fixture() -> None:
    """Each rule id is exercised by a test in this file."""
    source = Path(__file__).read_text()
    assert [r for r in RULES if f'"{r}"' not in source] == []


def test_usage_error_exits_2(tiny: Path) -> None:
    """A bad flag exits 2."""
    assert run_cli("check", "--format", "xml", cwd=tiny).returncode == 2


async def test_daemon_runs_output_gates(tiny: Path) -> None:
    """The daemon checks every agent it recomposes: findings reach the log line and the socket."""
    import asyncio

    async with run_daemon(tiny) as d:
        (tiny / "templates/base/footer.j2").write_text("See [there](#nowhere).\n")
        build = await d.next_build()
        assert build["findings"] == [
            "out/alpha.md:23:11: error [broken-anchor] link to #nowhere, but no heading has that anchor",
            "out/beta.md:18:11: error [broken-anchor] link to #nowhere, but no heading has that anchor",
        ]
        status = await asyncio.to_thread(run_cli, "status", "--json", cwd=tiny)
        assert status.returncode == 1
        errors = orjson.loads(status.stdout)["errors"]
        assert {(e["location"], e["rule"]) for e in errors} == {
            ("out/alpha.md:23", "broken-anchor"),
            ("out/beta.md:18", "broken-anchor"),
        }
        (tiny / "templates/base/footer.j2").write_text("-- end --\n")
        build = await d.next_build()
        assert build["findings"] == []
        status = await asyncio.to_thread(run_cli, "status", "--json", cwd=tiny)
        assert status.returncode == 0


def test_config_check_table_is_validated(tiny: Path) -> None:
    """A bad [check] value is a usage error naming it."""
    set_config(tiny, "")
    replace(tiny / "agentd.toml", "min_lines = 1", 'min_lines = "many"')
    result = run_cli("check", cwd=tiny)
    assert result.returncode == 2 and "check_min_lines" in result.stderr


#: Lines that open, close or break what the output gates track, in any order.
_MARKDOWN_LINES = st.sampled_from(
    [
        "## 1. Alpha", "## 2. Beta", "## 2. Beta", "### Deep", "#### Deeper", "# Top", "##not a heading",
        "```", "```python", "~~~", "    ```", "| a | b |", "| a | b | c |", "|---|---|",
        "see [x](#alpha)", "see [y](#1-alpha)", "go [z](#missing)", "see [b](#2-beta-1)",
        "{{ leak }}", "`{{ in code }}`", "{% if %}", "plain", "", "---", "name: x",
        "carriage\rreturn", "line\u2028separator", "caf\u00e9",
    ]
)  # fmt: skip
_DOCUMENTS = st.lists(_MARKDOWN_LINES, max_size=50).map("\n".join)
_METAS = [{"id": "alpha", "number": 1, "title": "Alpha"}, {"id": "beta", "number": 2, "title": "Beta"}]


@settings(max_examples=400, deadline=None)
@given(front=st.booleans(), body=_DOCUMENTS, prefix=_DOCUMENTS, newline=st.booleans())
def test_remembered_scans_find_what_a_full_scan_finds(front: bool, body: str, prefix: str, newline: bool) -> None:
    """The daemon's output gates remember the sections they scanned. On any output (fences,
    tables or front matter across sections, other line breaks), seen first, again, and after
    an edit before it that changes what its sections start in, they find exactly what
    scanning it whole finds."""
    config = Config.load(REPO)
    memory = ScanMemory()
    head = "---\nname: x\ndescription: y\n---\n" if front else ""
    for text in (head + body, head + body, head + prefix + "\n" + body):
        data = (text + "\n" * newline).encode()
        whole = check_output("out/x.md", data, _METAS, config)
        assert check_output("out/x.md", data, _METAS, config, memory) == whole
