"""Every error agentd raises, under one base class.

Source errors carry the file and line they are about and print like a Python traceback
frame (``File "agents/x.yaml", line 12`` plus the offending line), the way
``jinja2.TemplateSyntaxError`` does, so editors and terminals can jump to them.
"""

from __future__ import annotations

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

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt with every field (a parallel build returns errors across processes).
        return (type(self), (self.message, self.path, self.line, self.source_line, self.column), self.__dict__)

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


class RequestError(AgentdError):
    """A status-socket request that cannot be served; ``code`` goes into the error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
