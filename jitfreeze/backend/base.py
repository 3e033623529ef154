"""What every backend shares: the saved artifact, the room check, bound weights.

Kept apart from the package's ``__init__`` (which picks a backend by name and imports it), so
that a backend module imports this and not the package that imports it.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..errors import FallbackReason

__all__ = ["SavedArtifact", "BindingError", "EagerIsFaster", "NoCompiler", "module_weights", "bound_tensor", "room_for"]


class SavedArtifact:
    """A freshly saved artifact in a file: load it in place, read its bytes, remove it.

    ``error`` is the exception that kept it from the path the caller asked for (it was then saved
    to a temporary file instead), or None. :meth:`release` hands the file over to whoever now
    owns it (a cache that adopted it): :meth:`remove` then leaves it alone."""

    __slots__ = ("path", "error")

    def __init__(self, path: str, error: Exception | None = None):
        self.path = path
        self.error = error

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def release(self) -> None:
        self.path = None

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def __len__(self) -> int:
        return os.path.getsize(self.path)


def room_for(path: str, need: int) -> bool:
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return True          # unknown: let the write tell
    return st.f_bavail * st.f_frsize >= need


class EagerIsFaster(FallbackReason):
    """A stored decision: when this graph was compiled, eager ran faster than every compiled
    variant (:mod:`jitfreeze.backend.tuning`), so the call runs eagerly. ``record``: the timing."""

    def __init__(self, record: dict):
        ms = record.get("ms", {})
        best = ms.get(record.get("variant"), float("nan"))
        super().__init__(f"eager is faster here ({ms.get('eager', float('nan')):.3g} ms per call against "
                         f"{best:.3g} ms compiled, timed side by side when it was compiled)")
        self.record = record


class NoCompiler(FallbackReason):
    """The backend can't compile on this machine (``backend="aoti"`` without a working C++
    compiler): every new signature runs eagerly, and one warning per function says why."""


class BindingError(RuntimeError):
    """An artifact binds weights that the module at hand does not have (or not in that form)."""


def module_weights(module) -> dict | None:
    """A module's tensors by name -- what bound artifacts bind -- or None for anything else."""
    if not isinstance(module, torch.nn.Module):
        return None
    weights = dict(module.named_parameters(remove_duplicate=False))
    weights.update(module.named_buffers(remove_duplicate=False))
    return weights


def bound_tensor(weights: dict | None, name: str, layout: list, what: str):
    """The module's tensor ``name`` that an artifact (``what``: "artifact", "package") binds,
    detached; :class:`BindingError` when the module has none or its layout (dtype, shape,
    strides, offset, device) is not the one the artifact was compiled for."""
    from ..key import tensor_layout

    tensor = (weights or {}).get(name)
    if tensor is None:
        raise BindingError(f"the {what} binds the module's {name!r}, which it does not have")
    if tensor_layout(tensor) != layout:
        raise BindingError(f"the module's {name!r} is {tensor_layout(tensor)}; the {what} was "
                           f"compiled for {layout} (dtype, shape, strides, offset, device)")
    return tensor.detach()
