"""Render errors a template author can act on: each names the file and line of the mistake, in
words about templates (not Python's), and is reported once however many renders meet it."""

from __future__ import annotations

from pathlib import Path

from agentd.build import Engine
from agentd.config import Config
from agentd.exceptions import AgentdError, DataError, SourceError
from conftest import TINY, write_files


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
    error = only_error(build_errors(tiny, {"agents/alpha.yaml": source}))
    assert isinstance(error, DataError)
    assert (error.path, error.line, error.column) == ("agents/alpha.yaml", 2, 17)
    assert "not UTF-8 text: byte 0xe9 at line 2, column 17" in error.message
    assert error.source_line == "description: Caf\ufffd agent."
