"""What a function's signatures resolved to: :meth:`JitFreezeFunction.signatures` and its records.

Read-only views of the decorator's in-process state, for debugging and tests; nothing here runs
on the hot path.
"""

from __future__ import annotations

import dataclasses

from torch.utils import _pytree as pytree

__all__ = ["Signature", "signature_records", "key_text"]


@dataclasses.dataclass(frozen=True)
class Signature:
    """One signature a :class:`~jitfreeze.runtime.function.JitFreezeFunction` has met in this process.

    text: the call's leaves in order, e.g. ``(4x8 float32, int:3)`` (tensors: sizes, dtype, and the
        device, strides and ``requires_grad`` where they are not the plain ones).
    source: where its entry came from: ``"compiled"`` (compiled here and stored), ``"unstored"``
        (compiled here, the cache could not store it), ``"cache"`` (loaded by graph key after a
        trace), ``"index"`` (loaded from the fingerprint index, no trace), or ``"eager"`` (it
        runs the original function; ``reason`` says why).
    reason: why it runs eagerly (``source == "eager"``), else None.
    key: the graph key of the artifact it runs (None when eager).
    dynamic: served by a graph traced with symbolic sizes (one graph for several shapes).
    watched: each hit checks freshness first (weights, module tree, globals: ``jitfreeze.runtime.watch``);
        False where the graph reads nothing that can change.
    backend: the backend that compiled it (None when eager).
    compiled: the callable each hit runs (TorchScript: its ``.graph`` is the frozen graph), or None.
    """

    text: str
    source: str
    reason: str | None = None
    key: str | None = None
    dynamic: bool = False
    watched: bool = False
    backend: str | None = None
    compiled: object = dataclasses.field(default=None, repr=False, compare=False)


def signature_records(table: dict, fallbacks: dict, dyn: dict, backend: str) -> list[Signature]:
    """Records for a function's signature ``table`` (full and fast keys -> entry), its eager
    ``fallbacks`` (full key -> reason) and its dynamic candidates ``dyn`` (-> [(guards, entry)])."""
    dynamic = {id(entry) for candidates in dyn.values() for _, entry in candidates}
    out = [Signature(key_text(key), entry.source, key=entry.key, dynamic=id(entry) in dynamic,
                     watched=entry.watch is not None, backend=backend, compiled=entry.fwd)
           for key, entry in list(table.items()) if _is_full(key)]
    out += [Signature(key_text(key), "eager", reason=reason) for key, reason in list(fallbacks.items())]
    return out


def _is_full(key) -> bool:
    """A :func:`jitfreeze.trace.signature.describe` key (the table also holds the hot path's fast keys)."""
    return isinstance(key, tuple) and bool(key) and isinstance(key[0], pytree.TreeSpec)


def key_text(key: tuple) -> str:
    """``(4x8 float32, int:3)``-style text of a :func:`jitfreeze.trace.signature.describe` key."""
    items = []
    for part in key[2:]:                               # after the input structure and the call mode
        if len(part) == 6:                             # a tensor: shape, dtype, device, strides, grad, layout
            shape, dtype, device, stride, requires_grad, _layout = part
            text = "x".join(map(str, shape)) or "scalar"
            text += " " + str(dtype).replace("torch.", "")
            if device.type != "cpu":
                text += f" {device}"
            if tuple(stride) != _contiguous(shape):
                text += f" stride={tuple(stride)}"
            if requires_grad:
                text += " requires_grad"
            items.append(text)
        elif part[0] == "alias":
            items.append("aliases: " + ", ".join(f"{i}~{j} {kind}" for i, j, kind in part[1]))
        else:                                          # a constant: (type, value)
            kind, value = part
            items.append(f"float:{value}" if kind is float else f"{kind.__name__}:{value!r}")
    return "(" + ", ".join(items) + ")"


def _contiguous(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(tuple(shape)):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
