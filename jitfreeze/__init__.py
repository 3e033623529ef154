"""jitfreeze: trace, freeze and cache PyTorch inference functions across processes.

    from jitfreeze import jitfreeze

    @jitfreeze
    def f(x, w):
        return torch.nn.functional.gelu(x @ w)

    fast = jitfreeze(model.eval())
"""

__version__ = "0.1.0"

from .cache import clear_cache
from .core import CacheInfo, JitFreezeFunction, jitfreeze
from .errors import JitFreezeError, JitFreezeWarning, ParametersDiscardedError

# ``jitfreeze.clear_cache(...)`` also works on the decorator itself (``from jitfreeze import jitfreeze``).
jitfreeze.clear_cache = clear_cache

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
