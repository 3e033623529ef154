"""jitfreeze: trace, freeze and cache PyTorch inference functions across processes.

    from jitfreeze import jitfreeze

    @jitfreeze
    def f(x, w):
        return torch.nn.functional.gelu(x @ w)

    fast = jitfreeze(model.eval())

The decorator and its classes import torch on first use, so ``import jitfreeze`` (and the
``jitfreeze`` command line) start without it.
"""

__version__ = "0.1.0"

from .cache import clear_cache
from .errors import JitFreezeError, JitFreezeWarning, ParametersDiscardedError

__all__ = [
    "jitfreeze",
    "clear_cache",
    "CacheInfo",
    "JitFreezeFunction",
    "JitFreezeWarning",
    "JitFreezeError",
    "ParametersDiscardedError",
    "__version__",
]

_LAZY = {"jitfreeze", "CacheInfo", "JitFreezeFunction"}


def __getattr__(name):
    if name in _LAZY:
        from . import core

        core.jitfreeze.clear_cache = clear_cache   # ``jitfreeze.clear_cache(...)`` on the decorator too
        for attr in _LAZY:
            globals()[attr] = getattr(core, attr)
        return globals()[name]
    raise AttributeError(f"module 'jitfreeze' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _LAZY)
