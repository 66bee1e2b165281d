"""structlog, configured once: short console lines on a TTY (``console.py``), JSON lines
(orjson) otherwise.

Event names are fixed strings (``build.finished``, ``build.error``); data goes in keys, never in
the message, so the JSON stream can be filtered with ``jq`` and the journal. A JSON line starts
with ``event``, ``level`` and ``timestamp``, so a person scanning the journal sees what happened
before the data; under systemd it also starts with the sd-daemon priority prefix (``<3>``...),
so ``journalctl -p err`` finds the errors.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from .console import ConsoleRenderer, use_color

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


#: Keys a JSON line starts with, in this order.
LEAD_KEYS = ("event", "level", "timestamp")

#: sd-daemon(3) priority prefixes, by structlog level name (syslog's numbers).
PRIORITIES = {"critical": "<2>", "error": "<3>", "exception": "<3>", "warning": "<4>", "info": "<6>", "debug": "<7>"}


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default).decode()


def _lead_keys(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The fixed keys first (orjson keeps insertion order): structlog adds level and timestamp
    last, and the event name comes after the data."""
    lead = {key: event_dict[key] for key in LEAD_KEYS if key in event_dict}
    return {**lead, **{k: v for k, v in event_dict.items() if k not in lead}}


class _JournalPrefix:
    """Wraps the JSON renderer: each line gets the priority prefix journald strips and files
    the line under (``SyslogLevelPrefix=`` is on by default)."""

    def __init__(self, render: Any) -> None:
        self.render = render

    def __call__(self, logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> str:
        prefix = PRIORITIES.get(str(event_dict.get("level")), "<6>")
        return prefix + str(self.render(logger, name, event_dict))


def is_journal(stream: TextIO, journal_stream: str | None) -> bool:
    """Whether ``stream`` is the journal: systemd sets ``$JOURNAL_STREAM`` to the device and inode
    of the stream it connected (systemd.exec(5)); a process that inherited the variable but
    writes elsewhere (a redirect, a child) must not prefix."""
    if not journal_stream:
        return False
    try:
        dev, ino = (int(part) for part in journal_stream.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):  # malformed, or a stream without a descriptor
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def configure(
    fmt: str = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    color: str = "auto",
    journal_stream: str | None = None,
) -> None:
    """Configure structlog for this process. ``fmt``: auto | console | json; ``color``: auto (on
    a terminal) | always | never; ``journal_stream``: ``$JOURNAL_STREAM`` as the caller read it
    (only the CLI reads the environment)."""
    stream = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    if use_console:  # short lines in local time for a person (console.py); the record at debug
        renderer: Any = ConsoleRenderer(use_color(color, stream), verbose=level == "debug", stream=stream)
        stamp = structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False)
        exc: Any = structlog.processors.format_exc_info
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if is_journal(stream, journal_stream):
            renderer = _JournalPrefix(renderer)
        stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
        exc = structlog.processors.dict_tracebacks
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            exc,
            *(() if use_console else (_lead_keys,)),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger("agentd", **initial)
