"""Read-only cache layers (``JITFREEZE_CACHE_PATH=ro1:ro2:writable``) and entry listings.

A read-only layer is a jitfreeze cache directory (an imported bundle, a
directory baked into an image, a shared mount) or a bundle file
(``jitfreeze export``). Layers are read without ever writing to them: a
directory's SQLite index is opened with a ``file:...?mode=ro&immutable=1`` URI
(no lock, no journal, no shared-memory file, no LRU bookkeeping), so a layer
is read as a snapshot; a bundle file is read through ``os.pread``. Nothing here
deletes, evicts or clears.

Trust: ``torch.jit.load`` runs an entry's code, so a layer, its index and its value
files must not be writable by anyone but you or root (the one rule of
:mod:`jitfreeze.cache.trust`: owner you or root, not group- or world-writable), unless
``JITFREEZE_CACHE_KEY`` is set (every entry is then authenticated) or
``JITFREEZE_ALLOW_UNSAFE_CACHE_DIR=1``.

Also here: :func:`scan`, the metadata of every entry of any store without
reading payloads (for ``jitfreeze cache list``, ``explain`` and ``export``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import struct
import tarfile
import threading
from pathlib import Path
from typing import Iterator

from . import lru
from .store import DB_NAME, MODE_BINARY, MODE_RAW, UnsafeEntry
from .trust import UnsafeDirectory, check_path

log = logging.getLogger("jitfreeze")

__all__ = ["ReadOnlyDirStore", "BundleStore", "open_layer", "check_layer", "scan", "Row", "read_meta",
           "BUNDLE_MANIFEST", "read_manifest"]

BUNDLE_MANIFEST = "manifest.json"
BUNDLE_FORMAT = "jitfreeze-bundle"
_MANIFEST_LIMIT = 256 * 2**20

# Envelope layouts (see jitfreeze.cache.envelope), read here for listings without reading payloads:
#   v1: MAGIC1 (8) | flags (1) | meta_len (4) | payload_len (8) | meta | payload | sums
#   v2: payload | meta | meta_len (4) | payload_len (8) | flags (1) | algorithm (1) | digest (32)
#       | hmac (32) | MAGIC2 (8)
_HEAD1 = struct.Struct(">8sBIQ")
_MAGIC1 = b"JITFRZ\x00\x01"
_LENS2 = struct.Struct(">IQ")
_TRAILER2 = 4 + 8 + 1 + 1 + 32 + 32 + 8
_META_LIMIT = 64 * 2**20


class UnsafeLayer(Exception):
    """A read-only layer that others could have written (refused)."""


def check_layer(path: Path) -> None:
    """Raise UnsafeLayer unless ``path`` (and its SQLite index) passes the trust rule
    (:func:`jitfreeze.cache.trust.untrusted`: owned by you or root, writable by no one else)."""
    try:
        check_path(path, "read-only cache layer")
        if path.is_dir():
            for name in (DB_NAME, DB_NAME + "-wal"):
                if os.path.lexists(path / name):
                    check_path(path / name, "cache file")
    except UnsafeDirectory as exc:
        raise UnsafeLayer(str(exc)) from None


def open_layer(path, *, trusted: bool):
    """A read-only store for ``path``: a cache directory or a bundle file."""
    path = Path(path).expanduser()
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if not trusted:
        check_layer(path)
    if path.is_dir():
        return ReadOnlyDirStore(path, check_trust=not trusted)
    return BundleStore(path)


# -- a cache directory, read through SQLite in read-only mode ----------------------------------------


class ReadOnlyDirStore:
    """A diskcache directory written by jitfreeze, read without any write (index or files)."""

    readonly = True

    def __init__(self, directory, check_trust: bool = False):
        self.check_trust = check_trust      # value files and their directories: the trust rule too
        self.directory = Path(directory).resolve()
        self.location = str(self.directory)
        db = self.directory / DB_NAME
        if not db.is_file():
            raise FileNotFoundError(f"{db} does not exist (not a jitfreeze cache directory)")
        self._lock = threading.Lock()
        self._con = _connect_readonly(db)

    def _rows(self, sql: str, args=()):
        with self._lock:
            return self._con.execute(sql, args).fetchall()

    def _row(self, key: str):
        rows = self._rows("SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1", (key,))
        return rows[0] if rows else None

    def _file(self, filename: str) -> Path:
        full = (self.directory / filename).resolve()
        if self.directory not in full.parents:
            raise UnsafeEntry(f"cache row points outside the layer: {filename!r}")
        if self.check_trust:
            try:
                for part in reversed(full.parents[:full.parents.index(self.directory)]):
                    check_path(part, "cache value directory")
                check_path(full, "cache value file")
            except FileNotFoundError:
                pass        # a missing file: the caller's miss
            except UnsafeDirectory as exc:
                raise UnsafeEntry(str(exc)) from None
        return full

    def get(self, key):
        row = self._row(key)
        if row is None:
            return None
        mode, filename, value = row
        if mode == MODE_RAW and value is not None:
            return bytes(value)
        if mode == MODE_BINARY and filename:
            try:
                return self._file(filename).read_bytes()
            except FileNotFoundError:
                return None
        raise UnsafeEntry(f"cache row in mode {mode} (only raw bytes are accepted)")

    def get_file(self, key):
        """Path of a file-backed entry's value file (loaded in place, never written), or None."""
        row = self._row(key)
        if row is None:
            return None
        mode, filename, _value = row
        if mode != MODE_BINARY or not filename:
            return None
        path = self._file(filename)
        return str(path) if path.is_file() else None

    def head(self, key):
        row = self._row(key)
        if row is None:
            return None
        mode, filename, value = row
        if mode == MODE_RAW and value is not None:
            return _BytesReader(bytes(value))
        if mode == MODE_BINARY and filename:
            return _FileReader(self._file(filename))
        return None

    def put(self, key, value):
        raise PermissionError(f"{self.location} is a read-only layer")

    def delete(self, key):
        raise PermissionError(f"{self.location} is a read-only layer")

    def clear(self):
        raise PermissionError(f"{self.location} is a read-only layer")

    def keys(self):
        return iter([k for (k,) in self._rows("SELECT key FROM Cache WHERE raw = 1 ORDER BY rowid")
                     if type(k) is str])

    def rows(self):
        """(key, size, store_time, access_time) of every raw row."""
        return self._rows("SELECT key, mode, size, length(value), store_time, access_time FROM Cache "
                          "WHERE raw = 1 ORDER BY rowid")

    def stats(self):
        ((n, size),) = self._rows("SELECT COUNT(*), COALESCE(SUM(size), 0) + COALESCE(SUM(length(value)), 0) "
                                  "FROM Cache WHERE raw = 1")
        return {"entries": n, "bytes": int(size), "size_limit": None}

    def close(self):
        with self._lock:
            self._con.close()


def _connect_readonly(db: Path) -> sqlite3.Connection:
    """Open ``db`` as an immutable snapshot: no lock, no journal, no shared-memory file, no write."""
    wal = db.with_name(db.name + "-wal")
    try:
        if wal.stat().st_size > 0:
            log.info("jitfreeze: the read-only layer %s has writes not checkpointed into %s (is a process still "
                     "writing it?); they are not visible. Layers are read as snapshots: make them with "
                     "`jitfreeze import BUNDLE --into DIR`, or from a cache no process has open", db.parent, db.name)
    except OSError:
        pass
    con = sqlite3.connect(db.resolve().as_uri() + "?mode=ro&immutable=1", uri=True, check_same_thread=False)
    con.execute("SELECT COUNT(*) FROM Cache WHERE 0").fetchall()
    return con


# -- a bundle file -----------------------------------------------------------------------------------


def read_manifest(tar: tarfile.TarFile) -> tuple[dict, dict]:
    """(manifest, {member name: TarInfo}) of an open bundle; ValueError when it is not one."""
    members = {}
    for m in tar.getmembers():
        members.setdefault(m.name, m)
    info = members.get(BUNDLE_MANIFEST)
    if info is None or not info.isreg():
        raise ValueError(f"not a jitfreeze bundle (no {BUNDLE_MANIFEST})")
    if info.size > _MANIFEST_LIMIT:
        raise ValueError(f"{BUNDLE_MANIFEST} is too large ({info.size} bytes)")
    try:
        manifest = json.loads(tar.extractfile(info).read())
    except ValueError as exc:
        raise ValueError(f"unreadable {BUNDLE_MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT \
            or not isinstance(manifest.get("entries"), list):
        raise ValueError(f"not a jitfreeze bundle ({BUNDLE_MANIFEST} has no format {BUNDLE_FORMAT!r})")
    return manifest, members


class BundleStore:
    """An uncompressed bundle file (``jitfreeze export``) used directly as a read-only layer."""

    readonly = True

    def __init__(self, path):
        self.path = Path(path).resolve()
        self.location = str(self.path)
        try:
            with tarfile.open(self.path, "r:") as tar:
                manifest, members = read_manifest(tar)
        except tarfile.TarError as exc:
            raise ValueError(f"{self.path} is not an uncompressed jitfreeze bundle (tar): {exc}") from None
        self.manifest = manifest
        self._index: dict[str, tuple[int, int]] = {}
        self._meta: dict[str, dict] = {}
        for e in manifest["entries"]:
            if not isinstance(e, dict):
                continue
            m = members.get(e.get("member"))
            key = e.get("key")
            if m is None or not m.isreg() or not isinstance(key, str):
                continue
            self._index[key] = (m.offset_data, m.size)
            self._meta[key] = e
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def _read(self, offset: int, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            chunk = os.pread(self._fd, min(size - len(out), 64 * 2**20), offset + len(out))
            if not chunk:
                break
            out += chunk
        return bytes(out)

    def get(self, key):
        where = self._index.get(key)
        if where is None:
            return None
        return self._read(*where)

    def head(self, key):
        where = self._index.get(key)
        if where is None:
            return None
        offset, size = where
        return _FileReader(self.path, base=offset, size=size)

    def put(self, key, value):
        raise PermissionError(f"{self.location} is a read-only layer")

    def delete(self, key):
        raise PermissionError(f"{self.location} is a read-only layer")

    def clear(self):
        raise PermissionError(f"{self.location} is a read-only layer")

    def keys(self):
        return iter(list(self._index))

    def rows(self):
        created = self.manifest.get("created")
        return [(k, None, size, None, self._meta[k].get("created", created), None)
                for k, (_, size) in self._index.items()]

    def stats(self):
        return {"entries": len(self._index), "bytes": sum(s for _, s in self._index.values()), "size_limit": None}

    def close(self):
        try:
            os.close(self._fd)
        except OSError:
            pass


# -- listings ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One stored entry, described without reading its payload."""

    key: str                    # full key, "a/<graph key>" or "i/<index key>"
    layer: str                  # the store's location
    writable: bool
    size: int
    stored: float | None        # when the row was written
    accessed: float | None      # diskcache's last access (the writable layer only)
    meta: dict | None           # the entry's metadata (None: unreadable head)
    error: str | None = None

    @property
    def ns(self) -> str:
        return self.key[:2]


class _BytesReader:
    def __init__(self, data: bytes):
        self.data, self.size = data, len(data)

    def read(self, offset: int, n: int) -> bytes:
        return self.data[offset:offset + n]


class _FileReader:
    """Random access to ``size`` bytes of ``path`` starting at ``base``."""

    def __init__(self, path, base: int = 0, size: int | None = None):
        self.path, self.base = path, base
        self.size = os.stat(path).st_size - base if size is None else size

    def read(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self.size - offset))
        with open(self.path, "rb") as f:
            f.seek(self.base + offset)
            return f.read(n)


def read_meta(reader) -> dict:
    """The metadata of an entry, read from its head or trailer (no checksum check: listings only)."""
    if reader.size >= _HEAD1.size and reader.read(0, len(_MAGIC1)) == _MAGIC1:
        _magic, _flags, meta_len, _payload_len = _HEAD1.unpack(reader.read(0, _HEAD1.size))
        start = _HEAD1.size
    else:
        if reader.size < _TRAILER2:
            raise ValueError("truncated entry")
        trailer = reader.read(reader.size - _TRAILER2, _TRAILER2)
        if trailer[-8:-1] != b"JITFRZ\x00":
            raise ValueError("not a jitfreeze entry")
        meta_len, payload_len = _LENS2.unpack_from(trailer)
        start = payload_len
        if payload_len + meta_len + _TRAILER2 != reader.size:
            raise ValueError("truncated or padded entry")
    if meta_len > _META_LIMIT:
        raise ValueError("metadata too large")
    data = reader.read(start, meta_len)
    if len(data) < meta_len:
        raise ValueError("truncated entry")
    meta = json.loads(data)
    if not isinstance(meta, dict):
        raise ValueError("metadata is not an object")
    return meta


def _disk_rows(store):
    """(key, mode, size, value length, store_time, access_time) of a DiskStore's raw rows."""
    lru.drain(store.timeout)
    return store._cache._sql("SELECT key, mode, size, length(value), store_time, access_time FROM Cache "
                             "WHERE raw = 1 ORDER BY rowid").fetchall()


def _disk_head(store, key):
    rows = store._cache._sql("SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1",
                             (key,)).fetchall()
    if not rows:
        return None
    mode, filename, value = rows[0]
    if mode == MODE_RAW and value is not None:
        return _BytesReader(bytes(value))
    if mode == MODE_BINARY and filename:
        return _FileReader(Path(store.directory) / filename)
    return None


def scan(store, *, with_meta: bool = True) -> Iterator[Row]:
    """Every entry of ``store`` (any Store) with its metadata, reading only the head of each."""
    writable = not getattr(store, "readonly", False)
    location = getattr(store, "location", "?")
    if hasattr(store, "rows"):
        rows, head = store.rows(), store.head
    elif hasattr(store, "_cache") and hasattr(store._cache, "_sql"):       # DiskStore
        rows, head = _disk_rows(store), (lambda k: _disk_head(store, k))
    else:                                                                   # MemoryStore and others
        rows = []
        for k in store.keys():
            info = store.info(k) if hasattr(store, "info") else None
            info = info or {}
            rows.append((k, None, info.get("size", 0), None, info.get("store_time"), info.get("access_time")))

        def head(k):
            data = store.get(k)
            return None if data is None else _BytesReader(data)
    for key, _mode, size, vlen, store_time, access_time in rows:
        if type(key) is not str:
            continue
        meta, error = None, None
        if with_meta:
            try:
                reader = head(key)
                if reader is None:
                    error = "missing"
                else:
                    meta = read_meta(reader)
            except Exception as exc:  # noqa: BLE001 - listings report, verify repairs
                error = f"{type(exc).__name__}: {exc}"
        yield Row(key=key, layer=location, writable=writable, size=int(size or 0) + int(vlen or 0),
                  stored=store_time, accessed=access_time, meta=meta, error=error)
