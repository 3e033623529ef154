"""The stored entry: payload + metadata, with a checksum and an optional HMAC.

Layout (integers big-endian)::

    payload | meta (JSON) | trailer

    trailer = meta_len (4) | payload_len (8) | flags (1) | algorithm (1)
              | digest (32) | HMAC-SHA256 (32, zeros unless flags & SIGNED) | MAGIC (8)

The digest (xxh3-128, or sha256 where xxhash is missing) covers the payload, the metadata and
the trailer's length fields; the HMAC, when ``JITFREEZE_CACHE_KEY`` is set, covers the same
bytes and the digest. Both are checked before anything reads the payload, so a truncated or
bit-flipped entry never reaches ``torch.jit.load``. The metadata names the key it was stored
under, so an entry copied under another key is refused.

The payload comes first so that a file-backed entry *is* a loadable archive: zip readers find
their central directory from the end and skip up to 64 KiB of trailing bytes (the metadata and
trailer are kept under 48 KiB), so ``torch.jit.load(path)`` reads the file in place after
:func:`unpack_file` verified it in a streaming pass — no copy of the artifact in memory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct

try:
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - xxhash is a declared dependency
    _xxhash = None

__all__ = ["pack", "unpack", "unpack_file", "peek_meta", "BadEntry", "MAX_META"]

MAGIC = b"JITFRZ\x00\x02"
SIGNED = 1
XXH3, SHA256 = 1, 2
_LENS = struct.Struct(">IQBB")
_TRAILER = _LENS.size + 32 + 32 + len(MAGIC)
MAX_META = 48 * 1024
_CHUNK = 8 * 2**20


class BadEntry(Exception):
    """The entry is truncated, corrupt, unsigned or wrongly signed, or stored under another key."""


def _hasher(algorithm: int):
    if algorithm == XXH3 and _xxhash is not None:
        return _xxhash.xxh3_128()
    if algorithm == SHA256:
        return hashlib.sha256()
    raise BadEntry(f"unknown checksum algorithm {algorithm}")


def _digest(h) -> bytes:
    return h.digest().ljust(32, b"\0")


def pack(key: str, meta: dict, payload: bytes, hmac_key: bytes | None = None) -> bytes:
    meta = dict(meta, key=key)
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    if len(meta_bytes) > MAX_META:
        raise ValueError(f"entry metadata is {len(meta_bytes)} bytes (at most {MAX_META})")
    flags = SIGNED if hmac_key else 0
    algorithm = XXH3 if _xxhash is not None else SHA256
    lens = _LENS.pack(len(meta_bytes), len(payload), flags, algorithm)
    h = _hasher(algorithm)
    mac = hmac.new(hmac_key, digestmod=hashlib.sha256) if hmac_key else None
    for part in (payload, meta_bytes, lens):
        h.update(part)
        if mac is not None:
            mac.update(part)
    digest = _digest(h)
    signature = b"\0" * 32
    if mac is not None:
        mac.update(digest)
        signature = mac.digest()
    return b"".join((payload, meta_bytes, lens, digest, signature, MAGIC))


def _parse_trailer(trailer: bytes, total: int):
    if len(trailer) != _TRAILER or trailer[-len(MAGIC):] != MAGIC:
        raise BadEntry("not a jitfreeze entry or truncated (bad trailer)")
    meta_len, payload_len, flags, algorithm = _LENS.unpack_from(trailer)
    expected = payload_len + meta_len + _TRAILER
    if total != expected:
        raise BadEntry(f"entry truncated or padded ({total} bytes, expected {expected})")
    digest = trailer[_LENS.size:_LENS.size + 32]
    signature = trailer[_LENS.size + 32:_LENS.size + 64]
    return meta_len, payload_len, flags, algorithm, trailer[:_LENS.size], digest, signature


def _check(h, mac, lens, digest, signature, flags, hmac_key):
    h.update(lens)
    if not hmac.compare_digest(_digest(h), digest):
        raise BadEntry("checksum mismatch (corrupt entry)")
    if hmac_key is not None:
        if not flags & SIGNED:
            raise BadEntry("entry is not signed and JITFREEZE_CACHE_KEY is set")
        mac.update(lens)
        mac.update(digest)
        if not hmac.compare_digest(mac.digest(), signature):
            raise BadEntry("entry signature does not match JITFREEZE_CACHE_KEY")


def _meta(meta_bytes: bytes, key: str | None) -> dict:
    try:
        meta = json.loads(meta_bytes)
    except ValueError as exc:
        raise BadEntry(f"unreadable metadata: {exc}") from None
    if not isinstance(meta, dict) or (key is not None and meta.get("key") != key):
        raise BadEntry("entry was stored under another key")
    return meta


def _verify_bytes(data: bytes, key: str | None, hmac_key: bytes | None):
    if type(data) is not bytes:
        raise BadEntry(f"entry is {type(data).__name__}, not bytes")
    if len(data) < _TRAILER:
        raise BadEntry(f"entry truncated ({len(data)} bytes)")
    meta_len, payload_len, flags, algorithm, lens, digest, signature = \
        _parse_trailer(data[-_TRAILER:], len(data))
    body = memoryview(data)[:payload_len + meta_len]
    h = _hasher(algorithm)
    h.update(body)
    mac = None
    if hmac_key is not None:
        mac = hmac.new(hmac_key, digestmod=hashlib.sha256)
        mac.update(body)
    _check(h, mac, lens, digest, signature, flags, hmac_key)
    return _meta(bytes(body[payload_len:]), key), payload_len


def unpack(data: bytes, key: str, hmac_key: bytes | None = None) -> tuple[dict, bytes]:
    """(meta, payload) of a verified entry held in memory; raises BadEntry."""
    meta, payload_len = _verify_bytes(data, key, hmac_key)
    return meta, data[:payload_len]


def unpack_file(path: str | os.PathLike, key: str, hmac_key: bytes | None = None) -> tuple[dict, int]:
    """(meta, payload length) of a verified entry in a file, read in a streaming pass."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _TRAILER:
                raise BadEntry(f"entry truncated ({size} bytes)")
            f.seek(size - _TRAILER)
            meta_len, payload_len, flags, algorithm, lens, digest, signature = \
                _parse_trailer(f.read(_TRAILER), size)
            f.seek(0)
            h = _hasher(algorithm)
            mac = hmac.new(hmac_key, digestmod=hashlib.sha256) if hmac_key is not None else None
            body_len, pos, meta_parts = payload_len + meta_len, 0, []
            while pos < body_len:
                chunk = f.read(min(_CHUNK, body_len - pos))
                if not chunk:
                    raise BadEntry("entry truncated while reading")
                h.update(chunk)
                if mac is not None:
                    mac.update(chunk)
                if pos + len(chunk) > payload_len:           # the chunk reaches into the metadata
                    meta_parts.append(chunk[max(0, payload_len - pos):])
                pos += len(chunk)
            meta_bytes = b"".join(meta_parts)
    except FileNotFoundError:
        raise          # evicted or replaced since it was looked up: a miss, not a bad entry
    except OSError as exc:
        raise BadEntry(f"unreadable entry file: {exc}") from None
    _check(h, mac, lens, digest, signature, flags, hmac_key)
    return _meta(meta_bytes, key), payload_len


def peek_meta(data: bytes) -> dict:
    """Metadata of an entry after checking its checksum (no key or signature check)."""
    meta, _ = _verify_bytes(data, None, None)
    return meta
