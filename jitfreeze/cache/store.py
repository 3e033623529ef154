"""Storage: bytes in, bytes out, behind a small interface.

:class:`MemoryStore` (tests, ``cache_dir=False``-style use) and :class:`DiskStore`
(diskcache). Stores raise on trouble; deciding what trouble means (a miss plus
one warning) is the caller's job (:mod:`jitfreeze.cache.persistent`).

What :class:`DiskStore` adds to diskcache (each one a trap found in its source):

* raw bytes only (:class:`~jitfreeze.cache.files.RawOnlyDisk`): a row in pickle or text mode, a pickled
  key, or a value file outside the cache's own ``xx/yy/<hex>.val`` layout is
  refused, never deserialized, opened or deleted;
* reads take no write lock: diskcache's LRU ``get`` reads the value file inside a
  ``BEGIN IMMEDIATE`` transaction (every reader serialized, and no read at all on
  a full disk); here the row is selected, the file read, and the access time
  touched afterwards, best effort;
* bounded waits: diskcache's ``retry=True`` loops forever on *any* error at
  ``BEGIN`` (a read-only or full database included); here a busy database is
  retried a few times, then the error goes to the caller;
* a corrupt index (``database disk image is malformed``) found while running is
  set aside under the directory's lock and replaced by an empty one, and the
  error raised once (:class:`CorruptStore`);
* :meth:`DiskStore.check` and :meth:`DiskStore.maintain` know what else lives
  in the directory on purpose (``locks/``, set-aside indexes) and never delete a
  lock file (diskcache's ``check(fix=True)`` would).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sqlite3
import stat
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

if TYPE_CHECKING:
    import diskcache

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

from . import lru
from .trust import PRIVATE_DIR, UnsafeDirectory, check_path, create_private_file, untrusted

__all__ = ["Store", "MemoryStore", "DiskStore", "UnsafeEntry", "CorruptStore",
           "set_aside_index"]

# diskcache's own value files: two levels of two hex digits, then a random hex name.
_VALUE_FILE = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{8,64}\.val$")
_SIDE_FILES = ("-wal", "-shm", "-journal")
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
# diskcache's row modes and index name (checked against diskcache.core by the tests). diskcache
# itself is imported when something is written or maintained: a warm process only reads rows
# through a plain SQLite connection and never needs it (5-8 ms of a warm start's imports).
MODE_RAW, MODE_BINARY = 1, 2
DB_NAME = "cache.db"


def _diskcache():
    import diskcache
    return diskcache


class UnsafeEntry(Exception):
    """A row that is not raw bytes (e.g. pickle mode): refused, never deserialized."""


class CorruptStore(Exception):
    """The store's index is corrupt; it was set aside and an empty one started."""

    def __init__(self, location: str, detail: str, aside: str | None = None):
        super().__init__(f"the cache index in {location} is corrupt ({detail})"
                         + (f"; set it aside as {aside} and started an empty one" if aside else ""))
        self.location, self.detail, self.aside = location, detail, aside

    def __reduce__(self):
        return (CorruptStore, (self.location, self.detail, self.aside))


def is_corrupt(exc: BaseException) -> bool:
    """A SQLite error that means the database file itself is damaged (not busy, full or read-only)."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc)
    return "malformed" in text or "not a database" in text


class Store(Protocol):
    location: str

    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, value: bytes) -> None: ...
    def delete(self, key: str) -> bool: ...
    def clear(self) -> int: ...
    def keys(self) -> Iterator[str]: ...
    def stats(self) -> dict: ...
    def close(self) -> None: ...


class MemoryStore:
    """A dict behind the Store interface (thread-safe)."""

    def __init__(self, name: str = "memory"):
        self.location = f"<{name}>"
        self._data: dict[str, bytes] = {}
        self._meta: dict[str, dict] = {}
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._meta[key]["access_time"] = time.time()
                self._meta[key]["access_count"] += 1
            return value

    def put(self, key, value):
        if type(value) is not bytes:
            raise TypeError(f"stores take bytes, not {type(value).__name__}")
        with self._lock:
            self._data[key] = value
            now = time.time()
            self._meta[key] = {"store_time": now, "access_time": now, "access_count": 0, "size": len(value)}

    def delete(self, key):
        with self._lock:
            self._meta.pop(key, None)
            return self._data.pop(key, None) is not None

    def clear(self):
        with self._lock:
            n = len(self._data)
            self._data.clear()
            self._meta.clear()
            return n

    def keys(self):
        with self._lock:
            return iter(list(self._data))

    def info(self, key):
        with self._lock:
            return dict(self._meta[key]) if key in self._meta else None

    def stats(self):
        with self._lock:
            return {"entries": len(self._data), "bytes": sum(map(len, self._data.values())), "size_limit": None}

    def close(self):
        pass


def _chunks(value: bytes, size: int = 4 * 2**20):
    view = memoryview(value)
    return (view[i:i + size] for i in range(0, len(view), size))


class NewFile:
    """A value file being written (:meth:`DiskStore.new_file`): its name in the layout, its path,
    and the lock that marks it in use until :meth:`close`."""

    __slots__ = ("name", "path", "_fd")

    def __init__(self, name: str, path: str, fd: int):
        self.name, self.path, self._fd = name, path, fd

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


def _in_use(path) -> bool:
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


class Adopt:
    """A complete value already written to a value file in the cache's layout."""

    __slots__ = ("filename", "size")

    def __init__(self, filename: str, size: int):
        self.filename = filename
        self.size = size


def _fetch(directory: str, mode, filename, value, check: bool = True) -> bytes:
    """The bytes of a row (inline value or value file), raw bytes only: never unpickled, never a
    file outside the cache's layout or through a symlink."""
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
    if type(filename) is not str or not _VALUE_FILE.match(filename):
        raise UnsafeEntry(f"cache row names the value file {filename!r}, outside the cache's layout")
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


class DiskStore:
    """diskcache.Cache at ``directory`` with raw bytes only and LRU eviction."""

    DB_NAME = DB_NAME
    _BUSY_TRIES = 3             # BEGIN attempts (each waits up to `timeout` in SQLite's busy handler)

    def __init__(self, directory: str | os.PathLike, size_limit: int, *, timeout: float = 30.0,
                 readonly: bool = False, check_trust: bool = True):
        self.directory = Path(directory)
        self.check_trust = check_trust           # value files refused unless only you (or root) can write them
        self.location = str(self.directory)
        self.size_limit = size_limit
        self.readonly = readonly
        self.timeout = timeout
        # cull_limit=0: diskcache's own culling removes 10 rows per write once over the limit,
        # the row just written included (a small cache then empties itself); see _cull.
        settings = dict(size_limit=size_limit, eviction_policy="least-recently-used",
                        disk_min_file_size=32 * 1024, cull_limit=0)
        if readonly:
            settings["eviction_policy"] = "none"
        self._settings = settings
        self._swap = threading.Lock()            # setting a corrupt index aside
        self._open_lock = threading.Lock()       # opening diskcache on first need
        self._read_lock = threading.Lock()       # the reader connection, shared by threads
        self._db_path = os.path.abspath(self.directory / self.DB_NAME)    # for touches (cwd may change)
        self._opened = None                      # diskcache.Cache: opened for writes and maintenance
        self._reader = None                      # plain SQLite connection: row reads
        if not readonly and os.path.exists(self.directory / self.DB_NAME):
            # A warm process only reads: a plain connection costs well under a millisecond where
            # diskcache's open (a dozen PRAGMAs, its settings rewritten in a write transaction)
            # costs ~10. diskcache opens when something is written.
            self._reader = _connect_reader(self.directory / self.DB_NAME, timeout)
        if self._reader is None:
            self._opened = _open_with_retry(self.directory, timeout, settings)
        self._ino = _inode(self.directory / self.DB_NAME)

    @property
    def _cache(self) -> diskcache.Cache:
        cache = self._opened
        if cache is None:
            with self._open_lock:
                if self._opened is None:
                    self._opened = _open_with_retry(self.directory, self.timeout, self._settings)
                cache = self._opened
        return cache

    # -- the Store interface --------------------------------------------------------------------

    _ROW_SQL = ("SELECT rowid, mode, filename, value FROM Cache WHERE key = ? AND raw = 1"
                " AND (expire_time IS NULL OR expire_time > ?)")

    def _row(self, key):
        """(rowid, mode, filename, value) of the live row under ``key``, or None."""
        if type(key) is not str:
            raise TypeError(f"keys are str, not {type(key).__name__}")
        reader = self._reader
        handle = reader if reader is not None else self._cache
        try:
            if reader is not None:
                with self._read_lock:
                    rows = reader.execute(self._ROW_SQL, (key, time.time())).fetchall()
            else:
                rows = handle._sql(self._ROW_SQL, (key, time.time())).fetchall()
        except sqlite3.DatabaseError as exc:
            self._raise_corrupt(exc, handle)
            raise
        return rows[0] if rows else None

    def get(self, key):
        row = self._row(key)
        if row is None:
            return None
        rowid, mode, filename, value = row
        try:
            data = _fetch(self.location, mode, filename, value, self.check_trust)
        except FileNotFoundError:
            return None          # evicted or replaced since the SELECT: a miss
        if not self.readonly:
            self._touch(rowid)
        return data

    def get_file(self, key):
        """Path of the value file of a file-backed entry (large values), or None.

        Lets the caller verify and load a large artifact in place instead of reading it into
        memory. diskcache never rewrites a value file in place (a new value gets a new file), so
        the path stays valid until the entry is evicted or replaced.
        """
        row = self._row(key)
        if row is None:
            return None
        rowid, mode, filename, _ = row
        if mode != MODE_BINARY or not filename:
            return None
        if type(filename) is not str or not _VALUE_FILE.match(filename):
            raise UnsafeEntry(f"cache row names the value file {filename!r}, outside the cache's layout")
        path = os.path.join(self.location, filename)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None          # evicted or replaced since the SELECT: a miss
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeEntry(f"cache value file {filename} is not a regular file (a symlink?)")
        if self.check_trust:
            check_value_file(self.location, filename, st)
        if not self.readonly:
            self._touch(rowid)
        return path

    def put(self, key, value):
        if self.readonly:
            raise PermissionError(f"{self.location} is a read-only layer")
        self._write(lambda c: self._set(c, key, value))
        with contextlib.suppress(_diskcache().Timeout, sqlite3.OperationalError):
            self._cull(self._cache, keep=key)   # best effort: the entry is stored either way

    def new_file(self) -> "NewFile":
        """A fresh, empty value file in the cache's layout, for a large value to be written in
        place and then adopted with :meth:`put_file` (no copy). It is flock-ed until closed, so
        that :meth:`sweep_orphans` leaves it alone while it is being written (a compile takes
        seconds); a file that is never adopted (a crash: the kernel drops the lock) is an orphan
        that :meth:`sweep_orphans` removes."""
        if self.readonly:
            raise PermissionError(f"{self.location} is a read-only layer")
        filename, path = self._cache.disk.filename()
        fd = create_value_file(str(self._cache.directory), filename)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.remove(path)
            raise
        return NewFile(filename.replace(os.sep, "/"), path, fd)

    def put_file(self, key, filename: str):
        """Store the value file ``filename`` (from :meth:`new_file`, complete) under ``key``.
        On failure the file is removed, like a failed :meth:`put`'s."""
        if type(filename) is not str or not _VALUE_FILE.match(filename):
            raise ValueError(f"{filename!r} is not a value file of this cache")
        path = os.path.join(self._cache.directory, filename)
        try:
            size = os.lstat(path).st_size
            if size < self._cache.disk.min_file_size:     # small: inline in the row, like put's
                with open(path, "rb") as f:
                    value = f.read()
                os.remove(path)
                self.put(key, value)
            else:
                self.put(key, Adopt(filename, size))
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(path)
            raise

    def _set(self, cache, key, value):
        """diskcache's set, but a failed write never leaves its value file behind.

        diskcache removes the file only when BEGIN fails; an INSERT or COMMIT that fails (a
        full disk) rolls back and leaves an orphan, and a failed COMMIT may leave the
        connection inside the transaction.
        """
        disk = cache.disk
        disk.written = None
        try:
            return cache.set(key, value, retry=False)
        except BaseException:
            with contextlib.suppress(Exception):
                con = cache._con
                if con.in_transaction:
                    con.execute("ROLLBACK")
                    cache._txn_id = None
            written = disk.written
            if written is not None:
                disk.remove(written)
            raise
        finally:
            disk.written = None

    def _cull(self, cache, keep: str) -> int:
        """Evict least recently used rows until the volume is under the limit (never ``keep``)."""
        if cache.volume() <= self.size_limit:
            return 0
        lru.drain(self.timeout)         # this process's reads count as recent
        removed = []
        with cache.transact(retry=False):
            sql = cache._sql
            excess = cache.volume() - self.size_limit
            rows = sql("SELECT rowid, filename, size + COALESCE(length(value), 0) FROM Cache"
                       " WHERE NOT (key = ? AND raw = 1) ORDER BY access_time LIMIT 1000", (keep,)).fetchall()
            for rowid, filename, size in rows:
                if excess <= 0:
                    break
                sql("DELETE FROM Cache WHERE rowid = ?", (rowid,))
                removed.append(filename)
                excess -= max(int(size or 0), 1)
        for filename in removed:
            if filename:
                cache.disk.remove(filename)
        return len(removed)

    def delete(self, key):
        if self.readonly:
            raise PermissionError(f"{self.location} is a read-only layer")
        return self._write(lambda c: c.delete(key, retry=False))

    def clear(self):
        if self.readonly:
            raise PermissionError(f"{self.location} is a read-only layer")
        return self._write(lambda c: c.clear(retry=False))

    def keys(self):
        sql = self._cache._sql
        for key, raw in sql("SELECT key, raw FROM Cache ORDER BY rowid").fetchall():
            if raw and type(key) is str:
                yield key

    def info(self, key):
        lru.drain(self.timeout)
        rows = self._cache._sql(
            "SELECT store_time, access_time, access_count, size, mode FROM Cache WHERE key = ? AND raw = 1",
            (key,)).fetchall()
        if not rows:
            return None
        store_time, access_time, access_count, size, mode = rows[0]
        return {"store_time": store_time, "access_time": access_time, "access_count": access_count,
                "size": size, "mode": mode}

    def stats(self):
        return {"entries": len(self._cache), "bytes": self._cache.volume(), "size_limit": self.size_limit}

    def close(self):
        lru.drain(self.timeout)
        for handle in (self._reader, self._opened):
            if handle is not None:
                handle.close()

    # -- bounded, corruption-aware writes -------------------------------------------------------

    def _write(self, op: Callable):
        for attempt in range(self._BUSY_TRIES):
            cache = self._cache
            try:
                return op(cache)
            except _diskcache().Timeout:
                # BEGIN IMMEDIATE failed (busy past SQLite's own wait, or not writable at all).
                if attempt + 1 == self._BUSY_TRIES:
                    raise sqlite3.OperationalError(
                        f"the cache index in {self.location} stayed locked or unwritable "
                        f"({self._BUSY_TRIES} tries of {self.timeout:g}s)") from None
                time.sleep(0.05 * (attempt + 1))
            except sqlite3.DatabaseError as exc:
                self._raise_corrupt(exc, cache)
                raise

    def _touch(self, rowid) -> None:
        """LRU bookkeeping after a read: queued, written off this thread (:mod:`jitfreeze.cache.lru`)."""
        lru.add(self._db_path, rowid, time.time())

    def _raise_corrupt(self, exc: BaseException, handle) -> None:
        """Set a corrupt index aside (once, across processes) and raise CorruptStore; else return.

        ``handle`` is the connection (the reader or diskcache) the error came from."""
        if not is_corrupt(exc):
            return
        if self.readonly:
            raise CorruptStore(self.location, str(exc)) from exc
        with self._swap:
            if handle is not self._reader and handle is not self._opened:   # another thread swapped it
                raise CorruptStore(self.location, str(exc)) from exc
            aside = set_aside_index(self.directory, expect_ino=self._ino)
            for old in (self._reader, self._opened):
                if old is not None:
                    with contextlib.suppress(Exception):
                        old.close()
            self._reader = None
            self._opened = _open_with_retry(self.directory, self.timeout, self._settings)
            self._ino = _inode(self.directory / self.DB_NAME)
        raise CorruptStore(self.location, str(exc), aside) from exc

    # -- maintenance ----------------------------------------------------------------------------

    def unsafe_rows(self) -> list[int]:
        """rowids of rows that are not raw bytes under a str key, or name a file outside the layout."""
        rows = self._cache._sql("SELECT rowid, raw, key, mode, filename FROM Cache").fetchall()
        bad = []
        for rowid, raw, key, mode, filename in rows:
            if raw != 1 or type(key) is not str or mode not in (MODE_RAW, MODE_BINARY):
                bad.append(rowid)
            elif mode == MODE_BINARY and (type(filename) is not str or not _VALUE_FILE.match(filename)):
                bad.append(rowid)
            elif mode == MODE_RAW and filename is not None:
                bad.append(rowid)
        return bad

    def delete_rows(self, rowids: list[int]) -> None:
        """Delete rows by rowid (and their value files, when in the cache's own layout)."""
        with self._cache.transact(retry=False):
            for rowid in rowids:
                row = self._cache._sql("SELECT filename FROM Cache WHERE rowid = ?", (rowid,)).fetchall()
                self._cache._sql("DELETE FROM Cache WHERE rowid = ?", (rowid,))
                if row and row[0][0]:
                    self._cache.disk.remove(row[0][0])

    def _value_files(self) -> Iterator[Path]:
        return self.directory.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*.val")

    def sweep_orphans(self, min_age: float = 600.0) -> int:
        """Remove value files no row refers to (left by a process killed mid-write).

        Only files older than ``min_age`` seconds: a file younger than that may belong to a
        write whose row is about to be committed.
        """
        known = {r[0] for r in self._cache._sql("SELECT filename FROM Cache WHERE filename IS NOT NULL")}
        now, removed = time.time(), 0
        for path in self._value_files():
            rel = os.path.relpath(path, self.directory).replace(os.sep, "/")
            try:
                if rel not in known and now - path.lstat().st_mtime >= min_age and not _in_use(path):
                    path.unlink()
                    removed += 1
                    with contextlib.suppress(OSError):
                        os.removedirs(path.parent)      # stops at the first non-empty directory
            except OSError:
                pass
        return removed

    def _value_rows(self):
        """(rowid, size, filename) of the rows kept in value files of the cache's own layout
        (``unsafe_rows`` handles the others)."""
        for rowid, size, filename in self._cache._sql(
                "SELECT rowid, size, filename FROM Cache WHERE filename IS NOT NULL").fetchall():
            if type(filename) is str and _VALUE_FILE.match(filename):
                yield rowid, size, filename

    def missing_files(self) -> list[int]:
        """rowids whose value file is gone (or not a regular file): unreadable entries."""
        out = []
        for rowid, _, filename in self._value_rows():
            try:
                ok = os.path.isfile(self.directory / filename) and not os.path.islink(self.directory / filename)
            except OSError:
                ok = False
            if not ok:
                out.append(rowid)
        return out

    def wrong_sizes(self) -> list[int]:
        """rowids whose value file's size differs from the row's (truncated or grown files)."""
        out = []
        for rowid, size, filename in self._value_rows():
            with contextlib.suppress(OSError):
                if os.lstat(self.directory / filename).st_size != size:
                    out.append(rowid)
        return out

    def untrusted_files(self) -> list[int]:
        """rowids whose value file, or a directory holding it, fails the trust rule (another owner,
        writable by group or others): refused by every read (none when ``check_trust`` is off)."""
        if not self.check_trust:
            return []
        out = []
        for rowid, _, filename in self._value_rows():
            try:
                check_value_file(self.location, filename, os.lstat(self.directory / filename))
            except UnsafeEntry:
                out.append(rowid)
            except OSError:
                pass            # missing_files handles these
        return out

    def check(self, fix: bool = False) -> list[str]:
        """diskcache's consistency check, as a list of messages (empty: consistent).

        What jitfreeze keeps in the directory on purpose (``locks/``, set-aside indexes) is
        not reported. ``fix=True`` never runs diskcache's own fixes (they delete lock files):
        use :meth:`maintain`.
        """
        if fix:
            self.maintain(min_age=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = self._cache.check(fix=False, retry=False)
        out = []
        for w in found:
            text = str(w.message)
            path = text.split(": ", 1)[1] if ": " in text else ""
            rel = os.path.relpath(path, self.directory) if path.startswith(str(self.directory)) else ""
            if rel and (rel == "locks" or rel.startswith("locks" + os.sep) or
                        os.path.basename(rel).startswith(self.DB_NAME)):
                continue
            out.append(text)
        return out

    def maintain(self, *, min_age: float = 600.0, validate: Callable[[str, bytes], object] | None = None) -> dict:
        """Repair what crashes and tampering leave behind; returns counts of what was done.

        Removes rows that are not raw bytes (planted pickle rows, pickled keys, rows naming files
        outside the layout) or whose value file others could have written (both ``unsafe_rows``),
        rows whose value file is missing or has the wrong size, value files no row refers to
        (older than ``min_age``), and (with ``validate``, which raises for a bad
        entry) entries that fail it; then resets diskcache's count and size bookkeeping.
        """
        counts = {"unsafe_rows": 0, "missing_files": 0, "wrong_size": 0, "bad_entries": 0,
                  "orphan_files": 0}
        cache = self._cache
        try:
            result = [r[0] for r in cache._sql("PRAGMA quick_check").fetchall()]
        except sqlite3.DatabaseError as exc:
            self._raise_corrupt(exc, cache)
            raise
        if result != ["ok"]:
            self._raise_corrupt(sqlite3.DatabaseError(
                "database disk image is malformed (quick_check: " + "; ".join(map(str, result[:3])) + ")"), cache)
        unsafe = sorted(set(self.unsafe_rows()) | set(self.untrusted_files()))
        if unsafe:
            self.delete_rows(unsafe)
        counts["unsafe_rows"] = len(unsafe)
        missing = self.missing_files()
        if missing:
            self.delete_rows(missing)
        counts["missing_files"] = len(missing)
        wrong = self.wrong_sizes()
        if wrong:
            self.delete_rows(wrong)
        counts["wrong_size"] = len(wrong)
        if validate is not None:
            for key in list(self.keys()):
                try:
                    data = self.get(key)
                    if data is not None:
                        validate(key, data)
                except UnsafeEntry:
                    pass        # unsafe_rows already removed what it could see
                except Exception:  # noqa: BLE001 - any failure of the validator: a bad entry
                    if self.delete(key):
                        counts["bad_entries"] += 1
        counts["orphan_files"] = self.sweep_orphans(min_age)
        with self._cache.transact(retry=False):
            sql = self._cache._sql
            ((n,),) = sql("SELECT COUNT(key) FROM Cache").fetchall()
            ((size,),) = sql("SELECT COALESCE(SUM(size), 0) FROM Cache").fetchall()
            sql("UPDATE Settings SET value = ? WHERE key = 'count'", (n,))
            sql("UPDATE Settings SET value = ? WHERE key = 'size'", (size,))
        self._cache.reset("count")
        self._cache.reset("size")
        stats = self.stats()
        counts["entries"], counts["bytes"] = stats["entries"], stats["bytes"]
        return counts


def _inode(path: Path):
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return None


def set_aside_index(directory: str | os.PathLike, expect_ino=None) -> str | None:
    """Rename ``cache.db`` (and its -wal/-shm/-journal files) to ``cache.db.corrupt-<time>-<pid>``.

    Under the directory's ``locks/index.lock``. With ``expect_ino`` (the (dev, inode) this
    process opened), nothing is renamed when ``cache.db`` is already another file: another
    process set the corrupt one aside first. Returns the new name, or None.
    """
    from .lock import KeyLock

    directory = Path(directory)
    db = directory / DiskStore.DB_NAME
    suffix = f".corrupt-{int(time.time())}-{os.getpid()}"
    try:
        lock = KeyLock(directory, "index", 30.0)
        lock.__enter__()
    except Exception:  # noqa: BLE001 - no lock directory (read-only?): rename anyway
        lock = None
    try:
        if expect_ino is not None and _inode(db) != expect_ino:
            return None
        aside = None
        for side in ("",) + _SIDE_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{db}{side}", f"{db}{suffix}{side}")
                if not side:
                    aside = f"{db}{suffix}"
        return aside
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def _connect_reader(db: Path, timeout: float):
    """A plain SQLite connection to an existing index, or None when it is not ready (no table yet,
    locked: diskcache's open, with its retries, takes over). A file that is not a database raises."""
    con = sqlite3.connect(str(db), timeout=timeout, isolation_level=None, check_same_thread=False)
    try:
        con.execute("SELECT rowid FROM Cache LIMIT 0").fetchall()
    except sqlite3.OperationalError:
        con.close()
        return None
    except BaseException:
        con.close()
        raise
    return con


def _open_with_retry(directory: Path, timeout: float, settings: dict) -> diskcache.Cache:
    """Open (and maybe create) the cache; concurrent first opens can see "database is locked"."""
    diskcache = _diskcache()
    from .files import RawOnlyDisk

    # SQLite would create the index 0644 & ~umask; its -wal, -shm and -journal files take the
    # index's mode. Created here first, 0600 (an empty file is an empty database). Any other
    # failure (a read-only directory...) is diskcache's to report.
    with contextlib.suppress(OSError):
        os.close(create_private_file(Path(directory) / DB_NAME))
    deadline = time.monotonic() + max(timeout, 1.0)
    delay = 0.01
    while True:
        try:
            return diskcache.Cache(str(directory), timeout=timeout, disk=RawOnlyDisk, **settings)
        except (sqlite3.OperationalError, diskcache.Timeout) as exc:
            text = str(exc)
            if (isinstance(exc, sqlite3.OperationalError) and "locked" not in text and "busy" not in text) \
                    or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
