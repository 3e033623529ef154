"""What the cache did, kept across processes: counters, per-entry hits, recent misses.

Written only on the slow path (an entry loaded from the persistent cache, a
compile stored, an eviction), never on the hot path. For a cache directory it
lives in a small SQLite file of its own, ``stats.db`` beside diskcache's
``cache.db`` (so it never counts against the size limit, and clearing or
evicting entries leaves it alone); caches over other stores keep it in memory.
Best effort: a failure here is logged at DEBUG and otherwise ignored.

The miss records hold the key parts of each compile (what ``jitfreeze
explain`` compares with the nearest stored entry); the last :data:`MISS_RING`
are kept.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from .sqlindex import is_corrupt
from .trust import create_private_file

__all__ = ["Journal", "SqliteJournal", "MISS_RING", "STATS_DB", "open_journal"]

log = logging.getLogger("jitfreeze")

MISS_RING = 200
STATS_DB = "stats.db"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS jitfreeze_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS jitfreeze_entries (key TEXT PRIMARY KEY, hits INTEGER NOT NULL, "
    "last_used REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS jitfreeze_misses (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, "
    "record TEXT NOT NULL)",
)


class Journal:
    """In-memory journal (caches over a Store instance)."""

    location = "<memory>"

    def __init__(self):
        self._lock = threading.Lock()
        self._counters: collections.Counter = collections.Counter()
        self._entries: dict[str, list] = {}
        self._misses: collections.deque = collections.deque(maxlen=MISS_RING)

    # -- writing (slow path) -------------------------------------------------------------------

    def bump(self, names, key: str | None = None) -> None:
        """Add 1 to each counter in ``names``; with ``key``, count a use of that entry."""
        try:
            self._bump(list(names), key, time.time())
        except Exception as exc:  # noqa: BLE001 - counters are best effort
            log.debug("jitfreeze journal: cannot count %s: %s", names, exc)

    def record_miss(self, record: dict) -> None:
        try:
            self._record_miss(dict(record, time=record.get("time") or time.time()))
        except Exception as exc:  # noqa: BLE001
            log.debug("jitfreeze journal: cannot record a miss: %s", exc)

    def forget(self, keys) -> None:
        """Drop the per-entry statistics of removed entries."""
        try:
            self._forget(list(keys))
        except Exception as exc:  # noqa: BLE001
            log.debug("jitfreeze journal: cannot forget entries: %s", exc)

    def clear(self) -> None:
        """Forget per-entry statistics and misses (the counters stay)."""
        try:
            self._clear()
        except Exception as exc:  # noqa: BLE001
            log.debug("jitfreeze journal: cannot clear: %s", exc)

    # -- reading (CLI) ---------------------------------------------------------------------------

    def counters(self) -> dict:
        with self._lock:
            return dict(self._counters)

    def entry_stats(self) -> dict:
        """{full key: {"hits": n, "last_used": t}}"""
        with self._lock:
            return {k: {"hits": h, "last_used": t} for k, (h, t) in self._entries.items()}

    def misses(self, limit: int = MISS_RING) -> list[dict]:
        """The most recent miss records, oldest first."""
        with self._lock:
            return list(self._misses)[-limit:]

    def close(self) -> None:
        pass

    # -- in-memory implementation ------------------------------------------------------------------

    def _bump(self, names, key, now):
        with self._lock:
            for n in names:
                self._counters[n] += 1
            if key is not None:
                hits, _ = self._entries.get(key, (0, 0.0))
                self._entries[key] = [hits + 1, now]

    def _record_miss(self, record):
        with self._lock:
            self._misses.append(record)

    def _forget(self, keys):
        with self._lock:
            for k in keys:
                self._entries.pop(k, None)

    def _clear(self):
        with self._lock:
            self._entries.clear()
            self._misses.clear()


class SqliteJournal(Journal):
    """The journal in a cache directory's ``stats.db``."""

    def __init__(self, db_path, *, readonly: bool = False):
        super().__init__()
        self.path = Path(db_path)
        self.location = str(self.path)
        self.readonly = readonly
        self._con = None
        self._pid = None

    def _connect(self) -> sqlite3.Connection:
        if self._con is not None and self._pid == os.getpid():
            return self._con
        if self.readonly:
            con = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, timeout=10,
                                  isolation_level=None, check_same_thread=False)
        else:
            with contextlib.suppress(FileExistsError):
                os.close(create_private_file(self.path))     # 0600 whatever the umask (and its -journal)
            con = sqlite3.connect(str(self.path), timeout=10, isolation_level=None, check_same_thread=False)
            # Counters are best effort: no fsync per count (3 ms each on the warm path otherwise).
            # A file an OS crash left corrupt is started afresh (_write).
            con.execute("PRAGMA synchronous=OFF")
            for sql in _SCHEMA:
                con.execute(sql)
        self._con, self._pid = con, os.getpid()
        return con

    def _write(self, statements):
        with self._lock:
            try:
                con = self._connect()
                con.execute("BEGIN IMMEDIATE")
                try:
                    for sql, args in statements:
                        con.execute(sql, args)
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                if is_corrupt(exc):
                    self._start_afresh()
                raise

    def _start_afresh(self) -> None:
        """A corrupt stats.db holds nothing worth keeping: remove it; the next write recreates it."""
        if self._con is not None:
            self._con.close()
        self._con = None
        for suffix in ("", "-journal"):
            try:
                os.remove(f"{self.path}{suffix}")
            except OSError:
                pass

    def _read(self, sql, args=()):
        with self._lock:
            try:
                return self._connect().execute(sql, args).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise

    def _bump(self, names, key, now):
        stmts = [("INSERT INTO jitfreeze_counters (name, value) VALUES (?, 1) "
                  "ON CONFLICT(name) DO UPDATE SET value = value + 1", (n,)) for n in names]
        if key is not None:
            stmts.append(("INSERT INTO jitfreeze_entries (key, hits, last_used) VALUES (?, 1, ?) "
                          "ON CONFLICT(key) DO UPDATE SET hits = hits + 1, last_used = excluded.last_used",
                          (key, now)))
        self._write(stmts)

    def _record_miss(self, record):
        self._write([
            ("INSERT INTO jitfreeze_misses (time, record) VALUES (?, ?)",
             (record["time"], json.dumps(record, sort_keys=True, default=str))),
            ("DELETE FROM jitfreeze_misses WHERE id <= (SELECT MAX(id) FROM jitfreeze_misses) - ?", (MISS_RING,)),
        ])

    def _forget(self, keys):
        self._write([("DELETE FROM jitfreeze_entries WHERE key = ?", (k,)) for k in keys])

    def _clear(self):
        self._write([("DELETE FROM jitfreeze_entries", ()), ("DELETE FROM jitfreeze_misses", ())])

    def counters(self):
        return {name: value for name, value in self._read("SELECT name, value FROM jitfreeze_counters")}

    def entry_stats(self):
        return {k: {"hits": h, "last_used": t}
                for k, h, t in self._read("SELECT key, hits, last_used FROM jitfreeze_entries")}

    def misses(self, limit=MISS_RING):
        rows = self._read("SELECT record FROM jitfreeze_misses ORDER BY id DESC LIMIT ?", (int(limit),))
        out = []
        for (text,) in reversed(rows):
            try:
                record = json.loads(text)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def close(self):
        with self._lock:
            if self._con is not None and self._pid == os.getpid():
                self._con.close()
            self._con = None


def open_journal(store, *, readonly: bool = False) -> Journal:
    """The journal of ``store``: ``stats.db`` beside a cache directory's index, else in memory."""
    from .disk import DiskStore

    if isinstance(store, DiskStore) and not store.readonly:
        return SqliteJournal(Path(store.directory) / STATS_DB, readonly=readonly)
    return Journal()
