"""Who may write the cache decides whether we may load from it; what we create, only we can write.

``torch.jit.load`` runs the archive's code, so a directory or file someone else can write is a
code-execution hole. One rule (:func:`untrusted`) decides what may be read: owned by you or by
root (root can write anything anyway: refusing it adds no safety, and caches baked into images
belong to root), and writable by neither group nor others. It is applied to the cache directory,
its index files and ``locks/`` when the cache is opened (:func:`check_directory`, for read-only
layers too, :mod:`jitfreeze.cache.layers`; a bundle file: :func:`check_file`), and to every value
file and the directories that hold it when the entry is read (:mod:`jitfreeze.cache.files`).
Symlinks: a path reached through a symlink owned by someone other than you or root is refused (the directory itself, or any directory above it) — unless the user opts in.

Everything jitfreeze creates in a cache is owner-only whatever the process umask: directories
0700 (:func:`make_private_dirs`: ``mkdir``'s mode is masked by the umask, so it is set again with
``chmod``, which is not), files 0600 (:func:`create_private_file`: ``O_EXCL``, never through a
symlink, then ``fchmod``). The umask is process-wide and other threads create files too: it is
never changed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["UnsafeDirectory", "untrusted", "check_path", "prepare_directory", "check_directory", "check_file",
           "make_private_dirs", "create_private_file", "PRIVATE_DIR", "PRIVATE_FILE"]

PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


class UnsafeDirectory(Exception):
    pass


def untrusted(st: os.stat_result, uid: int | None = None) -> str | None:
    """Why a file or directory with status ``st`` may not be trusted; None when it may (the rule)."""
    uid = os.geteuid() if uid is None else uid
    if st.st_uid not in (uid, 0):
        return f"owned by uid {st.st_uid}, not you ({uid}) or root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def check_path(path, what: str, uid: int | None = None) -> None:
    """Raise UnsafeDirectory unless ``path`` (and, if it is a symlink, the link and its target)
    passes :func:`untrusted`."""
    uid = os.geteuid() if uid is None else uid
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        if st.st_uid not in (uid, 0):
            raise UnsafeDirectory(f"{what} {path} is a symlink owned by uid {st.st_uid}, not you ({uid}) or root")
        st = os.stat(path)
    why = untrusted(st, uid)
    if why is not None:
        raise UnsafeDirectory(f"{what} {path} is {why}")


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
    """Raise UnsafeDirectory unless only the current user (or root) can write ``path`` and what it holds."""
    uid = os.geteuid()
    path = Path(path)
    _check_ancestors(path, uid)
    check_path(path, "cache directory", uid)
    if not os.path.isdir(path):
        raise UnsafeDirectory(f"{path} is not a directory")
    for name in ("cache.db", "cache.db-wal", "cache.db-shm", "locks"):
        child = path / name
        if os.path.lexists(child):
            check_path(child, "cache file", uid)


def check_file(path: Path, what: str = "cache file") -> None:
    """Raise UnsafeDirectory unless only the current user (or root) can write the file ``path``
    (a bundle used as a layer), and no directory above it is reached through someone else's symlink."""
    uid = os.geteuid()
    _check_ancestors(Path(path), uid)
    check_path(path, what, uid)


def make_private_dirs(path, mode: int = PRIVATE_DIR) -> None:
    """Create ``path`` and its missing parents with ``mode`` (default 0700), whatever the umask.
    Directories that already exist are left as they are."""
    path = Path(os.path.abspath(path))
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue
        os.chmod(d, mode)       # mkdir's mode is masked by the umask; chmod's is not


def create_private_file(path, flags: int = os.O_WRONLY) -> int:
    """A new file at ``path`` (never an existing one, never through a symlink) with mode 0600
    whatever the umask; returns its descriptor. FileExistsError when ``path`` exists."""
    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                 PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def prepare_directory(path: Path, allow_unsafe: bool = False) -> None:
    """Create ``path`` (and missing parents: mode 0700) if missing, then check it unless ``allow_unsafe``."""
    path = Path(path)
    if not allow_unsafe:
        _check_ancestors(path, os.geteuid())     # before creating anything through a foreign symlink
    if not os.path.lexists(path):
        make_private_dirs(path)
    if not allow_unsafe:
        check_directory(path)
