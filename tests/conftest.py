"""Shared fixtures: a tiny hand-written workspace (exact assertions) and a copy of the shipped
corpus (realistic sizes)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

TINY: dict[str, str] = {
    "templates/base/agent-base.j2": """\
        {% include "base/header.j2" %}
        # {{ agent.name }}
        {% for s in sections %}
        {{ s.content }}
        {% endfor %}
        {% include "base/footer.j2" %}
        """,
    "templates/base/header.j2": """\
        ---
        name: {{ agent.id|yaml_str }}
        ---
        """,
    "templates/base/footer.j2": "-- end of {{ agent.id }} --\n",
    "templates/fragments/list-item.j2": """\
        {% macro bullets(items) -%}
        {% for i in items %}
        - {{ i }}
        {% endfor %}
        {%- endmacro %}
        """,
    "templates/sections/summary.j2": """\
        {% import "fragments/list-item.j2" as l %}
        ## {{ section.number }}. {{ section.title }}
        {{ agent.description }}
        {{ l.bullets(agent.skills) }}
        """,
    "templates/sections/peers.j2": """\
        ## {{ section.number }}. {{ section.title }}
        {% for peer in catalog if peer.id != agent.id %}
        - {{ peer.name }}
        {% endfor %}
        """,
    "templates/sections/traits.j2": """\
        ## {{ section.number }}. {{ section.title }}
        {% for kind, items in traits.items() %}
        {% for trait in items %}
        {% include "traits/" ~ kind ~ "-traits.j2" %}
        {% endfor %}
        {% endfor %}
        """,
    "templates/sections/shared.j2": """\
        ## {{ section.number }}. {{ section.title }}
        {% for trait in traits.safety %}
        {{ include_cached("traits/safety-traits.j2", trait=trait) }}
        {% endfor %}
        """,
    "templates/traits/safety-traits.j2": "### {{ trait.name }}\n{{ trait.rule }}\n",
    "agents/alpha.yaml": """\
        name: Alpha
        description: First agent.
        skills: [a1, a2]
        notes: not read by any template
        sections: [summary, peers, traits, shared]
        traits:
          safety: [careful]
        """,
    "agents/beta.yaml": """\
        name: Beta
        description: Second agent.
        skills: [b1]
        sections: [summary, peers, shared]
        traits:
          safety: [careful]
        """,
    "agents/traits/safety/careful.yaml": """\
        name: Careful
        rule: Look before you leap.
        """,
}


def write_files(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A small workspace whose every output line is known."""
    root = tmp_path / "tiny"
    write_files(root, TINY)
    return root


@pytest.fixture(scope="session")
def corpus_copy(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """Factory: a fresh copy of the shipped templates/ and agents/."""

    def make() -> Path:
        root = tmp_path_factory.mktemp("corpus")
        shutil.copytree(REPO / "templates", root / "templates")
        shutil.copytree(REPO / "agents", root / "agents")
        return root

    return make


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``agentd`` command line in a subprocess."""
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "agentd", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
