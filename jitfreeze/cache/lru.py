"""LRU bookkeeping after a read, written off the caller's thread.

A read from the disk cache records its access time (what eviction orders by). That is a write
to the SQLite index, and the first write after the index's last connection closed creates its
write-ahead log, which SQLite syncs to disk: 1-35 ms here (measured: a warm start of the conv
net after another process had closed the index paid 24-35 ms of ``fdatasync`` for its touch,
0.1-0.3 ms when the log was still there). A warm start should not wait for the disk to write
bookkeeping, so touches are queued and written by one daemon thread, on connections of its
own (they never take the reader's lock).

Best effort, like the touch itself always was: a busy index (a writer past 100 ms) or any
SQLite error drops the batch. :func:`drain` waits for queued touches; the store calls it
before evicting and before reading access times, and it runs at exit and before ``fork`` (a
child must not inherit a thread's half-done SQLite call).
"""

from __future__ import annotations

import atexit
import os
import sqlite3
import threading

from . import sqlindex

__all__ = ["add", "drain"]

_BUSY_S = 0.1           # how long a touch waits for another writer
_DRAIN_AT_EXIT_S = 2.0  # how long exit (or fork) waits for queued touches


class _Touches:
    def __init__(self):
        self._cond = threading.Condition()
        self._queue: list[tuple[str, int, float]] = []
        self._busy = False
        self._thread: threading.Thread | None = None

    def add(self, db: str, rowid: int, when: float) -> None:
        with self._cond:
            self._queue.append((db, rowid, when))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="jitfreeze-touches", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued touch is written (or dropped); False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue)
                batch, self._queue = self._queue, []
                self._busy = True
            try:
                write_batch(batch)
            except Exception:  # noqa: BLE001 - bookkeeping: the thread must outlive any batch
                pass
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _after_fork_in_child(self) -> None:
        # The thread does not exist in the child; what the parent still had queued is the
        # parent's to write.
        self.__init__()


def write_batch(batch) -> None:
    """Write one batch of access times ``[(index path, rowid, time)]`` (the thread's work)."""
    by_db: dict[str, list[tuple[float, int]]] = {}
    for db, rowid, when in batch:
        by_db.setdefault(db, []).append((when, rowid))
    for db, rows in by_db.items():
        try:
            # an index removed since the read (a cleared cache, a deleted directory) is not created again
            con = sqlindex.connect_existing(db, _BUSY_S)
        except (sqlite3.Error, ValueError):
            continue
        try:
            con.execute("BEGIN IMMEDIATE")
            con.executemany(sqlindex.TOUCH, rows)
            con.execute("COMMIT")
        except sqlite3.Error:
            pass
        finally:
            con.close()


_touches = _Touches()
add = _touches.add
drain = _touches.drain

atexit.register(drain, _DRAIN_AT_EXIT_S)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=lambda: drain(_DRAIN_AT_EXIT_S), after_in_child=_touches._after_fork_in_child)
