"""Backends: what turns a traced graph into a stored artifact and a stored artifact into a function.

A backend is an object with ``name`` (its part of every key), ``bindings``, ``compile``, ``load``,
``first_call`` and ``runner`` (see :class:`~jitfreeze.backend.torchscript.TorchScriptBackend`).
The decorator, the key and the cache never name one: :func:`get_backend` picks it by name.
"""

from __future__ import annotations

from ..config import BACKENDS
from .base import BindingError, EagerIsFaster, SavedArtifact, module_weights, room_for

__all__ = ["SavedArtifact", "BindingError", "EagerIsFaster", "module_weights", "room_for", "get_backend", "BACKENDS"]


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
