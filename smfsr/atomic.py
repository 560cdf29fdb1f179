"""Writing a file so that a failure never leaves a half-written file in place of the user's."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def refuse_existing(target: str | os.PathLike, overwrite: bool) -> Path:
    """``target`` as a Path; an existing file is never replaced unless asked (said before any work)."""
    from .errors import SMFSRError

    target = Path(target)
    if target.exists() and not overwrite:
        raise SMFSRError(f"{target} already exists; choose another name or pass --overwrite")
    return target


def probe_writable(folder: str | os.PathLike, fix: str) -> Path:
    """The nearest existing folder at or above ``folder``, after a real write probe there (a
    permission check says nothing on a read-only file system or as root); nothing is created.
    ``fix`` ends the message when it cannot be written."""
    from .errors import SMFSRError

    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SMFSRError(f"cannot write to {folder}: {existing} is a file, not a folder; {fix}")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".smfsr-probe-"):
            pass
    except OSError as e:
        raise SMFSRError(f"cannot write to {folder} ({e.strerror or e}); {fix}") from None
    return existing


def write_atomically(target: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` writes a temporary file in the target's folder, which then replaces the target
    in one rename; on any failure nothing is left behind. The file gets the permissions a plain
    ``open`` would give it (mkstemp's are owner-only)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
