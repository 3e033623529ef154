"""diskcache's SQLite index: every SQL statement and connection mode jitfreeze uses, in one place.

jitfreeze writes through diskcache's public API (``Cache.set``/``delete``/``clear``/``transact``/
``check``/``volume``) but reads, culls and repairs the index with statements of its own. Why,
measured or found in diskcache's source:

* **reads without a write lock** (:func:`connect_reader`, :func:`live_row`): diskcache's LRU
  ``get`` reads the value inside ``BEGIN IMMEDIATE`` (every reader serialized, no read at all on
  a full disk), and opening ``diskcache.Cache`` runs a dozen PRAGMAs and rewrites its settings in
  a write transaction (~10 ms, and diskcache's import 5-8 ms); a plain connection and one SELECT
  cost well under a millisecond, so a warm process never imports diskcache;
* **LRU write-behind** (:func:`connect_existing`, :data:`TOUCH`, used by :mod:`~jitfreeze.cache.lru`):
  the access-time touch is written off the caller's thread (its first write after the index's
  last close syncs a new WAL: 1-35 ms);
* **read-only layers** (:func:`connect_snapshot`): ``mode=ro&immutable=1``: no lock, no journal, no
  shared-memory file, nothing written to a layer;
* **bounded culling** (:func:`cull`): diskcache's own culling removes 10 rows per write once over
  the limit, the row just written included;
* **repair** (:mod:`~jitfreeze.cache.repair`): rows diskcache's API cannot see or would
  unpickle (pickle mode, pickled keys, rows naming files outside the layout), resetting its
  count/size bookkeeping, and never deleting lock files (``check(fix=True)`` would).

The statements reach diskcache's connection through its private ``Cache._sql`` (and, to roll back
a failed write, ``_con``/``_txn_id``): only here (:func:`query`, :func:`rollback`). They rely on
the schema of diskcache 5.x: table ``Cache`` with the columns :data:`CACHE_COLUMNS`, table
``Settings(key, value)`` with the keys ``count`` and ``size``, row modes 1 (raw) and 2 (binary
file), and the index file ``cache.db`` (tests/test_reliability.py checks these against the
installed diskcache).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .trust import create_private_file

if TYPE_CHECKING:
    import diskcache

__all__ = ["DB_NAME", "CACHE_COLUMNS", "SETTINGS_KEYS", "DISKCACHE_MAJOR", "CorruptStore", "is_corrupt",
           "connect_reader", "connect_snapshot", "connect_existing", "open_diskcache", "query", "rollback",
           "set_aside", "inode", "make_snapshot"]

DB_NAME = "cache.db"
DISKCACHE_MAJOR = 5
#: the columns of diskcache's ``Cache`` table the statements below name
CACHE_COLUMNS = ("rowid", "key", "raw", "store_time", "expire_time", "access_time", "access_count",
                 "size", "mode", "filename", "value")
SETTINGS_KEYS = ("count", "size")
SIDE_FILES = ("-wal", "-shm", "-journal")
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


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


# -- connection modes ---------------------------------------------------------------------------------


def connect_reader(db: Path, timeout: float):
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


def connect_snapshot(db: Path) -> sqlite3.Connection:
    """Open ``db`` as an immutable snapshot: no lock, no journal, no shared-memory file, no write."""
    con = sqlite3.connect(db.resolve().as_uri() + "?mode=ro&immutable=1", uri=True, check_same_thread=False)
    con.execute("SELECT COUNT(*) FROM Cache WHERE 0").fetchall()
    return con


def connect_existing(db: str, timeout: float) -> sqlite3.Connection:
    """A read-write connection to an index that exists (``mode=rw``: one removed since, a cleared
    cache or a deleted directory, is not created again), with ``synchronous = NORMAL``."""
    con = sqlite3.connect(Path(db).as_uri() + "?mode=rw", uri=True, timeout=timeout, isolation_level=None)
    try:
        con.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        con.close()
        raise
    return con


def open_diskcache(directory: Path, timeout: float, settings: dict) -> diskcache.Cache:
    """Open (and maybe create) the cache with :class:`~jitfreeze.cache.rawdisk.RawOnlyDisk`;
    concurrent first opens can see "database is locked", retried for up to ``timeout``."""
    import diskcache

    from .rawdisk import RawOnlyDisk

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


def make_snapshot(db: Path) -> None:
    """Fold the write-ahead log into ``db`` and leave it in rollback-journal mode (a layer to ship)."""
    con = sqlite3.connect(str(db), timeout=30)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.execute("PRAGMA journal_mode=DELETE")
    finally:
        con.close()


def query(handle):
    """``execute(sql, args=())`` on ``handle``: a plain connection, or a ``diskcache.Cache``
    (through its private ``_sql``, which runs on the connection of its current transaction)."""
    if isinstance(handle, sqlite3.Connection):
        return handle.execute
    return handle._sql


def rollback(cache) -> None:
    """After a failed write: roll back what diskcache left open (a failed COMMIT may leave its
    connection inside the transaction, with diskcache still counting it as its own)."""
    with contextlib.suppress(Exception):
        con = cache._con
        if con.in_transaction:
            con.execute("ROLLBACK")
            cache._txn_id = None


# -- statements ----------------------------------------------------------------------------------------

#: the LRU touch (:mod:`jitfreeze.cache.lru`): parameters (access_time, rowid)
TOUCH = "UPDATE Cache SET access_time = ?, access_count = access_count + 1 WHERE rowid = ?"


def live_row(execute, key: str):
    """(rowid, mode, filename, value) of the unexpired raw row under ``key``, or None."""
    rows = execute("SELECT rowid, mode, filename, value FROM Cache WHERE key = ? AND raw = 1"
                   " AND (expire_time IS NULL OR expire_time > ?)", (key, time.time())).fetchall()
    return rows[0] if rows else None


def stored_row(execute, key: str):
    """(mode, filename, value) of the raw row under ``key`` (expired or not), or None."""
    rows = execute("SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchall()
    return rows[0] if rows else None


def raw_keys(execute) -> list:
    """The keys of raw rows, in insertion order (str keys only)."""
    return [k for (k,) in execute("SELECT key FROM Cache WHERE raw = 1 ORDER BY rowid").fetchall()
            if type(k) is str]


def listing(execute) -> list:
    """(key, mode, size, inline length, store_time, access_time) of every raw row."""
    return execute("SELECT key, mode, size, length(value), store_time, access_time FROM Cache "
                   "WHERE raw = 1 ORDER BY rowid").fetchall()


def info(execute, key: str) -> dict | None:
    rows = execute("SELECT store_time, access_time, access_count, size, mode FROM Cache WHERE key = ? AND raw = 1",
                   (key,)).fetchall()
    if not rows:
        return None
    store_time, access_time, access_count, size, mode = rows[0]
    return {"store_time": store_time, "access_time": access_time, "access_count": access_count,
            "size": size, "mode": mode}


def totals(execute) -> tuple[int, int]:
    """(raw rows, bytes inline and in files), counted from the rows (a snapshot has no live bookkeeping)."""
    ((n, size),) = execute("SELECT COUNT(*), COALESCE(SUM(size), 0) + COALESCE(SUM(length(value)), 0) "
                           "FROM Cache WHERE raw = 1").fetchall()
    return n, int(size)


def cull(cache, keep: str, size_limit: int) -> list:
    """Delete least recently used rows until the volume is under ``size_limit`` (never the raw row
    ``keep``), in one transaction; returns the value files the deleted rows named (to remove)."""
    removed = []
    with cache.transact(retry=False):
        execute = cache._sql
        excess = cache.volume() - size_limit
        rows = execute("SELECT rowid, filename, size + COALESCE(length(value), 0) FROM Cache"
                       " WHERE NOT (key = ? AND raw = 1) ORDER BY access_time LIMIT 1000", (keep,)).fetchall()
        for rowid, filename, size in rows:
            if excess <= 0:
                break
            execute("DELETE FROM Cache WHERE rowid = ?", (rowid,))
            removed.append(filename)
            excess -= max(int(size or 0), 1)
    return [f for f in removed if f]


def delete_rows(cache, rowids) -> list:
    """Delete rows by rowid, in one transaction; returns the value files they named (to remove)."""
    files = []
    with cache.transact(retry=False):
        execute = cache._sql
        for rowid in rowids:
            row = execute("SELECT filename FROM Cache WHERE rowid = ?", (rowid,)).fetchall()
            execute("DELETE FROM Cache WHERE rowid = ?", (rowid,))
            if row and row[0][0]:
                files.append(row[0][0])
    return files


def all_rows(execute) -> list:
    """(rowid, raw, key, mode, filename) of every row, raw or not."""
    return execute("SELECT rowid, raw, key, mode, filename FROM Cache").fetchall()


def file_rows(execute) -> list:
    """(rowid, size, filename) of every row that names a value file."""
    return execute("SELECT rowid, size, filename FROM Cache WHERE filename IS NOT NULL").fetchall()


def quick_check(execute) -> list:
    return [r[0] for r in execute("PRAGMA quick_check").fetchall()]


def recount(cache) -> None:
    """Reset diskcache's ``count`` and ``size`` settings from the rows (after rows were deleted
    behind its back)."""
    with cache.transact(retry=False):
        execute = cache._sql
        ((n,),) = execute("SELECT COUNT(key) FROM Cache").fetchall()
        ((size,),) = execute("SELECT COALESCE(SUM(size), 0) FROM Cache").fetchall()
        execute("UPDATE Settings SET value = ? WHERE key = 'count'", (n,))
        execute("UPDATE Settings SET value = ? WHERE key = 'size'", (size,))
    cache.reset("count")
    cache.reset("size")


# -- the index file ------------------------------------------------------------------------------------


def inode(path):
    """(st_dev, st_ino) of ``path``, or None."""
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return None


def set_aside(directory: str | os.PathLike, expect_ino=None) -> str | None:
    """Rename ``cache.db`` (and its -wal/-shm/-journal files) to ``cache.db.corrupt-<time>-<pid>``.

    Under the directory's ``locks/index.lock``. With ``expect_ino`` (the (dev, inode) this
    process opened), nothing is renamed when ``cache.db`` is already another file: another
    process set the corrupt one aside first. Returns the new name, or None.
    """
    from .lock import KeyLock

    directory = Path(directory)
    db = directory / DB_NAME
    suffix = f".corrupt-{int(time.time())}-{os.getpid()}"
    try:
        lock = KeyLock(directory, "index", 30.0)
        lock.__enter__()
    except Exception:  # noqa: BLE001 - no lock directory (read-only?): rename anyway
        lock = None
    try:
        if expect_ino is not None and inode(db) != expect_ino:
            return None
        aside = None
        for side in ("",) + SIDE_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{db}{side}", f"{db}{suffix}{side}")
                if not side:
                    aside = f"{db}{suffix}"
        return aside
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
