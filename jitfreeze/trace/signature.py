"""Input signatures: what about a call changes the trace.

Forms of one thing:

* :func:`tensor_guards` — for a call of positional tensors only, a check in C++ that a later
  call's tensors match these ones: what the hot path tries first (about 0.3 us against about
  1.5 us for :func:`fast_key`).
* :func:`fast_key` — the hot path's key for the common call (positional tensors
  and plain scalars, no containers): a tuple built without a pytree walk, or
  ``None`` when the call needs the full description.
* :func:`describe` — the full description of any call (pytree walk), with the
  tensor leaves' positions, the baked-in constants, a hashable in-process key
  and a stable text form for the persistent key.

Both include grad mode, autocast and the module's training flag.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import FallbackReason
from .sigtext import _const_text, _float_key, alias_text, tensor_text

__all__ = ["CallSpec", "alias_pattern", "alias_text", "describe", "fast_key", "tensor_guards", "tensor_text"]

_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_TENSOR_TYPES = (_Tensor, _Parameter)
_grad_enabled = torch.is_grad_enabled
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: False)

try:        # torch's own C++ tensor check (what torch.compile's guards use); private, so optional
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:                                        # pragma: no cover - other torch builds
    _TensorGuards = None

# Plain constants that a trace bakes in; their repr is stable across processes.
_CONST_TYPES = (type(None), bool, int, str, bytes, complex, torch.dtype, torch.device,
                torch.layout, torch.memory_format)


def alias_pattern(tensors) -> tuple:
    """Which of ``tensors`` share storage, and how: ``()`` when none do (the common case).

    Otherwise one ``(i, j, kind)`` per pair ``i < j`` of tensors with the same storage, ``kind``
    being ``"is"`` (the same object: a trace sees one tensor, and ``q is k`` tests in the function,
    e.g. ``nn.MultiheadAttention``'s self-attention path, take the other branch), ``"view"``
    (another object with the same data pointer, shape and strides), ``"overlap"`` (their memory
    ranges intersect) or ``"apart"`` (the same storage, disjoint memory). A tensor without storage
    (no elements allocated) shares only with itself. About 0.12 us per tensor when nothing aliases.
    """
    n = len(tensors)
    if n < 2:
        return ()
    if n == 2:
        a, b = tensors
        if a is not b and (a.untyped_storage().data_ptr() or -id(a)) != (b.untyped_storage().data_ptr() or -id(b)):
            return ()
    ptrs = [t.untyped_storage().data_ptr() or -id(t) for t in tensors]
    if len(set(ptrs)) == len(ptrs):
        return ()
    pattern = []
    for j in range(1, len(tensors)):
        for i in range(j):
            if ptrs[i] == ptrs[j]:
                pattern.append((i, j, _alias_kind(tensors[i], tensors[j])))
    return tuple(pattern)


def _alias_kind(a, b) -> str:
    if a is b:
        return "is"
    if a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride():
        return "view"
    lo_a, hi_a = _span(a)
    lo_b, hi_b = _span(b)
    return "overlap" if lo_a < hi_b and lo_b < hi_a else "apart"


def _span(t) -> tuple:
    """[first byte, past the last byte) that ``t`` reaches."""
    lo = hi = t.data_ptr()
    if t.numel() == 0:
        return lo, lo
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride * t.element_size()
        if reach < 0:
            lo += reach
        else:
            hi += reach
    return lo, hi + t.element_size()


def fast_key(args: tuple, module):
    """The hot path's key, or None when the call needs :func:`describe`.

    Grad mode, autocast and the module's training flag come first; then per argument a small
    tuple (tensors: shape, dtype, device, strides, and requires_grad when grad is enabled); then,
    for calls with two or more tensors, their :func:`alias_pattern`.
    """
    grad = _grad_enabled()
    parts = [grad, _any_autocast(), module.training if module is not None else None]
    append = parts.append
    tensors = []
    try:
        for a in args:
            t = type(a)
            if t is _Tensor or t is _Parameter:
                tensors.append(a)
                # stride() raises for sparse/MKLDNN layouts: those take the full path
                if grad:
                    append((a.shape, a.dtype, a.device, a.stride(), a.requires_grad))
                else:
                    append((a.shape, a.dtype, a.device, a.stride()))
            elif t is int or t is bool or t is str or a is None:
                append((t, a))
            elif t is float:
                append((t, repr(a)))
            else:
                return None
        if len(tensors) > 1:
            append(alias_pattern(tensors))
    except RuntimeError:
        return None
    return tuple(parts)


def tensor_guards(args: tuple):
    """A C++ check that a call's positional arguments match ``args`` (all plain tensors), or None.

    ``guards.check(*other)`` is True only when ``other`` has the same Python types, dtypes,
    devices, shapes, strides, ``requires_grad`` and dispatch keys (layout, conjugate/negative
    bits, autocast state) as ``args`` had now: everything :func:`fast_key` compares, and more.
    It raises TypeError for another number of arguments: compare ``len`` first. Grad mode, a
    module's training flag and which arguments alias (:func:`alias_pattern`) are not in it: the
    caller compares them.
    """
    if _TensorGuards is None or _any_autocast():
        return None
    for a in args:
        t = type(a)
        if t is not _Tensor and t is not _Parameter:
            return None
    try:
        return _TensorGuards(*args, dynamic_dims_sizes=None, dynamic_dims_strides=None)
    except (TypeError, RuntimeError):                      # pragma: no cover - another torch's signature
        return None


def call_mode(module) -> tuple:
    """Global state that changes the trace: grad mode, autocast, training flag."""
    return (_grad_enabled(), _any_autocast(), module.training if module is not None else None)


def _path_text(path, names: list[str] | None) -> str:
    """``args[1]['k']`` -> ``argument 'cfg' ['k']`` when the parameter name is known."""
    if not path:
        return "argument"
    first, rest = path[0], path[1:]
    idx = getattr(first, "idx", None)
    label = "args" if idx == 0 else "kwargs"
    if len(rest) and label == "args":
        pos = getattr(rest[0], "idx", None)
        if names is not None and pos is not None and pos < len(names):
            return f"argument {names[pos]!r}{pytree.keystr(rest[1:])}"
        return f"positional argument {pos}{pytree.keystr(rest[1:])}"
    if len(rest):
        key = getattr(rest[0], "key", None)
        return f"argument {key!r}{pytree.keystr(rest[1:])}"
    return label


@dataclasses.dataclass(frozen=True)
class CallSpec:
    """Everything about one call that decides its trace."""

    in_spec: Any                 # pytree spec of (args, kwargs)
    n_leaves: int
    tensor_idx: tuple            # positions of the tensor leaves
    consts: tuple                # (position, value) of the non-tensor leaves
    mode: tuple                  # call_mode()
    key: tuple                   # hashable, for the in-process table
    texts: tuple                 # one stable line per leaf, for the persistent key
    devices: tuple               # distinct devices of the tensor leaves, in order
    requires_grad: bool          # any tensor leaf requires grad
    tensor_args: tuple = ()      # per tensor leaf: (position or None, argument name or None)
    alias: tuple = ()            # alias_pattern() of the tensor leaves (in key, not in texts)

    def spec_text(self) -> str:
        return " ".join(str(self.in_spec).split())

    def signature_text(self, texts=None) -> str:
        """The persistent key's signature part: structure, one line per leaf, and the alias line
        when tensor leaves share storage (absent otherwise: such keys are what they were)."""
        text = self.spec_text() + "\n" + "\n".join(self.texts if texts is None else texts)
        return text + "\n" + alias_text(self.alias) if self.alias else text

    def rebuild(self, tensors) -> tuple[tuple, dict]:
        leaves = [None] * self.n_leaves
        for i, v in self.consts:
            leaves[i] = v
        for i, t in zip(self.tensor_idx, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.in_spec)
        return args, kwargs


def describe(args: tuple, kwargs: dict, mode: tuple, names: list[str] | None = None) -> CallSpec:
    """Full signature of a call; raises FallbackReason for arguments that can't be baked in."""
    leaves_with_path, in_spec = pytree.tree_flatten_with_path((args, kwargs))
    tensor_idx, consts, key, texts, devices, tensor_args = [], [], [in_spec, mode], [], [], []
    any_grad = False
    for i, (path, leaf) in enumerate(leaves_with_path):
        if isinstance(leaf, _Tensor):
            if type(leaf) not in _TENSOR_TYPES:
                raise FallbackReason(
                    f"{_path_text(path, names)} is a tensor subclass ({type(leaf).__qualname__}); "
                    "only plain tensors and Parameters are traced")
            if leaf.is_sparse or leaf.layout != torch.strided:
                raise FallbackReason(f"{_path_text(path, names)} has layout {leaf.layout}; only strided tensors are traced")
            tensor_idx.append(i)
            tensor_args.append(_top_level(path, names))
            desc = (leaf.shape, leaf.dtype, leaf.device, leaf.stride(), leaf.requires_grad, leaf.layout)
            key.append(desc)
            texts.append(tensor_text(leaf))
            if leaf.device not in devices:
                devices.append(leaf.device)
            any_grad = any_grad or leaf.requires_grad
            continue
        if isinstance(leaf, float):
            key.append((float, _float_key(leaf)))
        elif isinstance(leaf, enum.Enum) or isinstance(leaf, _CONST_TYPES):
            try:
                hash(leaf)
            except TypeError:
                raise FallbackReason(f"{_path_text(path, names)} ({type(leaf).__qualname__}) can't be hashed") from None
            key.append((type(leaf), leaf))
        else:
            try:
                hash(leaf)
                why = "is not a tensor or a plain constant (None, bool, int, float, str, bytes, enum, dtype, device)"
            except TypeError:
                why = "can't be hashed"
            raise FallbackReason(f"{_path_text(path, names)} of type {type(leaf).__qualname__} {why}; "
                                 "jitfreeze bakes non-tensor arguments into the trace")
        consts.append((i, leaf))
        texts.append(_const_text(leaf))
    tensors = [leaves_with_path[i][1] for i in tensor_idx]
    alias = alias_pattern(tensors)
    if alias:
        key.append(("alias", alias))
    if len(devices) > 1:
        raise FallbackReason(f"tensors on several devices ({', '.join(map(str, devices))}); "
                             "jitfreeze compiles calls whose tensors share one device")
    return CallSpec(in_spec=in_spec, n_leaves=len(leaves_with_path), tensor_idx=tuple(tensor_idx),
                    consts=tuple(consts), mode=mode, key=tuple(key), texts=tuple(texts),
                    devices=tuple(devices), requires_grad=any_grad, tensor_args=tuple(tensor_args), alias=alias)


def _top_level(path, names):
    """(position, name) of the top-level argument a leaf belongs to."""
    if len(path) < 2:
        return (None, None)
    top = path[1]
    pos = getattr(top, "idx", None)
    if getattr(path[0], "idx", None) == 0 and pos is not None:
        return (pos, names[pos] if names is not None and pos < len(names) else None)
    return (None, getattr(top, "key", None))

