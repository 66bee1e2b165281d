"""Command line: ``agentd build | watch | status | check | verify | graph | affected | service``.

The boundary where errors are printed and turned into exit codes: 0 success, 1 an agent (or
any source) failed, 2 usage or configuration error, 3 no daemon answers (``status``), 4 a
daemon already runs on this workspace (``watch``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import orjson

from . import __version__
from .config import Config
from .exceptions import AgentdError, AlreadyRunning, ConfigError, ControlError

# The engine (networkx, Jinja2: ~130 ms of imports) is imported where a command needs it, so
# `agentd build --jobs` can start parsing in workers first and `agentd status` starts fast.
if TYPE_CHECKING:
    from .build import BuildReport, Engine

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_RUNNING = 0, 1, 2, 3, 4

_DESCRIPTION = """\
Render every agents/<id>.yaml through the Jinja2 templates in templates/ into out/<id>.md,
redoing only what changed.

Configuration comes from, in order of precedence: command-line flags, AGENTD_* environment
variables (AGENTD_OUTPUT_DIR=build ...), agentd.toml at the workspace root, defaults.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's default exit code is also 2; keep the text
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"agentd: error: {message}\n")


def _no_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-cache",
        action="store_false",
        dest="cache",
        default=None,
        help="ignore and do not update .agentd/cache.sqlite3",
    )


def _jobs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--jobs",
        "-j",
        metavar="N",
        help="worker processes for big batches of renders: cold builds and template edits that "
        "touch many agents ('auto': one per core, at most 8; 1: none). Workers are started once and "
        "kept warm; small edits never use them. Default: auto (AGENTD_JOBS, agentd.toml `jobs`)",
    )


def _parser() -> argparse.ArgumentParser:
    root_help = "workspace root holding templates/ and agents/ (default: the current directory)"
    socket_help = "status socket (default: $XDG_RUNTIME_DIR/agentd/<workspace>.sock; env AGENTD_SOCKET)"
    p = _Parser(prog="agentd", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"agentd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    b = sub.add_parser(
        "build",
        help="render every agent to out/ once and exit",
        description="Render every agents/*.yaml to out/<id>.md. Outputs are written atomically; "
        "an output whose bytes did not change is not touched; outputs of deleted agents are "
        "removed (only files agentd generated, listed in out/.agentd-manifest.json). "
        "Exit 0 on success, 1 when any agent failed (the others are still written), 2 on a "
        "usage or configuration error.",
    )
    b.add_argument("--root", default=".", help=root_help)
    b.add_argument("--output-dir", help="output folder, relative to the root (default: out)")
    b.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    _jobs(b)
    _no_cache(b)

    w = sub.add_parser(
        "watch",
        help="build, then rebuild on every change until stopped (Ctrl-C, SIGTERM)",
        description="Build everything, then watch templates/, agents/ and agentd.toml and "
        "re-render only what each change affects. out/ is never watched. Logs one line per "
        "rebuild (console on a terminal, JSON lines otherwise) on stderr. SIGINT/SIGTERM finish "
        "the build in flight and exit 0; SIGUSR1 runs `verify` and logs the result.",
    )
    w.add_argument("--root", default=".", help=root_help)
    w.add_argument("--output-dir", help="output folder, relative to the root (default: out)")
    w.add_argument(
        "--debounce",
        type=int,
        metavar="MS",
        dest="debounce_ms",
        help="longest time a continuous stream of changes is grouped into one rebuild (default: 400)",
    )
    w.add_argument(
        "--step",
        type=int,
        metavar="MS",
        dest="step_ms",
        help="quiet time after a change before it is reported; sets save-to-output latency (default: 8)",
    )
    w.add_argument("--log-format", choices=("auto", "console", "json"), help="log renderer (default: auto)")
    w.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="default: info")
    w.add_argument("--socket", metavar="PATH", help=socket_help)
    _jobs(w)
    _no_cache(w)

    ca = sub.add_parser(
        "cache",
        help="inspect or reset the persistent cache (.agentd/cache.sqlite3)",
        description="The persistent cache keeps rendered sections and their dependency records so a "
        "restart renders nothing that did not change. `stats` shows its size and contents; `clear` "
        "deletes it (the next build renders everything).",
    )
    ca.add_argument("action", choices=("stats", "clear"), help="what to do")
    ca.add_argument("--root", default=".", help=root_help)
    ca.add_argument("--json", action="store_true", help="print JSON (stats)")

    st = sub.add_parser(
        "status",
        help="ask a running daemon how it is doing",
        description="Ask the `agentd watch` of a workspace for its state, last build, cache hit "
        "rates, slowest templates, alerts and errors. Exit 0 when healthy, 1 when the daemon "
        "reports errors, 3 when no daemon answers.",
    )
    st.add_argument("--root", default=".", help=root_help)
    st.add_argument("--socket", metavar="PATH", help=socket_help)
    st.add_argument("--json", action="store_true", help="print the raw `stats` reply as JSON")
    st.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    st.add_argument("--interval", type=float, default=1.0, metavar="S", help="refresh period for --watch (default: 1)")
    st.add_argument(
        "--socket-path", action="store_true", help="print the workspace's socket path and exit (no daemon needed)"
    )

    sv = sub.add_parser(
        "service",
        help="install agentd as a systemd user service",
        description="Write ~/.config/systemd/user/agentd@.service (running this agentd) and "
        "enable and start the instance for the workspace (agentd@<escaped path>.service).",
    )
    sv.add_argument("action", choices=("install",), help="what to do")
    sv.add_argument("--root", default=".", help=root_help)
    sv.add_argument("--no-start", action="store_true", help="only write the unit; print the commands that start it")
    sv.add_argument("--print", action="store_true", dest="print_unit", help="print the unit instead of installing it")

    ch = sub.add_parser(
        "check",
        help="lint templates, sources and outputs (in memory; writes nothing)",
        description="Check that every template compiles and reads only its documented context, "
        "every include exists and none form a cycle, every agent and trait source matches the "
        "workspace schema (types, allowed values, no duplicate keys, known sections and traits), "
        "and every generated agent is complete, valid Markdown. Renders in memory: no prior "
        "build needed, out/ is never written. Exit 0 clean, 1 on errors (or warnings with "
        "--strict), 2 on a usage error. Rules are configured under [check] in agentd.toml.",
    )
    ch.add_argument("--root", default=".", help=root_help)
    ch.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    ch.add_argument("--strict", action="store_true", help="warnings fail too")

    v = sub.add_parser(
        "verify",
        help="check that out/ is byte-identical to a clean build",
        description="Run a clean build into a temporary folder and compare it with out/. Exit 0 "
        "when identical, 1 listing the files that differ, are missing or are stale.",
    )
    v.add_argument("--root", default=".", help=root_help)
    v.add_argument("--output-dir", help="output folder, relative to the root (default: out)")
    v.add_argument("--json", action="store_true", help="print JSON instead of text")

    be = sub.add_parser(
        "bench",
        help="benchmark agentd against the naive approach on synthetic workspaces",
        description="Generate workspaces of N agents from --root's templates and agents (ids renamed, "
        "values varied), then measure side by side: cold builds (naive: a fresh Jinja Environment per "
        "agent; agentd build --jobs 1 and --jobs auto; again with the persistent cache), the daemon's warm "
        "restart, save->output latency through a real `agentd watch` (--jobs auto, and --jobs 1 for the "
        "template edits) for one agent key, one section template, one trait, one fragment macro and the "
        "base template, beside the oracle (rendering exactly the affected sections in-process) and the "
        "naive full rebuild, and per-layer hit rates over two editing sessions. Prints a table; --output "
        "writes JSON.",
    )
    be.add_argument("--root", default=".", help="workspace the synthetic ones are derived from (default: .)")
    be.add_argument("--agents", default="10,100,1000", help="comma-separated workspace sizes (default: 10,100,1000)")
    be.add_argument("--trials", type=int, default=20, help="saves per edit kind (default: 20)")
    be.add_argument("--quick", action="store_true", help="N=10 and 6 trials: a smoke run well under a minute")
    be.add_argument("--output", type=Path, metavar="FILE", help="write the JSON report here")

    gr = sub.add_parser(
        "graph",
        help="export the dependency graph (templates, data keys, traits -> sections -> agents)",
        description="Render everything in memory (nothing is written) and print the dependency "
        "graph: static template references (jinja2.meta) plus what every render actually loaded "
        "and read.",
    )
    gr.add_argument("--root", default=".", help=root_help)
    gr.add_argument("--format", choices=("dot", "json"), default="dot", help="output format (default: dot)")

    af = sub.add_parser(
        "affected",
        help="list the agents and sections a change to PATH... would re-render",
        description="Render everything in memory (nothing is written), then print which agents "
        "and sections a change to the given files would re-render.",
    )
    af.add_argument("paths", nargs="+", metavar="PATH", help="template, agent or trait files")
    af.add_argument("--root", default=".", help=root_help)
    af.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        overrides = {
            k: getattr(args, k, None)
            for k in ("output_dir", "debounce_ms", "step_ms", "log_format", "log_level", "socket", "cache", "jobs")
        }
        config = Config.load(args.root, overrides)
        handler = {
            "build": _cmd_build,
            "watch": _cmd_watch,
            "verify": _cmd_verify,
            "status": _cmd_status,
            "check": _cmd_check,
            "cache": _cmd_cache,
            "bench": _cmd_bench,
            "service": _cmd_service,
            "graph": _cmd_graph,
            "affected": _cmd_affected,
        }[args.command]
        return handler(config, args)
    except AlreadyRunning as exc:
        print(f"agentd: {exc}", file=sys.stderr)
        return EXIT_RUNNING
    except (ConfigError, ControlError) as exc:
        print(f"agentd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AgentdError as exc:
        print(f"agentd: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # the environment (no file descriptors, a full disk), not a source
        print(f"agentd: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _check_workspace(config: Config) -> None:
    for path, what in ((config.templates_path, "templates"), (config.agents_path, "agents")):
        if not path.is_dir():
            raise ConfigError(f"{path} is not a directory: is {config.root} an agentd workspace? (expected {what}/)")


def print_errors(report: BuildReport, stream: TextIO) -> None:
    for error in report.errors:
        print(f"error: {error}", file=stream)


def summary(report: BuildReport) -> str:
    """A few lines a person can scan after a build."""
    rendered = len(report.sections_rendered)
    lines = [
        f"agentd: {report.agents} agents, {rendered} sections rendered, "
        f"{report.sections_reused + report.sections_restored} reused"
        + (f" ({report.sections_cut_off} re-rendered identical)" if report.sections_cut_off else ""),
        f"  outputs: {len(report.written)} written, {len(report.unchanged)} unchanged, {len(report.removed)} removed"
        + (f", {len(report.errors)} error(s)" if report.errors else ""),
    ]
    layers = []
    for name, c in report.caches.items():
        rate = "-" if c.hit_rate is None else f"{c.hit_rate:.0%}"
        layers.append(f"{name} {rate} ({c.hits}/{c.hits + c.misses})")
    lines.append("  cache hits: " + "  ".join(layers))
    if report.sections_restored:
        lines.append(f"  persistent cache: {report.sections_restored} sections restored (rendered by an earlier run)")
    workers = f" ({report.workers} worker processes)" if report.workers else ""
    lines.append(f"  time: {report.duration_ms:.0f} ms{workers}")
    return "\n".join(lines)


def _cmd_build(config: Config, args: argparse.Namespace) -> int:
    _check_workspace(config)
    from .store import open_store
    from .workspace import ParseAhead

    store = open_store(config, warn=_warn)
    parsing = ParseAhead.start(config, config.workers, store)  # while the engine is imported
    from .build import Engine

    engine = Engine(config, store)
    engine.parse_ahead = parsing
    try:
        report = engine.build()
    finally:
        engine.close()
    if engine.pool_error:
        _warn("workers.unavailable", error=engine.pool_error)
    if store:
        store.close()
    print_errors(report, sys.stderr)
    if not args.quiet:
        print(summary(report))
    return EXIT_OK if report.ok else EXIT_FAILED


def _cmd_watch(config: Config, args: argparse.Namespace) -> int:
    from . import log
    from .server import Server

    _check_workspace(config)
    log.configure(config.log_format, config.log_level)
    keep = ("output_dir", "debounce_ms", "step_ms", "socket", "cache", "jobs")
    overrides = {k: v for k, v in vars(args).items() if k in keep and v is not None}
    return Server(config, overrides).run()


def _cmd_status(config: Config, args: argparse.Namespace) -> int:
    if args.socket_path:
        from .control import socket_path

        print(socket_path(config))
        return EXIT_OK
    if not args.watch:
        return _status_once(config, args)
    code = 130  # interrupted before the first answer
    try:
        while True:
            code = _status_once(config, args)
            time.sleep(max(0.1, args.interval))
    except KeyboardInterrupt:  # Ctrl-C is how --watch ends, wherever in a refresh it lands
        return code


def _status_once(config: Config, args: argparse.Namespace) -> int:
    from .control import request, socket_path
    from .status import render_table

    path = socket_path(config)
    try:
        stats = request(path, "stats", timeout=5)
    except (OSError, ValueError) as exc:
        where = "set by --socket/AGENTD_SOCKET" if config.socket else f"derived from the workspace {config.root}"
        print(
            f"agentd: no daemon answers at {path} ({where}): {getattr(exc, 'strerror', None) or exc}\n"
            f"start one with: agentd watch --root {config.root}",
            file=sys.stderr,
        )
        return EXIT_NO_DAEMON
    if args.json:
        sys.stdout.write(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        if args.watch:
            sys.stdout.write("\x1b[H\x1b[2J")  # home + clear, like watch(1)
        print(render_table(stats))
    sys.stdout.flush()
    return EXIT_FAILED if stats["errors"] else EXIT_OK


def _warn(event: str, **fields: Any) -> None:
    detail = ", ".join(f"{k}={v}" for k, v in fields.items())
    print(f"agentd: warning: {event}: {detail}", file=sys.stderr)


def _cmd_bench(config: Config, args: argparse.Namespace) -> int:
    from .bench import run, table

    _check_workspace(config)
    try:
        sizes = [10] if args.quick else [int(n) for n in args.agents.split(",") if n.strip()]
    except ValueError:
        raise ConfigError(f"--agents: expected comma-separated numbers, got {args.agents!r}") from None
    if not sizes or min(sizes) < 1 or args.trials < 2:
        raise ConfigError("--agents needs sizes >= 1 and --trials at least 2")
    trials = 6 if args.quick else args.trials
    report = run(config.root, sizes, trials, args.output, lambda m: print(f"  ... {m}", file=sys.stderr, flush=True))
    print(table(report))
    return EXIT_OK


def _cmd_cache(config: Config, args: argparse.Namespace) -> int:
    from .store import Store, render_stamp

    store = Store(config.root, render_stamp(config), warn=_warn)
    if args.action == "clear":
        existed = store.path.exists()
        store.clear()
        print(f"removed {store.path}" if existed else f"no cache at {store.path}")
        return EXIT_OK
    if not store.path.exists():
        data: dict[str, Any] = {"path": str(store.path), "exists": False}
    else:
        data = {"exists": True, **store.stats()}
        store.close()
    if args.json:
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif not data["exists"]:
        print(f"no cache at {data['path']} (it is created by the next build)")
    else:
        print(f"cache       {data['path']} (format {data['format']})")
        print(f"renders     {data['units']} dependency records, {data['blobs']} stored outputs")
        print(f"sources     {data['parsed_and_compiled']} parsed sources, compiled templates and template references")
        print(f"size        {data['blob_bytes'] / 1e6:.1f} MB of output, {data['file_bytes'] / 1e6:.1f} MB on disk")
    return EXIT_OK


def _cmd_check(config: Config, args: argparse.Namespace) -> int:
    from .check import Checker

    _check_workspace(config)
    findings = Checker(config).run()
    errors = sum(f.severity == "error" for f in findings)
    warnings = len(findings) - errors
    failed = errors > 0 or (args.strict and warnings > 0)
    if args.format == "json":
        body = {
            "findings": [f.to_dict() for f in findings],
            "summary": {"errors": errors, "warnings": warnings, "files": len({f.path for f in findings})},
        }
        sys.stdout.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
        return EXIT_FAILED if failed else EXIT_OK
    current = None
    for f in findings:
        if f.path != current:
            if current is not None:
                print()
            print(f.path)
            current = f.path
        print(f"  {f.format()}")
    if findings:
        print(f"\n{errors} error(s), {warnings} warning(s) in {len({f.path for f in findings})} file(s)")
    else:
        print("agentd check: no findings")
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_service(config: Config, args: argparse.Namespace) -> int:
    from .service import install, unit_text

    if args.print_unit:
        sys.stdout.write(unit_text(sys.executable))
        return EXIT_OK
    _check_workspace(config)
    try:
        lines = install(config.root, start=not args.no_start)
    except OSError as exc:
        print(f"agentd: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for line in lines:
        print(line)
    return EXIT_OK


def _cmd_verify(config: Config, args: argparse.Namespace) -> int:
    from .verify import verify

    _check_workspace(config)
    result = verify(config)
    if args.json:
        sys.stdout.write(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return EXIT_OK if result.ok else EXIT_FAILED
    out = config.output_dir
    for error in result.errors:
        print(f"error: {error}", file=sys.stderr)
    for name in result.differing:
        print(f"differs: {out}/{name}")
        print(result.diffs[name])
    for name in result.missing:
        print(f"missing: {out}/{name} (a clean build writes it)")
    for name in result.stale:
        print(f"stale:   {out}/{name} (a clean build does not write it)")
    if result.ok:
        print(f"ok: {out}/ matches a clean build ({result.checked} files)")
        return EXIT_OK
    counts = f"{len(result.differing)} differ, {len(result.missing)} missing, {len(result.stale)} stale"
    print(f"{out}/ differs from a clean build: {counts}")
    return EXIT_FAILED


def _memory_engine(config: Config) -> Engine:
    from .build import Engine

    _check_workspace(config)
    engine = Engine(config)
    report = engine.build(write=False)
    print_errors(report, sys.stderr)
    return engine


def _cmd_graph(config: Config, args: argparse.Namespace) -> int:
    engine = _memory_engine(config)
    if args.format == "json":
        sys.stdout.write(orjson.dumps(engine.graph.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(engine.graph.to_dot())
    return EXIT_OK


def _cmd_affected(config: Config, args: argparse.Namespace) -> int:
    engine = _memory_engine(config)
    result = engine.affected(Path(p) if Path(p).is_absolute() else Path.cwd() / p for p in args.paths)
    if args.json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(f"agents ({len(result['agents'])}):")
        for a in result["agents"]:
            print(f"  {a}")
        print(f"sections ({len(result['sections'])}):")
        for s in result["sections"]:
            print(f"  {s}")
    return EXIT_OK
