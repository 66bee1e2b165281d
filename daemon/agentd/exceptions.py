"""Every error agentd raises, under one base class.

Source errors carry the file and line they are about and print like a Python traceback
frame (``File "agents/x.yaml", line 12`` plus the offending line), the way
``jinja2.TemplateSyntaxError`` does, so editors and terminals can jump to them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any


class AgentdError(Exception):
    """Base class: the CLI catches this, prints it and exits non-zero."""


class ConfigError(AgentdError):
    """Bad configuration or usage (``agentd.toml``, ``AGENTD_*``, flags): exit code 2."""


class SourceError(AgentdError):
    """A problem in a workspace file, located by path (relative to the root) and line."""

    def __init__(
        self,
        message: str,
        path: str,
        line: int | None = None,
        source_line: str | None = None,
        column: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line
        self.column = column
        self.source_line = source_line
        #: What agentd was doing when it hit the error ("rendering section x of agent y").
        self.context: str | None = None
        #: The agents whose builds hit it, sorted (``group_errors`` merges one mistake met by
        #: several); the message itself never names them, so a shared mistake reads the same.
        self.agents: tuple[str, ...] = ()

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt with every field (a parallel build returns errors across processes).
        return (type(self), (self.message, self.path, self.line, self.source_line, self.column), self.__dict__)

    @property
    def problem(self) -> str:
        """The message without its leading path: what is wrong, where ``location`` says where."""
        return self.message.removeprefix(f"{self.path}: ")

    @property
    def location(self) -> str:
        """``path:line`` (or just ``path``) for one-line logs."""
        return f"{self.path}:{self.line}" if self.line else self.path

    def __str__(self) -> str:
        head = f'  File "{self.path}"' + (f", line {self.line}" if self.line else "")
        parts = [self.message, head]
        if self.source_line is not None and self.source_line.strip():
            parts.append("    " + self.source_line.strip())
        if self.context:
            parts.append(f"  (while {self.context})")
        return "\n".join(parts)


class DataError(SourceError):
    """An agent or trait source that is malformed or refers to something that does not exist."""

    #: The ``agentd check`` rule it is reported under; "" when it only follows from another
    #: error, reported on its own (an agent listing a trait whose source does not load).
    rule: str = "schema"


class BlockedError(DataError):
    """A render that read the catalog where an agent whose source does not load belongs: it
    waits for that source (its agent keeps its last good output) rather than showing a catalog
    without it. Located at the broken source, so every reader reports the same mistake."""

    #: The agents whose sources do not load that this render waits for.
    blockers: tuple[str, ...] = ()
    #: What the render had read when it stopped (its inputs: any change may unblock it).
    reads: dict[str, bytes] = {}  # (a default shared read-only: each error sets its own)
    #: The section that stopped (None: the base template).
    section: str | None = None


class TemplateError(SourceError):
    """A template that does not compile, or fails while rendering (undefined variable, missing
    include, include cycle)."""


class BuildFailed(AgentdError):
    """A build its environment stopped (no file descriptors left, a full disk): no source is
    at fault, and the outputs stay as they were."""


class OutputError(AgentdError):
    """An output that cannot be written without losing a user's file."""


class WriteError(OutputError):
    """An output (or the manifest) the system refused to write or remove: permissions, a full
    disk, ``out/`` not a folder. Not the agent's fault: the daemon tries again by itself."""


class AlreadyRunning(AgentdError):
    """Another ``agentd watch`` holds this workspace (or serves this socket)."""


class ControlError(AgentdError):
    """The status socket cannot be set up safely (permissions, ownership, path length)."""


class ExplainError(AgentdError):
    """An output ``explain`` cannot map: its agent does not build, or the file is not what its
    sources give now."""


class RequestError(AgentdError):
    """A status-socket request that cannot be served; ``code`` goes into the error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def group_errors(errors: Iterable[AgentdError]) -> list[AgentdError]:
    """Each mistake once: source errors that differ only in what agentd was doing when it met
    them (a typo in a section template every agent renders, the same missing include in 24
    sections) become one, listing every agent that hit it, whose context names the first
    occasion and counts the others. The one place errors are grouped: logs, events, the status
    socket, ``agentd status`` and ``agentd build`` all show these groups."""
    unique: dict[Any, AgentdError] = {}
    others: dict[Any, list[SourceError]] = {}
    for e in errors:
        key = (type(e), e.path, e.line, e.column, e.message) if isinstance(e, SourceError) else str(e)
        if key in unique:
            assert isinstance(e, SourceError)
            others.setdefault(key, []).append(e)
        else:
            unique[key] = e
    for key, more in others.items():
        first = unique[key]
        assert isinstance(first, SourceError)
        merged = copy.copy(first)
        merged.context = f"{first.context}, and {len(more)} more" if first.context else None
        merged.agents = tuple(sorted({a for e in (first, *more) for a in e.agents}))
        unique[key] = merged
    return list(unique.values())
