"""Storage: bytes in, bytes out, behind a small interface.

What a store can do is said by the protocols it implements, checked with ``isinstance``:

* :class:`Store`: get/put/delete/clear/keys/stats/close of raw bytes, its ``location`` and
  whether it is ``readonly`` (every store);
* :class:`FileBacked`: the path of a large entry's value file, verified and loaded in place;
* :class:`InPlaceWritable`: a new value file to write a large entry into, then adopt (no copy);
* :class:`Listable`: every entry's row and random access to its bytes (listings read metadata
  without reading payloads).

Implementations: :class:`MemoryStore` (here), :class:`~jitfreeze.cache.disk.DiskStore` (a cache
directory), :class:`~jitfreeze.cache.layers.ReadOnlyDirStore` and
:class:`~jitfreeze.cache.layers.BundleStore` (read-only layers). Stores raise on trouble; deciding
what trouble means (a miss plus one warning) is :mod:`jitfreeze.cache.persistent`'s job.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator, Protocol, runtime_checkable

__all__ = ["Store", "FileBacked", "InPlaceWritable", "Listable", "MemoryStore"]


@runtime_checkable
class Store(Protocol):
    location: str
    readonly: bool

    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, value: bytes) -> None: ...
    def delete(self, key: str) -> bool: ...
    def clear(self) -> int: ...
    def keys(self) -> Iterator[str]: ...
    def stats(self) -> dict: ...
    def close(self) -> None: ...


@runtime_checkable
class FileBacked(Protocol):
    def get_file(self, key: str) -> str | None:
        """The path of the value file of a file-backed entry (checked like a read), or None."""


@runtime_checkable
class InPlaceWritable(Protocol):
    def new_file(self):
        """A fresh value file (``.name``, ``.path``, ``.close()``) for a large value."""

    def put_file(self, key: str, filename: str) -> None:
        """Store the complete value file ``filename`` (from :meth:`new_file`) under ``key``."""


@runtime_checkable
class Listable(Protocol):
    def rows(self) -> list:
        """(key, mode, size, inline length, store_time, access_time) of every entry."""

    def head(self, key: str):
        """A reader (``.size``, ``.read(offset, n)``) over the entry's bytes, or None."""


class MemoryStore:
    """A dict behind the Store interface (thread-safe)."""

    readonly = False

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

    def rows(self):
        with self._lock:
            return [(k, None, m["size"], None, m["store_time"], m["access_time"]) for k, m in self._meta.items()]

    def head(self, key):
        from .files import BytesReader

        with self._lock:
            data = self._data.get(key)
        return None if data is None else BytesReader(data)

    def stats(self):
        with self._lock:
            return {"entries": len(self._data), "bytes": sum(map(len, self._data.values())), "size_limit": None}

    def close(self):
        pass
