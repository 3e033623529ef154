"""Backends: what turns a traced graph into a stored artifact and a stored artifact into a function.

A backend is an object with ``name`` (its part of every key), ``bindings``, ``compile``, ``load``,
``first_call`` and ``runner`` (see :class:`~jitfreeze.backend.torchscript.TorchScriptBackend`).
The decorator, the key and the cache never name one: :func:`get_backend` picks it by name.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..config import BACKENDS

__all__ = ["SavedArtifact", "BindingError", "module_weights", "room_for", "get_backend", "BACKENDS"]


def get_backend(name: str = "torchscript", optimize: bool = True):
    """The backend called ``name`` (one of :data:`BACKENDS`): ``"torchscript"``
    (:class:`~jitfreeze.backend.torchscript.TorchScriptBackend`) or ``"aoti"``
    (:class:`~jitfreeze.backend.aoti.AOTIBackend`: torch.export + AOTInductor)."""
    if name == "torchscript":
        from .torchscript import TorchScriptBackend
        return TorchScriptBackend(optimize)
    if name == "aoti":
        from .aoti import AOTIBackend
        return AOTIBackend(optimize)
    raise ValueError(f"unknown jitfreeze backend {name!r}; choose one of {', '.join(BACKENDS)}")


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


class BindingError(RuntimeError):
    """An artifact binds weights that the module at hand does not have (or not in that form)."""


def module_weights(module) -> dict | None:
    """A module's tensors by name -- what bound artifacts bind -- or None for anything else."""
    if not isinstance(module, torch.nn.Module):
        return None
    weights = dict(module.named_parameters(remove_duplicate=False))
    weights.update(module.named_buffers(remove_duplicate=False))
    return weights


