"""``agentd verify``: is ``out/`` exactly what a clean build would write?

The clean build runs from scratch (a fresh ``Engine``: no caches, no graph, a new scan of the
disk) into a temporary folder, and its files are compared byte for byte with the generated
files in ``out/``. Files of the user's own in ``out/`` (not in the manifest) are not agentd's
business and are ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import tempfile
from pathlib import Path

from .build import Engine
from .config import Config
from .output import OUTPUT_SUFFIX, OutputDir, output_agent
from .progress import Progress


@dataclasses.dataclass
class VerifyResult:
    checked: int = 0
    differing: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)  # a clean build writes it; out/ lacks it
    stale: list[str] = dataclasses.field(default_factory=list)  # out/ has it; a clean build does not
    errors: list[str] = dataclasses.field(default_factory=list)  # the clean build itself failed here
    diffs: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.differing or self.missing or self.stale or self.errors)

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "differing": self.differing,
            "missing": self.missing,
            "stale": self.stale,
            "errors": self.errors,
        }


def verify(config: Config, diff_lines: int = 20, progress: Progress | None = None) -> VerifyResult:
    """Clean-build into a temporary folder and compare with ``config.output_path``."""
    result = VerifyResult()
    with tempfile.TemporaryDirectory(prefix="agentd-verify-") as tmp:
        clean_dir = Path(tmp)
        with Engine(dataclasses.replace(config, output_dir=str(clean_dir)), progress=progress) as engine:
            report = engine.build()
        result.errors = [str(e) for e in report.errors]
        clean = {p.name: p.read_bytes() for p in clean_dir.glob(f"*{OUTPUT_SUFFIX}")}
        ours = {n for n in OutputDir(config.output_path).files if output_agent(n) is not None}
        for name in sorted(clean.keys() | ours):
            result.checked += 1
            target = config.output_path / name
            if name not in clean:
                if target.exists():
                    result.stale.append(name)
                continue
            try:
                current = target.read_bytes()
            except FileNotFoundError:
                result.missing.append(name)
                continue
            if current != clean[name]:
                result.differing.append(name)
                result.diffs[name] = _diff(name, current, clean[name], diff_lines)
    return result


def _diff(name: str, current: bytes, clean: bytes, limit: int) -> str:
    lines = list(
        difflib.unified_diff(
            current.decode(errors="replace").splitlines(),
            clean.decode(errors="replace").splitlines(),
            f"out/{name}",
            f"clean build/{name}",
            lineterm="",
            n=1,
        )
    )
    more = f"\n... {len(lines) - limit} more diff lines" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more
