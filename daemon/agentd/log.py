"""structlog, configured once: short console lines on a TTY (``console.py``), JSON lines
(orjson) otherwise.

Event names are fixed strings (``build.finished``, ``build.error``); data goes in keys, never in
the message, so the JSON stream can be filtered with ``jq`` and the journal.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson
import structlog

from .console import ConsoleRenderer, use_color

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def configure(fmt: str = "auto", level: str = "info", stream: TextIO | None = None, color: str = "auto") -> None:
    """Configure structlog for this process. ``fmt``: auto | console | json; ``color``: auto (on
    a terminal) | always | never."""
    stream = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    if use_console:  # short lines in local time for a person (console.py); the record at debug
        renderer: Any = ConsoleRenderer(use_color(color, stream), verbose=level == "debug", stream=stream)
        stamp = structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False)
        exc: Any = structlog.processors.format_exc_info
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
        exc = structlog.processors.dict_tracebacks
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            exc,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger("agentd", **initial)
