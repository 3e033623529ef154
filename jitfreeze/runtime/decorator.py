"""``jitfreeze``: the decorator, above the classes it returns (a function wrapper, or for a module
instance an ``nn.Module`` wrapper), so that neither of them imports the other."""

from __future__ import annotations

from typing import Callable

import torch

from .function import JitFreezeFunction
from .module import JitFreezeModule

__all__ = ["jitfreeze"]


def jitfreeze(fn: Callable | torch.nn.Module | None = None, /, *, cache_dir=None, optimize: bool = True,
              max_signatures: int | None = None, index: bool = True, verify: bool | None = None,
              discard_parameters: bool = False, dynamic=None, backend: str | None = None
              ) -> JitFreezeFunction | JitFreezeModule | Callable[[Callable], JitFreezeFunction | JitFreezeModule]:
    """Compile-and-freeze ``fn`` on its first call per input signature, with a persistent cache.

    ``@jitfreeze`` on a function or a method, ``jitfreeze(module)`` on a module instance (an
    ``nn.Module`` that behaves like it: :class:`jitfreeze.runtime.module.JitFreezeModule`), or
    ``@jitfreeze(cache_dir=..., optimize=...)``. ``cache_dir`` may also be a Store instance
    (e.g. :class:`jitfreeze.cache.store.MemoryStore`).

    optimize: apply ``torch.jit.optimize_for_inference`` after loading (CPU); with ``backend="aoti"``,
        Inductor's freezing (constant folding, prepacked weights).
    max_signatures: most signatures compiled per function (default ``JITFREEZE_MAX_SIGNATURES`` or 8).
    index: use the trace-free fingerprint index on warm starts.
    verify: on index hits, trace anyway and compare graph keys (default ``JITFREEZE_VERIFY``).
    discard_parameters: once a frozen function exists for a module, release the module's
        parameter storage (eager calls, calling the module or its submodules directly,
        ``state_dict()`` and ``load_state_dict()`` then raise ``ParametersDiscardedError``).
    dynamic: ``None`` (automatic: static first, then the dims whose sizes change become symbolic,
        a decision remembered in the persistent cache), ``False`` (exact shapes), ``True`` (every
        dim symbolic) or ``{argument name or position: [dims]}``.
    backend: ``"torchscript"`` (script + freeze) or ``"aoti"`` (torch.export + AOTInductor: a C++
        compile per signature, tens of seconds; see docs/backends.md); default ``JITFREEZE_BACKEND``
        or ``"torchscript"``.
    """
    options = dict(cache_dir=cache_dir, optimize=optimize, max_signatures=max_signatures, index=index,
                   verify=verify, discard_parameters=discard_parameters, dynamic=dynamic, backend=backend)

    def wrap(f):
        if isinstance(f, torch.nn.Module):
            if isinstance(f, JitFreezeModule):
                f = f.module              # wrapped again (other options): the model, not the wrapper
            return JitFreezeModule(f, **options)
        if not callable(f):
            raise TypeError(f"jitfreeze expects a function or a torch.nn.Module, not {type(f).__name__}")
        return JitFreezeFunction(f, **options)

    if fn is None:
        return wrap
    return wrap(fn)
