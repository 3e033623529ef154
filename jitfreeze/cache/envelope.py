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
:func:`unpack_file` verified it in one pass (a read-only mapping) — no copy of the artifact in memory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import mmap
import os
import struct

try:
    import xxhash as _xxhash
except ImportError:  # pragma: no cover - xxhash is a declared dependency
    _xxhash = None

__all__ = ["pack", "seal_file", "unpack", "unpack_file", "peek_meta", "read_meta", "BadEntry", "MAX_META"]

MAGIC = b"JITFRZ\x00\x02"
SIGNED = 1
XXH3, SHA256 = 1, 2
_LENS = struct.Struct(">IQBB")
_TRAILER = _LENS.size + 32 + 32 + len(MAGIC)
MAX_META = 48 * 1024
_CHUNK = 2**20


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


def _chunks(f, limit: int):
    """Up to ``limit`` bytes of ``f`` from where it is, as views of one reused buffer (each is
    only valid until the next): no allocation per chunk, 4-6x faster than ``f.read(n)`` chunks
    on a file in the page cache (11 MB: 4 ms vs 20-30 ms; 434 MB: 80 ms vs 180-290 ms)."""
    buf = memoryview(bytearray(min(_CHUNK, max(limit, 1))))
    pos = 0
    while pos < limit:
        n = f.readinto(buf[:min(len(buf), limit - pos)])
        if not n:
            return
        yield buf[:n]
        pos += n


def _tail(key: str, meta: dict, payload_chunks, payload_len: int, hmac_key: bytes | None) -> bytes:
    """meta | trailer for a payload given as chunks (hashed in one pass)."""
    meta = dict(meta, key=key)
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    if len(meta_bytes) > MAX_META:
        raise ValueError(f"entry metadata is {len(meta_bytes)} bytes (at most {MAX_META})")
    flags = SIGNED if hmac_key else 0
    algorithm = XXH3 if _xxhash is not None else SHA256
    lens = _LENS.pack(len(meta_bytes), payload_len, flags, algorithm)
    h = _hasher(algorithm)
    mac = hmac.new(hmac_key, digestmod=hashlib.sha256) if hmac_key else None
    seen = 0
    for part in payload_chunks:
        seen += len(part)
        h.update(part)
        if mac is not None:
            mac.update(part)
    if seen != payload_len:
        raise BadEntry(f"payload changed while sealing ({seen} bytes, expected {payload_len})")
    for part in (meta_bytes, lens):
        h.update(part)
        if mac is not None:
            mac.update(part)
    digest = _digest(h)
    signature = b"\0" * 32
    if mac is not None:
        mac.update(digest)
        signature = mac.digest()
    return b"".join((meta_bytes, lens, digest, signature, MAGIC))


def pack(key: str, meta: dict, payload: bytes, hmac_key: bytes | None = None) -> bytes:
    return payload + _tail(key, meta, (payload,), len(payload), hmac_key)


def seal_file(path: str | os.PathLike, key: str, meta: dict, hmac_key: bytes | None = None) -> int:
    """Turn a file holding a payload into an entry in place (append meta and trailer): the
    same bytes :func:`pack` would give, without reading the payload into memory. Returns the
    entry's size."""
    with open(path, "r+b") as f:
        payload_len = os.fstat(f.fileno()).st_size
        tail = _tail(key, meta, _chunks(f, payload_len), payload_len, hmac_key)
        f.seek(payload_len)
        f.write(tail)
        f.truncate()
        return payload_len + len(tail)


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
    """(meta, payload length) of a verified entry in a file, hashed in one pass (through a
    read-only mapping, or read in chunks where the file can't be mapped)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _TRAILER:
                raise BadEntry(f"entry truncated ({size} bytes)")
            f.seek(size - _TRAILER)
            meta_len, payload_len, flags, algorithm, lens, digest, signature = \
                _parse_trailer(f.read(_TRAILER), size)
            h = _hasher(algorithm)
            mac = hmac.new(hmac_key, digestmod=hashlib.sha256) if hmac_key is not None else None
            meta_bytes = _hash_mapped(f, payload_len, meta_len, h, mac)
            if meta_bytes is None:
                meta_bytes = _hash_read(f, payload_len, meta_len, h, mac)
    except FileNotFoundError:
        raise          # evicted or replaced since it was looked up: a miss, not a bad entry
    except OSError as exc:
        raise BadEntry(f"unreadable entry file: {exc}") from None
    _check(h, mac, lens, digest, signature, flags, hmac_key)
    return _meta(meta_bytes, key), payload_len


def _hash_mapped(f, payload_len: int, meta_len: int, h, mac) -> bytes | None:
    """Hash the body of an entry file through a read-only mapping: the metadata bytes, or None
    where the file can't be mapped. The hash reads the page cache in place: 22 MB in 2.5 ms
    where copying it out in chunks (:func:`_hash_read`) takes 5-17 ms. Value files are never
    truncated or rewritten in place (a new value gets a new file, removal unlinks it, which
    leaves a mapping valid), so the mapping cannot lose pages under the hash."""
    body_len = payload_len + meta_len
    try:
        mapped = mmap.mmap(f.fileno(), body_len, access=mmap.ACCESS_READ)
    except (OSError, ValueError):       # an empty body, a file system without mmap
        return None
    with mapped:
        h.update(mapped)
        if mac is not None:
            mac.update(mapped)
        return mapped[payload_len:body_len]


def _hash_read(f, payload_len: int, meta_len: int, h, mac) -> bytes:
    """Hash the body of an entry file read in chunks: the metadata bytes."""
    f.seek(0)
    body_len, pos, meta_parts = payload_len + meta_len, 0, []
    for chunk in _chunks(f, body_len):
        h.update(chunk)
        if mac is not None:
            mac.update(chunk)
        if pos + len(chunk) > payload_len:           # the chunk reaches into the metadata
            meta_parts.append(bytes(chunk[max(0, payload_len - pos):]))
        pos += len(chunk)
    if pos < body_len:
        raise BadEntry("entry truncated while reading")
    return b"".join(meta_parts)


def peek_meta(data: bytes) -> dict:
    """Metadata of an entry after checking its checksum (no key or signature check)."""
    meta, _ = _verify_bytes(data, None, None)
    return meta


def read_meta(reader) -> dict:
    """The metadata of an entry read through ``reader`` (``.size``, ``.read(offset, n)``): its
    trailer and metadata only, no checksum (listings, which never read payloads); raises BadEntry."""
    size = reader.size
    if size < _TRAILER:
        raise BadEntry(f"entry truncated ({size} bytes)")
    meta_len, payload_len = _parse_trailer(reader.read(size - _TRAILER, _TRAILER), size)[:2]
    if meta_len > MAX_META:
        raise BadEntry(f"entry metadata is {meta_len} bytes (at most {MAX_META})")
    meta_bytes = reader.read(payload_len, meta_len)
    if len(meta_bytes) < meta_len:
        raise BadEntry("entry truncated while reading")
    return _meta(meta_bytes, None)
