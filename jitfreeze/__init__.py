"""jitfreeze: trace, freeze and cache PyTorch inference functions across processes.

    from jitfreeze import jitfreeze

    @jitfreeze
    def f(x, w):
        return torch.nn.functional.gelu(x @ w)

    fast = jitfreeze(model.eval())

    report = jitfreeze.precompile(fast, [(torch.randn(b, 3, 224, 224),) for b in (1, 8, 32)])

The decorator and its classes import torch on first use, so ``import jitfreeze`` (and the
``jitfreeze`` command line) start without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .cache.persistent import clear_cache
from .errors import JitFreezeError, JitFreezeWarning, ParametersDiscardedError
from .runtime.precompile import PrecompileReport, PrecompileResult, precompile
from .version import __version__

if TYPE_CHECKING:                      # imported lazily at run time (they import torch)
    from .runtime.decorator import jitfreeze
    from .runtime.function import CacheInfo, JitFreezeFunction
    from .runtime.module import JitFreezeModule

__all__ = [
    "jitfreeze",
    "clear_cache",
    "precompile",
    "PrecompileResult",
    "PrecompileReport",
    "CacheInfo",
    "JitFreezeFunction",
    "JitFreezeModule",
    "JitFreezeWarning",
    "JitFreezeError",
    "ParametersDiscardedError",
    "__version__",
]

_LAZY = {"jitfreeze", "CacheInfo", "JitFreezeFunction", "JitFreezeModule"}


def __getattr__(name: str):
    if name in _LAZY:
        from .runtime import decorator, function, module

        decorator.jitfreeze.clear_cache = clear_cache   # type: ignore[attr-defined]  # jitfreeze.clear_cache() too
        decorator.jitfreeze.precompile = precompile     # type: ignore[attr-defined]  # and jitfreeze.precompile()
        where = {"jitfreeze": decorator, "JitFreezeModule": module}
        for attr in _LAZY:
            globals()[attr] = getattr(where.get(attr, function), attr)
        return globals()[name]
    raise AttributeError(f"module 'jitfreeze' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
