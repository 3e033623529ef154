"""A cache directory as a store: diskcache's index and value files, raw bytes only, bounded writes.

What :class:`DiskStore` adds to diskcache (each one a trap found in its source):

* raw bytes only (:class:`~jitfreeze.cache.rawdisk.RawOnlyDisk`, :func:`~jitfreeze.cache.files.fetch`):
  a row in pickle or text mode, a pickled key, or a value file outside the cache's own
  ``xx/yy/<hex>.val`` layout is refused, never deserialized, opened or deleted;
* reads take no write lock: the row is selected on a plain connection
  (:func:`~jitfreeze.cache.sqlindex.connect_reader`), the file read, and the access time touched
  afterwards, off the thread (:mod:`~jitfreeze.cache.lru`);
* bounded waits: diskcache's ``retry=True`` loops forever on *any* error at ``BEGIN`` (a
  read-only or full database included); here a busy database is retried a few times, then the
  error goes to the caller;
* a corrupt index (``database disk image is malformed``) found while running is set aside under
  the directory's lock and replaced by an empty one, and the error raised once (:class:`CorruptStore`).

Checking and repairing a directory (planted rows, missing files, orphans) is
:mod:`jitfreeze.cache.repair`'s.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import lru, sqlindex
from .files import Adopt, NewFile, fetch, head, is_value_file, value_file_path
from .sqlindex import DB_NAME, CorruptStore

if TYPE_CHECKING:
    import diskcache

__all__ = ["DiskStore", "open_disk_store"]


def _timeout_error():
    import diskcache
    return diskcache.Timeout


class DiskStore:
    """diskcache.Cache at ``directory`` with raw bytes only and LRU eviction.

    Implements :class:`~jitfreeze.cache.store.Store`, ``FileBacked``, ``InPlaceWritable`` and ``Listable``."""

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
        self._db_path = os.path.abspath(self.directory / DB_NAME)    # for touches (cwd may change)
        self._opened = None                      # diskcache.Cache: opened for writes and maintenance
        self._reader = None                      # plain SQLite connection: row reads
        if not readonly and os.path.exists(self.directory / DB_NAME):
            # A warm process only reads; diskcache opens when something is written.
            self._reader = sqlindex.connect_reader(self.directory / DB_NAME, timeout)
        if self._reader is None:
            self._opened = sqlindex.open_diskcache(self.directory, timeout, settings)
        self._ino = sqlindex.inode(self.directory / DB_NAME)

    @property
    def reading_plainly(self) -> bool:
        """Whether reads go through the plain SQLite reader connection (a warm process's path)."""
        return self._reader is not None

    @property
    def _cache(self) -> diskcache.Cache:
        cache = self._opened
        if cache is None:
            with self._open_lock:
                if self._opened is None:
                    self._opened = sqlindex.open_diskcache(self.directory, self.timeout, self._settings)
                cache = self._opened
        return cache

    @property
    def index(self) -> diskcache.Cache:
        """diskcache's Cache over the directory (opened on first use): its public API."""
        return self._cache

    def execute(self, statement: str, args=()):
        """Run one statement on diskcache's connection; a corrupt index is set aside (CorruptStore)."""
        cache = self._cache
        try:
            return sqlindex.query(cache)(statement, args)
        except sqlite3.DatabaseError as exc:
            self._raise_corrupt(exc, cache)
            raise

    # -- reading --------------------------------------------------------------------------------

    def _row(self, key):
        """(rowid, mode, filename, value) of the live row under ``key``, or None."""
        if type(key) is not str:
            raise TypeError(f"keys are str, not {type(key).__name__}")
        reader = self._reader
        handle = reader if reader is not None else self._cache
        try:
            if reader is not None:
                with self._read_lock:
                    return sqlindex.live_row(reader.execute, key)
            return sqlindex.live_row(sqlindex.query(handle), key)
        except sqlite3.DatabaseError as exc:
            self._raise_corrupt(exc, handle)
            raise

    def get(self, key):
        row = self._row(key)
        if row is None:
            return None
        rowid, mode, filename, value = row
        try:
            data = fetch(self.location, mode, filename, value, self.check_trust)
        except FileNotFoundError:
            return None          # evicted or replaced since the SELECT: a miss
        if not self.readonly:
            self._touch(rowid)
        return data

    def get_file(self, key):
        """Path of the value file of a file-backed entry (large values), or None: the caller
        verifies and loads a large artifact in place instead of reading it into memory."""
        row = self._row(key)
        if row is None:
            return None
        rowid, mode, filename, _ = row
        path = value_file_path(self.location, mode, filename, self.check_trust)
        if path is not None and not self.readonly:
            self._touch(rowid)
        return path

    def keys(self):
        yield from sqlindex.raw_keys(self.execute)

    def info(self, key):
        lru.drain(self.timeout)
        return sqlindex.info(self.execute, key)

    def rows(self):
        """(key, mode, size, inline length, store_time, access_time) of every raw row."""
        lru.drain(self.timeout)
        return sqlindex.listing(self.execute)

    def head(self, key):
        row = sqlindex.stored_row(self.execute, key)
        return None if row is None else head(self.location, *row)

    def stats(self):
        return {"entries": len(self._cache), "bytes": self._cache.volume(), "size_limit": self.size_limit}

    def close(self):
        lru.drain(self.timeout)
        for handle in (self._reader, self._opened):
            if handle is not None:
                handle.close()

    # -- writing --------------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.readonly:
            raise PermissionError(f"{self.location} is a read-only layer")

    def put(self, key, value):
        self._writable()
        self._write(lambda c: self._set(c, key, value))
        with contextlib.suppress(_timeout_error(), sqlite3.OperationalError):
            self._cull(self._cache, keep=key)   # best effort: the entry is stored either way

    def new_file(self) -> NewFile:
        """A fresh, empty value file in the cache's layout, for a large value to be written in
        place and then adopted with :meth:`put_file` (no copy). It is flock-ed until closed, so
        that the orphan sweep (:func:`jitfreeze.cache.repair.sweep_orphans`) leaves it alone while
        it is being written (a compile takes seconds); a file never adopted (a crash: the kernel
        drops the lock) is an orphan the sweep removes."""
        self._writable()
        filename, _path = self._cache.disk.filename()
        return NewFile.create(str(self._cache.directory), filename)

    def put_file(self, key, filename: str):
        """Store the value file ``filename`` (from :meth:`new_file`, complete) under ``key``.
        On failure the file is removed, like a failed :meth:`put`'s."""
        if not is_value_file(filename):
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
            sqlindex.rollback(cache)
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
        removed = sqlindex.cull(cache, keep, self.size_limit)
        for filename in removed:
            cache.disk.remove(filename)
        return len(removed)

    def delete(self, key):
        self._writable()
        return self._write(lambda c: c.delete(key, retry=False))

    def clear(self):
        self._writable()
        return self._write(lambda c: c.clear(retry=False))

    def _write(self, op: Callable):
        for attempt in range(self._BUSY_TRIES):
            cache = self._cache
            try:
                return op(cache)
            except _timeout_error():
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

    def set_aside_corrupt(self, detail: str) -> None:
        """The index was found corrupt (``detail``): set it aside and raise CorruptStore."""
        self._raise_corrupt(sqlite3.DatabaseError(f"database disk image is malformed ({detail})"), self._cache)

    def _raise_corrupt(self, exc: BaseException, handle) -> None:
        """Set a corrupt index aside (once, across processes) and raise CorruptStore; else return.

        ``handle`` is the connection (the reader or diskcache) the error came from."""
        if not sqlindex.is_corrupt(exc):
            return
        if self.readonly:
            raise CorruptStore(self.location, str(exc)) from exc
        with self._swap:
            if handle is not self._reader and handle is not self._opened:   # another thread swapped it
                raise CorruptStore(self.location, str(exc)) from exc
            aside = sqlindex.set_aside(self.directory, expect_ino=self._ino)
            for old in (self._reader, self._opened):
                if old is not None:
                    with contextlib.suppress(Exception):
                        old.close()
            self._reader = None
            self._opened = sqlindex.open_diskcache(self.directory, self.timeout, self._settings)
            self._ino = sqlindex.inode(self.directory / DB_NAME)
        raise CorruptStore(self.location, str(exc), aside) from exc


def open_disk_store(path, size_limit: int, *, check_trust: bool = True) -> tuple[DiskStore, CorruptStore | None]:
    """(store, CorruptStore or None): an index found corrupt when opened is set aside (with its
    -wal/-shm files: a stale WAL must not be replayed into the new one; under the directory's
    lock) and an empty one started; the CorruptStore (its cause: the SQLite error) says so."""
    try:
        return DiskStore(path, size_limit, check_trust=check_trust), None
    except sqlite3.DatabaseError as exc:
        if not sqlindex.is_corrupt(exc):
            raise
        problem = CorruptStore(str(path), str(exc), sqlindex.set_aside(path))
        problem.__cause__ = exc
        return DiskStore(path, size_limit, check_trust=check_trust), problem
