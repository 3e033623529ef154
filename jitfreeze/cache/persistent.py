"""The persistent cache as the decorator sees it: verified entries or a miss.

Ties a :class:`~jitfreeze.cache.store.Store` (the writable layer), the read-only layers
(:mod:`jitfreeze.cache.layers`), the remote tier (:class:`~jitfreeze.cache.remote.RemoteLink`),
the entry envelope (:mod:`jitfreeze.cache.envelope`), the key locks and the trust checks together, and
is the one place where cache trouble becomes "a miss plus one warning"
(:func:`jitfreeze.errors.trouble`). Nothing here raises to the caller unless
``JITFREEZE_STRICT=1``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

from ..config import Config
from ..errors import trouble
from . import envelope
from .disk import DiskStore, open_disk_store
from .files import UnsafeEntry
from .lock import KeyLock, LockTimeout, MemoryLock
from .store import FileBacked, InPlaceWritable, MemoryStore
from .trust import UnsafeDirectory, prepare_directory

__all__ = ["PersistentCache", "open_cache", "clear_cache", "forget_open_caches", "maintain"]

log = logging.getLogger("jitfreeze")

ARTIFACT = "a/"       # frozen artifacts, by graph key
INDEX = "i/"          # fingerprint -> graph key (the trace-free warm path)
DECISION = "d/"       # function + input structure -> which dims are dynamic
HINT = "h/"           # function + signature -> the graph to load while the fingerprint is computed


class FilePayload:
    """A verified artifact that stays in its file: loaded in place (``torch.jit.load(path)``)."""

    __slots__ = ("path", "size")

    def __init__(self, path: str, size: int):
        self.path = path
        self.size = size

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read(self.size)


class PersistentCache:
    """Verified get/put of entries; every failure is handled here."""

    def __init__(self, store, config: Config, lock_dir: Path | None):
        self.store = store                  # None: running uncached (trouble was reported)
        self.config = config
        self.lock_dir = lock_dir
        self.location = store.location if store is not None else "<none>"
        self._writes_failed = False
        self.layers: list = []              # read-only layers (JITFREEZE_CACHE_PATH), never written
        self._link = None                   # RemoteLink over the remote tier, or None
        self.journal = None                 # counters and miss records (jitfreeze.cache.stats), slow path only
        self._masked: set = set()           # full keys evicted here: not read again from layers or remote
        self._source = threading.local()

    @property
    def remote(self):
        """The remote tier (:class:`~jitfreeze.cache.remote.RemoteTier`, ``JITFREEZE_REMOTE_CACHE``) or None."""
        return self._link.tier if self._link is not None else None

    @remote.setter
    def remote(self, tier) -> None:
        if tier is None:
            self._link = None
            return
        from .remote import RemoteLink

        self._link = RemoteLink(tier, self.config, lambda: self.journal and self.journal.bump(("remote_errors",)))

    # -- reading ---------------------------------------------------------------------------

    def get(self, key: str, ns: str = ARTIFACT):
        """(meta, payload) of a verified entry, or None.

        Looks in the writable layer, then the read-only layers in order, then the remote tier
        (a remote hit is verified and stored locally). :meth:`where` names the source.
        """
        full = ns + key
        found, source, kind = None, None, None
        if self.store is not None:
            found, source, kind = self._get_from(self.store, key, ns), self.location, "local"
        if found is None and self.layers and full not in self._masked:
            for layer in self.layers:
                found, source, kind = self._get_from(layer, key, ns), layer.location, "layer"
                if found is not None:
                    break
        if found is None and self.remote is not None and full not in self._masked:
            found, source, kind = self._get_remote(key, ns), self.remote.location, "remote"
        if found is None:
            return None
        self._source.value = source
        if self.journal is not None:
            if ns == ARTIFACT:
                self.journal.bump(("loads", "loads_" + kind), full)
            elif ns == INDEX:
                self.journal.bump(("index_hits",))
        return found

    def where(self, key: str | None = None) -> str:
        """Where this thread's last entry came from (a directory, a layer, or the Redis URL)."""
        return getattr(self._source, "value", None) or self.location

    def _get_from(self, store, key: str, ns: str):
        location = store.location
        if ns == ARTIFACT and isinstance(store, FileBacked):
            found = self._get_file_from(store, key, ns, location)
            if found is not None:
                return found
        try:
            data = store.get(ns + key)
        except UnsafeEntry as exc:
            self._refuse(ns + key, f"refused an unsafe cache entry in {location}", exc, store)
            return None
        except Exception as exc:  # noqa: BLE001
            trouble(f"cannot read the jitfreeze cache at {location}; treating as a miss", exc,
                    strict=self.config.strict, once=("read", location), key=key)
            return None
        if data is None:
            return None
        try:
            return envelope.unpack(data, ns + key, self.config.hmac_key)
        except envelope.BadEntry as exc:
            self._refuse(ns + key, f"dropped a bad jitfreeze cache entry {key[:16]} in {location}", exc, store)
            return None

    def _get_file_from(self, store, key: str, ns: str, location: str):
        """(meta, FilePayload) for a file-backed entry, verified in one pass over the file; else None."""
        try:
            path = store.get_file(ns + key)
            if path is None:
                return None
            meta, size = envelope.unpack_file(path, ns + key, self.config.hmac_key)
        except envelope.BadEntry as exc:
            self._refuse(ns + key, f"dropped a bad jitfreeze cache entry {key[:16]} in {location}", exc, store)
            return None
        except Exception:  # noqa: BLE001 - let the bytes path decide (and report) what is wrong
            return None
        return meta, FilePayload(path, size)

    def evict(self, key: str, why: str, exc: BaseException | None = None, ns: str = ARTIFACT) -> None:
        """Drop an entry that verified but could not be used (e.g. torch.jit.load failed)."""
        self._masked.add(ns + key)          # a read-only layer keeps it; don't read it again here
        if self.journal is not None:
            self.journal.bump(("evictions",))
        self._refuse(ns + key, f"dropped jitfreeze cache entry {key[:16]} ({why})", exc)

    def _refuse(self, full_key: str, message: str, exc: BaseException | None, store=None) -> None:
        store = self.store if store is None else store
        if store is not None and not store.readonly:
            with contextlib.suppress(Exception):
                store.delete(full_key)
        location = store.location if store is not None else self.location
        trouble(message, exc, strict=self.config.strict, once=("bad", location, full_key))

    # -- the remote tier ---------------------------------------------------------------------

    def _get_remote(self, key: str, ns: str):
        full = ns + key
        data = self._link.get(full)
        if data is None:
            return None
        try:
            found = envelope.unpack(data, full, self.config.hmac_key)
        except envelope.BadEntry as exc:
            self._masked.add(full)
            trouble(f"refused a bad jitfreeze entry {key[:16]} from {self.remote.location}", exc,
                    strict=self.config.strict, once=("bad", self.remote.location, full))
            return None
        log.debug("jitfreeze: fetched %s (%d bytes) from %s", full[:18], len(data), self.remote.location)
        if self.store is not None and not self._writes_failed:
            try:
                self.store.put(full, data)      # the same verified envelope, stored as it came
            except Exception as exc:  # noqa: BLE001
                self.write_failed(exc, key)
        return found

    # -- writing ---------------------------------------------------------------------------

    def new_file(self):
        """A file in the writable layer (``.name``, ``.path``, ``.close()``: see
        :meth:`DiskStore.new_file`) that a large artifact can be written to directly and then
        stored by :meth:`put` without a copy; None where that is not possible (a memory store,
        no writable layer, writes failed here before). The caller closes it after :meth:`put`."""
        if self.store is None or self._writes_failed or not isinstance(self.store, InPlaceWritable):
            return None
        try:
            return self.store.new_file()
        except Exception as exc:  # noqa: BLE001 - full disk, read-only: the write will tell
            log.debug("jitfreeze: no value file in %s: %s", self.location, exc)
            return None

    def write_failed(self, exc: BaseException, key: str | None = None) -> None:
        """Writing to the writable layer failed (full disk, read-only, locked database...):
        one warning, and no more writes from this process."""
        self._writes_failed = True
        trouble(f"cannot write to the jitfreeze cache at {self.location}; "
                "continuing without writing to it in this process", exc,
                strict=self.config.strict, once=("write", self.location), key=key)

    def put(self, key: str, meta: dict, payload, ns: str = ARTIFACT, file=None) -> bool:
        """Store in the writable layer (never a read-only one) and publish to the remote tier.

        ``payload`` is bytes, or a saved artifact (``.path``, ``.read()``, ``.release()``).
        With ``file``, what :meth:`new_file` gave for that same path, the file becomes the
        entry in place (the envelope appended, the row inserted: no read, no copy) and the
        artifact is released to the cache."""
        if (self.store is None or self._writes_failed) and self.remote is None:
            return False
        full, hmac_key = ns + key, self.config.hmac_key
        stored, data = False, None
        if file is not None and self.store is not None and not self._writes_failed:
            try:
                envelope.seal_file(payload.path, full, meta, hmac_key)
                if self.remote is not None:
                    data = payload.read()      # the sealed entry, to publish
                payload.release()              # the cache's file now, whatever happens next
                self.store.put_file(full, file.name)
                stored = True
            except Exception as exc:  # noqa: BLE001
                self.write_failed(exc, key)
        else:
            if not isinstance(payload, bytes):
                payload = payload.read()
            data = envelope.pack(full, meta, payload, hmac_key)
            if self.store is not None and not self._writes_failed:
                try:
                    self.store.put(full, data)
                    stored = True
                except Exception as exc:  # noqa: BLE001 - full disk, read-only, locked database...
                    self.write_failed(exc, key)
        if ns == ARTIFACT and self.journal is not None:
            self._record_compile(key, meta)
        if data is not None and self._link is not None and self._link.publish(ns + key, data):
            stored = True
            log.debug("jitfreeze: published %s to %s", full[:18], self.remote.location)
        return stored

    def _record_compile(self, key: str, meta: dict) -> None:
        """Count the compile and keep its key parts for ``jitfreeze explain`` (slow path only)."""
        self.journal.bump(("compiles",))
        if isinstance(meta.get("part_digests"), dict):
            self.journal.record_miss({
                "time": time.time(), "key": ARTIFACT + key, "qualname": meta.get("qualname"),
                "parts": meta.get("parts"), "part_digests": meta.get("part_digests"),
                "signature": meta.get("signature"), "spec": meta.get("spec"), "device": meta.get("device"),
                "torch": meta.get("torch")})

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
            with self._link.lock(key, ARTIFACT + key) if self._link is not None else contextlib.nullcontext():
                yield True
        finally:
            lock.__exit__(None, None, None)

    def clear(self) -> int:
        """Empty the writable layer (read-only layers and the remote tier are left as they are)."""
        if self.store is None:
            return 0
        n = self.store.clear()
        if self.journal is not None:
            self.journal.clear()
        return n


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


def _open_store(path: Path, config: Config) -> DiskStore:
    prepare_directory(path, allow_unsafe=config.allow_unsafe_dir)
    store, problem = open_disk_store(path, config.size_limit, check_trust=not config.allow_unsafe_dir)
    if problem is not None:
        try:
            trouble(f"the jitfreeze cache index {path / DiskStore.DB_NAME} is corrupt; set it aside and "
                    "starting an empty one", problem.__cause__, strict=config.strict, once=("corrupt", str(path)))
        except BaseException:
            store.close()
            raise
        log.info("set aside a corrupt cache index: %s", problem.aside)
    return store


def open_cache(cache_dir, config: Config) -> PersistentCache:
    """The cache for ``cache_dir`` (a path, or a Store instance), opened once per process."""
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        cache = PersistentCache(cache_dir, config, None)   # a Store given directly
        _attach_tiers(cache, config, layers=())
        return cache
    path = Path(cache_dir if cache_dir is not None else config.cache_dir).expanduser()
    reg_key = (str(path), config.strict, config.hmac_key, config.size_limit, config.lock_timeout,
               config.cache_layers, config.remote_url, config.remote_timeout, config.remote_lock_ttl,
               config.allow_unsafe_dir)
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
        _attach_tiers(cache, config, layers=[p for p in config.cache_layers if Path(p).expanduser() != path])
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


def _attach_tiers(cache: PersistentCache, config: Config, layers) -> None:
    """The journal, the read-only layers and the remote tier of a newly opened cache."""
    from .stats import open_journal

    if cache.store is not None:
        cache.journal = open_journal(cache.store)
    trusted = bool(config.hmac_key) or config.allow_unsafe_dir
    if layers:
        from .layers import UnsafeLayer, open_layer  # tarfile & co.: only when layers are configured
    for path in layers:
        try:
            cache.layers.append(open_layer(path, trusted=trusted))
        except UnsafeLayer as exc:
            trouble(f"refusing the read-only jitfreeze cache layer: {exc}. Skipping it; set JITFREEZE_CACHE_KEY "
                    "(entries are then authenticated) or JITFREEZE_ALLOW_UNSAFE_CACHE_DIR=1", None,
                    strict=config.strict, once=("layer", str(path)))
        except Exception as exc:  # noqa: BLE001 - missing, unreadable, not a cache
            trouble(f"cannot read the read-only jitfreeze cache layer {path}; skipping it", exc,
                    strict=config.strict, once=("layer", str(path)))
    if config.remote_url:
        from .remote import RemoteTier, redact

        url = redact(config.remote_url)
        if not trusted:
            trouble(f"not using the jitfreeze remote cache {url}: entries from a shared Redis run code when "
                    "loaded, and it has no signature to check. Set JITFREEZE_CACHE_KEY (the same key on every "
                    "machine), or JITFREEZE_ALLOW_UNSAFE_CACHE_DIR=1 if you trust everyone who can write to it",
                    None, strict=config.strict, once=("remote-unsafe", url))
            return
        try:
            cache.remote = RemoteTier(config.remote_url, config.remote_timeout, config.remote_lock_ttl)
        except ImportError as exc:
            trouble(f"JITFREEZE_REMOTE_CACHE={url} needs the redis package (pip install redis); "
                    "using the local cache only", exc, strict=config.strict, once=("remote-import", url))
        except Exception as exc:  # noqa: BLE001 - e.g. a malformed URL
            trouble(f"cannot use the jitfreeze remote cache {url}; using the local cache only", exc,
                    strict=config.strict, once=("remote", url))


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


def maintain(cache_dir=None, *, verify: bool = False, min_age: float = 600.0) -> dict:
    """Repair a cache directory after crashes or tampering: :func:`jitfreeze.cache.repair.maintain`."""
    from .repair import maintain as run

    return run(cache_dir, verify=verify, min_age=min_age)
