"""What a person reads in a terminal: the daemon's log as short lines, errors as blocks.

``agentd watch`` on a terminal logs one line per rebuild (local time, what changed, what was
done, how long) and each distinct error once, as a block that points at the mistake, in the
style of compilers and ``mkdocs serve``; ``agentd build`` prints its errors with the same
blocks. Everything else a log line carries is shown with ``--log-level debug`` (``-v``). The
JSON log (``log.py``) is the record for machines; this is only its rendering for people.
"""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, TextIO

from . import __version__

#: Widest line written (narrower terminals get their own width).
WIDTH = 100
#: Agent names an error's "(in N agents: ...)" line shows at most.
AGENTS_SHOWN = 5

_STYLES = {
    "dim": "\x1b[2m",
    "bold": "\x1b[1m",
    "red": "\x1b[31m",
    "green": "\x1b[32m",
    "yellow": "\x1b[33m",
    "blue": "\x1b[34m",
}
_RESET = "\x1b[0m"
#: Quoted names in a message ('colour' in "agent has no key 'colour'"): what to underline.
_QUOTED = re.compile(r"'([^'\n]+)'")
#: Fields every log line has, which the detail line (``-v``) leaves out.
_FRAME = ("event", "level", "timestamp")


def use_color(color: str, stream: TextIO) -> bool:
    """``--color``: always, never, or auto (only on a terminal; ``NO_COLOR`` makes it never)."""
    return color == "always" or (color == "auto" and _isatty(stream))


#: The width of a stream that is no terminal: lines are never wrapped or cut there (a log file,
#: CI output: grep finds a whole message).
UNBOUNDED = 1 << 16


def width_of(stream: TextIO) -> int:
    """The terminal's width, at most ``WIDTH`` (``UNBOUNDED`` when it is not a terminal)."""
    if not _isatty(stream):
        return UNBOUNDED
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return WIDTH
    return min(WIDTH, columns) if columns >= 40 else WIDTH


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Style:
    """Colours on or off, and the terminal width lines are cut to."""

    def __init__(self, colors: bool, width: int = WIDTH) -> None:
        self.colors = colors
        self.width = width

    def __call__(self, text: str, *styles: str) -> str:
        if not self.colors or not text:
            return text
        return "".join(_STYLES[s] for s in styles) + text + _RESET


# -- errors ---------------------------------------------------------------------------------------
def print_errors(errors: Iterable[Mapping[str, Any]], stream: TextIO, color: str = "auto") -> None:
    """Print errors (``status.error_fields`` of each group) as blocks: what ``agentd build``,
    ``rebuild``, ``graph`` and ``affected`` print, in-process or answered by the daemon."""
    style = Style(use_color(color, stream), width_of(stream))
    for fields in errors:
        print(error_block(fields, style), file=stream)


def error_block(fields: Mapping[str, Any], style: Style) -> str:
    """``path:line:col: message``, the source line with a caret under the mistake, and the
    agents that hit it (``(in 7 agents: a, b, c, …)``)."""
    column, length = _caret(fields)
    where = _where(fields, column) + ":"
    lines = []
    for n, line in enumerate(_wrap(error_header(fields, column), style.width)):  # wrapped plain, then coloured
        if n == 0 and line.startswith(where):
            lines.append(style(where, "bold") + style(line[len(where) :], "red"))
        else:
            lines.append(style(line, "red"))
    source = fields.get("source_line")
    if source and source.strip() and fields.get("line"):
        lines += _source(source, fields["line"], column, length, style)
    note = agents_note(fields, style.width - 2)
    if note:
        lines.append("  " + style(note, "dim"))
    elif fields.get("context"):
        lines += ["  " + style(line, "dim") for line in _wrap(f"(while {fields['context']})", style.width - 2)]
    return "\n".join(lines)


def error_header(fields: Mapping[str, Any], column: int | None = None) -> str:
    """``path:line:col: message`` (``path:line: message`` without a column; ``error: message``
    for an error no file is at fault for)."""
    message = str(fields.get("message") or "")
    if fields.get("rule"):
        message += f" [{fields['rule']}]"
    return f"{_where(fields, column)}: {message}"


def _where(fields: Mapping[str, Any], column: int | None) -> str:
    if not fields.get("path"):
        return "error"
    return str(fields["path"]) + "".join(f":{n}" for n in (fields.get("line"), column) if n)


def agents_note(fields: Mapping[str, Any], width: int = WIDTH) -> str:
    """``(in agent a)`` or ``(in 7 agents: a, b, c, …)``: as many names as fit (at most
    ``AGENTS_SHOWN``); "" when no agent's build is named."""
    agents = list(fields.get("agents") or ())
    total = max(int(fields.get("agents_total") or 0), len(agents))
    if not agents:
        return ""
    if total == 1:
        return f"(in agent {agents[0]})"
    head = f"(in {total} agents: "
    shown: list[str] = []
    for name in agents[:AGENTS_SHOWN]:
        more = len(shown) + 1 < total
        if shown and len(head + ", ".join([*shown, name]) + (", …)" if more else ")")) > width:
            break
        shown.append(name)
    rest = ", …" if len(shown) < total else ""
    return head + ", ".join(shown) + rest + ")"


def error_key(fields: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes two errors the same mistake (across builds: "still", "fixed")."""
    return (fields.get("path"), fields.get("line"), fields.get("column"), fields.get("message"))


def _caret(fields: Mapping[str, Any]) -> tuple[int | None, int]:
    """1-based column and length to underline: the error's own column (YAML has them), else
    the first name the message quotes that the source line holds (Jinja gives lines only)."""
    source = str(fields.get("source_line") or "")
    column = fields.get("column")
    names = _QUOTED.findall(str(fields.get("message") or ""))
    if column:
        at = column - 1
        length = next((len(n) for n in names if source.startswith(n, at)), 1)
        return column, length
    for name in names:
        pattern = r"(?<![\w-])" + re.escape(name) + r"(?![\w-])" if re.fullmatch(r"[\w.-]+", name) else re.escape(name)
        found = re.search(pattern, source)
        if found:
            return found.start() + 1, len(name)
    return None, 1


def _source(source: str, line: int, column: int | None, length: int, style: Style) -> list[str]:
    """The offending line (indentation dropped, cut to the width around the caret) and the
    caret line under it; without a column the caret marks the line's first character."""
    text = source.replace("\t", " ").rstrip()
    indent = len(text) - len(text.lstrip())
    text = text[indent:]
    at = max(0, (column - 1 - indent) if column else 0)
    at = min(at, max(0, len(text) - 1))
    length = max(1, min(length, len(text) - at))
    gutter = f"{line:>4} | "
    text, at = _clip(text, at, style.width - len(gutter))
    blank = " " * (len(gutter) - 2) + "| "
    return [
        style(gutter, "blue") + text,
        style(blank, "blue") + " " * at + style("^" * length, "bold", "red"),
    ]


def _clip(text: str, at: int, room: int) -> tuple[str, int]:
    """``text`` cut to ``room`` characters around ``at`` (marked "…" where cut)."""
    if len(text) <= room:
        return text, at
    start = max(0, min(at - room // 3, len(text) - room + 1))
    if start:
        text, at = "…" + text[start + 1 :], at - start
    if len(text) > room:
        text = text[: room - 1] + "…"
    return text, at


def _wrap(text: str, width: int) -> list[str]:
    """Lines of ``text`` wrapped at ``width`` (continuations indented); words never broken,
    so a long path stays whole (and clickable)."""
    out: list[str] = []
    for line in text.splitlines() or [""]:
        wrapped = textwrap.wrap(line, width, subsequent_indent="    ", break_long_words=False, break_on_hyphens=False)
        out += wrapped or [line]
    return out


def cut(text: str, width: int | None) -> str:
    """``text`` cut to ``width`` characters (marked "…" where cut); None: as it is."""
    return text if width is None or len(text) <= width else text[: max(width - 1, 0)] + "…"


# -- the log --------------------------------------------------------------------------------------
class ConsoleRenderer:
    """structlog's last processor for a terminal: each event as a short line (or an error's
    block), with the full key=value record under it when ``verbose``.

    It remembers the errors of the last build, so an error still there after the next save
    is named in one line instead of printed again (its block is above)."""

    def __init__(self, colors: bool, verbose: bool = False, stream: TextIO | None = None) -> None:
        self.colors = colors
        self.verbose = verbose
        self.stream = stream
        self._shown: set[tuple[Any, ...]] = set()  # the errors of the last finished build
        self._current: set[tuple[Any, ...]] = set()  # of the build running

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        style = Style(self.colors, width_of(self.stream) if self.stream is not None else WIDTH)
        ev = dict(event_dict)
        text = self._render(ev, style)
        if text is None and not self.verbose:
            import structlog  # here, not on top: the command line imports this module

            raise structlog.DropEvent
        clock = style(str(ev.get("timestamp", "")), "dim")
        if text is None:
            text = f"{clock} {ev.get('event')}"
        if self.verbose:
            detail = _detail(ev)
            if detail:
                text += "\n" + style("    " + detail, "dim")
        exception = ev.get("exception")
        if exception:
            text += "\n" + str(exception).rstrip()
        return text

    def _render(self, ev: dict[str, Any], style: Style) -> str | None:
        """The event as a person reads it; None: nothing worth a line (shown with ``-v``)."""
        name = str(ev.get("event"))
        clock = style(str(ev.get("timestamp", "")), "dim")
        room = style.width - 9  # after "HH:MM:SS "
        if name == "build.started":
            self._current = set()
            return None
        if name == "build.error":
            return self._error(ev, style)
        if name == "build.error_fixed":
            fixed = cut(f"fixed: {ev.get('location') or ev.get('message')}", room)
            return f"{clock} {style('fixed:', 'green')}{fixed[len('fixed:') :]}"
        if name == "build.finished":
            self._shown, self._current = self._current, set()
            return self._finished(ev, clock, style)
        if name == "build.errors_cleared":
            return None  # each fixed error said so
        line = self._line(name, ev, room)
        if line is None:
            return None
        level = str(ev.get("level", "info"))
        if level in ("warning", "error") and not line.startswith(f"{level}:"):
            line = f"{level}: {line}"
        if not self.verbose:
            line = cut(line, room)
        for word, colours in (("warning:", ("yellow",)), ("error:", ("red", "bold"))):
            if line.startswith(word):
                line = style(word, *colours) + line[len(word) :]
        return f"{clock} {line}"

    def _error(self, ev: dict[str, Any], style: Style) -> str:
        key = error_key(ev)
        self._current.add(key)
        if key in self._shown and not self.verbose:  # its block is above, after an earlier save
            column, _ = _caret(ev)
            still = cut("still: " + error_header(ev, column), style.width)
            return style("still:", "dim") + still[len("still:") :]
        return error_block(ev, style)

    def _finished(self, ev: dict[str, Any], clock: str, style: Style) -> str:
        """``HH:MM:SS what changed: N sections rendered, N reused, N written (N ms)``; the word
        "sections" goes first when the line would not fit, then the path's head."""
        changed = list(ev.get("changed") or ())
        rendered = ev.get("sections_rendered", 0)
        counts = [
            f"{ev.get('sections_reused', 0) + ev.get('sections_restored', 0)} reused",
            f"{ev.get('outputs_written', 0)} written",
        ]
        if ev.get("outputs_removed"):
            counts.append(f"{ev['outputs_removed']} removed")
        findings = list(ev.get("findings") or ())
        if findings:
            counts.append(style(_count(len(findings), "finding"), "yellow"))
        if ev.get("errors"):
            counts.append(style(_count(ev["errors"], "error"), "red", "bold"))
        duration = f" ({_ms(ev.get('duration_ms', 0.0))})"
        long = ", ".join([f"{_count(rendered, 'section')} rendered", *counts]) + duration
        short = ", ".join([f"{rendered} rendered", *counts]) + duration
        if changed:
            more = f" +{len(changed) - 1} more" if len(changed) > 1 else ""
            room = style.width - 11 - len(more)  # "HH:MM:SS " and ": "
            tail = long if len(changed[0]) + len(_plain(long)) <= room else short
            lead = _cut_left(changed[0], max(12, room - len(_plain(tail)))) + more
        else:
            lead, tail = f"built {_count(ev.get('agents', 0), 'agent')}", long
        lines = [f"{clock} {lead}: {tail}"]
        lines += ["  " + style(cut(str(f), style.width - 2), "yellow") for f in findings]
        return "\n".join(lines)

    def _line(self, name: str, ev: dict[str, Any], room: int) -> str | None:
        """Every other event in a few words; an unknown one as ``event key=value ...``."""
        if name == "watch.starting":
            return f"starting agentd {__version__} (pid {ev.get('pid')})"
        if name == "watch.ready":
            tail = f" ({_count(ev.get('agents', 0), 'agent')}) — Ctrl-C to stop"
            return f"watching {_cut_left(str(ev.get('root')), max(12, room - 9 - len(tail)))}{tail}"
        if name == "watch.stopping":
            return "stopping"
        if name == "watch.stopped":
            return f"stopped after {_count(ev.get('builds', 0), 'build')}"
        if name in ("watch.signal", "watch.stop_requested"):
            return None
        if name == "watch.reloading":
            return "reloading (SIGHUP)"
        if name == "watch.reloaded":
            return None
        if name == "config.reloaded":
            return f"agentd.toml reloaded: {', '.join(ev.get('changed') or ()) or 'nothing changed'}"
        if name == "config.error":
            return f"error: {ev.get('error')} (the configuration in use is kept)"
        if name == "alert.raised":
            return "warning: " + _alert(ev)
        if name == "alert.cleared":
            return f"alert cleared: {ev.get('key')}"
        if name == "verify.finished":
            return _verify(ev)
        if name == "output.missing":
            files = list(ev.get("files") or ())
            return f"warning: {_count(len(files), 'output')} deleted from out/, writing again: {', '.join(files)}"
        fields = " ".join(f"{k}={_value(v)}" for k, v in sorted(ev.items()) if k not in (*_FRAME, "build_id"))
        return f"{name} {fields}".rstrip()


def _alert(ev: Mapping[str, Any]) -> str:
    if ev.get("kind") == "slow_template":
        return f"slow template {ev.get('template')}: {ev.get('ms')} ms (over {ev.get('threshold_ms')} ms)"
    if ev.get("kind") == "low_hit_rate":
        rate, floor = ev.get("hit_rate") or 0.0, ev.get("floor") or 0.0
        builds = _count(ev.get("builds") or 0, "build")
        return f"{ev.get('layer')} cache hit rate {rate:.1%} (below {floor:.0%}) over the last {builds}"
    return f"alert {ev.get('key')}"


def _verify(ev: Mapping[str, Any]) -> str:
    if ev.get("ok"):
        return f"verify: out/ matches a clean build ({ev.get('checked')} files)"
    bad = [f"{len(ev.get(k) or ())} {k}" for k in ("differing", "missing", "stale") if ev.get(k)]
    if ev.get("errors"):
        bad.append(_count(len(ev["errors"]), "error"))
    return "warning: verify: out/ differs from a clean build: " + ", ".join(bad)


def _detail(ev: Mapping[str, Any]) -> str:
    """The record's fields as key=value, sorted (what the log said before it was made short)."""
    return " ".join(f"{k}={_value(v)}" for k, v in sorted(ev.items()) if k not in (*_FRAME, "exception"))


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value if value and not any(c.isspace() for c in value) else repr(value)
    return repr(value)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _ms(ms: float) -> str:
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:,.0f} ms"


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _cut_left(path: str, room: int) -> str:
    """A path cut from the left to ``room`` characters: its file name is what matters."""
    return path if len(path) <= room else "…" + path[len(path) - room + 1 :]
