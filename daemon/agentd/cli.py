"""Command line: ``agentd build | watch | status | stop | rebuild | check | verify | graph |
affected | service``.

The boundary where errors are printed and turned into exit codes: 0 success, 1 an agent (or
any source) failed, 2 usage or configuration error, 3 no daemon answers (``status``, ``stop``),
4 a daemon already runs on this workspace (``watch``).

``affected``, ``verify``, ``graph`` and ``rebuild`` ask the workspace's running daemon when one
answers (it has everything in memory) and work in-process otherwise; they print the same either
way, so the daemon's replies are printed by the same code as the in-process results.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson

from . import __version__
from .config import CONFIG_FILE, Config, did_you_mean, find_root
from .console import print_errors
from .exceptions import AgentdError, AlreadyRunning, ConfigError, ControlError, RequestError
from .progress import Progress, progress_line

# The engine (networkx, Jinja2: ~130 ms of imports) is imported where a command needs it, so
# `agentd build --jobs` can start parsing in workers first and `agentd status` starts fast.
if TYPE_CHECKING:
    from .build import Engine
from .report import BuildReport

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_RUNNING = 0, 1, 2, 3, 4
#: What a shell reports for a command killed by SIGPIPE (128 + 13), as git's is.
EXIT_BROKEN_PIPE = 141

#: How long a daemon gets to answer a ping (it answers within milliseconds, even mid-build)
#: before a command works without it.
PING_TIMEOUT_S = 5.0
#: How long ``agentd stop`` waits beyond the daemon's ``graceful_timeout`` for it to exit.
STOP_MARGIN_S = 10.0

_DESCRIPTION = """\
Render every agents/<id>.yaml (or .yml) through the Jinja2 templates in templates/ into out/<id>.md,
redoing only what changed.

Configuration comes from, in order of precedence: command-line flags, AGENTD_* environment
variables (AGENTD_OUTPUT_DIR=build ...), agentd.toml at the workspace root, defaults.
"""


#: argparse's message for a bad choice (a command, --format ...), in Python 3.11-3.13.
_INVALID_CHOICE = re.compile(r"invalid choice: '(?P<given>[^']*)' \(choose from (?P<choices>.*)\)$")


#: The end of the --help of the commands people start with.
_EXAMPLES = {
    "build": """\
examples:
  agentd build                      build the workspace this folder is in
  agentd -C ~/agents build -q       another workspace; print only errors
  agentd build --no-cache --jobs 1  render everything in this process, as a clean build does
""",
    "watch": """\
examples:
  agentd watch                      build, then rebuild on every save (Ctrl-C stops)
  agentd watch -v                   every log line in full (debug)
  agentd watch --log-format json 2>agentd.log   JSON lines, as under systemd
""",
    "status": """\
examples:
  agentd status                     the daemon's state, last build, caches, alerts, errors
  agentd status --watch             redraw after every build until Ctrl-C
  agentd status --format json | jq .last_build
""",
    "explain": """\
examples:
  agentd explain out/api-design.md:1234       what made line 1234: section, template chain, data
  agentd explain api-design:40-60             lines 40 to 60 of out/api-design.md
  agentd explain api-design --format json     every line, one JSON object each
  agentd explain --template templates/fragments/table.j2:8   every output line that line made
""",
    "check": """\
examples:
  agentd check                      lint everything; exit 1 on errors
  agentd check --strict             warnings fail too (for CI)
  agentd check --format json | jq '.findings[] | select(.rule == "schema")'
""",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's default exit code is also 2; keep the text
        self.print_usage(sys.stderr)
        match = _INVALID_CHOICE.search(message)
        if match:
            choices = re.findall(r"'([^']*)'", match["choices"])
            message += did_you_mean(match["given"], choices)
        self.exit(EXIT_USAGE, f"agentd: error: {message}\n")


class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions as argparse does, but keeps an ``examples:`` epilog as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return text.rstrip("\n")
        return super()._fill_text(text, width, indent)


def _format(parser: argparse.ArgumentParser, choices: tuple[str, ...] = ("text", "json")) -> None:
    """``--format`` is the one spelling of an output format; ``--json`` stays as its alias."""
    parser.add_argument("--format", choices=choices, default=choices[0], help=f"output format (default: {choices[0]})")
    parser.add_argument("--json", action="store_const", const="json", dest="format", help="same as --format json")


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


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """Options every command takes, before or after its name (``agentd -C ws build -q``).

    The top-level parser gives the real defaults; each subcommand's copy defaults to SUPPRESS
    so that leaving an option out after the name keeps what was given before it."""

    def given(value: Any) -> Any:
        return default if default is argparse.SUPPRESS else value

    parser.add_argument(
        "--root",
        "-C",
        metavar="DIR",
        default=given(None),
        help="workspace root (default: the nearest folder, from the current one up, holding "
        "agentd.toml or both templates/ and agents/)",
    )
    parser.add_argument(
        "--quiet", "-q", action="store_true", default=given(False), help="print only errors and warnings"
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", default=given(False), help="more detail (watch: debug log lines)"
    )
    parser.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default=given("auto"),
        help="colour console output: auto (on a terminal), always, never (default: auto)",
    )


_ASKS_DAEMON = (
    "When an `agentd watch` serves the workspace (its socket answers), it is asked; otherwise, "
    "or with --no-daemon, the work is done in this process. Output and exit codes are the same "
    "either way; -v says on stderr which one answered."
)


def _daemon_options(parser: argparse.ArgumentParser, no_daemon: bool = True) -> None:
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="the daemon's socket (default: $XDG_RUNTIME_DIR/agentd/<workspace>.sock; env AGENTD_SOCKET); "
        "a daemon of another workspace is refused",
    )
    if no_daemon:
        parser.add_argument(
            "--no-daemon", action="store_true", help="work in this process even when a daemon serves the workspace"
        )


def _parser() -> argparse.ArgumentParser:
    socket_help = "status socket (default: $XDG_RUNTIME_DIR/agentd/<workspace>.sock; env AGENTD_SOCKET)"
    p = _Parser(prog="agentd", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", "-V", action="version", version=f"agentd {__version__}")
    _global_options(p, None)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    sub = p.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        # a factory, not a class: argparse only calls it (typeshed asks for a type)
        parser_class=cast(type[_Parser], functools.partial(_Parser, parents=[common], formatter_class=_Formatter)),
    )

    b = sub.add_parser(
        "build",
        help="render every agent to out/ once and exit",
        description="Render every agents/*.yaml and *.yml to out/<id>.md. Outputs are written atomically; "
        "an output whose bytes did not change is not touched; outputs of deleted agents are "
        "removed (only files agentd generated, listed in out/.agentd-manifest.json). "
        "Exit 0 on success, 1 when any agent failed (the others are still written), 2 on a "
        "usage or configuration error.",
        epilog=_EXAMPLES["build"],
    )
    b.add_argument("--output-dir", help="output folder, relative to the root (default: out)")
    _jobs(b)
    _no_cache(b)

    w = sub.add_parser(
        "watch",
        help="build, then rebuild on every change until stopped (Ctrl-C, SIGTERM)",
        description="Build everything, then watch templates/, agents/ and agentd.toml and "
        "re-render only what each change affects. out/ is never watched. Logs one line per "
        "rebuild (console on a terminal, JSON lines otherwise) on stderr. SIGINT/SIGTERM finish "
        "the build in flight and exit 0; SIGUSR1 runs `verify` and logs the result.",
        epilog=_EXAMPLES["watch"],
    )
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
    _format(ca)

    st = sub.add_parser(
        "status",
        help="ask a running daemon how it is doing",
        description="Ask the `agentd watch` of a workspace for its state, last build, cache hit "
        "rates, slowest templates, alerts and errors. Exit 0 when healthy, 1 when the daemon "
        "reports errors, 3 when no daemon answers.",
        epilog=_EXAMPLES["status"],
    )
    st.add_argument("--socket", metavar="PATH", help=socket_help)
    _format(st)  # json: the raw `stats` reply
    st.add_argument(
        "--watch", action="store_true", help="redraw after every build (subscribed to the daemon's events) until Ctrl-C"
    )
    st.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="S",
        help="with --watch, also redraw after S seconds without a build, so uptime and memory stay "
        "current (default: 1; 0: only after builds)",
    )
    st.add_argument(
        "--socket-path", action="store_true", help="print the workspace's socket path and exit (no daemon needed)"
    )

    sp = sub.add_parser(
        "stop",
        help="stop the running daemon of the workspace (like SIGTERM)",
        description="Ask the `agentd watch` of the workspace to stop: it finishes the build in flight "
        "and exits 0, like on SIGTERM. Waits until it is gone, then prints `stopped agentd (pid N)`. "
        "Exit 0 when it stopped, 1 when it is still running after its graceful_timeout plus "
        f"{STOP_MARGIN_S:g} s, 3 when no daemon answers. A daemon systemd runs is better stopped with "
        "`systemctl --user stop agentd@<escaped path>.service`.",
    )
    _daemon_options(sp, no_daemon=False)

    rb = sub.add_parser(
        "rebuild",
        help="re-render everything (or AGENT...) from scratch, ignoring every cache",
        description="Re-render every section of every agent (or only of AGENT...) from scratch: "
        "templates compiled anew, no render taken from a cache or from .agentd/cache.sqlite3. "
        "Outputs are written only where their bytes changed. Prints a summary like `agentd build`; "
        "exit 0 on success, 1 when any agent failed, 2 for an unknown agent id. " + _ASKS_DAEMON,
    )
    rb.add_argument("agents", nargs="*", metavar="AGENT", help="agent ids (default: every agent)")
    _daemon_options(rb)
    _jobs(rb)

    sv = sub.add_parser(
        "service",
        help="install agentd as a systemd user service",
        description="Write ~/.config/systemd/user/agentd@.service (running this agentd) and "
        "enable and start the instance for the workspace (agentd@<escaped path>.service).",
    )
    sv.add_argument("action", choices=("install",), help="what to do")
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
        epilog=_EXAMPLES["check"],
    )
    _format(ch)
    ch.add_argument("--strict", action="store_true", help="warnings fail too")

    v = sub.add_parser(
        "verify",
        help="check that out/ is byte-identical to a clean build",
        description="Run a clean build into a temporary folder and compare it with out/. Exit 0 "
        "when identical, 1 listing the files that differ, are missing or are stale. "
        + _ASKS_DAEMON
        + " The daemon compares the folder it writes to; when that is not the one this command "
        "would check (--output-dir, AGENTD_OUTPUT_DIR), the check runs here.",
    )
    v.add_argument("--output-dir", help="output folder, relative to the root (default: out)")
    _format(v)
    _daemon_options(v)

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
    be.add_argument("--agents", default="10,100,1000", help="comma-separated workspace sizes (default: 10,100,1000)")
    be.add_argument("--trials", type=int, default=20, help="saves per edit kind (default: 20)")
    be.add_argument("--quick", action="store_true", help="N=10 and 6 trials: a smoke run well under a minute")
    be.add_argument("--output", type=Path, metavar="FILE", help="write the JSON report here")
    be.add_argument(
        "--only",
        choices=("cli", "explain"),
        help="cli: only the latency of `agentd affected` and `agentd verify` run as commands, answered "
        "by a running daemon and in-process (--no-daemon), alternating; median and min over --trials runs. "
        "explain: only `agentd explain` of one line (in-process, daemon cold and warm) and of a template "
        "line across all agents",
    )

    gr = sub.add_parser(
        "graph",
        help="export the dependency graph (templates, data keys, traits -> sections -> agents)",
        description="Print the dependency graph: static template references (jinja2.meta) plus "
        "what every render actually loaded and read. " + _ASKS_DAEMON + " In this process, "
        "everything is rendered in memory first (nothing is written).",
    )
    _format(gr, ("dot", "json"))
    _daemon_options(gr)

    ex = sub.add_parser(
        "explain",
        help="say which section, template line (and the include/extends/macro steps to it) and YAML "
        "values made an output line",
        epilog=_EXAMPLES["explain"],
        description="For each line of an output: its section; the template file and line that wrote "
        "it, after the include/import/extends/block/macro steps that led there (innermost last); and "
        "the file, line and path of each YAML value on it. With --template, the reverse: every output "
        "line range a template line produced, in every agent. The agent is rendered again in a tracing "
        "mode (builds never pay for it); the answer is refused when out/ is not what the sources give "
        "now. " + _ASKS_DAEMON + " The daemon keeps the map of the agents it explained while their "
        "output stays the same.",
    )
    ex.add_argument(
        "target",
        nargs="?",
        metavar="OUTPUT[:LINE[-LINE]]",
        help="an output (out/<id>.md, <id>.md or <id>) and optionally a line or a range; all lines without",
    )
    ex.add_argument(
        "--template",
        metavar="TEMPLATE:LINE",
        help="the reverse: the output lines a template line (templates/<name>:<line>) produced",
    )
    _format(ex)
    _daemon_options(ex)

    it = sub.add_parser(
        "init",
        help="start a new workspace in DIR: a small one to grow, or the full example (--example)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Write a new workspace into DIR (default: the current directory; created if missing) that
builds, checks clean and watches as it is:

  agentd.toml                      settings and contract: sections, [check] gates, schemas
  schemas/agent.json, trait.json   JSON Schemas `agentd check` validates sources against
  agents/<id>.yaml                 two agents, each rendered to out/<id>.md
  agents/traits/<kind>/<id>.yaml   a trait, which an agent lists under `traits: {<kind>: [id]}`
  templates/base/agent-base.j2     front matter, title and contents, then the sections
  templates/sections/_section.j2   the frame each section extends (its `## N. Title`)
  templates/sections/<name>.j2     one template per section
  templates/fragments/lists.j2     macros the sections import
  .gitignore                       out/ and .agentd/

--example writes the full example corpus agentd ships with instead: eight agents of
6,000-11,000 lines, nine sections, traits of four kinds.

DIR must be empty: entries starting with "." (a .git/ from `git init`) do not count, but a
file init writes (.gitignore) does. --force writes into a non-empty DIR: init's files replace
existing files of the same name; no other file is changed or deleted. Exit 0 on success, 2
when DIR is refused.""",
    )
    it.add_argument(
        "dir",
        nargs="?",
        default=".",
        metavar="DIR",
        help="where to create the workspace (default: .; taken from --root/-C when given, like git -C)",
    )
    it.add_argument("--example", action="store_true", help="write the full shipped corpus instead of the small starter")
    it.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty DIR, overwriting files of the same name (nothing else is touched)",
    )

    af = sub.add_parser(
        "affected",
        help="list the agents and sections a change to PATH... would re-render",
        description="Print which agents and sections a change to the given files would re-render. "
        + _ASKS_DAEMON
        + " In this process, everything is rendered in memory first (nothing is written).",
    )
    af.add_argument("paths", nargs="+", metavar="PATH", help="template, agent or trait files (relative to here)")
    _format(af)
    _daemon_options(af)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, not at exit, where a broken pipe prints a traceback
        return code
    except (
        BrokenPipeError,
        _ReaderGone,
    ):  # the reader went away (`agentd status | head -1`): stop quietly, as git does
        _silence_stdout()
        return EXIT_BROKEN_PIPE


class _ReaderGone(Exception):
    """stdout's reader went away where an ``OSError`` means the daemon did (``status --watch``)."""


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush at exit finds no broken pipe
    to complain about (https://docs.python.org/3/library/signal.html#note-on-sigpipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quiet and args.verbose:
        parser.error("--quiet and --verbose contradict each other; give one")
    if args.color == "auto" and os.environ.get("NO_COLOR"):  # https://no-color.org
        args.color = "never"
    try:
        if args.command == "init":  # it creates the workspace Config.load would read
            return _cmd_init(args)
        overrides = {
            k: getattr(args, k, None)
            for k in ("output_dir", "debounce_ms", "step_ms", "log_format", "log_level", "socket", "cache", "jobs")
        }
        if overrides["log_level"] is None and (args.quiet or args.verbose):
            overrides["log_level"] = "warning" if args.quiet else "debug"
        config = Config.load(_root(args), overrides)
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
            "explain": _cmd_explain,
            "rebuild": _cmd_rebuild,
            "stop": _cmd_stop,
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
    except BrokenPipeError:
        raise
    except OSError as exc:  # the environment (no file descriptors, a full disk), not a source
        print(f"agentd: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def _root(args: argparse.Namespace) -> Path:
    """``--root``, else the workspace the current directory is in, found the way git finds its
    repository; else the current directory, which ``_check_workspace`` then explains."""
    if args.root is not None:
        return Path(args.root)
    here = Path.cwd()
    return find_root(here) or here


def _check_workspace(config: Config) -> None:
    for path, what in ((config.templates_path, "templates"), (config.agents_path, "agents")):
        if not path.is_dir():
            raise ConfigError(
                f"{config.root} is not an agentd workspace: {path} is not a directory (expected {what}/). "
                f"Without --root, agentd looks from the current folder up for {CONFIG_FILE} or both "
                f"templates/ and agents/; `agentd init` creates a workspace"
            )


def _print_errors(errors: Sequence[AgentdError], args: argparse.Namespace) -> None:
    """A build's errors (grouped) as blocks on stderr, as ``agentd watch`` shows them."""
    from .console import print_errors
    from .status import error_fields

    print_errors([error_fields(e) for e in errors], sys.stderr, args.color)


def summary(record: Mapping[str, Any]) -> str:
    """A few lines a person can scan after a build, from its record (``BuildReport.record()``,
    or a daemon's reply to ``rebuild``)."""
    errors = record["errors"] if isinstance(record["errors"], int) else len(record["errors"])
    cut_off = record["sections_cut_off"]
    lines = [
        f"agentd: {record['agents']} agents, {record['sections_rendered']} sections rendered, "
        f"{record['sections_reused'] + record['sections_restored']} reused"
        + (f" ({cut_off} re-rendered identical)" if cut_off else ""),
        f"  outputs: {record['outputs_written']} written, {record['outputs_unchanged']} unchanged, "
        f"{record['outputs_removed']} removed" + (f", {errors} error(s)" if errors else ""),
    ]
    layers = []
    for name, c in record["caches"].items():
        total = c["hits"] + c["misses"]
        rate = f"{c['hits'] / total:.0%}" if total else "-"
        layers.append(f"{name} {rate} ({c['hits']}/{total})")
    lines.append("  cache hits: " + "  ".join(layers))
    if record["sections_restored"]:
        lines.append(
            f"  persistent cache: {record['sections_restored']} sections restored (rendered by an earlier run)"
        )
    workers = f" ({record['workers']} worker processes)" if record["workers"] else ""
    lines.append(f"  time: {record['duration_ms']:.0f} ms{workers}")
    return "\n".join(lines)


def _build_here(
    config: Config, restore: bool = True, fresh: Sequence[str] = (), progress: Progress | None = None
) -> BuildReport:
    """A build in this process (``agentd build``; ``agentd rebuild`` without a daemon, with
    ``restore=False`` or the ``fresh`` agents, as the daemon's ``rebuild`` does)."""
    _check_workspace(config)
    from .store import open_store
    from .workspace import ParseAhead

    store = open_store(config, warn=_warn)
    parsing = ParseAhead.start(config, config.workers, store if restore else None)  # while the engine is imported
    from .build import Engine

    with Engine(config, store, restore=restore, fresh=fresh, parse_ahead=parsing, progress=progress) as engine:
        report = engine.build()
    if engine.pool_error:
        _warn("workers.unavailable", error=engine.pool_error)
    if store:
        store.close()
    return report


def _cmd_build(config: Config, args: argparse.Namespace) -> int:
    with progress_line(args.quiet) as progress:
        report = _build_here(config, progress=progress)
    _print_errors(report.errors, args)
    if not args.quiet:
        print(summary(report.record()))
    return EXIT_OK if report.ok else EXIT_FAILED


def _cmd_rebuild(config: Config, args: argparse.Namespace) -> int:
    path = _daemon(config, args, output=True)
    if path is not None:
        record = _ask(path, "rebuild", **({"agents": args.agents} if args.agents else {}))
        errors = record["errors"]
    else:
        if args.agents:
            _check_workspace(config)
            from .plan import check_agents
            from .workspace import Workspace

            ws = Workspace(config)
            check_agents(args.agents, [k[1] for p in ws.agent_paths() if (k := ws.classify(p)) and k[0] == "agent"])
        with progress_line(args.quiet) as progress:
            report = _build_here(config, restore=bool(args.agents), fresh=args.agents, progress=progress)
        from .status import error_fields

        record, errors = report.record(), [error_fields(e) for e in report.errors]
    print_errors(errors, sys.stderr, args.color)
    if not getattr(args, "quiet", False):
        print(summary(record))
    return EXIT_FAILED if errors else EXIT_OK


def _cmd_stop(config: Config, args: argparse.Namespace) -> int:
    from .control import request, socket_path, wait_stopped

    path = socket_path(config)
    try:
        info = request(path, "ping", timeout=PING_TIMEOUT_S)
    except (OSError, ValueError, RequestError) as exc:
        return _no_daemon(config, path, exc)
    _same_workspace(config, path, info)
    reply = _ask(path, "stop")
    pid, bound = reply["pid"], reply["graceful_timeout"] + STOP_MARGIN_S
    if not wait_stopped(pid, bound):
        raise AgentdError(
            f"the daemon (pid {pid}) is still running {bound:g} s after it was asked to stop "
            "(it finishes the build in flight first; `agentd status` shows what it is doing)"
        )
    print(f"stopped agentd (pid {pid})")
    return EXIT_OK


# -- asking the daemon --------------------------------------------------------------------------
def _daemon(config: Config, args: argparse.Namespace, output: bool = False) -> Path | None:
    """The socket of the daemon that answers for this workspace, or None to work in-process
    (--no-daemon; nothing answers; ``output``: it writes to another folder than this command
    would look at). A daemon of another workspace is refused (``ControlError``)."""
    from .control import request, socket_path

    if args.no_daemon:
        return None
    path = socket_path(config)
    try:
        info = request(path, "ping", timeout=PING_TIMEOUT_S)
    except (OSError, ValueError, RequestError) as exc:
        _note(args, f"no daemon answers at {path} ({_reason(exc)}); working in-process")
        return None
    _same_workspace(config, path, info)
    if output and info["output_path"] != str(config.output_path):
        print(
            f"agentd: the daemon (pid {info['pid']}) writes to {info['output_path']}, not {config.output_path}: "
            "working in-process",
            file=sys.stderr,
        )
        return None
    _note(args, f"answered by the daemon (pid {info['pid']}) at {path}")
    return path


def _same_workspace(config: Config, path: Path, info: Mapping[str, Any]) -> None:
    if "root" not in info:
        raise ControlError(
            f"the daemon at {path} (pid {info.get('pid')}) does not say which workspace it serves "
            "(an older agentd): restart it, or give --no-daemon"
        )
    root = Path(info["root"])
    same = root == config.root
    if not same:
        try:
            same = root.samefile(config.root)
        except OSError:
            same = False
    if not same:
        raise ControlError(
            f"the daemon at {path} (pid {info['pid']}) serves {root}, not {config.root}: give the socket "
            "of this workspace's daemon (or none), or --no-daemon"
        )


def _ask(path: Path, command: str, **arguments: Any) -> Any:
    """A request whose error reply means what it would in-process: ``bad_request`` is a usage
    error (exit 2), anything else a failure (exit 1). No time limit: a verify or a rebuild of
    a big workspace takes a while."""
    from .control import request

    try:
        return request(path, command, timeout=None, **arguments)
    except RequestError as exc:
        if exc.code == "bad_request":
            raise ConfigError(exc.message) from None
        raise AgentdError(f"the daemon at {path} could not answer {command!r}: {exc.message}") from None
    except (OSError, ValueError) as exc:
        raise AgentdError(f"the daemon at {path} stopped answering: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "strerror", None) or exc or type(exc).__name__)


def _note(args: argparse.Namespace, message: str) -> None:
    if getattr(args, "verbose", False):
        print(f"agentd: {message}", file=sys.stderr)


def _start_command(config: Config) -> str:
    return f"agentd --root {shlex.quote(str(config.root))} watch"


def _no_daemon(config: Config, path: Path, exc: BaseException) -> int:
    where = "set by --socket/AGENTD_SOCKET" if config.socket else f"derived from the workspace {config.root}"
    print(
        f"agentd: no daemon answers at {path} ({where}): {_reason(exc)}\nstart one with: {_start_command(config)}",
        file=sys.stderr,
    )
    return EXIT_NO_DAEMON


def _cmd_watch(config: Config, args: argparse.Namespace) -> int:
    from . import log
    from .server import Server

    _check_workspace(config)
    # Installed before the log: a log line erases the line of a full build first.
    with progress_line(args.quiet or config.log_format == "json", start=False) as progress:
        # systemd names the stream it gives us (systemd.exec(5)); log.py checks it is stderr.
        log.configure(
            config.log_format, config.log_level, color=args.color, journal_stream=os.environ.get("JOURNAL_STREAM")
        )
        keep = ("output_dir", "debounce_ms", "step_ms", "socket", "cache", "jobs")
        overrides = {k: v for k, v in vars(args).items() if k in keep and v is not None}
        return Server(config, overrides, progress=progress).run()


def _cmd_status(config: Config, args: argparse.Namespace) -> int:
    from .control import socket_path

    if args.socket_path:
        print(socket_path(config))
        return EXIT_OK
    if not args.watch:
        return _status_once(config, args)
    return _status_watch(config, args)


def _status_once(config: Config, args: argparse.Namespace) -> int:
    from .control import request, socket_path

    path = socket_path(config)
    try:
        stats = request(path, "stats", timeout=PING_TIMEOUT_S)
    except (OSError, ValueError) as exc:
        return _no_daemon(config, path, exc)
    return _show_stats(stats, args)


def _status_watch(config: Config, args: argparse.Namespace) -> int:
    """Draw, then draw again after every build: subscribed to the daemon's ``build.finished``
    events, asking for ``stats`` on the same connection (and after ``--interval`` s without
    one). Ctrl-C ends it with the last refresh's exit code, wherever it lands."""
    from .control import SUBSCRIBE, Client, result_of, socket_path

    path = socket_path(config)
    code = 130  # interrupted before the first answer
    pid, stopping = None, False
    heartbeat = args.interval if args.interval > 0 else None
    try:
        try:
            client = Client(path, timeout=PING_TIMEOUT_S)
        except OSError as exc:
            return _no_daemon(config, path, exc)
        with client:
            try:
                client.send(SUBSCRIBE, events=["build.finished", "watch.stopping"])
                client.send("stats")
                while True:
                    try:
                        message = client.receive(heartbeat)
                    except TimeoutError:  # no build meanwhile: uptime and memory move anyway
                        client.send("stats")
                        continue
                    if message.get("event") == "watch.stopping":
                        stopping = True
                    elif "event" in message:
                        client.send("stats")
                    elif "subscribed" not in (result := result_of(message)):
                        pid = result["pid"]
                        code = _show_stats(result, args)
            except (OSError, ValueError) as exc:
                what = "stopped" if stopping else f"stopped answering ({_reason(exc)})"
                print(
                    f"agentd: the daemon{f' (pid {pid})' if pid else ''} at {path} {what}\n"
                    f"start one with: {_start_command(config)}",
                    file=sys.stderr,
                )
                return EXIT_NO_DAEMON
    except KeyboardInterrupt:  # Ctrl-C is how --watch ends, wherever in a refresh it lands
        return code


def _show_stats(stats: dict[str, Any], args: argparse.Namespace) -> int:
    from .status import render_table

    try:
        if args.format == "json":
            sys.stdout.write(orjson.dumps(stats, option=orjson.OPT_INDENT_2).decode() + "\n")
        else:
            if args.watch:
                sys.stdout.write("\x1b[H\x1b[2J")  # home + clear, like watch(1)
            print(render_table(stats))
        sys.stdout.flush()
    except BrokenPipeError:
        raise _ReaderGone from None
    return EXIT_FAILED if stats["errors"] else EXIT_OK


def _warn(event: str, **fields: Any) -> None:
    detail = ", ".join(f"{k}={v}" for k, v in fields.items())
    print(f"agentd: warning: {event}: {detail}", file=sys.stderr)


def _cmd_bench(config: Config, args: argparse.Namespace) -> int:
    from .bench import cli_table, explain_table, run, table

    _check_workspace(config)
    try:
        sizes = [10] if args.quick else [int(n) for n in args.agents.split(",") if n.strip()]
    except ValueError:
        raise ConfigError(f"--agents: expected comma-separated numbers, got {args.agents!r}") from None
    if not sizes or min(sizes) < 1 or args.trials < 2:
        raise ConfigError("--agents needs sizes >= 1 and --trials at least 2")
    trials = 6 if args.quick else args.trials

    with progress_line(args.quiet) as progress:

        def log(message: str | None) -> None:
            if progress is None:
                if message:
                    print(f"  ... {message}", file=sys.stderr, flush=True)
                return
            # On a terminal the phase running is the progress line, printed with its time when done.
            if progress.label:
                print(f"  ... {progress.label} ({progress.elapsed()} s)", file=sys.stderr, flush=True)
            progress.start(message)

        report = run(config.root, sizes, trials, args.output, log, only=args.only)
        log(None)
    print({"cli": cli_table, "explain": explain_table}.get(args.only or "", table)(report))
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
    if args.format == "json":
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
    with progress_line(args.quiet) as progress:
        findings = Checker(config, progress).run()
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
    elif not args.quiet:
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
    path = _daemon(config, args, output=True)
    if path is not None:
        result = _ask(path, "verify")
        out = result["output_dir"]
    else:
        from .verify import verify

        _check_workspace(config)
        with progress_line(args.quiet) as progress:
            done = verify(config, progress=progress)
        result, out = {**done.to_dict(), "diffs": done.diffs}, config.output_dir
    ok = not (result["differing"] or result["missing"] or result["stale"] or result["errors"])
    if args.format == "json":
        keys = ("ok", "checked", "differing", "missing", "stale", "errors")
        sys.stdout.write(orjson.dumps({k: result[k] for k in keys}, option=orjson.OPT_INDENT_2).decode() + "\n")
        return EXIT_OK if ok else EXIT_FAILED
    for error in result["errors"]:
        print(f"error: {error}", file=sys.stderr)
    for name in result["differing"]:
        print(f"differs: {out}/{name}")
        print(result["diffs"][name])
    for name in result["missing"]:
        print(f"missing: {out}/{name} (a clean build writes it)")
    for name in result["stale"]:
        print(f"stale:   {out}/{name} (a clean build does not write it)")
    if ok:
        if not args.quiet:
            print(f"ok: {out}/ matches a clean build ({result['checked']} files)")
        return EXIT_OK
    counts = f"{len(result['differing'])} differ, {len(result['missing'])} missing, {len(result['stale'])} stale"
    print(f"{out}/ differs from a clean build: {counts}")
    return EXIT_FAILED


def _memory_engine(config: Config, args: argparse.Namespace) -> Engine:
    """An engine built in memory, its workers stopped: the graph and ``affected`` need only
    its state."""
    from .build import Engine

    _check_workspace(config)
    with progress_line(args.quiet) as progress, Engine(config, progress=progress) as engine:
        report = engine.build(write=False)
    engine.progress = None
    _print_errors(report.errors, args)
    return engine


def _cmd_graph(config: Config, args: argparse.Namespace) -> int:
    path = _daemon(config, args)
    if path is not None:
        reply = _ask(path, "graph", format=args.format)
        print_errors(reply["errors"], sys.stderr, args.color)
        graph = reply["graph"]
    else:
        engine = _memory_engine(config, args)
        graph = engine.graph.to_json() if args.format == "json" else engine.graph.to_dot()
    if args.format == "json":
        sys.stdout.write(orjson.dumps(graph, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(graph)
    return EXIT_OK


def _cmd_affected(config: Config, args: argparse.Namespace) -> int:
    # Relative to here, not to the root (the daemon would take them relative to its root).
    paths = [Path(os.path.abspath(p)) for p in args.paths]  # relative to here; `..` folded as a shell would
    path = _daemon(config, args)
    if path is not None:
        reply = _ask(path, "affected", paths=[str(p) for p in paths])
        print_errors(reply["errors"], sys.stderr, args.color)
        result = {"agents": reply["agents"], "sections": reply["sections"]}
    else:
        result = _memory_engine(config, args).affected(paths)
    if args.format == "json":
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(f"agents ({len(result['agents'])}):")
        for a in result["agents"]:
            print(f"  {a}")
        print(f"sections ({len(result['sections'])}):")
        for s in result["sections"]:
            print(f"  {s}")
    return EXIT_OK


_TARGET = re.compile(r"^(?P<output>.+?)(?::(?P<first>\d+)(?:-(?P<last>\d+))?)?$")


def _explain_request(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    """The ``explain`` request the arguments make (the socket's shape, paths relative to the
    root), or a usage error. Paths are taken relative to here, as a shell completes them."""
    if (args.target is None) == (args.template is None):
        raise ConfigError("give an output (OUTPUT[:LINE[-LINE]]) or --template TEMPLATE:LINE, not both or neither")
    if args.template is not None:
        template, _, line = args.template.rpartition(":")
        if not template or not line.isdigit():
            raise ConfigError(f"--template {args.template}: expected TEMPLATE:LINE (templates/fragments/table.j2:8)")
        return {"template": _from_root(config, template), "line": int(line)}
    match = _TARGET.match(args.target)
    assert match is not None  # (the pattern matches any non-empty text)
    output = match["output"]
    request: dict[str, Any] = {"output": _from_root(config, output) if "/" in output else output}
    if match["first"] is not None:
        request["line"] = int(match["first"])
        if match["last"] is not None:
            request["end"] = int(match["last"])
    return request


def _from_root(config: Config, path: str) -> str:
    """A path given relative to here, relative to the root when it is inside it."""
    full = Path(os.path.abspath(path))
    return full.relative_to(config.root).as_posix() if full.is_relative_to(config.root) and full.exists() else path


def _cmd_explain(config: Config, args: argparse.Namespace) -> int:
    request = _explain_request(config, args)
    path = _daemon(config, args)
    if path is not None:
        reply = _ask(path, "explain", **request)
    else:
        from .build import Engine
        from .sourcemap import Explainer, answer

        _check_workspace(config)
        with progress_line(args.quiet or args.format == "json") as progress, Engine(config, jobs=1) as engine:
            engine.load()
            engine.progress = progress  # (the reverse question counts the agents it traced)
            reply = answer(Explainer(engine), request)
    if reply.get("note"):
        print(f"agentd: {reply['note']}", file=sys.stderr)
    _print_explained(reply, args)
    for entry in reply.get("skipped", ()):  # an incomplete answer: exit 1, as a build with a failed agent
        print(f"agentd: {entry['output']} not looked at: {entry['reason']}", file=sys.stderr)
    return EXIT_FAILED if reply.get("skipped") else EXIT_OK


def _print_explained(reply: dict[str, Any], args: argparse.Namespace) -> None:
    from .sourcemap import format_line, format_template

    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    if "outputs" in reply:  # --template
        if args.format == "json":
            head = {k: reply[k] for k in ("template", "line", "source")}
            for entry in reply["outputs"]:
                sys.stdout.write(orjson.dumps({**head, **entry}).decode() + "\n")
        else:
            print("\n".join(format_template(reply, width)))
        return
    for n, line in enumerate(reply["lines"]):
        if args.format == "json":
            sys.stdout.write(orjson.dumps(line).decode() + "\n")
        else:
            print(("\n" if n else "") + "\n".join(format_line(line, width)))


def _cmd_init(args: argparse.Namespace) -> int:
    from .scaffold import init

    target = Path(args.root or ".") / args.dir  # like git -C: DIR is taken from --root
    result = init(target, example=args.example, force=args.force)
    if args.quiet:
        return EXIT_OK
    where = shlex.quote(str(target))
    replaced = f" ({len(result.overwritten)} overwritten)" if result.overwritten else ""
    print(f"agentd: wrote {len(result.written)} files into {where}{replaced}")
    if len(result.written) <= 20:
        for rel in result.written:
            print(f"  {shlex.quote(rel)}" + ("  (overwritten)" if rel in result.overwritten else ""))
    else:  # the example: one line per top-level entry
        tops: dict[str, int] = {}
        for rel in result.written:
            top = rel.split("/", 1)[0] + ("/" if "/" in rel else "")
            tops[top] = tops.get(top, 0) + 1
        for top, count in tops.items():
            print(f"  {shlex.quote(top)}" + (f" ({count} files)" if top.endswith("/") else ""))
    print("next:")
    if result.root.resolve() != Path.cwd().resolve():
        print(f"  cd {where}")
    print("  agentd build     # render agents/*.yaml to out/<id>.md")
    print("  agentd check     # lint templates, sources and outputs")
    print("  agentd watch     # rebuild on every save until Ctrl-C")
    return EXIT_OK
