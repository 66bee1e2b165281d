"""``agentd init``: write a new workspace, either the small starter (``agentd/starter/``) or the
full shipped corpus (``agentd/example/``).

Both are package data, so they come with the wheel. ``example/`` holds relative links to the
repository's own top-level ``templates/`` and ``agents/`` (and whatever else the corpus is made
of): building a wheel copies the files behind them, an editable install reads through them, and
the repository keeps one real copy. This module copies whatever each folder holds, so adding a
link needs no change here.
"""

from __future__ import annotations

import dataclasses
import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from .exceptions import ConfigError

STARTER = "starter"
EXAMPLE = "example"
#: Written into both: the outputs and agentd's private state are never sources.
GITIGNORE = "out/\n.agentd/\n"


@dataclasses.dataclass(frozen=True)
class Scaffold:
    """What ``init`` did: the workspace folder and the files it wrote (relative, sorted)."""

    root: Path
    written: tuple[str, ...]
    overwritten: tuple[str, ...]


def files(example: bool = False) -> dict[str, bytes]:
    """The workspace's files, relative path -> bytes, sorted by path."""
    out: dict[str, bytes] = {}
    _collect(resources.files("agentd").joinpath(EXAMPLE if example else STARTER), "", out)
    if not out:  # a broken install must not look like success
        raise ConfigError(f"agentd's {'example' if example else 'starter'} files are missing from this installation")
    out[".gitignore"] = GITIGNORE.encode()
    return dict(sorted(out.items()))


def _collect(folder: Traversable, prefix: str, out: dict[str, bytes]) -> None:
    # Dot-entries are skipped: a wheel leaves them out too, so an editable install gives the same.
    for entry in folder.iterdir():
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        rel = prefix + entry.name
        if entry.is_dir():
            _collect(entry, rel + "/", out)
        elif entry.is_file():
            out[rel] = entry.read_bytes()


def init(target: Path, example: bool = False, force: bool = False) -> Scaffold:
    """Write the workspace into ``target`` (created if missing).

    A folder holding anything but dot-entries (``.git/`` from a ``git init``, an editor's
    settings) is refused unless ``force``, and so is one holding a file ``init`` would write
    (``.gitignore``): nothing is ever overwritten silently. With ``force`` the workspace's files
    replace existing ones of the same name and nothing else is touched. Every check runs before
    the first write, so a refusal leaves the folder as it was.
    """
    content = files(example)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target} exists and is not a folder")
    if target.is_dir() and not force:
        ours = {rel.split("/", 1)[0] for rel in content}
        found = sorted(e.name for e in target.iterdir() if not e.name.startswith(".") or e.name in ours)
        if found:
            shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
            raise ConfigError(
                f"{target} is not empty ({shown}); run `agentd init` on an empty or new folder, or "
                "pass --force to write the workspace's files over any of the same name (nothing else "
                "is changed or deleted)"
            )
    overwritten = [rel for rel in content if _blocked(target, rel)]
    target.mkdir(parents=True, exist_ok=True)
    for rel, data in content.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():  # replace the link itself, never write through it
            path.unlink()
        path.write_bytes(data)  # mode 0666 less the umask, like any file the user creates
    return Scaffold(target, tuple(content), tuple(overwritten))


def _blocked(target: Path, rel: str) -> bool:
    """Whether ``rel`` already exists (it will be overwritten); raise when it cannot be written:
    a folder in its place, a file or a link where one of its folders goes."""
    parts = rel.split("/")
    for depth in range(1, len(parts)):
        folder = target.joinpath(*parts[:depth])
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            what = "a symbolic link" if folder.is_symlink() else "not a folder"
            raise ConfigError(f"{folder} is {what}; agentd init needs a folder there for {rel}")
    path = target / rel
    if path.is_dir() and not path.is_symlink():
        raise ConfigError(f"{path} is a folder; agentd init writes a file there")
    return os.path.lexists(path)
