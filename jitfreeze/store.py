"""Storage: bytes in, bytes out, behind a small interface.

:class:`MemoryStore` (tests, ``cache_dir=False``-style use) and :class:`DiskStore`
(diskcache). Stores raise on trouble; deciding what trouble means (a miss plus
one warning) is the caller's job (:mod:`jitfreeze.cache`).
"""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterator, Protocol

import diskcache
from diskcache.core import MODE_BINARY, MODE_RAW, UNKNOWN

__all__ = ["Store", "MemoryStore", "DiskStore", "RawOnlyDisk", "UnsafeEntry"]


class UnsafeEntry(Exception):
    """A row that is not raw bytes (e.g. pickle mode): refused, never deserialized."""


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


class RawOnlyDisk(diskcache.Disk):
    """A diskcache Disk that stores and returns raw bytes only.

    diskcache unpickles any row whose mode column says pickle, whatever the
    application stored: a planted row would be code execution. This Disk never
    pickles or unpickles, keys included, and removes a partly written file when
    a write fails (a full disk).
    """

    def put(self, key):
        if type(key) is not str:
            raise TypeError(f"keys are str, not {type(key).__name__}")
        return key, True

    def get(self, key, raw):
        if not raw:
            raise UnsafeEntry("pickled key in the cache index")
        return bytes(key) if type(key) is sqlite3.Binary else key

    def store(self, value, read, key=UNKNOWN):
        if read or type(value) is not bytes:
            raise TypeError(f"jitfreeze stores raw bytes only, not {type(value).__name__}")
        if len(value) < self.min_file_size:
            return 0, MODE_RAW, None, sqlite3.Binary(value)
        filename, full_path = self.filename(key, value)
        try:
            self._write(full_path, io.BytesIO(value), "xb")
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(full_path)
            raise
        return len(value), MODE_BINARY, filename, None

    def fetch(self, mode, filename, value, read):
        if mode not in (MODE_RAW, MODE_BINARY) or read:
            raise UnsafeEntry(f"cache row in mode {mode} (only raw bytes are accepted)")
        data = super().fetch(mode, filename, value, read)
        if type(data) is not bytes:
            raise UnsafeEntry(f"cache row holds {type(data).__name__}, not bytes")
        return data


class DiskStore:
    """diskcache.Cache at ``directory`` with raw bytes only and LRU eviction."""

    DB_NAME = diskcache.core.DBNAME

    def __init__(self, directory: str | os.PathLike, size_limit: int, *, timeout: float = 30.0,
                 readonly: bool = False):
        self.directory = Path(directory)
        self.location = str(self.directory)
        self.size_limit = size_limit
        self.readonly = readonly
        settings = dict(size_limit=size_limit, eviction_policy="least-recently-used",
                        disk_min_file_size=32 * 1024)
        if readonly:
            settings["eviction_policy"] = "none"
        self._cache = _open_with_retry(self.directory, timeout, settings)

    def get(self, key):
        return self._cache.get(key, default=None, retry=True)

    def put(self, key, value):
        if self.readonly:
            raise PermissionError(f"{self.location} is a read-only layer")
        self._cache.set(key, value, retry=True)

    def delete(self, key):
        if self.readonly:
            raise PermissionError(f"{self.location} is a read-only layer")
        return self._cache.delete(key, retry=True)

    def clear(self):
        if self.readonly:
            raise PermissionError(f"{self.location} is a read-only layer")
        return self._cache.clear(retry=True)

    def keys(self):
        sql = self._cache._sql
        for key, raw in sql("SELECT key, raw FROM Cache ORDER BY rowid").fetchall():
            if raw and type(key) is str:
                yield key

    def info(self, key):
        rows = self._cache._sql(
            "SELECT store_time, access_time, access_count, size, mode FROM Cache WHERE key = ? AND raw = 1",
            (key,)).fetchall()
        if not rows:
            return None
        store_time, access_time, access_count, size, mode = rows[0]
        return {"store_time": store_time, "access_time": access_time, "access_count": access_count,
                "size": size, "mode": mode}

    def unsafe_rows(self) -> list[int]:
        """rowids of rows that are not raw bytes under a str key (planted or foreign)."""
        rows = self._cache._sql(
            "SELECT rowid FROM Cache WHERE raw != 1 OR mode NOT IN (?, ?)", (MODE_RAW, MODE_BINARY)).fetchall()
        return [r[0] for r in rows]

    def delete_rows(self, rowids: list[int]) -> None:
        with self._cache.transact(retry=True):
            for rowid in rowids:
                row = self._cache._sql("SELECT filename FROM Cache WHERE rowid = ?", (rowid,)).fetchall()
                self._cache._sql("DELETE FROM Cache WHERE rowid = ?", (rowid,))
                if row and row[0][0]:
                    self._cache.disk.remove(row[0][0])

    def stats(self):
        return {"entries": len(self._cache), "bytes": self._cache.volume(), "size_limit": self.size_limit}

    def check(self, fix: bool = False):
        return self._cache.check(fix=fix, retry=True)

    def sweep_orphans(self, min_age: float = 600.0) -> int:
        """Remove value files no row refers to (left by a process killed mid-write)."""
        known = {r[0] for r in self._cache._sql("SELECT filename FROM Cache WHERE filename IS NOT NULL")}
        now, removed = time.time(), 0
        for path in self.directory.glob("[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]/*.val"):
            rel = os.path.relpath(path, self.directory)
            try:
                if rel not in known and now - path.stat().st_mtime >= min_age:
                    path.unlink()
                    removed += 1
            except OSError:
                pass
        return removed

    def close(self):
        self._cache.close()


def _open_with_retry(directory: Path, timeout: float, settings: dict) -> diskcache.Cache:
    """Open (and maybe create) the cache; concurrent first opens can see "database is locked"."""
    deadline = time.monotonic() + max(timeout, 1.0)
    delay = 0.01
    while True:
        try:
            return diskcache.Cache(str(directory), timeout=timeout, disk=RawOnlyDisk, **settings)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.25)
