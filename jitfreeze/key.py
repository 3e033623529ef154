"""Cache keys: a sha256 over named parts, each part logged at DEBUG.

Canonicalized before hashing: the graph's generated code (no source ranges,
no debug names, no addresses), tensor bytes rather than pickles, stable
``repr`` of constants. Deliberately excluded: the function's file path and line
numbers, the cache directory, process ids, the time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import platform
import sys

import torch

__all__ = ["FORMAT_VERSION", "KeyParts", "device_text", "environment_parts"]

log = logging.getLogger("jitfreeze")

#: Bump when the artifact layout or anything the key covers changes meaning.
FORMAT_VERSION = 1


def device_text(device: torch.device) -> str:
    """Device type and index; for CUDA also the compute capability and name."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{index} sm_{major}{minor} {torch.cuda.get_device_name(index)}"
    if device.index is None:
        return device.type
    return f"{device.type}:{device.index}"


def environment_parts() -> list[tuple[str, str]]:
    from . import __version__

    return [
        ("format", str(FORMAT_VERSION)),
        ("jitfreeze", __version__),
        ("torch", torch.__version__),
        ("python", f"{platform.python_implementation()} {'.'.join(map(str, sys.version_info[:3]))}"),
    ]


@dataclasses.dataclass
class KeyParts:
    """Named parts of a key: each value is the readable text; the key hashes them all."""

    parts: list = dataclasses.field(default_factory=list)

    def add(self, name: str, text: str) -> "KeyParts":
        self.parts.append((name, text))
        return self

    def digests(self) -> dict:
        return {name: hashlib.sha256(text.encode()).hexdigest() for name, text in self.parts}

    def key(self, what: str = "key") -> str:
        h = hashlib.sha256()
        debug = log.isEnabledFor(logging.DEBUG)
        for name, text in self.parts:
            part = hashlib.sha256(text.encode()).hexdigest()
            h.update(f"{name}={part}\n".encode())
            if debug:
                shown = text if len(text) <= 120 else text[:117] + "..."
                log.debug("key part %-10s %s  %s  [%s]", name, part[:16], shown, what)
        key = h.hexdigest()
        if debug:
            log.debug("key = %s  [%s]", key, what)
        return key

    def summary(self) -> dict:
        """Readable texts (long ones shortened to their digest) for explain and listings."""
        out = {}
        for name, text in self.parts:
            out[name] = text if len(text) <= 200 else "sha256:" + hashlib.sha256(text.encode()).hexdigest()
        return out
