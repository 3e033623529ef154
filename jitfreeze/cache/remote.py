"""The remote tier: a shared Redis behind the local cache (``JITFREEZE_REMOTE_CACHE``).

Values are the same verified envelopes the local cache holds (never pickles),
under ``jitfreeze:<format>:a/<graph key>`` and ``jitfreeze:<format>:i/<index
key>``. One process in the fleet compiles a key at a time: :class:`RemoteLock`
is ``SET lock token NX PX ttl``, renewed while the compile runs and released
only by its holder (compare-and-delete in Lua). Waiters poll with a bounded
wait and stop as soon as the artifact is published.

:class:`RemoteTier` and :class:`RemoteLock` raise on trouble (down, slow, refused);
:class:`RemoteLink` is how :mod:`jitfreeze.cache.persistent` uses them: trouble is one warning,
then the local cache only for :data:`REMOTE_RETRY_AFTER` seconds. Every operation is bounded by
``JITFREEZE_REMOTE_TIMEOUT`` (no retries).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from urllib.parse import urlsplit, urlunsplit

from ..errors import trouble
from ..key import FORMAT_VERSION

__all__ = ["RemoteTier", "RemoteLock", "RemoteLink", "redact", "MAX_VALUE", "REMOTE_RETRY_AFTER"]

log = logging.getLogger("jitfreeze")

#: Redis strings hold at most 512 MB; larger entries stay local.
MAX_VALUE = 512 * 2**20 - 4096
REMOTE_RETRY_AFTER = 30.0     # seconds without the remote tier after it failed

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end
"""
_EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end
"""


def redact(url: str) -> str:
    """The URL without its password (for logs and messages)."""
    try:
        parts = urlsplit(url)
        if parts.password is None and parts.username is None:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    except ValueError:
        return "<redis>"


class RemoteTier:
    """A Redis client with bounded timeouts, keys namespaced by the cache format."""

    def __init__(self, url: str, timeout: float = 1.0, lock_ttl: float = 60.0):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.location = redact(url)
        self.timeout = timeout
        self.lock_ttl = lock_ttl
        self.prefix = f"jitfreeze:{FORMAT_VERSION}:"
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False, health_check_interval=0, single_connection_client=False)
        self._release = self.client.register_script(_RELEASE)
        self._extend = self.client.register_script(_EXTEND)

    def name(self, full_key: str) -> str:
        return self.prefix + full_key

    def get(self, full_key: str) -> bytes | None:
        value = self.client.get(self.name(full_key))
        if value is None:
            return None
        return bytes(value)

    def exists(self, full_key: str) -> bool:
        return bool(self.client.exists(self.name(full_key)))

    def put(self, full_key: str, data: bytes) -> bool:
        if len(data) > MAX_VALUE:
            log.debug("jitfreeze: %s is %d bytes, too large for Redis; kept local", full_key[:18], len(data))
            return False
        self.client.set(self.name(full_key), data)
        return True

    def ping(self) -> bool:
        return bool(self.client.ping())

    def keys(self, pattern: str = "*"):
        return [k.decode() if isinstance(k, bytes) else k
                for k in self.client.scan_iter(match=self.prefix + pattern, count=500)]

    def clear(self) -> int:
        n = 0
        for name in self.keys():
            n += int(self.client.delete(name))
        return n

    def lock(self, key: str) -> "RemoteLock":
        return RemoteLock(self, key)

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass


class RemoteLock:
    """The fleet-wide compile lock on one graph key."""

    def __init__(self, tier: RemoteTier, key: str):
        self.tier = tier
        self.key = key
        self.name = tier.prefix + "lock/" + key
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"
        self.ttl_ms = max(int(tier.lock_ttl * 1000), 1000)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.held = False

    def acquire(self, wait: float, published: str) -> str:
        """``"acquired"``; ``"published"`` when ``published`` (a full key) appeared while waiting;
        ``"timeout"`` after ``wait`` seconds. Raises on Redis errors."""
        client = self.tier.client
        deadline = time.monotonic() + max(wait, 0.0)
        delay = 0.02
        waited = False
        while True:
            if client.set(self.name, self.token, nx=True, px=self.ttl_ms):
                self.held = True
                self._start_renewer()
                if waited:
                    log.debug("jitfreeze: took the remote lock on %s", self.key[:16])
                return "acquired"
            if self.tier.exists(published):
                return "published"
            if not waited:
                waited = True
                holder = client.get(self.name)
                log.info("jitfreeze: %s is being compiled by %s; waiting for it (up to %.0fs)", self.key[:16],
                         holder.decode(errors="replace") if isinstance(holder, bytes) else holder, wait)
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, 0.5)

    def _start_renewer(self) -> None:
        period = self.ttl_ms / 3000.0

        def renew():
            while not self._stop.wait(period):
                try:
                    if not self.tier._extend(keys=[self.name], args=[self.token, self.ttl_ms]):
                        log.debug("jitfreeze: lost the remote lock on %s", self.key[:16])
                        return
                except Exception as exc:  # noqa: BLE001 - the lock then expires on its own
                    log.debug("jitfreeze: cannot renew the remote lock on %s: %s", self.key[:16], exc)
                    return

        self._renewer = threading.Thread(target=renew, name="jitfreeze-remote-lock", daemon=True)
        self._renewer.start()

    def release(self) -> None:
        """Release if still ours (compare-and-delete); errors are left to the lock's expiry."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=self.tier.timeout + 1.0)
        if not self.held:
            return
        self.held = False
        try:
            self.tier._release(keys=[self.name], args=[self.token])
        except Exception as exc:  # noqa: BLE001
            log.debug("jitfreeze: cannot release the remote lock on %s (it expires): %s", self.key[:16], exc)


class RemoteLink:
    """The remote tier as the persistent cache uses it: nothing here raises. Redis down, slow or
    refusing is one warning (``count_error`` is called too), then the local cache only for
    :data:`REMOTE_RETRY_AFTER` seconds."""

    def __init__(self, tier: RemoteTier, config, count_error=None):
        self.tier, self.config, self._count_error = tier, config, count_error
        self._down_until = 0.0

    def ok(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self, exc: BaseException, what: str) -> None:
        self._down_until = time.monotonic() + REMOTE_RETRY_AFTER
        if self._count_error is not None:
            self._count_error()
        trouble(f"the jitfreeze remote cache {self.tier.location} failed ({what}); carrying on with the "
                f"local cache (retrying the remote in {REMOTE_RETRY_AFTER:g}s)", exc,
                strict=self.config.strict, once=("remote", self.tier.location))

    def get(self, full_key: str) -> bytes | None:
        if not self.ok():
            return None
        try:
            return self.tier.get(full_key)
        except Exception as exc:  # noqa: BLE001 - down, slow, refused
            self.failed(exc, "get")
            return None

    def publish(self, full_key: str, data: bytes) -> bool:
        if not self.ok():
            return False
        try:
            return self.tier.put(full_key, data)
        except Exception as exc:  # noqa: BLE001
            self.failed(exc, "publish")
            return False

    @contextlib.contextmanager
    def lock(self, key: str, published: str):
        """The fleet-wide compile lock (graph keys only; ``published``: the full key whose
        publication ends a wait); on Redis trouble, one warning and no lock."""
        if not self.ok() or len(key) != 64 or key.strip("0123456789abcdef"):
            yield           # e.g. "index-<key>": a local read-modify-write, nothing to compile
            return
        handle = self.tier.lock(key)
        try:
            state = handle.acquire(self.config.lock_timeout, published)
        except Exception as exc:  # noqa: BLE001
            handle.release()
            self.failed(exc, "lock")
            yield
            return
        if state == "timeout":
            log.info("jitfreeze: waited %.0fs for another machine compiling %s; compiling here",
                     self.config.lock_timeout, key[:16])
        try:
            yield
        finally:
            handle.release()
