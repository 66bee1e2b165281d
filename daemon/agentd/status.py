"""The performance monitor: every metric the daemon reports, kept in one place.

The build loop feeds it one ``BuildReport`` per build (in the event-loop thread, after the
build thread is done, so nothing here needs a lock); the log line, the status socket's
``stats``/``status`` replies, systemd's ``STATUS=`` and ``agentd status`` all read from it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import deque
from typing import Any

import structlog

from . import __version__
from .build import Engine
from .cache import Counters
from .config import Config
from .console import WIDTH, agents_note, error_header
from .exceptions import AgentdError, SourceError
from .report import BuildReport

#: Render samples kept per template for the percentiles.
SAMPLES_PER_TEMPLATE = 512
#: Alerts kept in the history list.
ALERT_HISTORY = 50


@dataclasses.dataclass
class TemplateStats:
    renders: int = 0
    samples: deque[float] = dataclasses.field(default_factory=lambda: deque(maxlen=SAMPLES_PER_TEMPLATE))
    max_ms: float = 0.0

    def add(self, ms: float) -> None:
        self.renders += 1
        self.samples.append(ms)
        self.max_ms = max(self.max_ms, ms)

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.samples)
        return {
            "renders": self.renders,
            "p50_ms": round(percentile(ordered, 0.50, 0.0), 3),
            "p95_ms": round(percentile(ordered, 0.95, 0.0), 3),
            "max_ms": round(self.max_ms, 3),
        }


def percentile(ordered: list[float], q: float, empty: float) -> float:
    """The nearest-rank ``q`` quantile of sorted samples (``empty`` when there are none)."""
    if not ordered:
        return empty
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


#: Names a log line, an event or an error's ``agents`` lists at most (the counts beside them stay
#: exact): a cold build of 1,000 agents renders 9,000 sections, and a journal line of every name
#: helps nobody.
LISTED = 20


def error_fields(error: AgentdError) -> dict[str, Any]:
    """An error (one group of ``group_errors``) as data, for logs, events and the socket: file,
    line, column, the message without the path, the source line and the agents that hit it."""
    if isinstance(error, SourceError):
        return _error_dict(
            error.path,
            error.line,
            error.column,
            error.location,
            error.problem,
            str(error),
            source_line=(error.source_line or "").rstrip() or None,
            context=error.context,
            agents=list(error.agents[:LISTED]),
            agents_total=len(error.agents),
        )
    text = str(error)
    return _error_dict(None, None, None, None, text, text, source_line=None, context=None, agents=[], agents_total=0)


def _error_dict(
    path: str | None,
    line: int | None,
    column: int | None,
    location: str | None,
    message: str,
    text: str,
    **details: Any,
) -> dict[str, Any]:
    """The shape every error takes in logs, events and the socket (``details`` between the
    message and the text, in their order)."""
    fields = {"path": path, "line": line, "column": column, "location": location, "message": message}
    return {**fields, **details, "text": text}


def memory() -> tuple[int, int]:
    """Resident set size now and at its peak, in bytes: ``VmRSS`` and ``VmHWM`` of
    ``/proc/self/status`` (proc(5)), read at once, so the peak is never below the current
    value (the kernel reports the high-water mark as at least the current RSS). (0, 0) off
    Linux."""
    values = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024  # proc's "kB" is KiB
    except (OSError, ValueError, IndexError):
        return 0, 0
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


class Monitor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started = time.time()
        self._started_mono = time.monotonic()
        self._last_build_mono: float | None = None
        self.state = "starting"
        self.builds = 0
        self.last_build: dict[str, Any] | None = None
        self.last_caches: dict[str, Counters] = {}
        self.templates: dict[str, TemplateStats] = {}
        self.errors: list[dict[str, Any]] = []
        self.alerts: list[dict[str, Any]] = []  # active now
        self.alert_history: deque[dict[str, Any]] = deque(maxlen=ALERT_HISTORY)
        self.watcher = {"batches": 0, "events": 0}
        self._window: deque[dict[str, Counters]] = deque(maxlen=config.hit_rate_window)
        self.log = structlog.get_logger("agentd")

    # -- feeding ------------------------------------------------------------------------------
    def record_build(self, report: BuildReport, findings: list[Any] | None = None) -> None:
        """``findings``: the output gates' current findings for every agent (``check``)."""
        self.builds += 1
        self._last_build_mono = time.monotonic()
        self.last_caches = report.caches
        self.last_build = report.record()
        for name, seconds in report.timings:
            self.templates.setdefault(name, TemplateStats()).add(seconds * 1000)
        gate_errors = [f for f in findings or [] if f.severity == "error"]
        self.errors = [error_fields(e) for e in report.errors] + [
            _error_dict(f.path, f.line, f.column, f"{f.path}:{f.line}", f.message, f.format(), rule=f.rule)
            for f in gate_errors
        ]
        self.state = "error" if self.errors else "idle"
        # A cold build (the first, a rebuild of everything, a reload) renders everything at
        # once, in workers that share the cores, from empty caches: it says nothing of either.
        if not report.cold:
            self._check_slow_templates(report)
            if self._window.maxlen != self.config.hit_rate_window:  # a reload changed it
                self._window = deque(self._window, maxlen=self.config.hit_rate_window)
            self._window.append(report.caches)
            self._check_hit_rates()

    def record_watch(self, batches: int, events: int) -> None:
        self.watcher = {"batches": batches, "events": events}

    # -- alerts -------------------------------------------------------------------------------
    def _raise(self, key: str, **fields: Any) -> None:
        """Raise the alert, or bring a raised one's values up to date (logged once, when raised)."""
        for alert in self.alerts:
            if alert["key"] == key:
                alert.update(fields)
                return
        alert = {"key": key, "since": time.time(), **fields}
        self.alerts.append(alert)
        self.alert_history.append(dict(alert))
        self.log.warning("alert.raised", **alert)

    def _clear(self, key: str, **fields: Any) -> None:
        """End the alert, if raised; ``fields``: the values that end it."""
        ended = [a for a in self.alerts if a["key"] == key]
        if not ended:
            return
        self.alerts = [a for a in self.alerts if a["key"] != key]
        now = time.time()
        for entry in reversed(self.alert_history):
            if entry["key"] == key and "cleared" not in entry:
                entry["cleared"] = now
                break
        self.log.info("alert.cleared", key=key, kind=ended[0]["kind"], since=ended[0]["since"], **fields)

    def _check_slow_templates(self, report: BuildReport) -> None:
        """Each template rendered in this build is judged by its slowest render in it; one not
        rendered keeps its state."""
        limit = self.config.slow_template_ms
        slowest: dict[str, float] = {}
        for name, seconds in report.timings:
            slowest[name] = max(slowest.get(name, 0.0), seconds * 1000)
        for name, ms in slowest.items():
            key = f"slow_template:{name}"
            if ms > limit:
                self._raise(key, kind="slow_template", template=name, ms=round(ms, 2), threshold_ms=limit)
            else:
                self._clear(key, template=name, ms=round(ms, 2), threshold_ms=limit)

    def _check_hit_rates(self) -> None:
        """Judge each watched layer over the window, once it is full: hits out of the lookups
        that could have hit (``Counters.could_hit``). A window with none of those is fine."""
        if len(self._window) < self.config.hit_rate_window:
            return
        floor = self.config.hit_rate_floor
        for layer in ("L1", "L2", "L3", "L4"):
            key = f"low_hit_rate:{layer}"
            hits = sum(c[layer].hits for c in self._window if layer in c)
            could = sum(c[layer].could_hit for c in self._window if layer in c)
            rate = round(hits / could, 4) if could else None
            if layer in self.config.hit_rate_layers and rate is not None and rate < floor:
                self._raise(key, kind="low_hit_rate", layer=layer, hit_rate=rate, floor=floor, builds=len(self._window))
            else:
                self._clear(key, layer=layer, hit_rate=rate, floor=floor, builds=len(self._window))

    # -- reading ------------------------------------------------------------------------------
    def uptime_s(self) -> float:
        return round(time.monotonic() - self._started_mono, 3)

    def one_line(self) -> str:
        """For systemd's STATUS= and quick glances."""
        b = self.last_build
        if b is None:
            return f"{self.state}: first build running"
        errors = f", {len(self.errors)} error(s)" if self.errors else ""
        return (
            f"{self.state}: {self.builds} builds; last {b['duration_ms']:.0f} ms, "
            f"{b['sections_rendered']} sections rendered, {b['outputs_written']} written{errors}"
        )

    def _identity(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": os.getpid(),
            "version": __version__,
            "root": str(self.config.root),
            "uptime_s": self.uptime_s(),
            "builds": self.builds,
            "last_build": self.last_build,
            # On the monotonic clock, from the build's end: a wall-clock jump cannot skew it.
            "last_build_age_s": (
                None if self._last_build_mono is None else round(time.monotonic() - self._last_build_mono, 3)
            ),
        }

    def summary(self) -> dict[str, Any]:
        return {
            **self._identity(),
            "errors": len(self.errors),
            "alerts": len(self.alerts),
            "summary": self.one_line(),
        }

    def stats(self, engine: Engine) -> dict[str, Any]:
        lifetime = engine.caches.stats()
        rss, peak = memory()
        caches = {}
        for layer, data in lifetime.items():
            last = self.last_caches.get(layer, Counters())
            caches[layer] = {
                **data,
                "last_build": {
                    "hits": last.hits,
                    "misses": last.misses,
                    "evictions": last.evictions,
                    "expected": last.expected,
                    "hit_rate": last.hit_rate,
                },
            }
        return {
            **self._identity(),
            "caches": caches,
            "templates": {name: t.summary() for name, t in sorted(self.templates.items())},
            "alerts": list(self.alerts),
            "alert_history": list(self.alert_history),
            "errors": self.errors,
            "rss_bytes": rss,
            "peak_rss_bytes": peak,
            "watcher": dict(self.watcher),
        }


def render_table(stats: dict[str, Any]) -> str:
    """``agentd status``'s human view of a ``stats`` reply."""
    lines = [
        f"agentd {stats['version']}  {stats['root']}  (pid {stats['pid']}, up {_duration(stats['uptime_s'])})",
        f"state       {stats['state']}",
    ]
    b = stats.get("last_build")
    if b:
        # Sections the store gave back were reused as much as those kept in memory.
        reused = b["sections_reused"] + b["sections_restored"]
        restored = f" ({b['sections_restored']} from the store)" if b["sections_restored"] else ""
        age = stats.get("last_build_age_s")
        ago = f" {_duration(age)} ago" if age is not None else ""
        lines.append(
            f"builds      {stats['builds']}  last {b['build_id']}{ago}: {b['duration_ms']:.1f} ms, "
            f"{b['sections_rendered']} rendered / {reused} reused{restored} / {b['sections_cut_off']} cut off, "
            f"{b['outputs_written']} written / {b['outputs_unchanged']} unchanged"
        )
        if b["changed"]:
            shown = ", ".join(b["changed"][:5]) + (f" (+{len(b['changed']) - 5})" if len(b["changed"]) > 5 else "")
            lines.append(f"changed     {shown}")
    else:
        lines.append(f"builds      {stats['builds']}")
    lines += ["", "cache  entries      bytes  hit rate (life)  last build   hits/misses (expected)  evictions"]
    for layer, c in stats["caches"].items():
        last = c["last_build"]
        counts = f"{c['hits']:>6}/{c['misses']} ({c.get('expected', 0)})"
        lines.append(
            f"{layer:<5}{c['entries']:>9}{format_size(c['bytes']):>11}  {_rate(c['hit_rate']):>15}"
            f"  {_rate(last['hit_rate']):>10}  {counts:<22}{c['evictions']:>11}"
        )
    slow = sorted(stats["templates"].items(), key=lambda kv: kv[1]["p95_ms"], reverse=True)[:5]
    if slow:
        lines += ["", "slowest templates                          p50 ms   p95 ms   max ms  renders"]
        for name, t in slow:
            lines.append(f"{name:<40}{t['p50_ms']:>9.2f}{t['p95_ms']:>9.2f}{t['max_ms']:>9.2f}{t['renders']:>9}")
    lines.append("")
    lines.append("alerts      " + ("none" if not stats["alerts"] else ""))
    for a in stats["alerts"]:
        detail = a.get("template") or a.get("layer")
        value = (
            f"{a['ms']} ms > {a['threshold_ms']} ms"
            if a["kind"] == "slow_template"
            else f"{a['hit_rate']:.1%} < {a['floor']:.0%}"
        )
        lines.append(f"  {a['kind']}: {detail} ({value})")
    lines.append("errors      " + ("none" if not stats["errors"] else str(len(stats["errors"]))))
    for e in stats["errors"]:  # each once (grouped by the daemon), with the agents that hit it
        lines.append("  " + error_header(e, e.get("column")))
        note = agents_note(e, WIDTH - 4)
        if note:
            lines.append("    " + note)
    w = stats["watcher"]
    lines.append(
        f"memory      rss {format_size(stats['rss_bytes'])} (peak {format_size(stats['peak_rss_bytes'])});"
        f"  watcher: {w['batches']} batches, {w['events']} events"
    )
    return "\n".join(lines)


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def format_size(n: int) -> str:
    """Sizes in SI units (1 kB = 1000 B), as everywhere agentd prints or takes one
    (``memory_budget_mb``, ``agentd cache``, the bench)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
