"""Checking and repairing a cache directory: what crashes and tampering leave behind.

Works on a :class:`~jitfreeze.cache.disk.DiskStore`: rows that are not raw bytes (planted pickle
rows, pickled keys, rows naming files outside the layout), value files others could have written,
rows whose file is missing or has the wrong size, value files no row refers to (left by a process
killed mid-write), a corrupt index (set aside). It knows what else lives in the directory on
purpose (``locks/``, set-aside indexes) and never deletes a lock file (diskcache's
``check(fix=True)`` would). :func:`maintain` is ``jitfreeze cache verify``'s and
``jitfreeze.cache.persistent.maintain``'s entry point.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path
from typing import Callable

from . import sqlindex
from .disk import DiskStore, open_disk_store
from .files import MODE_BINARY, MODE_RAW, UnsafeEntry, check_value_file, in_use, is_value_file, value_files
from .sqlindex import DB_NAME, CorruptStore

__all__ = ["maintain", "maintain_store", "check", "unsafe_rows", "untrusted_files", "missing_files",
           "wrong_sizes", "sweep_orphans"]


def unsafe_rows(store: DiskStore) -> list[int]:
    """rowids of rows that are not raw bytes under a str key, or name a file outside the layout."""
    bad = []
    for rowid, raw, key, mode, filename in sqlindex.all_rows(store.execute):
        if raw != 1 or type(key) is not str or mode not in (MODE_RAW, MODE_BINARY):
            bad.append(rowid)
        elif mode == MODE_BINARY and not is_value_file(filename):
            bad.append(rowid)
        elif mode == MODE_RAW and filename is not None:
            bad.append(rowid)
    return bad


def delete_rows(store: DiskStore, rowids: list[int]) -> None:
    """Delete rows by rowid (and their value files, when in the cache's own layout)."""
    for filename in sqlindex.delete_rows(store.index, rowids):
        store.index.disk.remove(filename)


def _value_rows(store: DiskStore):
    """(rowid, size, filename) of the rows kept in value files of the layout (``unsafe_rows``
    handles the others)."""
    for rowid, size, filename in sqlindex.file_rows(store.execute):
        if is_value_file(filename):
            yield rowid, size, filename


def missing_files(store: DiskStore) -> list[int]:
    """rowids whose value file is gone (or not a regular file): unreadable entries."""
    out = []
    for rowid, _, filename in _value_rows(store):
        path = store.directory / filename
        try:
            ok = os.path.isfile(path) and not os.path.islink(path)
        except OSError:
            ok = False
        if not ok:
            out.append(rowid)
    return out


def wrong_sizes(store: DiskStore) -> list[int]:
    """rowids whose value file's size differs from the row's (truncated or grown files)."""
    out = []
    for rowid, size, filename in _value_rows(store):
        with contextlib.suppress(OSError):
            if os.lstat(store.directory / filename).st_size != size:
                out.append(rowid)
    return out


def untrusted_files(store: DiskStore) -> list[int]:
    """rowids whose value file, or a directory holding it, fails the trust rule (another owner,
    writable by group or others): refused by every read (none when ``check_trust`` is off)."""
    if not store.check_trust:
        return []
    out = []
    for rowid, _, filename in _value_rows(store):
        try:
            check_value_file(store.location, filename, os.lstat(store.directory / filename))
        except UnsafeEntry:
            out.append(rowid)
        except OSError:
            pass            # missing_files handles these
    return out


def sweep_orphans(store: DiskStore, min_age: float = 600.0) -> int:
    """Remove value files no row refers to (left by a process killed mid-write).

    Only files older than ``min_age`` seconds: a file younger than that may belong to a write
    whose row is about to be committed; and never one that is flock-ed (being written).
    """
    known = {filename for _, _, filename in sqlindex.file_rows(store.execute)}
    now, removed = time.time(), 0
    for path in value_files(store.directory):
        rel = os.path.relpath(path, store.directory).replace(os.sep, "/")
        try:
            if rel not in known and now - path.lstat().st_mtime >= min_age and not in_use(path):
                path.unlink()
                removed += 1
                with contextlib.suppress(OSError):
                    os.removedirs(path.parent)      # stops at the first non-empty directory
        except OSError:
            pass
    return removed


def check(store: DiskStore, fix: bool = False) -> list[str]:
    """diskcache's consistency check, as a list of messages (empty: consistent).

    What jitfreeze keeps in the directory on purpose (``locks/``, set-aside indexes) is not
    reported. ``fix=True`` never runs diskcache's own fixes (they delete lock files): it runs
    :func:`maintain_store`.
    """
    if fix:
        maintain_store(store, min_age=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = store.index.check(fix=False, retry=False)
    out = []
    for w in found:
        text = str(w.message)
        path = text.split(": ", 1)[1] if ": " in text else ""
        rel = os.path.relpath(path, store.directory) if path.startswith(str(store.directory)) else ""
        if rel and (rel == "locks" or rel.startswith("locks" + os.sep) or
                    os.path.basename(rel).startswith(DB_NAME)):
            continue
        out.append(text)
    return out


def maintain_store(store: DiskStore, *, min_age: float = 600.0,
                   validate: Callable[[str, bytes], object] | None = None) -> dict:
    """Repair what crashes and tampering leave behind in ``store``; returns counts of what was done.

    Removes rows that are not raw bytes or whose value file others could have written (both
    ``unsafe_rows``), rows whose value file is missing or has the wrong size, value files no row
    refers to (older than ``min_age``), and (with ``validate``, which raises for a bad entry)
    entries that fail it; then resets diskcache's count and size bookkeeping. A corrupt index is
    set aside (CorruptStore).
    """
    counts = {"unsafe_rows": 0, "missing_files": 0, "wrong_size": 0, "bad_entries": 0, "orphan_files": 0}
    result = sqlindex.quick_check(store.execute)
    if result != ["ok"]:
        store.set_aside_corrupt("quick_check: " + "; ".join(map(str, result[:3])))
    for name, rowids in (("unsafe_rows", lambda: sorted(set(unsafe_rows(store)) | set(untrusted_files(store)))),
                         ("missing_files", lambda: missing_files(store)),
                         ("wrong_size", lambda: wrong_sizes(store))):
        found = rowids()
        if found:
            delete_rows(store, found)
        counts[name] = len(found)
    if validate is not None:
        for key in list(store.keys()):
            try:
                data = store.get(key)
                if data is not None:
                    validate(key, data)
            except UnsafeEntry:
                pass        # unsafe_rows already removed what it could see
            except Exception:  # noqa: BLE001 - any failure of the validator: a bad entry
                if store.delete(key):
                    counts["bad_entries"] += 1
    counts["orphan_files"] = sweep_orphans(store, min_age)
    sqlindex.recount(store.index)
    stats = store.stats()
    counts["entries"], counts["bytes"] = stats["entries"], stats["bytes"]
    return counts


def maintain(cache_dir=None, *, verify: bool = False, min_age: float = 600.0) -> dict:
    """Repair a cache directory after crashes or tampering; returns counts of what was done.

    Removes rows that are not raw bytes (planted pickle rows, pickled keys, rows naming files
    outside the cache) or whose value file others could have written (both ``unsafe_rows``),
    rows whose value file is missing or has the wrong size, and value files no row refers to
    (left by a process killed mid-write; only those older than ``min_age`` seconds, younger ones
    may belong to a write in progress). A corrupt index is set aside and
    an empty one started. ``verify=True`` also reads every entry and checks its checksum (and
    its signature when ``JITFREEZE_CACHE_KEY`` is set), removing the bad ones. Lock files are
    never touched.

    Returns a dict with the keys ``entries``, ``bytes`` (after), ``unsafe_rows``,
    ``missing_files``, ``wrong_size``, ``bad_entries``, ``orphan_files``, ``index_set_aside``
    (counts removed or done) and ``problems`` (inconsistencies diskcache's check still reports;
    0 when clean). Raises :class:`~jitfreeze.cache.trust.UnsafeDirectory` for a directory the trust
    checks refuse, and FileNotFoundError when ``cache_dir`` holds no cache.
    """
    from ..config import Config
    from . import envelope
    from .trust import check_directory

    config = Config.from_env()
    path = Path(cache_dir if cache_dir is not None else config.cache_dir).expanduser()
    if not (path / DB_NAME).exists():
        raise FileNotFoundError(f"no jitfreeze cache in {path}")
    if not config.allow_unsafe_dir:
        check_directory(path)
    store, problem = open_disk_store(path, config.size_limit, check_trust=not config.allow_unsafe_dir)
    set_aside = int(problem is not None)

    def validate(key: str, data: bytes) -> None:
        envelope.unpack(data, key, config.hmac_key)

    try:
        try:
            counts = maintain_store(store, min_age=min_age, validate=validate if verify else None)
        except CorruptStore:
            set_aside += 1
            counts = maintain_store(store, min_age=min_age, validate=validate if verify else None)
        counts["problems"] = len(check(store))
    finally:
        store.close()
    counts["index_set_aside"] = set_aside
    return counts
