"""The diskcache ``Disk`` jitfreeze opens its caches with: raw bytes only.

Imported when a cache is opened for writes or maintenance (:func:`jitfreeze.cache.sqlindex.open_diskcache`),
not by a process that only reads.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading

import diskcache
from diskcache.core import UNKNOWN

from .files import MODE_BINARY, MODE_RAW, Adopt, UnsafeEntry, chunks, create_value_file, fetch, is_value_file

__all__ = ["RawOnlyDisk"]


class RawOnlyDisk(diskcache.Disk):
    """A diskcache Disk that stores and returns raw bytes only.

    diskcache unpickles any row whose mode column says pickle, whatever the
    application stored: a planted row would be code execution. This Disk never
    pickles or unpickles, keys included; reads and deletes only value files in
    diskcache's own layout (never a path a row names outside the directory, never
    through a symlink); creates value files and their directories owner-only
    whatever the umask (diskcache's own writer uses ``os.makedirs`` and ``open``:
    0777 and 0666 under umask 000); and removes a partly written file when a write
    fails (a full disk).
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
        if type(value) is Adopt and not read:
            # A value file written in place (DiskStore.put_file): the row takes it as it is.
            self.written = value.filename
            return value.size, MODE_BINARY, value.filename, None
        if read or type(value) is not bytes:
            raise TypeError(f"jitfreeze stores raw bytes only, not {type(value).__name__}")
        if len(value) < self.min_file_size:
            return 0, MODE_RAW, None, sqlite3.Binary(value)
        filename, full_path = self.filename(key, value)
        try:
            self._write(full_path, chunks(value), "xb")   # not io.BytesIO: iterating it yields lines
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(full_path)
            raise
        self.written = filename
        return len(value), MODE_BINARY, filename, None

    @property
    def written(self):
        """The value file this thread's last ``store`` wrote (DiskStore removes it if the row fails)."""
        return getattr(self._local(), "written", None)

    @written.setter
    def written(self, filename):
        self._local().written = filename

    def _local(self):
        local = self.__dict__.get("_thread_local")
        if local is None:
            local = self.__dict__.setdefault("_thread_local", threading.local())
        return local

    def _write(self, full_path, iterator, mode, encoding=None):
        if mode != "xb":
            raise TypeError(f"jitfreeze writes new binary value files only, not mode {mode!r}")
        filename = os.path.relpath(full_path, self._directory)
        with open(create_value_file(self._directory, filename), "wb") as writer:
            size = 0
            for chunk in iterator:
                size += len(chunk)
                writer.write(chunk)
            return size

    def fetch(self, mode, filename, value, read):
        if read:
            raise UnsafeEntry(f"cache row in mode {mode} read as a file (only raw bytes are accepted)")
        return fetch(self._directory, mode, filename, value)

    def remove(self, file_path):
        if file_path is None or not is_value_file(str(file_path)):
            return      # a row naming a path outside the cache's layout: never delete it
        super().remove(file_path)
