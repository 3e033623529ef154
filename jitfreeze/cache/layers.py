"""Read-only cache layers (``JITFREEZE_CACHE_PATH=ro1:ro2:writable``) and entry listings.

A read-only layer is a jitfreeze cache directory (an imported bundle, a
directory baked into an image, a shared mount) or a bundle file
(``jitfreeze export``). Layers are read without ever writing to them: a
directory's SQLite index is opened with a ``file:...?mode=ro&immutable=1`` URI
(no lock, no journal, no shared-memory file, no LRU bookkeeping), so a layer
is read as a snapshot; a bundle file is read through ``os.pread``. Nothing here
deletes, evicts or clears.

Trust: ``torch.jit.load`` runs an entry's code, so a layer, its index and its value
files must not be writable by anyone but you or root: the checks of a cache directory
(:func:`jitfreeze.cache.trust.check_directory`; a bundle file, :func:`~jitfreeze.cache.trust.check_file`),
unless ``JITFREEZE_CACHE_KEY`` is set (every entry is then authenticated) or
``JITFREEZE_ALLOW_UNSAFE_CACHE_DIR=1``. Rows and value files are read by
:mod:`jitfreeze.cache.files` (the layout only), the index by :mod:`jitfreeze.cache.sqlindex`.

Also here: :func:`scan`, the metadata of every entry of any store without
reading payloads (for ``jitfreeze cache list``, ``explain`` and ``export``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tarfile
import threading
from pathlib import Path
from typing import Iterator

from . import sqlindex
from .envelope import read_meta
from .files import BytesReader, FileReader, fetch, head, value_file_path
from .sqlindex import DB_NAME
from .store import Listable
from .trust import UnsafeDirectory, check_directory, check_file

log = logging.getLogger("jitfreeze")

__all__ = ["ReadOnlyDirStore", "BundleStore", "open_layer", "check_layer", "scan", "Row",
           "BUNDLE_MANIFEST", "read_manifest"]

BUNDLE_MANIFEST = "manifest.json"
BUNDLE_FORMAT = "jitfreeze-bundle"
_MANIFEST_LIMIT = 256 * 2**20

class UnsafeLayer(Exception):
    """A read-only layer that others could have written (refused)."""


def check_layer(path: Path) -> None:
    """Raise UnsafeLayer unless ``path`` passes the trust checks of a cache directory
    (:func:`jitfreeze.cache.trust.check_directory`), or of a file for a bundle."""
    try:
        if path.is_dir():
            check_directory(path)
        else:
            check_file(path, "read-only cache layer")
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


class _ReadOnly:
    """Writes to a read-only layer raise."""

    def put(self, key, value):
        raise PermissionError(f"{self.location} is a read-only layer")

    def delete(self, key):
        raise PermissionError(f"{self.location} is a read-only layer")

    def clear(self):
        raise PermissionError(f"{self.location} is a read-only layer")


class ReadOnlyDirStore(_ReadOnly):
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

    def _rows(self, run):
        with self._lock:
            return run(self._con.execute)

    def get(self, key):
        row = self._rows(lambda execute: sqlindex.stored_row(execute, key))
        if row is None:
            return None
        try:
            return fetch(self.location, *row, check=self.check_trust)
        except FileNotFoundError:
            return None

    def get_file(self, key):
        """Path of a file-backed entry's value file (loaded in place, never written), or None."""
        row = self._rows(lambda execute: sqlindex.stored_row(execute, key))
        if row is None:
            return None
        return value_file_path(self.location, row[0], row[1], self.check_trust)

    def head(self, key):
        row = self._rows(lambda execute: sqlindex.stored_row(execute, key))
        return None if row is None else head(self.location, *row)

    def keys(self):
        return iter(self._rows(sqlindex.raw_keys))

    def rows(self):
        """(key, mode, size, inline length, store_time, access_time) of every raw row."""
        return self._rows(sqlindex.listing)

    def stats(self):
        n, size = self._rows(sqlindex.totals)
        return {"entries": n, "bytes": size, "size_limit": None}

    def close(self):
        with self._lock:
            self._con.close()


def _connect_readonly(db: Path):
    """Open ``db`` as an immutable snapshot: no lock, no journal, no shared-memory file, no write."""
    wal = db.with_name(db.name + "-wal")
    try:
        if wal.stat().st_size > 0:
            log.info("jitfreeze: the read-only layer %s has writes not checkpointed into %s (is a process still "
                     "writing it?); they are not visible. Layers are read as snapshots: make them with "
                     "`jitfreeze import BUNDLE --into DIR`, or from a cache no process has open", db.parent, db.name)
    except OSError:
        pass
    return sqlindex.connect_snapshot(db)


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


class BundleStore(_ReadOnly):
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
        return FileReader(self.path, base=offset, size=size)

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


def scan(store, *, with_meta: bool = True) -> Iterator[Row]:
    """Every entry of ``store`` with its metadata, reading only the head of each (a
    :class:`~jitfreeze.cache.store.Listable` store; any other Store: its keys, each read whole)."""
    if isinstance(store, Listable):
        rows, head = store.rows(), store.head
    else:
        rows = [(k, None, 0, None, None, None) for k in store.keys()]

        def head(k):
            data = store.get(k)
            return None if data is None else BytesReader(data)
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
        yield Row(key=key, layer=store.location, writable=not store.readonly, size=int(size or 0) + int(vlen or 0),
                  stored=store_time, accessed=access_time, meta=meta, error=error)
