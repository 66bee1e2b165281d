"""The build engine: minimal re-renders, early cutoff, outputs equal to a clean build."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from agentd.build import BuildReport, Engine
from agentd.config import Config
from agentd.exceptions import SourceError
from agentd.workspace import Delta
from conftest import EDIT_KINDS, REPO, clean_build, read_outputs, run_cli, run_daemon


def engine(root: Path) -> Engine:
    return Engine(Config.load(root))


def clean_outputs(root: Path, tmp: Path) -> dict[str, bytes]:
    """What a from-scratch build of the same workspace produces."""
    return clean_build(root, tmp / "oracle")


def outputs(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "out").glob("*.md")}


def edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return path


#: An agent that reads no catalog: a broken agent source never blocks it.
GAMMA = "name: Gamma\ndescription: Reads no catalog.\nskills: []\nsections: [summary]\n"


def test_first_build_renders_every_section_and_writes_every_agent(tiny: Path) -> None:
    """A cold build renders each enabled section once and writes one file per agent."""
    report = engine(tiny).build()
    assert report.ok, report.errors
    assert sorted(report.sections_rendered) == [
        "alpha/peers",
        "alpha/shared",
        "alpha/summary",
        "alpha/traits",
        "beta/peers",
        "beta/shared",
        "beta/summary",
    ]
    assert sorted(report.written) == ["alpha.md", "beta.md"]
    text = (tiny / "out/alpha.md").read_text()
    assert text.startswith('---\nname: "alpha"\n---\n')
    assert "## 2. Peers\n- Beta\n" in text
    assert "- a1\n- a2\n" in text


def test_nothing_changed_means_nothing_rendered_or_written(tiny: Path) -> None:
    """A second build of an unchanged workspace renders nothing and leaves mtimes alone."""
    e = engine(tiny)
    e.build()
    before = {p: p.stat().st_mtime_ns for p in (tiny / "out").glob("*.md")}
    report = e.build([tiny / "agents/alpha.yaml", tiny / "templates"])
    assert report.sections_rendered == [] and report.written == []
    assert {p: p.stat().st_mtime_ns for p in (tiny / "out").glob("*.md")} == before


@pytest.mark.parametrize(("path", "old", "new", "expected"), EDIT_KINDS)
def test_an_edit_re_renders_exactly_its_readers(
    tiny: Path, tmp_path: Path, path: str, old: str, new: str, expected: list[str]
) -> None:
    """Each edit kind re-renders exactly the sections that read what changed, and the result
    equals a clean build."""
    e = engine(tiny)
    e.build()
    report = e.build([edit(tiny / path, old, new)])
    assert report.ok, report.errors
    assert sorted(report.sections_rendered) == expected
    assert outputs(tiny) == clean_outputs(tiny, tmp_path)


def test_identical_re_render_is_cut_off_and_not_written(tiny: Path) -> None:
    """A section re-rendered to the same bytes recomposes nothing and writes nothing."""
    e = engine(tiny)
    e.build()
    alpha = tiny / "out/alpha.md"
    mtime = alpha.stat().st_mtime_ns
    # Reordering the YAML keeps every value: no key fingerprint changes at all.
    report = e.build(
        [
            edit(
                tiny / "agents/alpha.yaml",
                "name: Alpha\ndescription: First agent.",
                "description: First agent.\nname: Alpha",
            )
        ]
    )
    assert report.sections_rendered == [] and report.written == []
    # A template edit whose output is the same: rendered, cut off, not written.
    report = e.build([edit(tiny / "templates/sections/summary.j2", "## {{", "{# a comment #}\n## {{")])
    assert sorted(report.sections_rendered) == ["alpha/summary", "beta/summary"]
    assert report.sections_cut_off == 2
    assert report.written == [] and report.agents_composed == []
    assert alpha.stat().st_mtime_ns == mtime


def test_base_edit_recomposes_without_rendering_sections(tiny: Path) -> None:
    """Editing base/* rewrites every agent from cached sections (L3 hits only)."""
    e = engine(tiny)
    e.build()
    report = e.build([edit(tiny / "templates/base/agent-base.j2", "# {{ agent.name }}", "# Agent: {{ agent.name }}")])
    assert report.sections_rendered == []
    assert sorted(report.agents_composed) == ["alpha", "beta"]
    assert sorted(report.written) == ["alpha.md", "beta.md"]
    assert report.caches["L3"].hits == 7 and report.caches["L3"].misses == 0


def test_trait_body_is_rendered_once_for_all_agents(tiny: Path) -> None:
    """L2: a trait body shared by two agents is rendered once and reused."""
    e = engine(tiny)
    report = e.build()
    assert report.caches["L2"].misses == 1 and report.caches["L2"].hits == 1
    report = e.build([edit(tiny / "agents/traits/safety/careful.yaml", "Look", "Peek")])
    assert report.caches["L2"].misses == 1 and report.caches["L2"].evictions == 1
    assert "Peek before you leap." in (tiny / "out/beta.md").read_text()


def test_l1_recompiles_only_the_changed_template(tiny: Path) -> None:
    """L1: a template edit recompiles that template; the others stay compiled."""
    e = engine(tiny)
    e.build()
    compiled = {k[1]: id(v) for k, v in e.renderer.env.cache.items()}  # type: ignore[union-attr]
    e.build([edit(tiny / "templates/fragments/list-item.j2", "- {{ i }}", "+ {{ i }}")])
    after = {k[1]: id(v) for k, v in e.renderer.env.cache.items()}  # type: ignore[union-attr]
    changed = sorted(n for n in compiled if after.get(n) != compiled[n])
    assert changed == ["fragments/list-item.j2"]


def test_new_deleted_and_renamed_agents(tiny: Path, tmp_path: Path) -> None:
    """Creating an agent builds it; deleting removes its output; a rename does both."""
    e = engine(tiny)
    e.build()
    gamma = tiny / "agents/gamma.yaml"
    gamma.write_text("name: Gamma\ndescription: Third.\nskills: []\nsections: [summary, peers]\n")
    report = e.build([gamma])
    assert "gamma.md" in report.written
    assert sorted(report.sections_rendered) == ["alpha/peers", "beta/peers", "gamma/peers", "gamma/summary"]
    delta = tiny / "agents/delta.yaml"
    gamma.rename(delta)
    report = e.build([gamma, delta])
    assert report.removed == ["gamma.md"] and "delta.md" in report.written
    assert not (tiny / "out/gamma.md").exists()
    assert outputs(tiny) == clean_outputs(tiny, tmp_path)


def test_deleted_and_recreated_template_folder(tiny: Path, tmp_path: Path) -> None:
    """Removing a template folder fails its users; restoring it recovers them fully."""
    e = engine(tiny)
    e.build()
    good = outputs(tiny)
    saved = tmp_path / "saved"
    shutil.move(tiny / "templates/fragments", saved)
    report = e.build([tiny / "templates/fragments"])
    assert not report.ok
    assert "template 'fragments/list-item.j2' not found" in str(report.errors[0])
    assert outputs(tiny) == good  # last good output kept
    shutil.move(saved, tiny / "templates/fragments")
    report = e.build([tiny / "templates/fragments"])
    assert report.ok and outputs(tiny) == good


def test_error_keeps_last_good_output_and_fix_recovers(tiny: Path, tmp_path: Path) -> None:
    """A broken agent keeps its output; agents that do not read the catalog still build (its
    readers wait: beta lists it as a peer); fixing it recovers, beta's edit included."""
    (tiny / "agents/gamma.yaml").write_text(GAMMA)
    e = engine(tiny)
    e.build()
    alpha_before = (tiny / "out/alpha.md").read_bytes()
    bad = edit(tiny / "agents/alpha.yaml", "skills: [a1, a2]", "skills: [a1, a2")
    report = e.build([bad])
    assert not report.ok
    assert (tiny / "out/alpha.md").read_bytes() == alpha_before
    edit(tiny / "agents/gamma.yaml", "skills: []", "skills: [g1]")
    edit(tiny / "agents/beta.yaml", "skills: [b1]", "skills: [b1, b2]")
    report = e.build([tiny / "agents/gamma.yaml", tiny / "agents/beta.yaml"])
    assert report.written == ["gamma.md"] and not report.ok
    edit(bad, "skills: [a1, a2", "skills: [a1, a2, a9]")
    report = e.build([bad])
    assert report.ok, report.errors
    assert sorted(report.written) == ["alpha.md", "beta.md"]
    assert outputs(tiny) == clean_outputs(tiny, tmp_path)


def test_template_error_is_not_cached(tiny: Path) -> None:
    """A failing render is retried on the next build, even if nothing it read changed."""
    e = engine(tiny)
    e.build()
    edit(tiny / "templates/sections/summary.j2", "{{ agent.description }}", "{{ agent.descr }}")
    report = e.build([tiny / "templates/sections/summary.j2"])
    (error,) = report.errors  # one mistake, met by both agents
    assert isinstance(error, SourceError) and error.agents == ("alpha", "beta")
    report = e.build([])
    assert len(report.errors) == 1  # still failing, still reported: not a cached result
    edit(tiny / "templates/sections/summary.j2", "{{ agent.descr }}", "{{ agent.description }}")
    report = e.build([tiny / "templates/sections/summary.j2"])
    assert report.ok


def test_adding_a_missing_key_re_renders_its_reader(tiny: Path) -> None:
    """Reading a key that does not exist is a dependency: adding the key re-renders."""
    write = tiny / "templates/sections/summary.j2"
    edit(write, "{{ agent.description }}", "{{ agent.motto|default('no motto') }}")
    e = engine(tiny)
    e.build()
    assert "no motto" in (tiny / "out/alpha.md").read_text()
    report = e.build([edit(tiny / "agents/alpha.yaml", "name: Alpha", "name: Alpha\nmotto: Onward")])
    assert report.sections_rendered == ["alpha/summary"]
    assert "Onward" in (tiny / "out/alpha.md").read_text()


def test_section_list_change_renumbers_only_what_moved(tiny: Path, tmp_path: Path) -> None:
    """Appending a section renders the new one; the others keep their numbers and caches."""
    e = engine(tiny)
    e.build()
    report = e.build(
        [
            edit(
                tiny / "agents/beta.yaml",
                "sections: [summary, peers, shared]",
                "sections: [summary, peers, shared, traits]",
            )
        ]
    )
    assert report.sections_rendered == ["beta/traits"]
    assert outputs(tiny) == clean_outputs(tiny, tmp_path)


def test_write_false_touches_nothing(tiny: Path) -> None:
    """An in-memory build (graph, affected) writes no output and no manifest."""
    engine(tiny).build(write=False)
    assert not (tiny / "out").exists()


def test_incremental_equals_clean_on_the_shipped_corpus(corpus_copy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """On the real corpus, a sequence of edits ends byte-identical to a clean build."""
    root = corpus_copy()
    e = engine(root)
    assert e.build().ok
    agent = sorted((root / "agents").glob("*.yaml"))[0]
    steps = [
        edit(agent, "version: 1.0.0", "version: 1.0.1"),
        edit(root / "templates/fragments/list-item.j2", "Evidence for", "Evidence kept for"),
        edit(root / "templates/base/footer.j2", "Edit the source, not this file.", "Edit the source."),
        edit(next((root / "agents/traits/safety").glob("*.yaml")), "summary: >-", "summary: >-\n  Revised."),
    ]
    for path in steps:
        report = e.build([path])
        assert report.ok, report.errors
    assert outputs(root) == clean_outputs(root, tmp_path)


def test_agent_without_traits_gets_empty_kinds(tiny: Path) -> None:
    """An agent listing no traits still renders sections that loop over a trait kind."""
    edit(tiny / "agents/beta.yaml", "traits:\n  safety: [careful]\n", "")
    report = engine(tiny).build()
    assert report.ok, report.errors
    assert "Careful" not in (tiny / "out/beta.md").read_text()


def test_yaml_values_stay_literal(tiny: Path) -> None:
    """Template syntax inside agent data is data: it reaches the output unevaluated."""
    edit(tiny / "agents/alpha.yaml", "description: First agent.", "description: \"{{ 7*7 }} {% include 'x' %}\"")
    assert engine(tiny).build().ok
    assert "{{ 7*7 }} {% include 'x' %}" in (tiny / "out/alpha.md").read_text()


def test_dotted_access_to_yaml_data_behaves_as_in_jinja(tiny: Path) -> None:
    """In nested YAML mappings a key gives its value and a dict method name the method (as
    Jinja resolves ``x.y``); ``agent`` and traits offer get/keys too; a missing nested key is
    an error naming the template and line."""
    edit(tiny / "agents/alpha.yaml", "notes: not read by any template", "notes: {title: T, keys: K}")
    edit(
        tiny / "templates/sections/summary.j2",
        "{{ agent.description }}",
        "{{ agent.description }}\n"
        "{% if agent.notes is mapping %}[{{ agent.notes.title }} {{ agent.notes.keys()|sort|join(',') }}]{% endif %}\n"
        "<{{ agent.get('motto', 'no motto') }} {{ traits.safety|map(attribute='name')|join(',') }}>",
    )
    report = engine(tiny).build()
    assert report.ok, report.errors
    text = (tiny / "out/alpha.md").read_text()
    assert "[T keys,title]" in text and "<no motto Careful>" in (tiny / "out/beta.md").read_text()
    edit(tiny / "templates/sections/summary.j2", "agent.notes.title", "agent.notes.nope")
    report = engine(tiny).build()
    assert [e.location for e in report.errors] == ["templates/sections/summary.j2:4"]
    assert "nope" in str(report.errors[0])


def test_related_peers_rank_handoffs_then_shared_tags() -> None:
    """related(): handoff partners first, then most shared tags, then the rest by id."""
    from agentd.catalog import Relations

    entries = {
        "a": {"tags": ["x", "y"], "handoffs": [{"agent": "c"}]},
        "b": {"tags": ["x"]},
        "c": {"tags": ["z"]},
        "d": {"tags": ["x", "y"]},
        "e": {"tags": []},
    }
    r = Relations(entries)
    assert r.related("a", 3) == ["c", "d", "b"]
    assert r.related("c", 2) == ["a", "b"]  # handoff received, then fill by id
    assert r.related("e", 10) == ["a", "b", "c", "d"]


def test_related_readers_follow_only_what_they_show(tiny: Path) -> None:
    """A description edit re-renders only the sections showing that agent; a tag edit
    re-renders every reader of the relations."""
    (tiny / "templates/sections/peers.j2").write_text(
        "## {{ section.number }}. {{ section.title }}\n"
        "{% for peer in catalog.related(agent.id, 1) %}- {{ peer.name }}: {{ peer.description }}\n{% endfor %}"
    )
    (tiny / "agents/gamma.yaml").write_text(
        "name: Gamma\ndescription: Third.\nskills: []\ntags: [z]\nsections: [peers]\n"
    )
    edit(tiny / "agents/alpha.yaml", "name: Alpha", "name: Alpha\ntags: [z]")
    e = engine(tiny)
    e.build()
    assert "- Gamma: Third." in (tiny / "out/alpha.md").read_text()
    assert "- Alpha: First agent." in (tiny / "out/beta.md").read_text()  # fill by id
    report = e.build([edit(tiny / "agents/gamma.yaml", "Third.", "Third!")])
    assert report.sections_rendered == ["alpha/peers"]  # only alpha shows gamma
    report = e.build([edit(tiny / "agents/beta.yaml", "skills: [b1]", "skills: [b1]\ntags: [z]")])
    assert sorted(report.sections_rendered) == ["alpha/peers", "beta/peers", "gamma/peers"]


def test_parallel_build_is_byte_identical(corpus_copy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`--jobs 2` writes exactly what a sequential build writes, and reports the same errors."""
    from conftest import run_cli

    root = corpus_copy()
    result = run_cli("build", "--jobs", "2", "--no-cache", cwd=root)
    assert result.returncode == 0, result.stderr
    assert "72 sections rendered" in result.stdout and "(2 worker processes)" in result.stdout
    assert outputs(root) == clean_outputs(root, tmp_path)
    troubleshooting = root / "templates/sections/troubleshooting.j2"
    troubleshooting.write_text(troubleshooting.read_text().replace("{{ f.title }}", "{{ f.titel }}", 1))
    parallel = run_cli("build", "--jobs", "2", "--no-cache", cwd=root)
    sequential = run_cli("build", "--jobs", "1", "--no-cache", cwd=root)
    assert parallel.returncode == sequential.returncode == 1
    assert parallel.stderr == sequential.stderr
    assert "templates/sections/troubleshooting.j2:27:48: undefined variable" in parallel.stderr
    assert "(in 8 agents: " in parallel.stderr  # one error, its agents gathered from both workers


def test_jobs_flag_validation(tiny: Path) -> None:
    """--jobs takes a positive number or 'auto'."""
    from conftest import run_cli

    assert run_cli("build", "--jobs", "auto", cwd=tiny).returncode == 0
    bad = run_cli("build", "--jobs", "0", cwd=tiny)
    assert bad.returncode == 2 and "jobs: expected a number >= 1 or 'auto', got '0'" in bad.stderr


@pytest.mark.parametrize(
    ("body", "composable"),
    [
        pytest.param("{{ s.content }}", True, id="copied"),
        pytest.param("{{ s.content ~ '' }}{{ '%s'|format(s.content) }}", True, id="concatenated"),
        pytest.param("{{ s.content|length }}\n{{ s.content }}", False, id="length"),
        pytest.param("{{ s.content|wordcount }}\n{{ s.content }}", False, id="wordcount"),
        pytest.param("{{ s.content|upper }}", False, id="upper"),
        pytest.param("{{ s.content|indent(2) }}", False, id="indent"),
        pytest.param("{% if s.content %}{{ s.content }}{% endif %}", False, id="truthiness"),
        pytest.param("{{ s.content[:12] }}", False, id="slice"),
        pytest.param("{{ s.content.splitlines()|first }}", False, id="method"),
    ],
)
def test_composition_equals_a_full_render_of_the_base_template(tiny: Path, body: str, composable: bool) -> None:
    """Agents are composed by joining sections into the base template's output only when the
    template copies each section verbatim; any other use of the content gets a full render,
    and either way the output is exactly what Jinja renders."""
    base = tiny / "templates/base/agent-base.j2"
    base.write_text(base.read_text().replace("{{ s.content }}", body))
    e = engine(tiny)
    report = e.build()
    assert report.ok, report.errors
    assert (e.composer.skeletons["alpha"] is not None) is composable
    for agent_id, plan in e.plans.items():
        sections = [e.caches.l3.peek((agent_id, m["id"])).data.decode() for m in plan.metas]
        full = e.composer.render_base(plan, e._catalog(Delta()), sections).data
        assert (tiny / "out" / f"{agent_id}.md").read_bytes() == full


def test_a_section_edit_recomposes_from_the_kept_skeleton(tiny: Path, tmp_path: Path) -> None:
    """After a section edit the agent is recomposed by concatenation (no base template render),
    and after a base template edit the skeleton is rendered again: both equal a clean build."""
    e = engine(tiny)
    e.build()
    before = e.composer.skeletons["alpha"]
    e.build([edit(tiny / "templates/sections/summary.j2", "{{ agent.description }}", "> {{ agent.description }}")])
    assert e.composer.skeletons["alpha"] is before
    assert outputs(tiny) == clean_outputs(tiny, tmp_path)
    e.build([edit(tiny / "templates/base/footer.j2", "-- end of", "-- the end of")])
    assert e.composer.skeletons["alpha"] is not before
    assert outputs(tiny) == clean_outputs(tiny, tmp_path)


def test_an_output_changed_while_being_written_is_written_whole(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An edit rewrites each output by copying its unchanged bytes from the file on disk; when
    someone writes to that file between agentd's check and its write, the output is written
    from bytes instead: every output equals a clean build."""
    e = engine(tiny)
    e.build()
    write_file = e.output.write_file
    spliced: list[str] = []

    def meddling(name: str, data: Any, digest: bytes, entry: Any) -> Any:
        if not isinstance(data, bytes):  # about to copy from the file: another writer is first
            spliced.append(name)
            with (e.output.path / name).open("ab") as fh:
                fh.write(b"meddled\n")
        return write_file(name, data, digest, entry)

    monkeypatch.setattr(e.output, "write_file", meddling)
    report = e.build(
        [edit(tiny / "templates/sections/summary.j2", "{{ agent.description }}", "> {{ agent.description }}")]
    )
    assert report.ok and sorted(spliced) == sorted(report.written) == ["alpha.md", "beta.md"]
    assert outputs(tiny) == clean_outputs(tiny, tmp_path)


# -- a broken agent source blocks its readers ---------------------------------------------------


def clean_report(root: Path, tmp: Path) -> tuple[BuildReport, dict[str, bytes]]:
    """A from-scratch build of the same sources: its report and outputs."""
    copy = tmp / "oracle"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(root / "templates", copy / "templates")
    shutil.copytree(root / "agents", copy / "agents")
    report = Engine(Config.load(copy), jobs=1).build()
    return report, {p.name: p.read_bytes() for p in (copy / "out").glob("*.md")}


def blocked(report: BuildReport) -> list[str]:
    return [str(e) for e in report.errors if "blocked by" in str(e)]


def stamps(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (root / "out").glob("*.md")}


def test_a_broken_agent_blocks_its_readers_once_and_keeps_their_output(tiny: Path, tmp_path: Path) -> None:
    """A typo in alpha leaves every output as it was (beta lists alpha as a peer), reports beta
    as blocked once, retries nothing while alpha stays broken, and the fix rewrites nothing."""
    (tiny / "agents/gamma.yaml").write_text(GAMMA)
    e = engine(tiny)
    e.build()
    before = stamps(tiny)
    alpha = edit(tiny / "agents/alpha.yaml", "skills: [a1, a2]", "skills: [a1, a2")
    report = e.build([alpha])
    assert report.written == [] and report.sections_rendered == []
    assert stamps(tiny) == before
    line = e.workspace.agent_errors["alpha"].line
    assert isinstance(line, int)
    (message,) = blocked(report)
    assert f"blocked by agents/alpha.yaml:{line}: agent 'alpha' does not load" in message
    assert "(while building 'beta')" in message  # gamma reads no catalog: not blocked
    assert len(report.errors) == 2  # alpha's own, and the one blocked error
    report = e.build([edit(alpha, "notes: not read", "notes: still not read")])  # still broken
    assert report.sections_rendered == [] and len(blocked(report)) == 1
    report = e.build([edit(alpha, "skills: [a1, a2", "skills: [a1, a2]")])
    assert report.ok, report.errors
    assert report.written == [] and "beta/summary" not in report.sections_rendered
    assert stamps(tiny) == before
    assert outputs(tiny) == clean_outputs(tiny, tmp_path)


@pytest.mark.parametrize(
    ("path", "old", "new", "readers"),
    [
        pytest.param("agents/alpha.yaml", "[a1, a2]", "[a1, a2", "'beta'", id="typo-in-a-loaded-agent"),
        pytest.param("agents/delta.yaml", None, "name: [Delta\n", "'alpha', 'beta'", id="new-agent-never-loaded"),
    ],
)
def test_a_clean_build_of_a_broken_state_blocks_the_same_readers(
    tiny: Path, tmp_path: Path, path: str, old: str | None, new: str, readers: str
) -> None:
    """However a source came to not load, a clean build fails the same readers with the same
    errors, and writes exactly the outputs the incremental build keeps up to date."""
    (tiny / "agents/gamma.yaml").write_text(GAMMA)
    e = engine(tiny)
    e.build()
    before = stamps(tiny)
    if old is None:
        (tiny / path).write_text(new)
    else:
        edit(tiny / path, old, new)
    report = e.build([tiny / path])
    assert stamps(tiny) == before
    clean, clean_out = clean_report(tiny, tmp_path)
    assert [str(x) for x in clean.errors] == [str(x) for x in report.errors]
    (message,) = blocked(clean)
    assert f"blocked by {path}:" in message and f"(while building {readers})" in message
    assert sorted(clean.written) == ["gamma.md"]  # the readers are blocked in a clean build too
    assert clean_out["gamma.md"] == before["gamma.md"][0]


def test_deleting_a_broken_agent_re_renders_its_readers_without_it(tiny: Path, tmp_path: Path) -> None:
    """Deleting an agent is no error: once the broken alpha is gone, beta is rebuilt without it
    (no longer blocked) and out/ equals a clean build."""
    e = engine(tiny)
    e.build()
    alpha = edit(tiny / "agents/alpha.yaml", "skills: [a1, a2]", "skills: [a1, a2")
    assert len(blocked(e.build([alpha]))) == 1
    alpha.unlink()
    report = e.build([alpha])
    assert report.ok, report.errors
    assert report.written == ["beta.md"] and report.removed == ["alpha.md"]
    assert "Alpha" not in (tiny / "out/beta.md").read_text()
    assert outputs(tiny) == clean_outputs(tiny, tmp_path)


async def test_watch_keeps_the_readers_of_a_broken_agent_until_it_is_fixed(tiny: Path, tmp_path: Path) -> None:
    """Under `agentd watch`, saving alpha with a typo leaves beta's file alone and logs its block
    once, at alpha's line; the save that fixes it rewrites nothing and out/ equals a clean build."""
    async with run_daemon(tiny) as d:
        before = stamps(tiny)
        start = len(d.events)
        edit(tiny / "agents/alpha.yaml", "skills: [a1, a2]", "skills: [a1, a2")
        build = await d.next_build()
        errors = [e for e in d.events[start:] if e.get("event") == "build.error"]
        (own,) = [e for e in errors if "malformed YAML" in e["message"]]
        (block,) = [e for e in errors if "blocked by" in e["message"]]
        assert len(errors) == 2 and build["written"] == []
        assert isinstance(own["line"], int)
        assert block["message"].startswith(f"blocked by agents/alpha.yaml:{own['line']}:")
        assert block["location"] == own["location"] and block["agents"] == ["beta"]
        assert stamps(tiny) == before
        edit(tiny / "agents/alpha.yaml", "skills: [a1, a2", "skills: [a1, a2]")
        build = await d.next_build()
        assert build["errors"] == 0 and build["written"] == []
        assert stamps(tiny) == before
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


#: An agent whose source lists no sections, and a section template listing its agent's sections.
DEFAULTED = "name: Gamma\ndescription: Takes the default sections.\nskills: [g1]\n"
CONTENTS = "## {{ section.number }}. {{ section.title }}\n{% for s in sections %}\n- {{ s.title }}\n{% endfor %}\n"


def test_default_sections_are_the_section_templates_sorted_by_name(tiny: Path, tmp_path: Path) -> None:
    """An agent without `sections` gets every section template but the "_" partials, sorted by
    name; with no section template at all, it is an error at the agent saying what to add."""
    (tiny / "agents/gamma.yaml").write_text(DEFAULTED)
    (tiny / "templates/sections/_frame.j2").write_text("a partial, not a section\n")
    report = engine(tiny).build()
    assert report.ok, report.errors
    text = (tiny / "out/gamma.md").read_text()
    assert [line for line in text.splitlines() if line.startswith("## ")] == [
        "## 1. Peers",
        "## 2. Shared",
        "## 3. Summary",
        "## 4. Traits",
    ]
    bare = tmp_path / "bare"
    (bare / "agents").mkdir(parents=True)
    (bare / "templates").mkdir()
    (bare / "agents/solo.yaml").write_text("# no sections here\nname: Solo\n")
    (error,) = engine(bare).build().errors
    assert (error.path, error.line) == ("agents/solo.yaml", 2)
    assert error.message == (
        "agents/solo.yaml: no sections: add templates/sections/<name>.j2, or set `sections` in agentd.toml "
        "or in this file"
    )


def test_a_run_after_a_section_template_is_added_restores_nothing_stale(tiny: Path, tmp_path: Path) -> None:
    """The persistent store gives back no agent and no section made for the old default list:
    after a section template is added, the next `agentd build` equals a clean build."""
    (tiny / "agents/gamma.yaml").write_text(DEFAULTED)
    (tiny / "templates/sections/contents.j2").write_text(CONTENTS)
    assert run_cli("build", cwd=tiny).returncode == 0
    (tiny / "templates/sections/zz-notes.j2").write_text("## {{ section.number }}. {{ section.title }}\n")
    assert run_cli("build", cwd=tiny).returncode == 0
    assert "- Zz Notes" in (tiny / "out/gamma.md").read_text()
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


async def test_watch_follows_the_section_templates_for_default_sections(tiny: Path, tmp_path: Path) -> None:
    """Under `agentd watch`, creating a section template adds it to every agent without
    `sections` (and re-renders what lists their sections), deleting it takes it away again;
    each time out/ equals a clean build."""
    (tiny / "agents/gamma.yaml").write_text(DEFAULTED)
    (tiny / "templates/sections/contents.j2").write_text(CONTENTS)
    notes = tiny / "templates/sections/zz-notes.j2"
    async with run_daemon(tiny) as d:
        draft = tiny / "zz-notes.tmp"  # renamed into place: one event, the whole file
        draft.write_text("## {{ section.number }}. {{ section.title }}\n")
        draft.rename(notes)
        build = await d.next_build()
        assert build["written"] == ["gamma.md"]
        assert "- Zz Notes" in (tiny / "out/gamma.md").read_text()
        assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")
        notes.unlink()
        build = await d.next_build()
        assert build["written"] == ["gamma.md"]
        assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


async def test_watch_follows_the_base_template_appearing_and_going(tiny: Path, tmp_path: Path) -> None:
    """Without templates/base/agent-base.j2 an agent is its sections in order; under `agentd
    watch` creating the file composes every agent with it, deleting it goes back; each time
    out/ equals a clean build."""
    base = tiny / "templates/base/agent-base.j2"
    text = base.read_text()
    base.unlink()
    async with run_daemon(tiny) as d:
        assert (tiny / "out/beta.md").read_text().startswith("## 1. Summary\nSecond agent.\n")
        assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")
        draft = tiny / "agent-base.tmp"  # renamed into place: one event, the whole file
        draft.write_text(text)
        draft.rename(base)
        build = await d.next_build()
        assert sorted(build["written"]) == ["alpha.md", "beta.md"] and build["rendered"] == []
        assert (tiny / "out/beta.md").read_text().startswith('---\nname: "beta"\n---\n# Beta\n')
        assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")
        base.unlink()
        build = await d.next_build()
        assert sorted(build["written"]) == ["alpha.md", "beta.md"] and build["rendered"] == []
        assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


def test_no_import_cycle_between_agentd_modules() -> None:
    """Every import between agentd's modules (at the top, in a function or for type checking)
    runs one way: a cycle is how ``build`` and ``pool`` once came to reach into each other."""
    import ast

    package = REPO / "daemon" / "agentd"
    names = {path.stem for path in package.glob("*.py")}
    imports: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("agentd."):
                found.add((node.module or "").split(".")[1])
        imports[path.stem] = found & names

    done: set[str] = set()  # no cycle through these

    def visit(name: str, path: list[str]) -> None:
        for dep in sorted(imports[name] - done):
            assert dep not in path, f"import cycle: {' -> '.join([*path[path.index(dep) :], dep])}"
            visit(dep, [*path, dep])
        done.add(name)

    for name in sorted(imports):
        visit(name, [name])
