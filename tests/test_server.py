"""`agentd watch`: the real daemon process, real files, real watchfiles events."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from agentd.output import MANIFEST
from conftest import EDIT_KINDS, clean_build, read_outputs, run_daemon, set_config, slow_down, unprivileged


def replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


async def test_startup_builds_everything(tiny: Path) -> None:
    """Startup compiles and builds every agent before reporting ready."""
    async with run_daemon(tiny) as d:
        first = d.builds[0]
        assert first["written"] == ["alpha.md", "beta.md"] and first["errors"] == 0
        assert first["build_id"]


@pytest.mark.parametrize(("path", "old", "new", "expected"), EDIT_KINDS)
async def test_each_edit_kind_re_renders_exactly_its_readers(
    tiny: Path, tmp_path: Path, path: str, old: str, new: str, expected: list[str]
) -> None:
    """One save triggers one rebuild of exactly the affected sections; out/ equals a clean build."""
    async with run_daemon(tiny) as d:
        replace(tiny / path, old, new)
        build = await d.next_build()
        assert sorted(build["rendered"]) == expected
        assert build["changed"] == [path]
        await d.quiet(0.4)
        assert len(d.builds) == 2
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


async def test_unchanged_output_is_not_rewritten(tiny: Path) -> None:
    """An edit that changes only beta leaves alpha's file (and mtime) alone."""
    async with run_daemon(tiny) as d:
        alpha = tiny / "out/alpha.md"
        mtime = alpha.stat().st_mtime_ns
        replace(tiny / "agents/beta.yaml", "skills: [b1]", "skills: [b2]")
        build = await d.next_build()
        assert build["written"] == ["beta.md"]
        assert alpha.stat().st_mtime_ns == mtime


async def test_outputs_deleted_under_watch_are_written_again(tiny: Path, tmp_path: Path) -> None:
    """`rm -r out/`, then `rm` of one output, while `agentd watch` runs: each time what is gone
    comes back byte-identical, written from the daemon's caches (no section rendered), and
    agentd's own writes in out/ in between start no build."""
    async with run_daemon(tiny, "--jobs", "1") as d:
        out = tiny / "out"
        before = read_outputs(tiny)
        shutil.rmtree(out)
        build = await d.next_build(timeout=5)
        assert build["written"] == ["alpha.md", "beta.md"] and build["sections_rendered"] == 0
        assert read_outputs(tiny) == before and (out / MANIFEST).exists()
        replace(tiny / "agents/beta.yaml", "skills: [b1]", "skills: [b2]")  # beta.md replaced
        assert (await d.next_build())["written"] == ["beta.md"]
        (out / "beta.md").unlink()
        build = await d.next_build(timeout=5)  # the next build: none for agentd's own writes
        assert build["written"] == ["beta.md"] and build["sections_rendered"] == 0 and build["errors"] == 0
        assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


def _refuse_writes(folder: Path) -> Callable[[], None]:
    """Make ``folder`` refuse new files, for root too (root ignores mode bits: the immutable
    attribute stops it); return the undo."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
        pytest.skip("running as root, and chattr +i (the one refusal root meets) is not available here")
    return lambda: subprocess.run(["chattr", "-i", str(folder)], check=True) and None


async def test_an_output_the_system_refuses_is_written_once_it_can_be(tiny: Path, tmp_path: Path) -> None:
    """While out/ refuses files, an edit's output fails with an error naming the file and the
    system's reason, and the daemon keeps running; once out/ takes files again, the output is
    written without another edit."""
    async with run_daemon(tiny, "--jobs", "1") as d:
        old = (tiny / "out/alpha.md").read_bytes()
        undo = _refuse_writes(tiny / "out")
        try:
            replace(tiny / "agents/alpha.yaml", "skills: [a1, a2]", "skills: [a1, a2, a3]")
            build = await d.next_build()
            assert build["errors"] == 1 and build["written"] == []
            error = d.named("build.error")[-1]["message"]
            assert error in (
                "out/alpha.md: cannot write it: Operation not permitted (EPERM)",
                "out/alpha.md: cannot write it: Permission denied (EACCES)",
            )
            assert (tiny / "out/alpha.md").read_bytes() == old
        finally:
            undo()
        build = await d.next_build()
        assert build["written"] == ["alpha.md"] and build["errors"] == 0 and build["changed"] == []
        assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


def _inplace(path: Path, text: str) -> None:
    with open(path, "r+") as fh:
        fh.seek(0)
        fh.write(text)
        fh.truncate()


def _temp_rename(path: Path, text: str) -> None:
    # VS Code / JetBrains "safe write": a temp file next to the target, then rename over it.
    tmp = path.with_name(path.name + "___jb_tmp___")
    tmp.write_text(text)
    os.replace(tmp, path)


def _vim(path: Path, text: str) -> None:
    # vim with backupcopy=no: probe file 4913, rename the original to a backup, write anew.
    probe = path.with_name("4913")
    probe.write_text("")
    probe.unlink()
    backup = path.with_name(path.name + "~")
    os.rename(path, backup)
    path.write_text(text)
    backup.unlink()


def _sed(path: Path, text: str) -> None:
    old = path.read_text()
    assert "skills: [a1, a2]" in old and "skills: [a1, a2, a3]" in text
    subprocess.run(["sed", "-i", "s/skills: \\[a1, a2\\]/skills: [a1, a2, a3]/", str(path)], check=True)


@pytest.mark.parametrize("save", [_inplace, _temp_rename, _vim, _sed], ids=["in-place", "temp-rename", "vim", "sed-i"])
async def test_each_editor_save_style_gives_one_correct_rebuild(tiny: Path, tmp_path: Path, save) -> None:  # type: ignore[no-untyped-def]
    """In-place writes, temp-then-rename, vim's backup dance and sed -i each cause exactly one
    rebuild, and temp files never reach the workspace."""
    target = tiny / "agents/alpha.yaml"
    async with run_daemon(tiny) as d:
        save(target, target.read_text().replace("skills: [a1, a2]", "skills: [a1, a2, a3]"))
        build = await d.next_build()
        assert build["changed"] == ["agents/alpha.yaml"] and build["rendered"] == ["alpha/summary"]
        await d.quiet(0.5)
        assert len(d.builds) == 2, [b["changed"] for b in d.builds]
        assert "- a3" in (tiny / "out/alpha.md").read_text()
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


def _git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True, capture_output=True
    )


def _write_bulk(root: Path, count: int, description: str) -> None:
    for i in range(count):
        (root / f"agents/bulk{i:03}.yaml").write_text(
            f"name: Bulk {i}\ndescription: {description} {i}\nskills: [s]\nsections: [summary]\n"
        )


def _bulk_repo(root: Path, count: int) -> None:
    """``count`` extra agents, committed in a fresh git repository on branch main."""
    _write_bulk(root, count, "d")
    _git(root, "init", "-q", "-b", "main")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "one")


async def test_git_checkout_of_many_files_is_one_rebuild(tiny: Path, tmp_path: Path) -> None:
    """Switching branches rewrites 300 files at once: one rebuild, output equal to a clean build."""
    _bulk_repo(tiny, 300)
    _git(tiny, "checkout", "-q", "-b", "other")
    _write_bulk(tiny, 300, "changed")
    _git(tiny, "commit", "-qam", "two")
    _git(tiny, "checkout", "-q", "main")
    async with run_daemon(tiny) as d:
        _git(tiny, "checkout", "-q", "other")
        build = await d.next_build(timeout=30)
        assert build["sections_rendered"] == 302  # 300 summaries + the two peer lists (descriptions are catalog data)
        await d.quiet(0.6)
        assert len(d.builds) == 2
        assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")
        _git(tiny, "checkout", "-q", "main")
        await d.next_build(timeout=30)
        await d.quiet(0.6)
        assert len(d.builds) == 3
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle2")


async def test_git_stash_and_pop_are_one_rebuild_each(tiny: Path, tmp_path: Path) -> None:
    """`git stash` reverting many files, then `git stash pop`, each give one rebuild."""
    _bulk_repo(tiny, 60)
    async with run_daemon(tiny) as d:
        _write_bulk(tiny, 60, "wip")
        await d.next_build(timeout=30)
        await d.quiet(0.6)
        count = len(d.builds)
        for command in ("stash", "pop"):
            _git(tiny, "stash", *(["pop"] if command == "pop" else ["-q"]))
            await d.next_build(timeout=30)
            await d.quiet(0.6)
            count += 1
            assert len(d.builds) == count, command
            assert read_outputs(tiny) == clean_build(tiny, tmp_path / f"oracle-{command}")
        assert "wip 7" in (tiny / "out/bulk007.md").read_text()


async def test_changes_during_a_rebuild_cause_one_follow_up(tiny: Path, tmp_path: Path) -> None:
    """Edits that land while a build runs are all picked up by exactly one more build."""
    slow_down(tiny / "templates/sections/summary.j2", 400_000)
    async with run_daemon(tiny) as d:
        replace(tiny / "agents/alpha.yaml", "skills: [a1, a2]", "skills: [a1]")
        await d.wait_for(
            lambda e: e.get("event") == "build.started" and e["changed"] == ["agents/alpha.yaml"], start=len(d.events)
        )
        count = len(d.builds)
        replace(tiny / "agents/beta.yaml", "skills: [b1]", "skills: [b9]")
        replace(tiny / "agents/traits/safety/careful.yaml", "Look", "Peek")
        await d.next_build()  # the one that was running
        follow_up = await d.next_build()
        assert sorted(follow_up["changed"]) == ["agents/beta.yaml", "agents/traits/safety/careful.yaml"]
        await d.quiet(0.6)
        assert len(d.builds) == count + 2
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


@pytest.mark.parametrize(
    ("path", "old", "new", "location"),
    [
        (
            "templates/sections/summary.j2",
            "{{ agent.description }}",
            "{{ agent.description }",
            "templates/sections/summary.j2:3",
        ),
        (
            "templates/sections/summary.j2",
            "{{ agent.description }}",
            "{{ agent.nope }}",
            "templates/sections/summary.j2:3",
        ),
        ("agents/alpha.yaml", "skills: [a1, a2]", "skills: [a1, a2", "agents/alpha.yaml:3"),
        (
            "templates/sections/summary.j2",
            '"fragments/list-item.j2"',
            '"fragments/missing.j2"',
            "templates/sections/summary.j2:1",
        ),
    ],
    ids=["syntax-error", "undefined-variable", "broken-yaml", "missing-include"],
)
async def test_error_mid_session_keeps_running_and_recovers(
    tiny: Path, tmp_path: Path, path: str, old: str, new: str, location: str
) -> None:
    """An error is logged with file:line, the last good output stays, other agents keep
    rebuilding, and the save that fixes it recovers fully."""
    async with run_daemon(tiny) as d:
        good = read_outputs(tiny)
        replace(tiny / path, old, new)
        build = await d.next_build()
        assert build["errors"] >= 1
        errors = [e for e in d.named("build.error") if e["build_id"] == build["build_id"]]
        assert location in {e["location"] for e in errors}
        assert all(e["text"] for e in errors)
        if path.startswith("agents/alpha"):
            assert (tiny / "out/alpha.md").read_bytes() == good["alpha.md"]
        else:
            assert read_outputs(tiny) == good
        # unaffected work goes on (beta lists alpha among its peers: it waits for alpha to load)
        replace(tiny / "agents/beta.yaml", "description: Second agent.", "description: Second agent!")
        await d.next_build()
        if path.startswith("agents/alpha"):
            assert (tiny / "out/beta.md").read_bytes() == good["beta.md"]
        elif not path.startswith("templates/sections/summary"):
            assert "Second agent!" in (tiny / "out/beta.md").read_text()
        replace(tiny / path, new, old)
        fixed = await d.next_build()
        assert fixed["errors"] == 0
        await d.quiet(0.3)
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


async def test_include_cycle_mid_session(tiny: Path, tmp_path: Path) -> None:
    """An include cycle is reported (not a crash) and fixing it recovers."""
    async with run_daemon(tiny) as d:
        (tiny / "templates/fragments/b.j2").write_text('{% include "fragments/a.j2" %}\n')
        await d.next_build()
        (tiny / "templates/fragments/a.j2").write_text('{% include "fragments/b.j2" %}\n')
        await d.next_build()
        replace(tiny / "templates/sections/peers.j2", "## {{", '{% include "fragments/a.j2" %}\n## {{')
        build = await d.next_build()
        assert build["errors"] == 1  # one mistake, met by both agents: reported once
        (error,) = d.named("build.error")
        assert "include cycle" in error["message"] and error["agents"] == ["alpha", "beta"]
        (tiny / "templates/fragments/a.j2").write_text("")
        fixed = await d.next_build()
        assert fixed["errors"] == 0
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


async def test_create_delete_rename_agents(tiny: Path, tmp_path: Path) -> None:
    """A new agent is built, a deleted one's output removed, a renamed one moved."""
    async with run_daemon(tiny) as d:
        gamma = tiny / "agents/gamma.yaml"
        gamma.write_text("name: Gamma\ndescription: Third.\nskills: []\nsections: [summary]\n")
        build = await d.next_build()
        assert "gamma.md" in build["written"]
        gamma.rename(tiny / "agents/delta.yaml")
        build = await d.next_build()
        await d.quiet(0.4)
        assert not (tiny / "out/gamma.md").exists() and (tiny / "out/delta.md").exists()
        (tiny / "agents/delta.yaml").unlink()
        build = await d.next_build()
        assert build["removed"] == ["delta.md"]
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


async def test_template_folder_deleted_and_recreated(tiny: Path, tmp_path: Path) -> None:
    """Deleting templates/fragments and putting it back recovers fully."""
    import shutil

    async with run_daemon(tiny) as d:
        saved = tmp_path / "saved"
        shutil.copytree(tiny / "templates/fragments", saved)
        shutil.rmtree(tiny / "templates/fragments")
        build = await d.next_build()
        assert build["errors"] >= 1
        shutil.copytree(saved, tiny / "templates/fragments")
        await d.wait_for(lambda e: e.get("event") == "build.finished" and e["errors"] == 0, start=len(d.events))
        await d.quiet(0.4)
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


async def test_unreadable_source_and_folder_are_built_once_readable(tiny: Path, tmp_path: Path) -> None:
    """A source and a folder the daemon may not read are errors of their own ("permission
    denied") and the daemon keeps running; chmod back (an attribute change) builds them, edits
    inside the folder are seen from then on, and a folder's error goes with the folder."""
    prefix = unprivileged()
    beta, safety = tiny / "agents/beta.yaml", tiny / "agents/traits/safety"
    beta.chmod(0)
    safety.chmod(0)
    try:
        async with run_daemon(tiny, prefix=prefix) as d:
            errors = {(e["path"], e["message"]) for e in d.named("build.error")}
            assert ("agents/beta.yaml", "cannot read: permission denied") in errors
            folder = "cannot list this folder: permission denied; the sources in it are left out"
            assert ("agents/traits/safety", folder) in errors
            beta.chmod(0o644)
            safety.chmod(0o755)
            await d.wait_for(lambda e: e.get("event") == "build.finished" and e["errors"] == 0, start=len(d.events))
            replace(safety / "careful.yaml", "Look before", "Always look before")
            await d.wait_for(lambda e: "alpha.md" in e.get("written", ()), start=len(d.events))
            # A folder's own error (here a link out of the workspace) goes with the folder.
            (safety / "out").symlink_to(tmp_path, target_is_directory=True)
            await d.wait_for(lambda e: e.get("event") == "build.finished" and e["errors"] == 1, start=len(d.events))
            (safety / "out").unlink()
            await d.wait_for(lambda e: e.get("event") == "build.finished" and e["errors"] == 0, start=len(d.events))
            await d.quiet(0.3)
    finally:
        beta.chmod(0o644)
        safety.chmod(0o755)
    assert "Always look before" in (tiny / "out/alpha.md").read_text()
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_signal_stops_cleanly(tiny: Path, sig: signal.Signals) -> None:
    """SIGINT/SIGTERM exit 0 promptly and leave no partial file in out/."""
    async with run_daemon(tiny) as d:
        replace(tiny / "agents/alpha.yaml", "skills: [a1, a2]", "skills: [a1]")
        d.proc.send_signal(sig)
        code = await asyncio.wait_for(d.proc.wait(), 10)
        assert code == 0
        await d.wait_for(lambda e: e.get("event") == "watch.stopped")
    assert sorted(p.name for p in (tiny / "out").iterdir()) == [".agentd-manifest.json", "alpha.md", "beta.md"]


async def test_verify_on_demand_with_sigusr1(tiny: Path) -> None:
    """SIGUSR1 makes the daemon run a clean-build comparison and log it."""
    async with run_daemon(tiny) as d:
        d.proc.send_signal(signal.SIGUSR1)
        result = await d.wait_for(lambda e: e.get("event") == "verify.finished")
        assert result["ok"] is True and result["checked"] == 2
        (tiny / "out/alpha.md").write_text("tampered\n")
        d.proc.send_signal(signal.SIGUSR1)
        result = await d.wait_for(lambda e: e.get("event") == "verify.finished" and not e["ok"], start=len(d.events))
        assert result["differing"] == ["alpha.md"]


async def test_config_change_rebuilds(tiny: Path) -> None:
    """Editing agentd.toml reloads the configuration and rebuilds with it."""
    async with run_daemon(tiny) as d:
        set_config(tiny, 'output_dir = "elsewhere"')
        await d.wait_for(lambda e: e.get("event") == "config.reloaded")
        build = await d.next_build()
        assert sorted(build["written"]) == ["alpha.md", "beta.md"]
        assert (tiny / "elsewhere/alpha.md").exists()
        set_config(tiny, "output_dirr = 1")
        error = await d.wait_for(lambda e: e.get("event") == "config.error")
        assert "output_dirr" in error["error"]
        replace(tiny / "agents/alpha.yaml", "skills: [a1, a2]", "skills: [a7]")
        await d.next_build()
        assert "- a7" in (tiny / "elsewhere/alpha.md").read_text()


async def test_out_is_not_watched(tiny: Path) -> None:
    """Writing into out/ never triggers a rebuild."""
    async with run_daemon(tiny) as d:
        (tiny / "out/notes.md").write_text("mine\n")
        (tiny / "out/alpha.md").write_text("tampered\n")
        await d.quiet(0.5)
        assert len(d.builds) == 1


# -- a stateful model: random edit sequences against a clean-build oracle -------------------

import tempfile  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule  # noqa: E402

from conftest import TINY, Daemon, write_files  # noqa: E402

NAMES = ["alpha", "beta", "gamma", "delta", "omega"]
SKILLS = ["[a1]", "[a1, a2]", "[]", "[x, y, z]"]
DESCRIPTIONS = ["First agent.", "Changed.", "Something else entirely."]
TEMPLATE_VARIANTS = {
    "templates/sections/summary.j2": [
        TINY["templates/sections/summary.j2"],
        TINY["templates/sections/summary.j2"].replace("{{ agent.description }}", "> {{ agent.description }}"),
        # same output, different source: rendered, cut off, nothing written
        "{# a comment #}\n" + TINY["templates/sections/summary.j2"],
    ],
    "templates/fragments/list-item.j2": [
        TINY["templates/fragments/list-item.j2"],
        TINY["templates/fragments/list-item.j2"].replace("- {{ i }}", "* {{ i }}"),
    ],
    "templates/traits/safety-traits.j2": [
        TINY["templates/traits/safety-traits.j2"],
        "#### {{ trait.name }}: {{ trait.rule }}\n",
    ],
    "templates/base/footer.j2": [TINY["templates/base/footer.j2"], "== {{ agent.name }} ==\n"],
    "templates/sections/peers.j2": [
        TINY["templates/sections/peers.j2"],
        TINY["templates/sections/peers.j2"].replace("- {{ peer.name }}", "- {{ peer.name }}: {{ peer.description }}"),
    ],
}


def agent_yaml(name: str, skills: str, description: str, sections: str) -> str:
    return (
        f"name: {name.capitalize()}\ndescription: {description}\nskills: {skills}\n"
        f"sections: {sections}\ntraits:\n  safety: [careful]\n"
    )


class DaemonMatchesCleanBuild(RuleBasedStateMachine):
    """Drive a real `agentd watch` through creates, edits, deletes and renames of agents,
    templates and traits; after every step out/ must equal a clean build, and no output whose
    bytes did not change may have been rewritten."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="agentd-stateful-"))
        self.root = self.tmp / "ws"
        write_files(self.root, TINY)
        self.loop = asyncio.new_event_loop()
        self.cm = run_daemon(self.root)
        self.d: Daemon = self.loop.run_until_complete(self.cm.__aenter__())
        self.before: dict[str, tuple[bytes, int]] = {}

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self.cm.__aexit__(None, None, None))
        finally:
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------------
    def agents(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "agents").glob("*.yaml"))

    def snapshot(self) -> None:
        self.before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (self.root / "out").glob("*.md")}

    def settle(self, *paths: Path) -> None:
        """Wait until builds have covered every touched path, then for quiet."""
        want = {p.relative_to(self.root).as_posix() for p in paths}
        start = len(self.d.events)

        async def covered() -> None:
            while True:
                count = len(self.d.events)
                builds = [e for e in self.d.events[start:count] if e.get("event") == "build.finished"]
                if want <= {c for e in builds for c in e["changed"]}:
                    break
                await self.d.wait_for(lambda e: e.get("event") == "build.finished", timeout=20, start=count)
            await self.d.quiet(0.25)

        self.loop.run_until_complete(covered())

    # -- rules ----------------------------------------------------------------------------------
    @precondition(lambda self: bool(self.agents()))
    @rule(data=st.data(), skills=st.sampled_from(SKILLS), description=st.sampled_from(DESCRIPTIONS))
    def edit_agent(self, data: st.DataObject, skills: str, description: str) -> None:
        name = data.draw(st.sampled_from(self.agents()))
        self.snapshot()
        path = self.root / f"agents/{name}.yaml"
        path.write_text(agent_yaml(name, skills, description, "[summary, peers, traits, shared]"))
        self.settle(path)

    @rule(name=st.sampled_from(NAMES), sections=st.sampled_from(["[summary, peers]", "[peers, shared, summary]"]))
    def create_agent(self, name: str, sections: str) -> None:
        path = self.root / f"agents/{name}.yaml"
        if path.exists():
            return
        self.snapshot()
        path.write_text(agent_yaml(name, "[n1]", "New.", sections))
        self.settle(path)

    @precondition(lambda self: len(self.agents()) > 1)
    @rule(data=st.data())
    def delete_agent(self, data: st.DataObject) -> None:
        path = self.root / f"agents/{data.draw(st.sampled_from(self.agents()))}.yaml"
        self.snapshot()
        path.unlink()
        self.settle(path)

    @precondition(lambda self: bool(self.agents()))
    @rule(data=st.data(), new=st.sampled_from(NAMES))
    def rename_agent(self, data: st.DataObject, new: str) -> None:
        old = self.root / f"agents/{data.draw(st.sampled_from(self.agents()))}.yaml"
        target = self.root / f"agents/{new}.yaml"
        if target.exists():
            return
        self.snapshot()
        old.rename(target)
        self.settle(old, target)

    @rule(template=st.sampled_from(sorted(TEMPLATE_VARIANTS)), data=st.data())
    def edit_template(self, template: str, data: st.DataObject) -> None:
        path = self.root / template
        text = data.draw(st.sampled_from(TEMPLATE_VARIANTS[template]))
        self.snapshot()
        path.write_text(textwrap.dedent(text))
        self.settle(path)

    @rule(rule_text=st.sampled_from(["Look before you leap.", "Measure twice.", "Stop."]))
    def edit_trait(self, rule_text: str) -> None:
        path = self.root / "agents/traits/safety/careful.yaml"
        self.snapshot()
        path.write_text(f"name: Careful\nrule: {rule_text}\n")
        self.settle(path)

    @rule()
    def break_then_fix_a_template(self) -> None:
        path = self.root / "templates/sections/peers.j2"
        good = path.read_text()
        self.snapshot()
        path.write_text(good.replace("{% endfor %}", "{% endfor"))
        self.settle(path)
        path.write_text(good)
        self.settle(path)

    # -- what must always hold --------------------------------------------------------------------
    @invariant()
    def outputs_equal_a_clean_build(self) -> None:
        assert read_outputs(self.root) == clean_build(self.root, self.tmp / "oracle")

    @invariant()
    def unchanged_outputs_were_not_rewritten(self) -> None:
        for name, (data, mtime) in self.before.items():
            path = self.root / "out" / name
            if path.exists() and path.read_bytes() == data:
                assert path.stat().st_mtime_ns == mtime, f"{name} rewritten with identical bytes"


DaemonMatchesCleanBuild.TestCase.settings = settings(
    max_examples=6,
    stateful_step_count=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_daemon_matches_clean_build = DaemonMatchesCleanBuild.TestCase
