"""The one ``Config`` object: CLI flag > ``AGENTD_*`` environment variable > ``agentd.toml`` >
default, resolved once at startup and passed down (nothing else reads the environment)."""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .exceptions import ConfigError

CONFIG_FILE = "agentd.toml"


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings for one workspace. Paths are relative to ``root`` unless absolute."""

    root: Path = Path(".")
    templates_dir: str = "templates"
    agents_dir: str = "agents"
    output_dir: str = "out"
    #: Sections an agent gets when its source has no ``sections`` list. Empty: every
    #: ``templates/sections/*.j2`` whose name does not start with "_", sorted by name
    #: (the tool knows no sections of its own: a workspace names its order here).
    sections: tuple[str, ...] = ()
    #: ``auto`` (console on a TTY, JSON otherwise), ``console`` or ``json``.
    log_format: str = "auto"
    log_level: str = "info"
    #: watchfiles ``step``: how long the watcher waits for more changes after one (ms). It sets
    #: save-to-output latency (an event arrives step..2*step after the write).
    step_ms: int = 8
    #: watchfiles ``debounce``: the longest a continuous stream of changes is grouped (ms).
    debounce_ms: int = 400
    #: After a batch that deletes files or touches many, wait this long for quiet before
    #: building, so a ``git checkout`` or an editor's rename dance is one rebuild (ms).
    settle_ms: int = 100
    #: Keep rendered sections in ``.agentd/cache.sqlite3`` across runs (see ``store.py``).
    cache: bool = True
    #: In-memory budget for rendered sections (L3) and fragments (L2), each, in MB; the least
    #: recently used are dropped beyond it (the store keeps them). 0: no limit.
    memory_budget_mb: int = 64
    #: Worker processes for big batches of renders (cold builds, template edits that touch many
    #: agents); 0 (``auto``): one per core, at most 8. 1: render in this process only.
    jobs: int = 0
    #: Seconds a shutdown waits for the build in flight before giving up on it.
    graceful_timeout: float = 5.0
    #: The status socket; empty: ``$XDG_RUNTIME_DIR/agentd/<name>.sock`` (see ``control.py``).
    socket: str = ""
    #: A template render slower than this raises an alert (ms).
    slow_template_ms: float = 100.0
    #: A cache layer whose hit rate over the recent builds falls below this raises an alert.
    hit_rate_floor: float = 0.95
    #: How many recent builds the hit-rate floor looks at, and which layers it watches: those
    #: that can lose a valid entry (L1 never evicts, L4 has no budget: their misses are all
    #: expected, see ``cache.py``).
    hit_rate_window: int = 20
    hit_rate_layers: tuple[str, ...] = ("L2", "L3")
    #: Longest request line the status socket accepts (bytes).
    max_request_bytes: int = 65536
    #: Clients the status socket serves at once; the next one gets a ``busy`` reply.
    max_clients: int = 64
    #: Seconds a status-socket client may stay silent before it is disconnected.
    client_idle_timeout: float = 60.0
    #: ``agentd check`` (``[check]`` in agentd.toml): output line range (0: no bound), sections
    #: every agent must enable, front matter keys every output must have (none: front matter is
    #: optional), rules switched off, and JSON Schemas (paths inside the workspace) the sources
    #: are validated against (empty: none; only what agentd interprets is checked). Nothing
    #: here is on by default: a workspace declares its own contract.
    check_min_lines: int = 0
    check_max_lines: int = 0
    check_required_sections: tuple[str, ...] = ()
    check_front_matter: tuple[str, ...] = ()
    check_disable: tuple[str, ...] = ()
    check_agent_schema: str = ""
    check_trait_schema: str = ""

    @property
    def workers(self) -> int:
        return self.jobs or min(os.cpu_count() or 1, 8)

    @property
    def templates_path(self) -> Path:
        return self.root / self.templates_dir

    @property
    def agents_path(self) -> Path:
        return self.root / self.agents_dir

    @property
    def output_path(self) -> Path:
        return self.root / self.output_dir

    @classmethod
    def load(
        cls,
        root: str | Path = ".",
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Config:
        """Resolve every field by precedence; raise ``ConfigError`` naming the bad source."""
        root = Path(root).resolve()
        if not root.is_dir():
            raise ConfigError(f"workspace root {root} is not a directory")
        values: dict[str, Any] = {}
        values.update(_from_toml(root / CONFIG_FILE))
        values.update(_from_env(os.environ if environ is None else environ))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        values["root"] = root
        return cls(**{name: _coerce(name, value) for name, value in values.items()})


def find_root(start: Path) -> Path | None:
    """The nearest folder from ``start`` up that is a workspace: it holds ``agentd.toml``, or both
    ``templates/`` and ``agents/`` (so a subfolder of a workspace finds it, as git and cargo do)."""
    for folder in (start, *start.parents):
        if (folder / CONFIG_FILE).is_file() or ((folder / "templates").is_dir() and (folder / "agents").is_dir()):
            return folder
    return None


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_LOG_FORMATS = ("auto", "console", "json")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_NUMBERS: dict[str, tuple[type, float]] = {
    "step_ms": (int, 1),
    "debounce_ms": (int, 1),
    "settle_ms": (int, 0),
    "graceful_timeout": (float, 0),
    "slow_template_ms": (float, 0),
    "hit_rate_floor": (float, 0),
    "hit_rate_window": (int, 1),
    "max_request_bytes": (int, 256),
    "max_clients": (int, 1),
    "client_idle_timeout": (float, 0.1),
    "memory_budget_mb": (int, 0),
    "check_min_lines": (int, 0),
    "check_max_lines": (int, 0),
}


def _from_toml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path.name}: {exc}") from exc
    table = dict(data.get("agentd", data))
    check = table.pop("check", {})
    if not isinstance(check, dict):
        raise ConfigError(f"{path.name}: [check] must be a table")
    table.update({f"check_{k}": v for k, v in check.items()})
    known = sorted(set(_FIELDS) - {"root"})
    unknown = sorted(set(table) - set(known))
    if unknown:
        named = [_toml_name(k) + _closest(k, known) for k in unknown]
        hint = (
            "" if all("did you mean" in n for n in named) else f"; expected any of {', '.join(map(_toml_name, known))}"
        )
        raise ConfigError(f"{path.name}: unknown setting(s) {', '.join(named)}{hint}")
    return {k: v for k, v in table.items() if k != "root"}


def _toml_name(field: str) -> str:
    """How a field is spelled in agentd.toml: ``check_min_lines`` is ``[check] min_lines``."""
    return f"[check] {field.removeprefix('check_')}" if field.startswith("check_") else field


def _closest(field: str, known: list[str]) -> str:
    """A suggestion from the same table: ``[check] min_line`` is compared with ``[check]`` keys."""
    table = "check_" if field.startswith("check_") else ""
    peers = [f.removeprefix(table) for f in known if f.startswith("check_") == bool(table)]
    return did_you_mean(field.removeprefix(table), peers)


def did_you_mean(given: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing when none is close."""
    close = difflib.get_close_matches(given, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _FIELDS:
        key = f"AGENTD_{name.upper()}"
        if name != "root" and key in environ:
            out[name] = environ[key]
    return out


def _coerce(name: str, value: Any) -> Any:
    if name == "root":
        return value
    if name in ("sections", "hit_rate_layers", "check_required_sections", "check_front_matter", "check_disable"):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
            raise ConfigError(f"{name}: expected a list of names, got {value!r}")
        items = tuple(s.strip() for s in items if s.strip())
        if name == "hit_rate_layers" and not set(items) <= {"L1", "L2", "L3", "L4"}:
            raise ConfigError(f"hit_rate_layers: expected names among L1, L2, L3, L4, got {value!r}")
        return items
    if name == "cache":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"cache: expected true or false, got {value!r}")
    if name == "jobs":
        if value == "auto":
            return 0
        if (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.isdigit()):
            if int(value) >= 1:
                return int(value)
        raise ConfigError(f"jobs: expected a number >= 1 or 'auto', got {value!r}")
    if name in _NUMBERS:
        kind, low = _NUMBERS[name]
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        if number < low:
            raise ConfigError(f"{name}: expected a number >= {low}, got {value!r}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if name == "log_format" and value not in _LOG_FORMATS:
        raise ConfigError(f"log_format: expected one of {'|'.join(_LOG_FORMATS)}, got {value!r}")
    if name == "log_level" and value.lower() not in _LOG_LEVELS:
        raise ConfigError(f"log_level: expected one of {'|'.join(_LOG_LEVELS)}, got {value!r}")
    return value.lower() if name == "log_level" else value
