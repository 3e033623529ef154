"""The stored entry: metadata + payload, with a checksum and an optional HMAC.

Layout (all integers big-endian)::

    MAGIC (8) | flags (1) | meta_len (4) | payload_len (8) | meta (JSON) | payload
    | sha256 of everything before (32) | HMAC-SHA256 of the same (32, if flags & SIGNED)

The checksum is checked before anything reads the payload, so a truncated or
bit-flipped entry never reaches ``torch.jit.load``. The metadata names the key
it was stored under, so an entry copied under another key is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct

__all__ = ["pack", "unpack", "peek_meta", "BadEntry"]

MAGIC = b"JITFRZ\x00\x01"
SIGNED = 1
_HEAD = struct.Struct(">8sBIQ")
_SUM = 32


class BadEntry(Exception):
    """The entry is truncated, corrupt, unsigned or wrongly signed, or stored under another key."""


def pack(key: str, meta: dict, payload: bytes, hmac_key: bytes | None = None) -> bytes:
    meta = dict(meta, key=key)
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    flags = SIGNED if hmac_key else 0
    body = _HEAD.pack(MAGIC, flags, len(meta_bytes), len(payload)) + meta_bytes + payload
    out = body + hashlib.sha256(body).digest()
    if hmac_key:
        out += hmac.new(hmac_key, body, hashlib.sha256).digest()
    return out


def _split(data: bytes):
    if type(data) is not bytes:
        raise BadEntry(f"entry is {type(data).__name__}, not bytes")
    if len(data) < _HEAD.size + _SUM:
        raise BadEntry(f"entry truncated ({len(data)} bytes)")
    magic, flags, meta_len, payload_len = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise BadEntry("not a jitfreeze entry (bad magic)")
    body_len = _HEAD.size + meta_len + payload_len
    expected = body_len + _SUM + (_SUM if flags & SIGNED else 0)
    if len(data) != expected:
        raise BadEntry(f"entry truncated or padded ({len(data)} bytes, expected {expected})")
    return flags, meta_len, body_len


def unpack(data: bytes, key: str, hmac_key: bytes | None = None) -> tuple[dict, bytes]:
    flags, meta_len, body_len = _split(data)
    body = memoryview(data)[:body_len]
    if not hmac.compare_digest(hashlib.sha256(body).digest(), data[body_len:body_len + _SUM]):
        raise BadEntry("checksum mismatch (corrupt entry)")
    if hmac_key is not None:
        if not flags & SIGNED:
            raise BadEntry("entry is not signed and JITFREEZE_CACHE_KEY is set")
        sig = hmac.new(hmac_key, body, hashlib.sha256).digest()
        if not hmac.compare_digest(sig, data[body_len + _SUM:]):
            raise BadEntry("entry signature does not match JITFREEZE_CACHE_KEY")
    start = _HEAD.size
    try:
        meta = json.loads(bytes(data[start:start + meta_len]))
    except ValueError as exc:
        raise BadEntry(f"unreadable metadata: {exc}") from None
    if not isinstance(meta, dict) or meta.get("key") != key:
        raise BadEntry("entry was stored under another key")
    return meta, data[start + meta_len:body_len]


def peek_meta(data: bytes) -> dict:
    """Metadata of an entry after checking its checksum (no key or signature check)."""
    flags, meta_len, body_len = _split(data)
    if hashlib.sha256(memoryview(data)[:body_len]).digest() != data[body_len:body_len + _SUM]:
        raise BadEntry("checksum mismatch (corrupt entry)")
    return json.loads(bytes(data[_HEAD.size:_HEAD.size + meta_len]))
