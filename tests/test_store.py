"""The persistent cache: restarts render nothing that did not change, damage is survived."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from pathlib import Path

import orjson
import pytest

from agentd.build import Engine
from agentd.cache import Rendered
from agentd.config import Config
from agentd.render import BASE_TEMPLATE
from agentd.store import KEEP_VERSIONS, STORE_FILE, Store, render_stamp
from agentd.trace import fingerprint
from conftest import EDIT_KINDS, clean_build, read_outputs, run_cli, run_daemon


def build(root: Path, *args: str) -> str:
    result = run_cli("build", *args, cwd=root)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def engine(root: Path, stamp: bytes | None = None) -> Engine:
    config = Config.load(root)
    return Engine(config, Store(root, stamp or render_stamp(config)))


def test_second_process_renders_nothing(tiny: Path, tmp_path: Path) -> None:
    """A second `agentd build` takes every section from the store and writes nothing."""
    assert "7 sections rendered" in build(tiny)
    out = build(tiny)
    assert "0 sections rendered, 7 reused" in out and "0 written, 2 unchanged" in out
    assert "L3 100% (7/7)" in out  # the store is L3's disk tier: what it gives back is a hit
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


async def test_daemon_warm_restart(tiny: Path, tmp_path: Path) -> None:
    """A daemon started on a built workspace is ready without rendering a section."""
    build(tiny)
    async with run_daemon(tiny) as d:
        first = d.builds[0]
        assert first["sections_rendered"] == 0 and first["sections_restored"] == 7
        assert first["outputs_written"] == 0
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


@pytest.mark.parametrize(("path", "old", "new", "expected"), EDIT_KINDS)
def test_edits_while_stopped_re_render_exactly_their_readers(
    tiny: Path, tmp_path: Path, path: str, old: str, new: str, expected: list[str]
) -> None:
    """Between two processes, the store's dependency records give the same minimal re-render
    as the daemon's graph, and the result equals a clean build."""
    engine(tiny).build()
    text = (tiny / path).read_text()
    (tiny / path).write_text(text.replace(old, new))
    report = engine(tiny).build()
    assert sorted(report.sections_rendered) == expected
    assert report.sections_restored == 7 - len(expected)
    assert (report.caches["L3"].hits, report.caches["L3"].misses) == (7 - len(expected), len(expected))
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


def test_a_restarted_engine_takes_skeletons_from_the_store(tiny: Path, tmp_path: Path) -> None:
    """After a restart, recomposing agents after a section edit takes each agent's skeleton
    from the store (no base template render) while the base template is unchanged, and
    renders it again once it changed: outputs equal a clean build either way."""
    first = engine(tiny)
    first.build()
    summary = tiny / "templates/sections/summary.j2"
    summary.write_text(summary.read_text().replace("{{ agent.description }}", "> {{ agent.description }}"))
    first.build([summary])  # composes both agents: renders and stores their skeletons
    summary.write_text(summary.read_text().replace("> {{ agent.description }}", ">> {{ agent.description }}"))
    report = engine(tiny).build()
    assert sorted(report.sections_rendered) == ["alpha/summary", "beta/summary"]
    assert BASE_TEMPLATE not in {name for name, _ in report.timings}
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle1")
    footer = tiny / "templates/base/footer.j2"
    footer.write_text(footer.read_text().replace("-- end of", "-- the end of"))
    summary.write_text(summary.read_text().replace(">> {{ agent.description }}", "{{ agent.description }}"))
    report = engine(tiny).build()
    assert BASE_TEMPLATE in {name for name, _ in report.timings}
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle2")


def test_new_trait_kind_invalidates_trait_readers(tiny: Path, tmp_path: Path) -> None:
    """Adding a trait kind changes every agent's `traits` mapping: stored renders that read it
    are not reused."""
    engine(tiny).build()
    (tiny / "agents/traits/tools").mkdir()
    (tiny / "agents/traits/tools/cli.yaml").write_text("name: CLI\nrule: Use the shell.\n")
    (tiny / "templates/traits/tools-traits.j2").write_text("### {{ trait.name }}\n")
    report = engine(tiny).build()
    assert "alpha/traits" in report.sections_rendered
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


def test_foreign_stamp_is_ignored(tiny: Path) -> None:
    """A store written by another agentd/Jinja2 version or config never matches."""
    engine(tiny, stamp=b"agentd 0.0.1").build()
    report = engine(tiny).build()
    assert len(report.sections_rendered) == 7 and report.sections_restored == 0


def test_superseded_versions_are_dropped(tiny: Path, tmp_path: Path) -> None:
    """The store keeps the current and the previous version of each render and of each
    template's compiled code, not every one ever made: an undo of the last edit is served from
    the store, an older state is rendered again (and equals a clean build)."""
    summary = tiny / "templates/sections/summary.j2"
    original = summary.read_text()
    states = [original.replace("{{ agent.description }}", f"v{i} {{{{ agent.description }}}}") for i in range(5)]
    for text in states:
        summary.write_text(text)
        assert engine(tiny).build().ok
    with sqlite3.connect(tiny / STORE_FILE) as db:
        versions = dict(db.execute("SELECT unit, count(*) FROM blobs GROUP BY unit").fetchall())
        slots = dict(db.execute("SELECT slot, count(*) FROM aux GROUP BY slot").fetchall())
    assert versions["section:alpha/summary"] == versions["compose:alpha"] == KEEP_VERSIONS == 2
    assert max(versions.values()) == 2 and max(slots.values()) == 2
    summary.write_text(states[-2])  # undo
    assert sorted(engine(tiny).build().sections_rendered) == []
    summary.write_text(states[0])
    assert sorted(engine(tiny).build().sections_rendered) == ["alpha/summary", "beta/summary"]
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


def test_store_of_an_earlier_format_is_replaced(tiny: Path, tmp_path: Path) -> None:
    """A store an earlier agentd wrote in another format is replaced with a warning (not kept
    aside: nothing in it can serve), and the new one works."""
    db = tiny / STORE_FILE
    db.parent.mkdir()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('format', '1')")
        conn.execute("CREATE TABLE blobs (key BLOB PRIMARY KEY, data BLOB, digest BLOB, reads BLOB, used REAL)")
    out = build(tiny)
    assert "warning: cache.reset" in out and "format 1" in out
    assert sorted(p.name for p in db.parent.iterdir() if "corrupt" in p.name) == []
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")
    assert "0 sections rendered" in build(tiny)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_store_is_set_aside(tiny: Path, tmp_path: Path, damage: str) -> None:
    """A corrupt or truncated database is moved aside with a warning and rebuilt; the build is
    correct and succeeds."""
    build(tiny)
    db = tiny / STORE_FILE
    run_cli("build", cwd=tiny)  # checkpoint the WAL into the main file
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = db.read_bytes()
    db.write_bytes(b"\x00garbage" * 4096 if damage == "garbage" else data[: len(data) // 2])
    (tiny / "agents/alpha.yaml").write_text((tiny / "agents/alpha.yaml").read_text().replace("[a1, a2]", "[a1]"))
    out = build(tiny)
    assert "warning: cache.set_aside" in out
    assert list(db.parent.glob("cache.sqlite3.corrupt-*"))
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")
    assert "0 sections rendered" in build(tiny)  # the new store works


def test_corrupt_row_is_a_miss(tiny: Path, tmp_path: Path) -> None:
    """A stored render whose bytes no longer match their checksum is re-rendered, not used, and
    stored again; an output whose bytes come out the same is not rewritten."""
    engine(tiny).build()
    with sqlite3.connect(tiny / STORE_FILE) as conn:
        conn.execute("UPDATE blobs SET data = CAST('tampered' AS BLOB)")
    (tiny / "out/alpha.md").unlink()
    beta = (tiny / "out/beta.md").stat().st_mtime_ns
    e = engine(tiny)
    report = e.build()
    assert report.sections_rendered == [] and report.written == ["alpha.md"]
    assert e.store is not None and e.store.corrupt_rows == 11  # 7 sections, 2 compositions, 2 skeletons
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")
    assert (tiny / "out/beta.md").stat().st_mtime_ns == beta
    (tiny / "out/alpha.md").unlink()
    e = engine(tiny)
    e.build()
    assert e.store is not None and e.store.corrupt_rows == 0  # re-rendered bytes were stored


async def test_daemon_and_build_share_the_store_safely(tiny: Path, tmp_path: Path) -> None:
    """Concurrent writers (a daemon rebuilding and several `agentd build` runs) never damage the
    store or the outputs."""
    async with run_daemon(tiny) as d:
        alpha = tiny / "agents/alpha.yaml"
        original = alpha.read_text()
        builds = [asyncio.to_thread(run_cli, "build", "-q", cwd=tiny) for _ in range(4)]
        for i in range(6):
            alpha.write_text(original.replace("[a1, a2]", f"[a{i}]"))
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*builds)
        alpha.write_text(original)
        await d.wait_for(lambda e: e.get("event") == "build.finished" and "agents/alpha.yaml" in e["changed"])
        await d.quiet(0.4)
        assert not d.named("cache.set_aside")
    assert all("cache.set_aside" not in r.stderr for r in results)
    build(tiny)
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")
    with sqlite3.connect(tiny / STORE_FILE) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_cache_cli_stats_and_clear(tiny: Path) -> None:
    """`agentd cache stats` describes the store; `clear` removes it."""
    assert "no cache at" in run_cli("cache", "stats", cwd=tiny).stdout
    build(tiny)
    stats = orjson.loads(run_cli("cache", "stats", "--json", cwd=tiny).stdout)
    # 7 sections, 2 compositions, 2 skeletons
    assert stats["exists"] and stats["units"] == 11 and stats["blobs"] == 11
    assert "renders     11 dependency records" in run_cli("cache", "stats", cwd=tiny).stdout
    assert run_cli("cache", "clear", cwd=tiny).returncode == 0
    assert not (tiny / STORE_FILE).exists()
    assert "7 sections rendered" in build(tiny)


def test_no_cache_flag(tiny: Path) -> None:
    """--no-cache (or AGENTD_CACHE=0) neither reads nor writes the store."""
    build(tiny, "--no-cache")
    assert not (tiny / STORE_FILE).exists()
    assert run_cli("build", cwd=tiny, env={"AGENTD_CACHE": "0"}).returncode == 0
    assert not (tiny / STORE_FILE).exists()


@pytest.mark.parametrize("with_store", [True, False], ids=["store", "no-store"])
def test_tiny_memory_budget_still_builds_correctly(corpus_copy, tmp_path: Path, with_store: bool) -> None:  # type: ignore[no-untyped-def]
    """With a 1 MB budget most sections are evicted from memory; outputs stay exactly right
    through edits (evicted sections come back from the store, or are rendered again)."""
    root = corpus_copy()
    config = Config.load(root, {"memory_budget_mb": 1, "cache": with_store})
    # In this process: rendered in workers, sections never reach this process's L3.
    e = Engine(config, Store(root, render_stamp(config)) if with_store else None, jobs=1)
    report = e.build()
    assert report.ok
    assert e.caches.l3.bytes <= 1024 * 1024 and e.caches.l3.counters.evictions > 0
    assert read_outputs(root) == clean_build(root, tmp_path / "oracle1")
    fragment = root / "templates/fragments/badge.j2"
    fragment.write_text(fragment.read_text().replace("`level: {{ value }}`", "`level {{ value }}`"))
    base = root / "templates/base/footer.j2"
    base.write_text(base.read_text().replace("Edit the source, not this file.", "Edit the source."))
    report = e.build([fragment, base])
    assert report.ok and report.written
    assert read_outputs(root) == clean_build(root, tmp_path / "oracle2")


def test_parsed_sources_and_compiled_templates_are_kept(tiny: Path, tmp_path: Path) -> None:
    """The store also keeps parsed YAML (when JSON holds it exactly) and Jinja bytecode, so a
    restart neither parses nor compiles what did not change; YAML that JSON cannot hold (a
    date) is parsed every time and still renders right."""
    (tiny / "agents/alpha.yaml").write_text((tiny / "agents/alpha.yaml").read_text() + "released: 2025-03-04\n")
    summary = tiny / "templates/sections/summary.j2"
    summary.write_text(
        summary.read_text() + "{% if agent.released is defined %}year {{ agent.released.year }}{% endif %}\n"
    )
    build(tiny)
    stats = orjson.loads(run_cli("cache", "stats", "--json", cwd=tiny).stdout)
    # beta + the trait (alpha has a date), 9 templates' bytecode and 9 reference lists
    assert stats["parsed_and_compiled"] == 2 + 9 + 9
    e = engine(tiny)
    report = e.build()
    assert report.sections_rendered == [] and report.caches["L1"].misses == 9
    assert e.graph.to_json()["edges"]  # static template references came back from the store too
    assert ("template:fragments/list-item.j2", "template:sections/summary.j2", "static") in {
        (x["source"], x["target"], x["type"]) for x in e.graph.to_json()["edges"]
    }
    assert "year 2025" in (tiny / "out/alpha.md").read_text()
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")


def test_evicted_sections_are_sliced_from_the_output_agentd_wrote(corpus_copy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With sections evicted from memory and no store, recomposing an agent takes its unchanged
    sections from the output agentd last wrote (no render); once someone else changes that file,
    they are rendered again instead. Either way the output equals a clean build."""
    root = corpus_copy()
    e = Engine(Config.load(root, {"memory_budget_mb": 1, "cache": False}), None, jobs=1)
    e.build()
    fragment = root / "templates/fragments/badge.j2"
    fragment.write_text(fragment.read_text().replace("`level: {{ value }}`", "`level {{ value }}`"))
    report = e.build([fragment])
    assert report.ok and e.caches.l3.counters.evictions > 0
    sections = [name for name, _ in report.timings if name.startswith("sections/")]
    assert len(sections) == len(report.sections_rendered) == 32  # nothing rendered twice
    assert read_outputs(root) == clean_build(root, tmp_path / "oracle1")
    output = root / "out/api-design.md"
    output.write_bytes(output.read_bytes() + b"a line of the user's\n")
    fragment.write_text(fragment.read_text().replace("`level {{ value }}`", "`lvl {{ value }}`"))
    report = e.build([fragment])
    sections = [name for name, _ in report.timings if name.startswith("sections/")]
    assert len(sections) > len(report.sections_rendered) == 32  # api-design's others again
    assert read_outputs(root) == clean_build(root, tmp_path / "oracle2")


def test_queued_renders_do_not_wait_for_another_writer(tmp_path: Path) -> None:
    """Past the flush threshold, renders stay queued while another process holds the write
    lock (a worker keeps rendering instead of sleeping on it); ``flush`` then writes them all."""
    store = Store(tmp_path, b"stamp")
    store.FLUSH_EVERY = 4
    assert store.stats()["units"] == 0  # creates the database
    other = sqlite3.connect(tmp_path / STORE_FILE, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    for i in range(6):
        store.put(f"section:a/s{i}", Rendered(b"x%d" % i, {"template:t": b"1"}, fingerprint(b"x%d" % i)))
    assert other.execute("SELECT count(*) FROM deps").fetchone()[0] == 0
    other.execute("ROLLBACK")
    store.flush()
    assert other.execute("SELECT count(*) FROM deps").fetchone()[0] == 6
    other.close()
    store.close()


def _warnings_engine(root: Path, warnings: list[str], reasons: list[str] | None = None) -> Engine:
    """An engine whose store's warnings (event names; their reasons in ``reasons``) go to
    ``warnings``; no worker processes (which would reopen the store's connection)."""
    config = Config.load(root)

    def warn(event: str, reason: str = "", **_: object) -> None:
        warnings.append(event)
        if reasons is not None:
            reasons.append(reason)

    return Engine(config, Store(root, render_stamp(config), warn=warn), jobs=1)


def test_store_is_private_whatever_the_umask(tiny: Path) -> None:
    """Under umask 000, .agentd/ is created 0700 and the store with its -wal and -shm files
    0600; a folder and files found wider (an earlier agentd, another umask) are tightened the
    next time agentd opens the store, set-aside copies included."""
    folder = tiny / ".agentd"
    old = os.umask(0)
    try:
        e = engine(tiny)
        e.build()
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert modes == {"cache.sqlite3": 0o600, "cache.sqlite3-wal": 0o600, "cache.sqlite3-shm": 0o600}
        assert e.store is not None
        e.store.close()
    finally:
        os.umask(old)
    folder.chmod(0o755)
    (tiny / STORE_FILE).chmod(0o644)
    copy = folder / "cache.sqlite3.corrupt-20250101-000000"
    copy.write_bytes(b"an earlier copy")
    copy.chmod(0o644)
    engine(tiny).build()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o600}


def test_full_disk_keeps_the_store(tiny: Path, tmp_path: Path) -> None:
    """A full disk (SQLITE_FULL, which is what SQLite makes of ENOSPC) is not damage: over
    several builds the store stays where it is and nothing is set aside; each build warns once,
    goes on without caching and writes outputs equal to a clean build. With space again, the
    store caches as before."""
    engine(tiny).build()
    inode = (tiny / STORE_FILE).stat().st_ino
    alpha = tiny / "agents/alpha.yaml"
    original = alpha.read_text()
    for round_ in range(3):  # a rendered description bigger than a page: the store must grow
        alpha.write_text(original.replace("First agent.", f"First agent {round_}. " + "word " * 8000))
        warnings: list[str] = []
        e = _warnings_engine(tiny, warnings)
        assert e.store is not None
        db = e.store._connect()
        db.execute(f"PRAGMA max_page_count={db.execute('PRAGMA page_count').fetchone()[0]}")  # no room to grow
        report = e.build()
        assert report.ok and "alpha/summary" in report.sections_rendered
        assert warnings == ["cache.unavailable"]
        e.store.close()
        assert read_outputs(tiny) == clean_build(tiny, tmp_path / f"oracle{round_}")
    assert (tiny / STORE_FILE).stat().st_ino == inode
    assert [p.name for p in (tiny / ".agentd").iterdir() if ".corrupt-" in p.name or ".foreign-" in p.name] == []
    warnings = []
    _warnings_engine(tiny, warnings).build()  # space again: stored...
    assert _warnings_engine(tiny, warnings).build().sections_rendered == []  # ...and restored
    assert warnings == []


def test_only_the_newest_set_aside_copy_is_kept(tiny: Path) -> None:
    """Setting a damaged store aside deletes the copy set aside before: a store that keeps
    breaking never fills the disk."""
    folder = tiny / ".agentd"
    warnings: list[str] = []
    e = _warnings_engine(tiny, warnings)
    e.build()
    (folder / "cache.sqlite3.corrupt-20250101-000000").write_bytes(b"set aside by an earlier run")
    for damage in (b"first damage", b"second damage"):
        assert e.store is not None
        e.store.close()  # its last connection: the WAL is checkpointed into the file, and removed
        (tiny / STORE_FILE).write_bytes(damage * 1024)
        e = _warnings_engine(tiny, warnings)
        assert e.build().ok
    assert warnings == ["cache.set_aside", "cache.set_aside"]
    (copy,) = [p for p in folder.iterdir() if ".corrupt-" in p.name]
    assert copy.read_bytes().startswith(b"second damage")
    assert engine(tiny).build().sections_rendered == []  # the new store works


def test_foreign_sqlite_file_is_set_aside(tiny: Path, tmp_path: Path) -> None:
    """A SQLite database agentd did not write, found at .agentd/cache.sqlite3, is moved aside
    unchanged with a warning (never adopted); the build works and caches in a new store."""
    db = tiny / STORE_FILE
    db.parent.mkdir()
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE notes (text TEXT)")
    conn.execute("INSERT INTO notes VALUES ('mine')")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    warnings: list[str] = []
    reasons: list[str] = []
    e = _warnings_engine(tiny, warnings, reasons)
    assert e.build().ok
    assert warnings == ["cache.set_aside"] and reasons == ["not an agentd store: tables notes, no agentd format record"]
    (aside,) = db.parent.glob("cache.sqlite3.foreign-*")
    assert aside.read_bytes() == before
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")
    assert e.store is not None
    e.store.close()
    assert _warnings_engine(tiny, warnings).build().sections_rendered == []  # the new store works
    assert warnings == ["cache.set_aside"]


async def test_agentd_path_that_is_a_file(tiny: Path, tmp_path: Path) -> None:
    """A `.agentd` that is a file costs the persistent cache, never the build: `agentd build`
    warns once, naming the path and why, and succeeds; the daemon starts (locking the workspace
    folder instead), builds edits, and the file is left as it was."""
    (tiny / ".agentd").write_text("not agentd's\n")
    result = run_cli("build", cwd=tiny)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("warning:") == 1 and "Traceback" not in result.stderr
    assert "cache.unavailable" in result.stderr and f"{tiny}/.agentd" in result.stderr
    assert "exists and is not a folder" in result.stderr
    async with run_daemon(tiny) as d:
        assert [e["reason"] for e in d.named("watch.lock_fallback")] == [
            f"[Errno 20] exists and is not a folder: '{tiny}/.agentd'"
        ]
        alpha = tiny / "agents/alpha.yaml"
        alpha.write_text(alpha.read_text().replace("[a1, a2]", "[a1]"))
        assert (await d.next_build())["errors"] == 0
        assert len(d.named("cache.unavailable")) == 1
    assert read_outputs(tiny) == clean_build(tiny, tmp_path / "oracle")
    assert (tiny / ".agentd").read_text() == "not agentd's\n"


def test_a_parse_stored_before_stricter_checks_is_parsed_again(tiny: Path) -> None:
    """A source's parse stored by an agentd that did not refuse duplicate keys yet is not
    trusted: the duplicate is reported as if nothing were stored."""
    import yaml

    source = tiny / "agents/alpha.yaml"
    source.write_text(source.read_text() + "skills: [again]\n")
    raw = source.read_bytes()
    old = engine(tiny)
    assert old.store is not None
    old.store.put_aux(b"yaml", fingerprint(raw), orjson.dumps(yaml.safe_load(raw)), "agents/alpha.yaml")
    old.store.flush()
    old.store.close()
    report = engine(tiny).build(write=False)
    assert any("duplicate key 'skills'" in str(e) for e in report.errors), report.errors
