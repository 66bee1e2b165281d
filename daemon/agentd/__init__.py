"""agentd: a watch-mode incremental build daemon for Markdown agents rendered from Jinja2."""

from __future__ import annotations

__version__ = "0.1.0"

from .config import Config  # noqa: E402
from .exceptions import AgentdError, ConfigError, DataError, OutputError, SourceError, TemplateError  # noqa: E402

__all__ = [
    "AgentdError",
    "Config",
    "ConfigError",
    "DataError",
    "OutputError",
    "SourceError",
    "TemplateError",
    "__version__",
]
