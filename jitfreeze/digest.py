"""Digests of tensors (the weights) and of text, for keys and checksums."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import torch

__all__ = ["tensor_bytes", "digest_tensors", "sha256_hex"]

# Tensors larger than this are hashed on worker threads (hashlib releases the GIL).
_THREAD_MIN_BYTES = 4 * 2**20
_CHUNK = 64 * 2**20


def sha256_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's elements as bytes (row-major), without a copy when it is contiguous on CPU."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    elif t.element_size() and t.dtype not in (torch.uint8,):
        t = t.view(torch.uint8)
    return memoryview(t.numpy()).cast("B")


def _hash_one(t: torch.Tensor) -> bytes:
    h = hashlib.sha256()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    data = tensor_bytes(t)
    for start in range(0, len(data), _CHUNK):
        h.update(data[start:start + _CHUNK])
    return h.digest()


def digest_tensors(tensors: Iterable[torch.Tensor]) -> str:
    """One sha256 hex over the dtype, shape and bytes of each tensor, in order."""
    tensors = list(tensors)
    big = sum(t.numel() * t.element_size() for t in tensors) >= _THREAD_MIN_BYTES and len(tensors) > 1
    if big:
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="jitfreeze-hash") as pool:
            parts = list(pool.map(_hash_one, tensors))
    else:
        parts = [_hash_one(t) for t in tensors]
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()
