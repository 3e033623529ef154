"""One cross-process lock per cache key (filelock; flock on Unix).

The kernel releases an flock when its holder dies, even on SIGKILL, so a
killed compiler never blocks the others for longer than it lived. Lock files
are never deleted (deleting them lets two processes hold "the lock" at once).
"""

from __future__ import annotations

import inspect
import os
import stat
import threading
from pathlib import Path

from .trust import make_private_dirs

__all__ = ["LockTimeout", "UnsafeLock", "KeyLock", "MemoryLock"]

_filelock = None
_EXTRA: dict = {}


def _import_filelock():
    """filelock costs ~75 ms of imports; only compiles take locks, so warm starts never pay it."""
    global _filelock
    if _filelock is None:
        import filelock

        params = set(inspect.signature(filelock.FileLock.__init__).parameters)
        if "preserve_lock_file" in params:
            _EXTRA["preserve_lock_file"] = True      # keep the file: never unlink a lock path
        if "fallback_to_soft" in params:
            _EXTRA["fallback_to_soft"] = False       # a soft marker outlives a killed holder
        _filelock = filelock
    return _filelock


class LockTimeout(Exception):
    def __init__(self, path: str, timeout: float):
        super().__init__(f"timed out after {timeout:g}s waiting for the lock {path}")
        self.path = path
        self.timeout = timeout

    def __reduce__(self):
        return (LockTimeout, (self.path, self.timeout))


class KeyLock:
    """``with KeyLock(dir, key, timeout):`` holds the lock on ``key`` across processes and threads."""

    def __init__(self, directory: Path, key: str, timeout: float):
        lock_dir = Path(directory) / "locks"
        if not lock_dir.is_dir():
            make_private_dirs(lock_dir)
        self.path = str(lock_dir / f"{key}.lock")
        self.timeout = timeout
        # A new FileLock (own file descriptor) per use: flock then excludes threads too.
        filelock = _import_filelock()
        self._lock = filelock.FileLock(self.path, timeout=timeout, mode=0o600, thread_local=False,
                                       is_singleton=False, **_EXTRA)

    def __enter__(self):
        _refuse_symlink(self.path)
        try:
            self._lock.acquire()
        except _filelock.Timeout:
            raise LockTimeout(self.path, self.timeout) from None
        return self

    def __exit__(self, *exc):
        self._lock.release()
        return False


class UnsafeLock(OSError):
    """The lock path is a symlink (or not a regular file): refused, its target never opened."""


def _refuse_symlink(path: str) -> None:
    """filelock opens with O_NOFOLLOW too; this says why, and holds for any filelock version."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeLock(f"refusing the lock file {path}: it is a symlink (to {os.readlink(path)!r})")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeLock(f"refusing the lock file {path}: it is not a regular file")


class MemoryLock:
    """In-process lock per key, for stores that live in one process."""

    _locks: dict = {}
    _guard = threading.Lock()

    def __init__(self, key: str, timeout: float):
        with self._guard:
            self._lock = self._locks.setdefault(key, threading.Lock())
        self.timeout = timeout
        self.path = f"<memory:{key}>"

    def __enter__(self):
        if not self._lock.acquire(timeout=self.timeout if self.timeout >= 0 else -1):
            raise LockTimeout(self.path, self.timeout)
        return self

    def __exit__(self, *exc):
        self._lock.release()
        return False


def _reset_memory_locks_in_child() -> None:
    # A lock held by a parent's thread at fork() would be held forever in the child.
    MemoryLock._locks = {}
    MemoryLock._guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_memory_locks_in_child)
