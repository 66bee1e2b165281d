"""The systemd user service: the unit file and ``agentd service install``.

The unit is a template, ``agentd@.service``: the instance is the workspace path, escaped the
way ``systemd-escape --path`` does (``/home/me/agents`` -> ``home-me-agents``), and ``%f``
turns it back into the path. ``systemd/agentd@.service`` in the repository is this module's
``unit_text()`` with a ``PATH`` lookup; ``install`` writes one that names the running
interpreter, so the service uses exactly the agentd that installed it.

``Documentation=`` names only what is true of the unit it is in: an installed unit runs one
known agentd, whose package holds the README (``agentd/README.md``, a link to the top-level one
in a checkout, a copy in a wheel), so it names that file. The shipped unit may run whichever
agentd ``PATH`` finds, wherever it is installed: no path or address is known to hold its
documentation (the project has no man page and no published home), so it names none.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

UNIT_NAME = "agentd@.service"
#: Exit codes that a restart cannot fix: usage/configuration (2), already running (4).
NO_RESTART_CODES = "2 4"

_UNIT = """\
# agentd: watch one workspace and keep its out/ up to date.
# The instance name is the workspace path, escaped: for ~/agents run
#   systemctl --user enable --now "agentd@$(systemd-escape --path ~/agents).service"
# or let `agentd service install --root ~/agents` do it.
[Unit]
Description=agentd incremental agent builder for %f
{documentation}After=default.target
StartLimitIntervalSec=120
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
{exec_start}
ExecReload=/bin/kill -HUP $MAINPID
{environment}Environment=AGENTD_LOG_FORMAT=json
# journald tags the lines "agentd", not "env" or the interpreter's name
SyslogIdentifier=agentd
# Until READY=1, agentd asks for 30 s more every 10 s (EXTEND_TIMEOUT_USEC) while its event
# loop runs, so a long first build is waited for and a hung start fails in 30 s.
TimeoutStartSec=30
RuntimeDirectory=agentd
RuntimeDirectoryMode=0700
RuntimeDirectoryPreserve=yes
WatchdogSec=30
Restart=on-failure
RestartSec=2
RestartPreventExitStatus={no_restart}
TimeoutStopSec=15

[Install]
WantedBy=default.target
"""


def unit_text(python: str | None = None) -> str:
    """The unit; with ``python``, run agentd through that interpreter (no PATH lookup)."""
    if python:
        exec_start = f"ExecStart={python} -m agentd watch --root %f"
        environment = ""
        documentation = f"Documentation={readme().as_uri().replace('%', '%%')}\n"  # % starts a specifier
    else:
        exec_start = "ExecStart=/usr/bin/env agentd watch --root %f"
        environment = "Environment=PATH=%h/.local/bin:/usr/local/bin:/usr/bin:/bin\n"
        documentation = "# No Documentation=: PATH picks the agentd; `agentd service install` names its README.\n"
    return _UNIT.format(
        exec_start=exec_start, environment=environment, documentation=documentation, no_restart=NO_RESTART_CODES
    )


def readme() -> Path:
    """The README of this agentd's package (see the module's docstring)."""
    return Path(__file__).with_name("README.md").resolve()


def escape_path(path: Path) -> str:
    """``systemd-escape --path``: strip slashes at the ends, ``/`` -> ``-``, anything but
    ``[A-Za-z0-9:_.]`` (and a leading ``.``) -> ``\\xNN``."""
    text = str(path).strip("/")
    if not text:
        return "-"
    out = []
    for i, ch in enumerate(text):
        if ch == "/":
            out.append("-")
        elif (ch.isascii() and (ch.isalnum() or ch in ":_.")) and not (ch == "." and i == 0):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return "".join(out)


def instance_name(root: Path) -> str:
    return f"agentd@{escape_path(root)}.service"


def unit_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def install(root: Path, start: bool = True, environ: Mapping[str, str] | None = None) -> list[str]:
    """Write the unit for the current user; enable and start the workspace's instance when
    ``start`` (and ``systemctl --user`` is reachable). Returns what was done, line by line."""
    target = unit_dir(environ) / UNIT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(unit_text(sys.executable))
    instance = instance_name(root)
    done = [f"wrote {target}"]
    commands = [
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "enable", "--now", instance],
    ]
    if not start:
        done.append("to start it: " + " && ".join(shlex.join(c) for c in commands))
        return done
    if shutil.which("systemctl") is None:
        raise OSError("systemctl not found; run: " + " && ".join(shlex.join(c) for c in commands))
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise OSError(f"`{shlex.join(command)}` failed: {result.stderr.strip() or result.stdout.strip()}")
        done.append("ran " + shlex.join(command))
    done.append(f"logs: journalctl --user -u {shlex.quote(instance)} -f")
    return done
