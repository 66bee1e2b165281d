"""What one build did (``BuildReport``), and the state its steps share (``Run``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from .cache import Counters
from .catalog import TrackedCatalog
from .exceptions import AgentdError


@dataclasses.dataclass
class BuildReport:
    """What one build did; the CLI prints it, the daemon logs it."""

    build_id: str
    started: float
    changed: list[str] = dataclasses.field(default_factory=list)
    agents: int = 0
    agents_composed: list[str] = dataclasses.field(default_factory=list)
    sections_rendered: list[str] = dataclasses.field(default_factory=list)
    sections_reused: int = 0
    #: Sections taken from the persistent store (rendered by an earlier process).
    sections_restored: int = 0
    sections_cut_off: int = 0
    written: list[str] = dataclasses.field(default_factory=list)
    unchanged: list[str] = dataclasses.field(default_factory=list)
    removed: list[str] = dataclasses.field(default_factory=list)
    errors: list[AgentdError] = dataclasses.field(default_factory=list)
    caches: dict[str, Counters] = dataclasses.field(default_factory=dict)
    #: (template, seconds) for every render of this build.
    timings: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    #: A build from empty caches (the first one): its misses say nothing about cache health.
    cold: bool = False
    #: Output-gate findings for the agents composed in this build (see ``gates.py``).
    findings: list[Any] = dataclasses.field(default_factory=list)
    #: Worker processes that rendered in this build (0: all in this process).
    workers: int = 0
    duration_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def record(self) -> dict[str, Any]:
        """What the build did, as data: ``stats``' ``last_build``, the ``build.finished`` log
        line and event, the reply to ``rebuild``, and ``agentd build``'s summary all print it."""
        return {
            "build_id": self.build_id,
            "start": self.started,
            "duration_ms": round(self.duration_ms, 2),
            "changed": self.changed,
            "agents": self.agents,
            "agents_rendered": self.agents_composed,
            "sections_rendered": len(self.sections_rendered),
            "sections_reused": self.sections_reused,
            "sections_restored": self.sections_restored,
            "sections_cut_off": self.sections_cut_off,
            "workers": self.workers,
            "outputs_written": len(self.written),
            "outputs_unchanged": len(self.unchanged),
            "outputs_removed": len(self.removed),
            "errors": len(self.errors),
            "findings": len(self.findings),
            "caches": {k: {"hits": c.hits, "misses": c.misses, "expected": c.expected} for k, c in self.caches.items()},
        }


@dataclasses.dataclass
class Run:
    """One build's state, shared by its steps instead of passed from one to the next."""

    report: BuildReport
    catalog: TrackedCatalog
    #: The digests the sections this build evicted had (a re-render with the same one is cut off).
    old: dict[tuple[str, str], bytes]
    #: False: render in memory only.
    write: bool
    #: Take unchanged renders from the store.
    restore: bool
