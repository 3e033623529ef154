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

from .digest import digest_tensors

__all__ = ["FORMAT_VERSION", "INDEX_VERSION", "KeyParts", "device_text", "environment_parts", "graph_key",
           "hint_key", "index_key", "decision_key", "graph_text", "tensor_layout"]

log = logging.getLogger("jitfreeze")

#: Bump when the artifact layout or anything the key covers changes meaning.
FORMAT_VERSION = 1

# Part of every index key. 4: index entries written before symbolic traces guarded the sizes they
# turned into numbers (and sizes 0/1) hold no guard for them: never served. 5: fingerprints made
# before the walk refused what it cannot hash (it skipped it): never trusted.
INDEX_VERSION = "5"


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
    from .version import __version__

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


def graph_text(traced) -> str:
    """Canonical text of the graph: generated code, no source ranges, no addresses."""
    return traced.graph_module.code


def tensor_layout(t: torch.Tensor) -> list:
    """What a bound weight must look like for the graph saved against it to run on it."""
    return [str(t.dtype).removeprefix("torch."), list(t.shape), list(t.stride()), t.storage_offset(), str(t.device)]


# -- the three recipes: the graph key, the fingerprint index's key, the dynamic-shape decision's key --

def _devices_text(call, tensors) -> str:
    """The call's devices, then those of the weights not among them."""
    devices = list(call.devices)
    for t in tensors:
        if t.device not in devices:
            devices.append(t.device)
    return ",".join(device_text(d) for d in devices) or "none"


def graph_key(name: str, backend: str, call, traced, texts, bindings: dict) -> tuple[str, KeyParts]:
    """The key of a traced graph (``name``: the function's, for the DEBUG log): (key, its parts).
    ``bindings``: {graph attribute: the module's name for it} (the weights bound at load)."""
    parts = KeyParts(environment_parts())
    parts.add("backend", backend)
    parts.add("device", _devices_text(call, [t for _, t in traced.constants]))
    parts.add("signature", call.signature_text(texts))
    if traced.guards:
        parts.add("guards", "\n".join(traced.guards))
    parts.add("graph", graph_text(traced))
    parts.add("weights", digest_tensors([t for _, t in traced.constants]))
    if bindings:
        layouts = dict(traced.constants)
        parts.add("bindings", "\n".join(f"{attr}={name} {tensor_layout(layouts[attr])}"
                                         for attr, name in bindings.items()))
    return parts.key(name), parts


def index_key(name: str, backend: str, call, texts, digest: str, tensors) -> str:
    """The fingerprint index's key for a call: no trace, the function's code and weights
    (``digest``, over ``tensors``) in place of its graph."""
    parts = KeyParts(environment_parts())
    parts.add("backend", backend)
    parts.add("index", INDEX_VERSION)
    parts.add("device", _devices_text(call, tensors))
    parts.add("signature", call.signature_text(texts))
    parts.add("code+weights", digest)
    return parts.key(name + " (index)")


def hint_key(name: str, backend: str, call, texts) -> str:
    """The key of a call's speculation hint (:mod:`jitfreeze.runtime.speculate`): the index key
    without the fingerprint, known before the walk."""
    parts = KeyParts(environment_parts())
    parts.add("backend", backend)
    parts.add("index", INDEX_VERSION)
    parts.add("signature", call.signature_text(texts))
    return parts.key(name + " (hint)")


def decision_key(name: str, call, tensors) -> str:
    """The key of the automatic dynamic-shape decision for a call's structure (not its sizes)."""
    parts = KeyParts(environment_parts())
    parts.add("function", name)
    parts.add("structure", call.spec_text() + "\n" + "\n".join(
        f"{t.dtype} {t.device} ndim={t.dim()}" for t in tensors) + "\n" + "\n".join(
        call.texts[i] for i, _ in call.consts))
    return parts.key(name + " (dynamic decision)")
