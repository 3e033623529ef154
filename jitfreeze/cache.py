"""The persistent cache as the decorator sees it: verified entries or a miss.

Ties a :class:`~jitfreeze.store.Store`, the entry envelope
(:mod:`jitfreeze.artifact`), the key locks and the trust checks together, and
is the one place where cache trouble becomes "a miss plus one warning"
(:func:`jitfreeze.errors.trouble`). Nothing here raises to the caller unless
``JITFREEZE_STRICT=1``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from . import artifact
from .config import Config
from .errors import trouble
from .lock import KeyLock, LockTimeout, MemoryLock
from .store import DiskStore, MemoryStore, UnsafeEntry
from .trust import UnsafeDirectory, prepare_directory

__all__ = ["PersistentCache", "open_cache", "clear_cache", "forget_open_caches"]

log = logging.getLogger("jitfreeze")

ARTIFACT = "a/"       # frozen artifacts, by graph key
INDEX = "i/"          # fingerprint -> graph key (the trace-free warm path)


class PersistentCache:
    """Verified get/put of entries; every failure is handled here."""

    def __init__(self, store, config: Config, lock_dir: Path | None):
        self.store = store                  # None: running uncached (trouble was reported)
        self.config = config
        self.lock_dir = lock_dir
        self.location = getattr(store, "location", "<none>")
        self._writes_failed = False

    # -- reading ---------------------------------------------------------------------------

    def get(self, key: str, ns: str = ARTIFACT):
        """(meta, payload) of a verified entry, or None."""
        if self.store is None:
            return None
        try:
            data = self.store.get(ns + key)
        except UnsafeEntry as exc:
            self._refuse(ns + key, f"refused an unsafe cache entry in {self.location}", exc)
            return None
        except Exception as exc:  # noqa: BLE001
            trouble(f"cannot read the jitfreeze cache at {self.location}; treating as a miss", exc,
                    strict=self.config.strict, once=("read", self.location), key=key)
            return None
        if data is None:
            return None
        try:
            return artifact.unpack(data, ns + key, self.config.hmac_key)
        except artifact.BadEntry as exc:
            self._refuse(ns + key, f"dropped a bad jitfreeze cache entry {key[:16]} in {self.location}", exc)
            return None

    def evict(self, key: str, why: str, exc: BaseException | None = None, ns: str = ARTIFACT) -> None:
        """Drop an entry that verified but could not be used (e.g. torch.jit.load failed)."""
        self._refuse(ns + key, f"dropped jitfreeze cache entry {key[:16]} ({why})", exc)

    def _refuse(self, full_key: str, message: str, exc: BaseException | None) -> None:
        if self.store is not None and not getattr(self.store, "readonly", False):
            with contextlib.suppress(Exception):
                self.store.delete(full_key)
        trouble(message, exc, strict=self.config.strict, once=("bad", self.location, full_key))

    # -- writing ---------------------------------------------------------------------------

    def put(self, key: str, meta: dict, payload: bytes, ns: str = ARTIFACT) -> bool:
        if self.store is None or self._writes_failed:
            return False
        data = artifact.pack(ns + key, meta, payload, self.config.hmac_key)
        try:
            self.store.put(ns + key, data)
            return True
        except Exception as exc:  # noqa: BLE001 - full disk, read-only, locked database...
            self._writes_failed = True
            trouble(f"cannot write to the jitfreeze cache at {self.location}; "
                    "continuing without writing to it in this process", exc,
                    strict=self.config.strict, once=("write", self.location), key=key)
            return False

    @contextlib.contextmanager
    def lock(self, key: str):
        """Hold the key's lock; yields False (after one warning) when it timed out or failed."""
        if self.store is None:
            yield False
            return
        try:
            if self.lock_dir is None:
                lock = MemoryLock(self.location + key, self.config.lock_timeout)
            else:
                lock = KeyLock(self.lock_dir, key, self.config.lock_timeout)
            lock.__enter__()
        except LockTimeout as exc:
            trouble("another process has been compiling this function for longer than "
                    f"JITFREEZE_LOCK_TIMEOUT={self.config.lock_timeout:g}s; compiling here without "
                    "writing to the cache", exc, strict=self.config.strict, once=("lock", key), key=key)
            yield False
            return
        except Exception as exc:  # noqa: BLE001 - e.g. read-only lock directory
            trouble(f"cannot lock in the jitfreeze cache at {self.location}; compiling without writing", exc,
                    strict=self.config.strict, once=("lockfail", self.location), key=key)
            yield False
            return
        try:
            yield True
        finally:
            lock.__exit__(None, None, None)

    def clear(self) -> int:
        if self.store is None:
            return 0
        return self.store.clear()


# -- opening caches, once per directory per process ---------------------------------------------

_open: dict = {}
_open_lock = threading.Lock()
_cleared: set = set()


def forget_open_caches() -> None:
    """Drop the per-process registry (after fork, and in tests)."""
    global _open_lock
    _open.clear()
    _cleared.clear()
    _open_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    # A child must not share the parent's SQLite connections or locks.
    os.register_at_fork(after_in_child=forget_open_caches)


def _set_aside(db: Path) -> None:
    aside = db.with_name(f"{db.name}.corrupt-{int(time.time())}-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(db, aside)
        log.info("set aside a corrupt cache index: %s", aside)


def _open_store(path: Path, config: Config):
    prepare_directory(path, allow_unsafe=config.allow_unsafe_dir)
    try:
        return DiskStore(path, config.size_limit)
    except sqlite3.DatabaseError as exc:
        if "not a database" not in str(exc) and "malformed" not in str(exc):
            raise
        trouble(f"the jitfreeze cache index {path / DiskStore.DB_NAME} is corrupt; set it aside and "
                "starting an empty one", exc, strict=config.strict, once=("corrupt", str(path)))
        _set_aside(path / DiskStore.DB_NAME)
        return DiskStore(path, config.size_limit)


def open_cache(cache_dir, config: Config) -> PersistentCache:
    """The cache for ``cache_dir`` (a path, or a Store instance), opened once per process."""
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        return PersistentCache(cache_dir, config, None)   # a Store given directly
    path = Path(cache_dir if cache_dir is not None else config.cache_dir).expanduser()
    reg_key = (str(path), config.strict, config.hmac_key, config.size_limit, config.lock_timeout)
    with _open_lock:
        cache = _open.get(reg_key)
        if cache is not None:
            return cache
        try:
            store = _open_store(path, config)
        except UnsafeDirectory as exc:
            trouble(f"refusing the jitfreeze cache directory: {exc}. Running uncached; set "
                    "JITFREEZE_ALLOW_UNSAFE_CACHE_DIR=1 if you trust everyone who can write it", None,
                    strict=config.strict, once=("unsafe", str(path)))
            store = None
        except Exception as exc:  # noqa: BLE001 - read-only, permission, full disk, locked...
            trouble(f"cannot use the jitfreeze cache directory {path}; running uncached", exc,
                    strict=config.strict, once=("open", str(path)))
            store = None
        cache = PersistentCache(store, config, path if store is not None else None)
        cache.location = str(path)
        if store is not None and config.clear_cache and str(path) not in _cleared:
            _cleared.add(str(path))
            try:
                n = store.clear()
                log.info("JITFREEZE_CLEAR_CACHE=1: cleared %d entries from %s", n, path)
            except Exception as exc:  # noqa: BLE001
                trouble(f"cannot clear the jitfreeze cache at {path}", exc, strict=config.strict,
                        once=("clear", str(path)))
        _open[reg_key] = cache
        return cache


def clear_cache(cache_dir=None) -> int:
    """Empty the persistent cache (``cache_dir``, else ``JITFREEZE_CACHE_DIR``, else the default)."""
    config = Config.from_env()
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        return cache_dir.clear()
    path = Path(cache_dir if cache_dir is not None else config.cache_dir).expanduser()
    if not path.exists():
        return 0
    cache = open_cache(path, config)
    return cache.clear()


# Re-exported for tests that want a store without a directory.
MemoryStore = MemoryStore
