"""Who may write the cache directory decides whether we may load from it.

``torch.jit.load`` runs the archive's code, so a directory someone else can
write is a code-execution hole. We create the directory with mode 0700 and
refuse one that is not owned by us, is group- or world-writable, or is reached
through a symlink we don't own (the directory itself, or any directory above
it; symlinks owned by root are trusted, as root could write anything anyway) —
unless the user opts in.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["UnsafeDirectory", "prepare_directory", "check_directory"]


class UnsafeDirectory(Exception):
    pass


def _check_one(path: Path, uid: int, what: str) -> None:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        if st.st_uid != uid:
            raise UnsafeDirectory(f"{what} {path} is a symlink owned by uid {st.st_uid}, not you ({uid})")
        st = os.stat(path)
    if st.st_uid != uid:
        raise UnsafeDirectory(f"{what} {path} is owned by uid {st.st_uid}, not you ({uid})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDirectory(f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")


def _check_ancestors(path: Path, uid: int) -> None:
    """No component above ``path`` may be a symlink owned by someone other than us or root."""
    path = Path(os.path.abspath(path))
    for parent in reversed(path.parents):
        try:
            st = os.lstat(parent)
        except OSError:
            return
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (uid, 0):
            raise UnsafeDirectory(f"the cache directory {path} is reached through {parent}, a symlink owned "
                                  f"by uid {st.st_uid}, not you ({uid}) or root")


def check_directory(path: Path) -> None:
    """Raise UnsafeDirectory unless only the current user can write ``path`` and what it holds."""
    uid = os.geteuid()
    path = Path(path)
    _check_ancestors(path, uid)
    _check_one(path, uid, "cache directory")
    if not os.path.isdir(path):
        raise UnsafeDirectory(f"{path} is not a directory")
    for name in ("cache.db", "cache.db-wal", "cache.db-shm", "locks"):
        child = path / name
        if os.path.lexists(child):
            _check_one(child, uid, "cache file")


def prepare_directory(path: Path, allow_unsafe: bool = False) -> None:
    """Create ``path`` (mode 0700) if missing, then check it unless ``allow_unsafe``."""
    path = Path(path)
    if not allow_unsafe:
        _check_ancestors(path, os.geteuid())     # before creating anything through a foreign symlink
    if not os.path.lexists(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(path, 0o700)  # mkdir's mode is masked by the umask
    if not allow_unsafe:
        check_directory(path)
