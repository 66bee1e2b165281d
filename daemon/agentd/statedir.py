"""agentd's own folder in a workspace, ``.agentd/``: the persistent cache and the watch lock.

Private to its user whatever the umask: the store holds every parsed source and rendered
output, so anything the workspace's sources say passes through it. The folder is 0700 and what
agentd creates in it 0600; a folder or file found wider (made by an earlier agentd, or under a
permissive umask) loses its group and other bits when agentd opens it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

STATE_DIR = ".agentd"
_OTHERS = stat.S_IRWXG | stat.S_IRWXO


def ensure(root: Path) -> Path:
    """``root/.agentd``, created 0700 or tightened (with what it holds). Raises ``OSError``
    naming the path when it cannot be agentd's folder (a file in the way, no permission)."""
    folder = root / STATE_DIR
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(folder)) from None
        _tighten(folder, follow=True)  # a symlinked .agentd is the user's choice: its target is ours
        with os.scandir(folder) as entries:
            for entry in entries:
                _tighten(Path(entry.path), follow=False)
    else:
        os.chmod(folder, 0o700)  # mkdir's mode went through the umask
    return folder


def create_private(path: Path) -> None:
    """Create ``path`` empty and 0600 unless it exists (SQLite would create a database 0644
    under the usual umask, and gives its -wal and -shm files the database's mode)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)  # the umask may have taken the owner's bits too
    finally:
        os.close(fd)


def _tighten(path: Path, follow: bool) -> None:
    """Drop group and other bits; a symlink inside the folder is left alone (chmod would change
    whatever it points to)."""
    st = os.stat(path, follow_symlinks=follow)
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & _OTHERS:
        return
    os.chmod(path, stat.S_IMODE(st.st_mode) & ~_OTHERS)
