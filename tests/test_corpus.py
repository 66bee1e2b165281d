"""The shipped corpus stays within its contract, so a template change cannot silently break it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from agentd.build import Engine
from agentd.config import Config
from conftest import REPO

MIN_LINES, MAX_LINES = 6000, 11000
SOURCES = sorted((REPO / "agents").glob("*.yaml"))


@pytest.fixture(scope="module")
def built(corpus_copy: Callable[[], Path]) -> Path:
    root = corpus_copy()
    report = Engine(Config.load(root)).build()
    assert report.ok, "\n".join(map(str, report.errors))
    return root


def test_at_least_eight_agents_of_distinct_domains() -> None:
    """The corpus has 8+ agents, each in its own domain."""
    domains = [yaml.safe_load(p.read_text())["domain"] for p in SOURCES]
    assert len(SOURCES) >= 8 and len(set(domains)) == len(domains)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_source_size(source: Path) -> None:
    """Each agent source is 350-700 lines."""
    assert 350 <= len(source.read_text().splitlines()) <= 700


def test_trait_library_is_shared() -> None:
    """Each trait kind has 3+ traits and every trait is used by several agents."""
    uses: Counter[str] = Counter()
    for source in SOURCES:
        for kind, ids in yaml.safe_load(source.read_text())["traits"].items():
            uses.update(f"{kind}/{i}" for i in ids)
    for kind in ("coordination", "tools", "safety", "enhancement"):
        traits = sorted((REPO / "agents/traits" / kind).glob("*.yaml"))
        assert len(traits) >= 3, kind
        for t in traits:
            assert uses[f"{kind}/{t.stem}"] >= 2, f"{kind}/{t.stem} is used by fewer than 2 agents"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_output_bounds(built: Path, source: Path) -> None:
    """Each output is 6,000-11,000 lines, opens with parseable front matter carrying name,
    description, tools and model, and at least 60 % of its non-blank lines are distinct."""
    text = (built / "out" / f"{source.stem}.md").read_text()
    lines = text.splitlines()
    assert MIN_LINES <= len(lines) <= MAX_LINES, len(lines)
    assert lines[0] == "---"
    end = lines.index("---", 1)
    front = yaml.safe_load("\n".join(lines[1:end]))
    assert front["name"] == source.stem
    assert front["description"] and front["model"] in ("opus", "sonnet", "haiku")
    assert isinstance(front["tools"], list) and front["tools"]
    non_blank = [line for line in lines if line.strip()]
    assert len(set(non_blank)) / len(non_blank) >= 0.60


def test_every_section_present_in_order(built: Path) -> None:
    """Every output carries the nine sections, numbered in the order agentd.toml declares."""
    for source in SOURCES:
        headings = [
            line for line in (built / "out" / f"{source.stem}.md").read_text().splitlines() if line.startswith("## ")
        ]
        numbered = [h for h in headings if h[3].isdigit()]
        assert [h.split(". ", 1)[1] for h in numbered] == [
            "Core Responsibilities",
            "Expertise Areas",
            "Technology Stack",
            "Implementation Patterns",
            "Professional Standards",
            "Integration Guidelines",
            "Performance Benchmarks",
            "Troubleshooting",
            "Tool Configurations",
        ]


def test_the_workspace_declares_its_contract(tmp_path: Path) -> None:
    """The corpus's section order, line range, front matter keys and schemas come from its own
    agentd.toml: a workspace without one gets none of them."""
    config = Config.load(REPO, environ={})
    assert config.sections[:2] == ("core-responsibilities", "expertise-areas") and len(config.sections) == 9
    assert (config.check_min_lines, config.check_max_lines) == (MIN_LINES, MAX_LINES)
    assert config.check_front_matter == ("name", "description", "tools", "model")
    assert (config.check_agent_schema, config.check_trait_schema) == ("schemas/agent.json", "schemas/trait.json")
    bare = Config.load(tmp_path, environ={})
    assert (bare.sections, bare.check_min_lines, bare.check_max_lines, bare.check_front_matter) == ((), 0, 0, ())
    assert (bare.check_agent_schema, bare.check_trait_schema) == ("", "")
