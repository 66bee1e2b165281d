"""Output gates: checks of an output's bytes (the daemon's ``check`` rules), run after a
build's writes so that they never delay a file.

An output whose bytes did not change has the findings it had: only outputs a build composed
anew are checked, and findings are kept per agent until the agent is composed again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .output import output_name
from .plan import Plan

#: Called with (agent id, output bytes, plan); returns the findings.
Check = Callable[[str, bytes, Plan], list[Any]]


class Gates:
    """The gates of one engine: what a build queued, and the standing findings by agent."""

    def __init__(self, check: Check | None, output_path: Path) -> None:
        self.check = check
        self.output_path = output_path
        self.findings: dict[str, list[Any]] = {}
        self._queued: list[tuple[str, bytes | None, Plan]] = []

    def queue(self, agent_id: str, data: bytes | None, plan: Plan) -> None:
        """Check this output after the build's writes (``data`` None: read back what was
        written, rather than hold every output in memory)."""
        if self.check is not None:
            self._queued.append((agent_id, data, plan))

    def run(self) -> list[Any]:
        """Check the queued outputs; return their findings."""
        queued, self._queued = self._queued, []
        found: list[Any] = []
        check = self.check
        if check is None:
            return found
        for agent_id, data, plan in queued:
            if data is None:
                try:
                    data = (self.output_path / output_name(agent_id)).read_bytes()
                except OSError:  # deleted since: restored (and checked) by the next build
                    continue
            self.findings[agent_id] = check(agent_id, data, plan)
            found += self.findings[agent_id]
        return found
