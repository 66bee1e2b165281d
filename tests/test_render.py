"""Render errors a template author can act on: each names the file and line of the mistake, in
words about templates (not Python's), and is reported once however many renders meet it."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentd.build import Engine
from agentd.config import Config
from agentd.exceptions import AgentdError, BlockedError, DataError, SourceError, TemplateError
from conftest import TINY, run_cli, write_files


def build_errors(root: Path, files: dict[str, str | bytes] | None = None) -> list[AgentdError]:
    """The errors of a clean build of ``root`` after writing ``files`` (text or raw bytes)."""
    for rel, content in (files or {}).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            write_files(root, {rel: content})
    return Engine(Config.load(root), jobs=1).build(write=False).errors


def only_error(errors: list[AgentdError]) -> SourceError:
    """The one error of a build: a mistake is reported once, not once per render meeting it."""
    assert len(errors) == 1, "\n\n".join(map(str, errors))
    error = errors[0]
    assert isinstance(error, SourceError)
    return error


#: A section frame like the shipped ``_section.j2``: sections extend it, so a render's stack
#: holds each section template twice (its root, then its block inside the frame's root).
FRAMED = {
    "templates/sections/_frame.j2": "## {{ section.title }}\n{% block body %}{% endblock %}\n",
    "templates/sections/peers.j2": """\
        {% extends "sections/_frame.j2" %}
        {% import "fragments/list-item.j2" as l %}
        {% block body %}
        {% include "fragments/a.j2" %}
        {% endblock %}
        """,
    "templates/sections/summary.j2": """\
        {% extends "sections/_frame.j2" %}
        {% block body %}
        {% include "fragments/b.j2" %}
        {% endblock %}
        """,
}


def test_include_cycle_names_the_chain_once_at_its_include(tiny: Path) -> None:
    """Templates including each other: "include cycle" with the chain, at the include in the
    cycle's first template, once whichever template a section enters the cycle by."""
    error = only_error(
        build_errors(
            tiny,
            {
                **FRAMED,
                "templates/fragments/a.j2": 'a\n{% include "fragments/b.j2" %}\n',
                "templates/fragments/b.j2": 'b\n\n{% include "fragments/a.j2" %}\n',
            },
        )
    )
    assert isinstance(error, TemplateError)
    assert (error.path, error.line) == ("templates/fragments/a.j2", 2)
    assert error.message.endswith("include cycle: fragments/a.j2 -> fragments/b.j2 -> fragments/a.j2")
    assert error.__context__ is None  # holds none of the failed render's frames


def test_self_including_partial_blames_its_own_include(tiny: Path) -> None:
    """A partial that includes itself (behind a condition that never stops it) is an include
    cycle at the partial's include line, found by include depth, not Python's recursion limit."""
    error = only_error(
        build_errors(
            tiny,
            {
                **FRAMED,
                "templates/fragments/a.j2": '{% include "sections/_part.j2" %}\n',
                "templates/fragments/b.j2": '{% include "sections/_part.j2" %}\n',
                "templates/sections/_part.j2": 'x\n{% if agent %}\n{% include "sections/_part.j2" %}\n{% endif %}\n',
            },
        )
    )
    assert (error.path, error.line) == ("templates/sections/_part.j2", 3)
    assert error.message.endswith("include cycle: sections/_part.j2 includes itself")
    assert error.source_line == '{% include "sections/_part.j2" %}'


def test_includes_nested_too_deep_say_so(tiny: Path) -> None:
    """A chain of includes that never repeats but goes on past the limit is "nested too deep",
    at the include that went past it, not an include cycle."""
    chain = {f"templates/fragments/d{i}.j2": f'{{% include "fragments/d{i + 1}.j2" %}}\n' for i in range(110)}
    error = only_error(
        build_errors(
            tiny,
            {
                **chain,
                "templates/fragments/d110.j2": "end\n",
                "templates/sections/peers.j2": '{% include "fragments/d0.j2" %}\n',
            },
        )
    )
    assert (error.path, error.line) == ("templates/fragments/d99.j2", 1)
    assert "includes nested more than 100 deep: fragments/d0.j2 -> fragments/d1.j2 -> ..." in error.message
    assert "cycle" not in error.message


def test_infinite_macro_recursion_names_the_macro(tiny: Path) -> None:
    """A macro that calls itself without end is named with its file:line and reported at the
    recursive call, once for every section that calls it (not "include cycle" at an import)."""
    error = only_error(
        build_errors(
            tiny,
            {
                **FRAMED,
                "templates/fragments/a.j2": "{{ l.bullets(agent.skills) }}\n",
                "templates/fragments/b.j2": "",
                "templates/sections/summary.j2": """\
                    {% extends "sections/_frame.j2" %}
                    {% import "fragments/list-item.j2" as l %}
                    {% block body %}
                    {{ l.bullets(agent.skills) }}
                    {% endblock %}
                    """,
                "templates/fragments/list-item.j2": """\
                    {% macro bullets(items) -%}
                    {% for i in items %}
                    - {{ i }}
                    {% endfor %}
                    {{ bullets(items) }}
                    {%- endmacro %}
                    """,
            },
        )
    )
    assert (error.path, error.line) == ("templates/fragments/list-item.j2", 5)
    assert error.message.endswith(
        "macro 'bullets' (defined at templates/fragments/list-item.j2:1) calls itself without end"
    )
    assert error.__context__ is None


def test_macros_calling_each_other_name_both(tiny: Path) -> None:
    """Two macros calling each other without end: both named, with where each is defined."""
    error = only_error(
        build_errors(
            tiny,
            {
                "templates/fragments/list-item.j2": """\
                    {% macro bullets(items) -%}
                    {{ other(items) }}
                    {%- endmacro %}
                    {% macro other(items) -%}
                    {{ bullets(items) }}
                    {%- endmacro %}
                    """
            },
        )
    )
    assert (error.path, error.line) == ("templates/fragments/list-item.j2", 2)
    assert "macros call each other without end: 'bullets' (defined at templates/fragments/list-item.j2:1)" in (
        error.message
    )
    assert "-> 'other' (defined at templates/fragments/list-item.j2:4) -> 'bullets'" in error.message


@pytest.mark.parametrize(
    ("files", "path", "line", "words"),
    [
        pytest.param(
            {
                "templates/traits/safety-traits.j2": "### {{ trait.name }}\n"
                '{{ include_cached("traits/safety-traits.j2", trait=trait) }}\n'
            },
            "templates/traits/safety-traits.j2",
            2,
            "include cycle: traits/safety-traits.j2 includes itself",
            id="include_cached",
        ),
        pytest.param(
            {
                "templates/fragments/e1.j2": '{% extends "fragments/e2.j2" %}\n',
                "templates/fragments/e2.j2": 'x\n{% extends "fragments/e1.j2" %}\n',
                "templates/sections/peers.j2": '{% include "fragments/e2.j2" %}\n',
            },
            "templates/fragments/e1.j2",
            1,
            "include cycle: fragments/e1.j2 -> fragments/e2.j2 -> fragments/e1.j2",
            id="extends",
        ),
    ],
)
def test_cycles_past_python_recursion_limit_name_the_templates(
    tiny: Path, files: dict[str, str], path: str, line: int, words: str
) -> None:
    """Cycles only Python's recursion limit stops (through ``include_cached``, ``extends``) are
    named from the compiled frames: the templates of the cycle, at the first one's statement."""
    error = only_error(build_errors(tiny, files))  # type: ignore[arg-type]
    assert (error.path, error.line) == (path, line)
    assert error.message.endswith(words)


def test_expression_nested_too_deep_to_parse_is_an_error(tiny: Path) -> None:
    """An expression nested past Jinja's parser's depth is an error of its template and line,
    not a crash of the build."""
    deep = "(" * 400 + "1" + ")" * 400
    error = only_error(build_errors(tiny, {"templates/sections/peers.j2": f"## x\n{{{{ {deep} }}}}\n"}))
    assert (error.path, error.line) == ("templates/sections/peers.j2", 2)
    assert "nested too deeply for Jinja to parse" in error.message


@pytest.mark.parametrize(
    ("text", "opener", "closer"),
    [
        ("{% for peer in catalog if peer.id != agent.id\n- {{ peer.name }}\n{% endfor %}\nmore\n", "{%", "%}"),
        ("{% for peer in catalog\n### {{ peer.name }}\n{% endfor %}\n", "{%", "%}"),
        ("{{ agent.name\nmore\ntext {{ agent.id }}\n", "{{", "}}"),
    ],
    ids=["parser-error", "lexer-error", "variable"],
)
def test_unclosed_tag_is_reported_where_it_opens(tiny: Path, text: str, opener: str, closer: str) -> None:
    """A tag missing its closing ``%}`` / ``}}`` is reported at the line it opens on, not at the
    later line where Jinja gave up reading it."""
    error = only_error(build_errors(tiny, {"templates/sections/peers.j2": "## {{ section.title }}\n" + text}))
    assert (error.path, error.line) == ("templates/sections/peers.j2", 2)
    assert f"{opener!r} on line 2 has no closing {closer!r} (at line 3: " in error.message
    assert " at 2" not in error.message.split("(at line 3:")[1]  # no character offset
    assert error.source_line == text.splitlines()[0]


def test_non_utf8_section_template_is_one_error_at_its_line(tiny: Path) -> None:
    """A section template that is not UTF-8 is one error at the line and column of the bad
    byte; agents listing the section are blocked by it (last good output kept), not told the
    section is unknown."""
    engine = Engine(Config.load(tiny), jobs=1)
    assert engine.build().ok
    before = {p.name: p.read_bytes() for p in (tiny / "out").glob("*.md")}
    peers = tiny / "templates/sections/peers.j2"
    peers.write_bytes(b"## {{ section.title }}\nok\nbad \xe9 here\n")
    report = engine.build([peers])
    error = only_error(report.errors)
    assert (error.path, error.line, error.column) == ("templates/sections/peers.j2", 3, 5)
    assert "not UTF-8 text: byte 0xe9 at line 3, column 5" in error.message
    assert "unknown section" not in str(report.errors)
    assert {p.name: p.read_bytes() for p in (tiny / "out").glob("*.md")} == before
    assert sorted(engine.agent_errors) == ["alpha", "beta"]
    write_files(tiny, {"templates/sections/peers.j2": TINY["templates/sections/peers.j2"]})
    assert engine.build([peers]).ok


def test_non_utf8_yaml_reports_line_and_column(tiny: Path) -> None:
    """An agent source that is not UTF-8 is an error at the line and column of the bad byte."""
    source = (tiny / "agents/alpha.yaml").read_bytes().replace(b"First agent.", b"Caf\xe9 agent.")
    errors = build_errors(tiny, {"agents/alpha.yaml": source})
    # beta lists its peers: it waits for alpha (item 6), reported once beside alpha's own error
    blocked = [e for e in errors if isinstance(e, BlockedError)]
    assert [e.location for e in blocked] == ["agents/alpha.yaml:2"]
    error = only_error([e for e in errors if e not in blocked])
    assert isinstance(error, DataError)
    assert (error.path, error.line, error.column) == ("agents/alpha.yaml", 2, 17)
    assert "not UTF-8 text: byte 0xe9 at line 2, column 17" in error.message
    assert error.source_line == "description: Caf\ufffd agent."


def test_missing_macro_names_the_template_and_its_macros(tiny: Path) -> None:
    """Calling a macro an imported template does not define (renamed) names that template and
    the macros it does define, at the calling line, once."""
    renamed = TINY["templates/fragments/list-item.j2"].replace("bullets", "bullet")
    error = only_error(build_errors(tiny, {"templates/fragments/list-item.j2": renamed}))
    assert (error.path, error.line) == ("templates/sections/summary.j2", 4)
    assert error.message.endswith("fragments/list-item.j2 has no macro 'bullets' (it defines: bullet)")
    assert "TemplateModule" not in error.message


def test_missing_include_in_a_shared_frame_is_printed_once(tiny: Path) -> None:
    """A missing include in the frame every section extends is printed once by ``agentd
    build``, naming the agents whose renders met it, not once per section of each agent."""
    write_files(tiny, FRAMED)
    write_files(
        tiny,
        {
            "templates/sections/_frame.j2": '## {{ section.title }}\n{% include "fragments/nope.j2" %}\n'
            "{% block body %}{% endblock %}\n",
            "templates/fragments/a.j2": "",
            "templates/fragments/b.j2": "",
        },
    )
    result = run_cli("build", cwd=tiny)
    assert result.returncode == 1
    assert result.stderr.count("template 'fragments/nope.j2' not found") == 1, result.stderr
    assert "templates/sections/_frame.j2:2:13: template 'fragments/nope.j2' not found" in result.stderr
    assert "(in 2 agents: alpha, beta)" in result.stderr
