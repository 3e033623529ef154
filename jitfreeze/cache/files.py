"""The value-file layout of a cache directory, and reading a row's bytes: the bottom of the cache.

diskcache keeps a value under 32 KiB inline in its row (mode ``MODE_RAW``) and a larger one in a
value file (``MODE_BINARY``) named ``xx/yy/<hex>.val`` under the cache directory. Everything that
reads or writes those files goes through here: what a row may name (:func:`is_value_file`: the
layout only, never a path outside it), reading one (:func:`fetch`: never through a symlink, never
unpickled, the trust rule of :mod:`jitfreeze.cache.trust` applied to the file and the two
directories that hold it), creating one owner-only (:func:`create_value_file`, :class:`NewFile`),
and random access for listings (:class:`BytesReader`, :class:`FileReader`).

Imports nothing of the cache but :mod:`~jitfreeze.cache.trust`; diskcache is not imported here (a
warm process reads rows through a plain SQLite connection and this module, and never needs it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sqlite3
import stat
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

from .trust import PRIVATE_DIR, UnsafeDirectory, check_path, create_private_file, untrusted

__all__ = ["MODE_RAW", "MODE_BINARY", "UnsafeEntry", "Adopt", "NewFile", "is_value_file", "fetch",
           "value_file_path", "check_value_file", "create_value_file", "in_use", "value_files",
           "chunks", "BytesReader", "FileReader"]

# diskcache's row modes (checked against diskcache.core by the tests): inline bytes, or a value file.
MODE_RAW, MODE_BINARY = 1, 2
# diskcache's own value files: two levels of two hex digits, then a random hex name.
_VALUE_FILE = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{8,64}\.val$")
_VALUE_GLOB = "[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*.val"


class UnsafeEntry(Exception):
    """A row that is not raw bytes (e.g. pickle mode), or names a file outside the layout, or whose
    file fails the trust rule: refused, never deserialized or opened."""


def is_value_file(filename) -> bool:
    """Whether a row's ``filename`` is a value file of the layout (``xx/yy/<hex>.val``)."""
    return type(filename) is str and _VALUE_FILE.match(filename) is not None


def _require_value_file(filename) -> None:
    if not is_value_file(filename):
        raise UnsafeEntry(f"cache row names the value file {filename!r}, outside the cache's layout")


def chunks(value: bytes, size: int = 4 * 2**20):
    view = memoryview(value)
    return (view[i:i + size] for i in range(0, len(view), size))


class Adopt:
    """A complete value already written to a value file in the cache's layout."""

    __slots__ = ("filename", "size")

    def __init__(self, filename: str, size: int):
        self.filename = filename
        self.size = size


def fetch(directory: str, mode, filename, value, check: bool = True) -> bytes:
    """The bytes of a row (inline value or value file), raw bytes only: never unpickled, never a
    file outside the cache's layout or through a symlink. FileNotFoundError: the file is gone."""
    if mode not in (MODE_RAW, MODE_BINARY):
        raise UnsafeEntry(f"cache row in mode {mode} (only raw bytes are accepted)")
    if mode == MODE_RAW:
        data = bytes(value) if type(value) in (sqlite3.Binary, memoryview, bytearray) else value
    else:
        data = _read_value_file(directory, filename, check)
    if type(data) is not bytes:
        raise UnsafeEntry(f"cache row holds {type(data).__name__}, not bytes")
    return data


def _read_value_file(directory: str, filename, check: bool = True) -> bytes:
    _require_value_file(filename)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(os.path.join(directory, filename), flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeEntry(f"cache value file {filename} is a symlink") from None
        raise
    with open(fd, "rb") as reader:
        if check:
            check_value_file(directory, filename, os.fstat(fd))
        return reader.read()


def value_file_path(directory: str, mode, filename, check: bool = True) -> str | None:
    """The path of a file-backed row's value file, to be verified and loaded in place; None for an
    inline row or a file that is gone. diskcache never rewrites a value file in place (a new value
    gets a new file), so the path stays valid until the entry is evicted or replaced."""
    if mode != MODE_BINARY or not filename:
        return None
    _require_value_file(filename)
    path = os.path.join(directory, filename)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None          # evicted or replaced since the row was read: a miss
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeEntry(f"cache value file {filename} is not a regular file (a symlink?)")
    if check:
        check_value_file(directory, filename, st)
    return path


def check_value_file(directory: str, filename: str, st: os.stat_result) -> None:
    """Raise UnsafeEntry unless the value file (status ``st``) and the two directories that hold it
    pass the trust rule (:func:`jitfreeze.cache.trust.untrusted`): owned by you or root, writable by no one
    else. The cache directory itself was checked when it was opened."""
    why = untrusted(st)
    if why is not None:
        raise UnsafeEntry(f"cache value file {filename} is {why}")
    sub = os.path.dirname(filename)
    for d in (os.path.dirname(sub), sub):
        try:
            check_path(os.path.join(directory, d), "cache value directory")
        except UnsafeDirectory as exc:
            raise UnsafeEntry(str(exc)) from None


def create_value_file(directory: str, filename: str) -> int:
    """Create the value file ``filename`` (in the cache's ``xx/yy/`` layout) and the directories that
    hold it, owner-only whatever the umask (directories 0700, the file 0600); returns its
    descriptor, open for writing. A directory of ours that others could write (made by an older
    version under a permissive umask) is made 0700 first; one owned by someone else is refused."""
    path = os.path.join(directory, filename)
    sub = os.path.dirname(filename)
    for attempt in range(10):
        try:
            for d in (os.path.dirname(sub), sub):
                _private_subdir(os.path.join(directory, d))
            return create_private_file(path)
        except FileNotFoundError:
            # diskcache removes emptied directories: another process removed one between the two
            # steps. Try again, as diskcache's own writer does.
            if attempt == 9:
                raise
    raise AssertionError("unreachable")


def _private_subdir(path: str) -> None:
    try:
        os.mkdir(path, PRIVATE_DIR)
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafeEntry(f"cache value directory {path} is not a directory (a symlink?)") from None
        if untrusted(st) is None:
            return
        if st.st_uid != os.geteuid():
            raise UnsafeEntry(f"cache value directory {path} is {untrusted(st)}") from None
    os.chmod(path, PRIVATE_DIR)     # new: mkdir's mode is masked by the umask; ours and too open: repaired


class NewFile:
    """A value file being written (:meth:`~jitfreeze.cache.disk.DiskStore.new_file`): its name in
    the layout, its path, and the flock that marks it in use (:func:`in_use`) until :meth:`close`."""

    __slots__ = ("name", "path", "_fd")

    def __init__(self, name: str, path: str, fd: int):
        self.name, self.path, self._fd = name, path, fd

    @classmethod
    def create(cls, directory: str, filename: str) -> "NewFile":
        fd = create_value_file(directory, filename)
        path = os.path.join(directory, filename)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.remove(path)
            raise
        return cls(filename.replace(os.sep, "/"), path, fd)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def discard(self) -> None:
        """Close and remove it (nothing complete was written)."""
        self.close()
        with contextlib.suppress(OSError):
            os.remove(self.path)

    def __enter__(self) -> "NewFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


def in_use(path) -> bool:
    """Whether another open file description holds an flock on ``path`` (a value file being written)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)          # closing drops the probe's own lock


def value_files(directory):
    """Every file of the layout under ``directory`` (Paths), whether a row names it or not."""
    return Path(directory).glob(_VALUE_GLOB)


class BytesReader:
    """Random access to an inline value (listings read an entry's trailer and metadata only)."""

    def __init__(self, data: bytes):
        self.data, self.size = data, len(data)

    def read(self, offset: int, n: int) -> bytes:
        return self.data[offset:offset + n]


class FileReader:
    """Random access to ``size`` bytes of ``path`` starting at ``base``."""

    def __init__(self, path, base: int = 0, size: int | None = None):
        self.path, self.base = path, base
        self.size = os.stat(path).st_size - base if size is None else size

    def read(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self.size - offset))
        with open(self.path, "rb") as f:
            f.seek(self.base + offset)
            return f.read(n)


def head(directory: str, mode, filename, value):
    """A reader over a row's stored bytes (inline or value file in the layout), or None."""
    if mode == MODE_RAW and value is not None:
        return BytesReader(bytes(value))
    if mode == MODE_BINARY and filename:
        _require_value_file(filename)
        return FileReader(os.path.join(directory, filename))
    return None
