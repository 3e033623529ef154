"""The ``@jitfreeze`` decorator: ties signature, pipeline, key and cache together.

Hot path (every call after the first with a given signature): build a small
tuple key from the positional arguments (with which of them alias), one dict
lookup, a freshness check (:class:`jitfreeze.runtime.watch.Watch`: the baked-in weights' versions and
storage pointers, the module tree's training flags and hooks), the compiled
call, and the output rebuilt. No locks, no logging, no pytree walk for plain calls.

Slow path (first call per signature): describe the call; decide whether it runs
eagerly (:mod:`jitfreeze.runtime.fallback`); else, under a per-function lock, the miss
path (:mod:`jitfreeze.runtime.miss`: index, trace, load or compile) returns an entry and
this call's result, or a fallback; the entry goes in the in-process table.
"""

from __future__ import annotations

import collections
import functools
import inspect
import itertools
import logging
import os
import threading
import weakref
from pathlib import Path
from typing import Callable

import torch
from torch.utils import _pytree as pytree

from ..backend import get_backend
from ..cache.persistent import open_cache
from ..config import Config, backend_name
from ..errors import FallbackReason
from ..trace import fingerprint
from ..trace import signature as sig_mod
from ..trace.pipeline import NO_RESULT
from . import fallback, gcpause
from .discard import discard_parameters
from .index import FingerprintIndex
from .introspect import Signature, signature_records
from .miss import Miss
from .resolve import Resolver
from .watch import install_hooks

__all__ = ["JitFreezeFunction", "CacheInfo"]

log = logging.getLogger("jitfreeze")

CacheInfo = collections.namedtuple("CacheInfo", "hits loads compiles fallbacks entries")

_TABLE_LIMIT = 4096          # concrete signatures kept in one function's in-process table
_Tensor = torch.Tensor
_fast_key = sig_mod.fast_key
_tensor_guards = sig_mod.tensor_guards
_grad_enabled = torch.is_grad_enabled
_call_mode = sig_mod.call_mode
_alias_pattern = sig_mod.alias_pattern

# Every JitFreezeFunction, so that a forked child gets fresh locks: a fork taken while another
# thread holds one (compiling) would otherwise leave the child blocked on it forever.
_live: "weakref.WeakSet[JitFreezeFunction]" = weakref.WeakSet()
_serials = itertools.count()


def _after_fork_in_child() -> None:
    for f in list(_live):
        f._lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _backend_name(backend: str | None) -> str:
    """The name of the backend a new function compiles with (:func:`jitfreeze.backend.get_backend`):
    its ``backend=`` option, else ``JITFREEZE_BACKEND``, else ``"torchscript"``; the one place it comes in."""
    return backend or backend_name()


class JitFreezeFunction:
    """What ``@jitfreeze`` returns: call it like the function (or module) it wraps."""

    def __init__(self, fn: Callable, *, module: torch.nn.Module | None = None, cache_dir=None,
                 optimize: bool = True, max_signatures: int | None = None, index: bool = True,
                 verify: bool | None = None, discard_parameters: bool = False, dynamic=None,
                 name: str | None = None, backend: str | None = None,
                 _parent: "JitFreezeFunction | None" = None):
        self.fn = fn
        self.module = module
        self.cache_dir = cache_dir
        self.optimize = optimize
        self.backend = _backend_name(backend)        # JITFREEZE_BACKEND when not given
        self.max_signatures = max_signatures
        self.index = index
        self.verify = verify
        self.discard_parameters = discard_parameters
        if not (dynamic is None or isinstance(dynamic, (bool, dict))):
            raise TypeError("dynamic must be None (automatic), True, False or a dict {argument: dims}")
        self.dynamic = dynamic
        self.name = name or _qualname(fn, module)
        me = weakref.ref(self)       # not a bound method: no cycle keeps the function (and its module) alive
        self._parent = _parent
        self._bound = weakref.WeakKeyDictionary()
        self._table: dict = {}
        self._last: tuple | None = None      # the hot path's first try (see _remember)
        self._lasts: dict = {}               # fast key -> its _remember tuple
        self._signatures = 0
        self._hits = 0
        self._lock = threading.RLock()
        # Names this function in once-per-function warnings: never its id(), which a new function
        # reuses once this one is gone (and would then not warn).
        serial = next(_serials)
        _live.add(self)
        self._fallbacks = fallback.Fallbacks(self.name, serial)     # signatures that run eagerly
        self._config: Config | None = None
        self._disabled = False
        self._cache = None
        backend = get_backend(self.backend, optimize)
        self._resolver = Resolver(self.name, fn, module, backend, lambda: me()._cache_for())
        self._param_names = None
        self._index = FingerprintIndex(self.name, backend.name, fn, _parent._index if _parent else None)
        self._miss = Miss(self.name, fn, module, dynamic, self._index if index else None, self._resolver,
                          lambda: me()._cache_for(), serial)
        if module is None and not isinstance(fn, torch.nn.Module):
            functools.update_wrapper(self, fn, updated=())
        else:
            self.__wrapped__ = fn

    # -- binding as a method --------------------------------------------------------------------

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        try:
            return self._bound[instance]
        except (KeyError, TypeError):
            pass
        bound = JitFreezeFunction(
            self.fn.__get__(instance, owner),
            module=instance if isinstance(instance, torch.nn.Module) else None,
            cache_dir=self.cache_dir, optimize=self.optimize, max_signatures=self.max_signatures,
            index=self.index, verify=self.verify, discard_parameters=self.discard_parameters,
            dynamic=self.dynamic, name=self.name, backend=self.backend, _parent=self)
        try:
            self._bound[instance] = bound
        except TypeError:
            pass
        return bound

    # -- the hot path ---------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        if not kwargs:
            # 1. The last tensors-only signature served, checked in C++ (see _remember).
            last = self._last
            if last is not None:
                n, check, grad, module, entry, alias = last
                if (len(args) == n and check(*args) and _grad_enabled() is grad
                        and (module is None or not module.training)
                        and (n < 2 or _alias_pattern(args) == alias)):
                    watch = entry.watch
                    if watch is None or watch.fresh(args):
                        self._hits += 1
                        outs = entry.fwd(*args)
                        return outs if entry.out_kind == 0 else entry.rebuild(outs)
            # 2. The in-process table, by the fast key.
            key = _fast_key(args, self.module)
            if key is not None:
                entry = self._table.get(key)
                if entry is not None:
                    watch = entry.watch
                    if watch is None or watch.fresh(args):
                        self._hits += 1
                        idx = entry.fast_idx
                        if idx is None:
                            last = self._lasts.get(key)
                            self._last = last if last is not None and last[4] is entry else \
                                self._remember(key, args, entry)
                            outs = entry.fwd(*args)
                        else:
                            outs = entry.fwd(*[args[i] for i in idx])
                        return outs if entry.out_kind == 0 else entry.rebuild(outs)
        return self._call_slow(args, kwargs)

    def _remember(self, key, args, entry):
        """The first hit of a tensors-only signature (fast key ``key``): the hot path's first try
        from now on, ``(len(args), check, grad mode, module, entry, alias pattern)``. ``check`` is
        torch's C++ tensor check (types, dtypes, devices, shapes, strides, requires_grad, dispatch
        keys incl. autocast); with the same grad mode, the module (if any) in eval mode and (for
        two or more tensors) the same alias pattern, a call that passes it has this fast key. One flat tuple: the hot path's cost here is mostly cache
        misses (each object it touches after a TorchScript call), not instructions."""
        module = self.module
        guards = _tensor_guards(args) if module is None or not module.training else None
        if guards is None:
            return self._last
        last = self._lasts[key] = (len(args), guards.check, _grad_enabled(), module, entry,
                                   _alias_pattern(args) if len(args) > 1 else None)
        return last

    # -- introspection --------------------------------------------------------------------------

    @property
    def traces(self) -> int:
        """How many times this function was traced (a warm start traces nothing)."""
        return self._miss.traces

    @property
    def _dyn(self) -> dict:
        return self._miss.dynamic_entries.by_class

    def cache_info(self) -> CacheInfo:
        entries = len({id(e) for e in self._table.values()})
        return CacheInfo(self._hits, self._resolver.loads, self._resolver.compiles, len(self._fallbacks), entries)

    def signatures(self) -> list[Signature]:
        """What each signature met in this process resolved to, compiled ones first, then eager
        ones (:class:`jitfreeze.runtime.introspect.Signature`: its text, where its entry came from
        or why it runs eagerly, the graph key, dynamic or static, the backend). A method bound to
        an instance has its own (``obj.method.signatures()``)."""
        return signature_records(self._table, self._fallbacks.reasons, self._dyn, self._resolver.backend_name)

    @property
    def cache_location(self) -> str | None:
        """The persistent cache's directory (where it is, or will be once a call needs it), or
        None where this function runs uncached (the directory was refused, or a Store instance was
        given as ``cache_dir``)."""
        where = self.cache_dir if self.cache_dir is not None else (self._config or Config.from_env()).cache_dir
        if not isinstance(where, (str, os.PathLike)) or (self._cache is not None and self._cache.store is None):
            return None
        return str(Path(where).expanduser())

    def cache_clear(self) -> None:
        """Empty the in-process table (and forget remembered fallbacks); the persistent cache stays."""
        with self._lock:
            self._forget_lasts()
            self._table.clear()
            self._fallbacks.clear()
            self._miss.clear()
            self._signatures = 0
            self._hits = self._resolver.loads = self._resolver.compiles = 0
        for bound in list(self._bound.values()):
            bound.cache_clear()

    def __repr__(self):
        return f"<jitfreeze {self.name}>"

    # -- the slow path --------------------------------------------------------------------------

    def _setup(self) -> None:
        config = Config.from_env()
        if config.log:
            _configure_logging(config.log)
        self._disabled = config.disable
        if self.max_signatures is None:
            self.max_signatures = config.max_signatures
        if self.verify is None:
            self.verify = config.verify
        self._config = config
        install_hooks()

    def _eager(self, args, kwargs):
        return fallback.run_eagerly(self.fn, self.module, self.name, args, kwargs)

    def _forget_lasts(self):
        self._last = None
        self._lasts = {}

    def _call_slow(self, args, kwargs):
        if self._config is None:
            with self._lock:
                if self._config is None:
                    self._setup()
        if self._disabled:
            return self._eager(args, kwargs)
        module = self.module
        mode = _call_mode(module)
        try:
            if self._param_names is None:
                self._param_names = _positional_names(self.fn)
            call = sig_mod.describe(args, kwargs, mode, self._param_names)
        except FallbackReason as reason:
            self._fallbacks.unsupported(reason, self._config.strict)
            return self._eager(args, kwargs)
        key = call.key
        if key in self._fallbacks:
            return self._eager(args, kwargs)
        entry = self._table.get(key)
        if entry is not None and (entry.watch is None or entry.watch.fresh(pytree.tree_leaves((args, kwargs)))):
            self._hits += 1
            return entry.call_leaves(pytree.tree_leaves((args, kwargs)))
        eager = fallback.before_trace(call, mode, module)
        if eager is not None:
            self._fallbacks.add(key, eager, self._config.strict)
            return self._eager(args, kwargs)
        with self._lock:
            entry = self._table.get(key)
            if entry is not None and (entry.watch is None or entry.watch.fresh(pytree.tree_leaves((args, kwargs)))):
                self._hits += 1
                return entry.call_leaves(pytree.tree_leaves((args, kwargs)))
            with gcpause.paused():
                outcome = self._miss.resolve(call, args, kwargs, self._config, self.verify,
                                             fallback.cap(self.name, self._signatures, self.max_signatures))
            if isinstance(outcome, fallback.Fallback):
                self._fallbacks.add(key, outcome, self._config.strict)
                if outcome.result is not NO_RESULT:
                    return outcome.result      # the trace ran the function: don't run it twice
                return self._eager(args, kwargs)
            entry, result = outcome.entry, outcome.result
            if len(self._table) >= _TABLE_LIMIT:
                self._forget_lasts()
                self._table.clear()
            if outcome.new:
                self._signatures += 1
            else:
                self._hits += 1          # an artifact already in this process serves a new shape
            self._table[key] = entry
            if self.discard_parameters and self.module is not None:
                self._discard_parameters()
            fast = _fast_key(args, self.module) if not kwargs else None
            if fast is not None:
                entry.fast_idx = _fast_positions(args, call)
                self._table[fast] = entry
        return result

    def _discard_parameters(self):
        """Release the module's parameter and buffer storage: the frozen graphs hold the weights."""
        if not discard_parameters(self.module, served=JitFreezeFunction):
            return
        for entry in self._table.values():
            entry.watch = None          # the weights can no longer change under the frozen copies
        log.info("%s: discarded the module's parameters (discard_parameters=True)", self.name)

    def _cache_for(self):
        if self._cache is None:
            self._cache = open_cache(self.cache_dir, self._config)
        return self._cache

fingerprint.WRAPPER_TYPES.append(JitFreezeFunction)    # a fingerprint walks one as the function it wraps

def _fast_positions(args, call):
    positions = tuple(i for i, a in enumerate(args) if isinstance(a, _Tensor))
    return None if len(positions) == len(args) else positions


def _positional_names(fn) -> list:
    """The names of ``fn``'s positional parameters (a module's ``forward``'s): ``dynamic={name: dims}``
    and messages name arguments by them."""
    try:
        target = fn.forward if isinstance(fn, torch.nn.Module) else fn
        return [p.name for p in inspect.signature(target).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return []


def _qualname(fn, module) -> str:
    if isinstance(fn, torch.nn.Module):
        return f"{type(fn).__module__}.{type(fn).__qualname__}"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


_LOGGING_SET = False


def _configure_logging(level: str) -> None:
    global _LOGGING_SET
    if _LOGGING_SET:
        return
    _LOGGING_SET = True
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("jitfreeze %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(getattr(logging, level.upper()))
