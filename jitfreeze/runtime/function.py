"""The ``@jitfreeze`` decorator: ties signature, pipeline, key and cache together.

Hot path (every call after the first with a given signature): build a small
tuple key from the positional arguments (with which of them alias), one dict
lookup, a freshness check (:class:`jitfreeze.runtime.watch.Watch`: the baked-in weights' versions and
storage pointers, the module tree's training flags and hooks), the compiled
call, and the output rebuilt. No locks, no logging, no pytree walk for plain calls.

Slow path (first call per signature, under a per-function lock): describe the
call, trace it, compute the key, load from the persistent cache or compile
under the key's cross-process lock, verify the compiled outputs against the
trace's own (eager) outputs, and put the entry in the in-process table.
"""

from __future__ import annotations

import collections
import functools
import inspect
import itertools
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Callable

import torch
from torch.utils import _pytree as pytree

from ..backend import get_backend
from ..cache.persistent import open_cache
from ..config import Config, backend_name
from ..errors import NO_RESULT, FallbackReason, ParametersDiscardedError, trouble
from ..key import graph_key
from ..trace import signature as sig_mod
from ..trace.dynamic import AutoDynamic, Guards, dynamic_texts
from ..trace.pipeline import trace
from . import gcpause
from .discard import discard_parameters
from .index import FingerprintIndex
from .progress import Progress
from .resolve import GradFallback, Resolver, short_sig
from .watch import install_hooks, module_tensors, storages

if TYPE_CHECKING:
    from .module import JitFreezeModule

__all__ = ["jitfreeze", "JitFreezeFunction", "CacheInfo"]

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


class _CapReached(FallbackReason):
    """``max_signatures`` reached: new signatures run eagerly (one warning per function)."""


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
        self.backend = backend or backend_name()     # JITFREEZE_BACKEND when not given
        self.max_signatures = max_signatures
        self.index = index
        self.verify = verify
        self.discard_parameters = discard_parameters
        if not (dynamic is None or isinstance(dynamic, (bool, dict))):
            raise TypeError("dynamic must be None (automatic), True, False or a dict {argument: dims}")
        self.dynamic = dynamic
        self._dyn: dict = {}         # (structure, mode, dynamic texts, aliasing) -> [(Guards, entry)]
        self.traces = 0          # how many times this function was traced (tests assert warm paths trace nothing)
        self.name = name or _qualname(fn, module)
        me = weakref.ref(self)       # not a bound method: no cycle keeps the function (and its module) alive
        self._shapes = AutoDynamic(self.name, dynamic, lambda: me()._cache_for())   # which dims trace symbolically
        self._parent = _parent
        self._bound = weakref.WeakKeyDictionary()
        self._table: dict = {}
        self._last: tuple | None = None      # the hot path's first try (see _remember)
        self._lasts: dict = {}               # fast key -> its _remember tuple
        self._fallbacks: dict = {}
        self._signatures = 0
        self._hits = 0
        self._lock = threading.RLock()
        # Names this function in once-per-function warnings: never its id(), which a new function
        # reuses once this one is gone (and would then not warn).
        self._serial = next(_serials)
        _live.add(self)
        self._config: Config | None = None
        self._disabled = False
        self._cache = None
        self._backend = get_backend(self.backend, optimize)
        self._resolver = Resolver(self.name, fn, module, self._backend, lambda: me()._cache_for())
        self._param_names = None
        self._index = FingerprintIndex(self.name, self._backend.name, fn, _parent._index if _parent else None)
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

    def cache_info(self) -> CacheInfo:
        entries = len({id(e) for e in self._table.values()})
        return CacheInfo(self._hits, self._resolver.loads, self._resolver.compiles, len(self._fallbacks), entries)

    def cache_clear(self) -> None:
        """Empty the in-process table (and forget remembered fallbacks); the persistent cache stays."""
        with self._lock:
            self._forget_lasts()
            self._table.clear()
            self._fallbacks.clear()
            self._dyn.clear()
            self._shapes.clear()
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
        if self.module is not None and getattr(self.module, "_jitfreeze_discarded", False):
            raise ParametersDiscardedError(
                f"{self.name}: this call needs the eager module (a new signature, a fallback or grad mode), "
                "but its parameters were discarded (discard_parameters=True); keep the parameters or call "
                "it only with signatures compiled before they were discarded")
        return self.fn(*args, **kwargs)

    def _names(self):
        if self._param_names is None:
            try:
                target = self.fn.forward if isinstance(self.fn, torch.nn.Module) else self.fn
                self._param_names = [p.name for p in inspect.signature(target).parameters.values()
                                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            except (TypeError, ValueError):
                self._param_names = []
        return self._param_names

    def _fallback(self, key, reason: str, *, grad: bool = False, cap: bool = False):
        """Remember that this signature runs eagerly; warn once per function and signature, or,
        when grad mode is the reason (``grad``), once per function with the fix, and once per
        function when ``max_signatures`` is reached (``cap``)."""
        self._fallbacks[key] = reason
        if cap:
            trouble(f"jitfreeze: {self.name}: {reason}", None, strict=self._config.strict,
                    once=(self._serial, "cap"), error=FallbackReason)
        elif grad:
            trouble(f"jitfreeze: {self.name} runs eagerly (no compiled graph) while grad is enabled: {reason}. "
                    "Call it under torch.no_grad() or torch.inference_mode() to use the frozen graph "
                    "(or filter this warning if the gradients are wanted)", None,
                    strict=self._config.strict, once=(self._serial, "grad"), error=FallbackReason)
        else:
            trouble(f"jitfreeze: {self.name} runs eagerly for this signature: {reason}", None,
                    strict=self._config.strict, once=(self._serial, key), error=FallbackReason)

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
            call = sig_mod.describe(args, kwargs, mode, self._names())
        except FallbackReason as reason:
            trouble(f"jitfreeze: {self.name} runs eagerly: {reason}", None, strict=self._config.strict,
                    once=(self._serial, str(reason)), error=FallbackReason)
            return self._eager(args, kwargs)
        key = call.key
        if key in self._fallbacks:
            return self._eager(args, kwargs)
        entry = self._table.get(key)
        if entry is not None and (entry.watch is None or entry.watch.fresh(pytree.tree_leaves((args, kwargs)))):
            self._hits += 1
            return entry.call_leaves(pytree.tree_leaves((args, kwargs)))
        reason = self._eager_reason(call, mode)
        if reason is not None:
            self._fallback(key, reason[0], grad=reason[1])
            return self._eager(args, kwargs)
        with self._lock:
            entry = self._table.get(key)
            if entry is not None and (entry.watch is None or entry.watch.fresh(pytree.tree_leaves((args, kwargs)))):
                self._hits += 1
                return entry.call_leaves(pytree.tree_leaves((args, kwargs)))
            try:
                with gcpause.paused():
                    entry, result, new = self._resolve(call, args, kwargs)
            except FallbackReason as reason:
                self._fallback(key, str(reason), grad=isinstance(reason, GradFallback),
                               cap=isinstance(reason, _CapReached))
                if reason.result is not NO_RESULT:
                    return reason.result      # the trace ran the function: don't run it twice
                return self._eager(args, kwargs)
            if len(self._table) >= _TABLE_LIMIT:
                self._forget_lasts()
                self._table.clear()
            if new:
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

    def _eager_reason(self, call, mode):
        """(why, grad mode is the reason?) when this call must run eagerly before any trace, else None."""
        grad, autocast, training = mode
        if training:
            return (f"the module is in training mode; jitfreeze compiles eval-mode inference "
                    f"(call .eval() on {type(self.module).__name__})", False)
        if autocast:
            return "autocast is enabled; jitfreeze compiles calls outside autocast", False
        if grad:
            if call.requires_grad:
                return "an input requires grad and frozen graphs are inference-only", True
            if self.module is not None and any(p.requires_grad for p in self.module.parameters()):
                return "the module's parameters require grad and frozen graphs are inference-only", True
        return None

    def _check_cap(self):
        if self._signatures >= self.max_signatures:
            raise _CapReached(f"{self.name} already has {self._signatures} signatures "
                                 f"(max_signatures={self.max_signatures}, JITFREEZE_MAX_SIGNATURES); "
                                 "new signatures run eagerly")

    def _resolve(self, call, args, kwargs):
        """Dynamic candidates, index, or trace + key, then load or compile.

        Returns (entry, result of this call, whether the entry is a new artifact in this process).
        """
        leaves = pytree.tree_leaves((args, kwargs))
        tensors = [leaves[i] for i in call.tensor_idx]
        dims = self._shapes.dims(call, tensors) if tensors else {}
        texts = call.texts
        if dims:
            texts = dynamic_texts(call, tensors, dims)
            failures = []
            for guards, entry in self._dyn.get((call.in_spec, call.mode, texts, call.alias), ()):
                failed = guards.failing(tensors)
                if failed is None:
                    if entry.watch is not None and not entry.watch.fresh(tensors):
                        continue          # its weights changed: traced again below
                    return entry, entry.call_leaves_tensors(tensors), False
                failures.append(failed)
            if failures:
                log.info("%s: recompiling: %s fails for %s", self.name, " / ".join(failures), short_sig(call))
        if self.module is not None and getattr(self.module, "_jitfreeze_discarded", False):
            raise ParametersDiscardedError(
                f"{self.name}: a new signature needs the module's weights (to trace it, or to bind them to "
                "a stored graph), but its parameters were discarded (discard_parameters=True)")
        self._check_cap()
        after = self._config.progress_after
        where = None
        if after is not None:
            cache = self._cache_for()
            where = cache.location if cache.store is not None else None
        with Progress(self.name, short_sig(call) if after is not None else "", where, after) as watch:
            entry, result, new = self._miss(call, args, kwargs, tensors, dims, texts, watch)
            watch.done = _DONE.get(entry.source, "done")
            return entry, result, new

    def _miss(self, call, args, kwargs, tensors, dims, texts, watch):
        """Index, or trace + key, then load or compile; ``watch``: its progress line (:mod:`jitfreeze.runtime.progress`)."""
        fp = self._index.fingerprint(call, texts) if self.index else None
        weights = (list(fp.tensors) if fp is not None else []) + (
            module_tensors(self.module) if self.module is not None else [])
        if storages(tensors) & storages(weights):
            raise FallbackReason(_SHARES_WEIGHT)
        indexed = None
        if fp is not None:
            watch.phase = "loading"
            indexed = self._resolver.from_index(call, fp, self._index, tensors)
            watch.phase = "compiling"
            if indexed is not None and not self.verify:
                self._remember_dynamic(call, texts, indexed.guards, indexed.entry)
                return indexed.entry, indexed.result, True
        # The trace runs the function for real (it may mutate its inputs); verification runs the
        # compiled function on copies taken before.
        copies = _copies(tensors) if call.alias else [t.detach().clone() for t in tensors]
        t0 = time.perf_counter()
        self.traces += 1
        traced = trace(self.fn, call, tensors, dims, recorder=self._config.tracer == "auto")
        t_trace = time.perf_counter() - t0
        if traced.specialized and self.dynamic is None:
            self._shapes.pin_static(call, tensors, traced.specialized)
        try:
            if storages(tensors) & storages([t for _, t in traced.constants]):
                raise FallbackReason(_SHARES_WEIGHT)
            if dims:
                # A symbolic trace computed nothing real: run eagerly once for this call's answer
                # (and as the reference the compiled function must match).
                with torch.no_grad():
                    traced.real_result = self.fn(*args, **kwargs)
                real_leaves = pytree.tree_leaves(traced.real_result)
                traced.real_outputs = [real_leaves[i] for i in traced.out_tensor_idx] \
                    if len(real_leaves) == traced.out_spec.num_leaves else []
            if indexed is not None:
                key, _ = graph_key(self.name, self._backend.name, call, traced, texts, self._resolver.bindings(traced))
                if key == indexed.entry.key:
                    log.info("%s: verify=True: the index entry matches the traced graph", self.name)
                    return indexed.entry, traced.real_result, True
                trouble(f"jitfreeze: {self.name}: stale fingerprint index entry (the traced graph differs from "
                        "the indexed one: something the fingerprint cannot see changed, e.g. a helper in "
                        "another module); replacing it", None, strict=self._config.strict,
                        once=(self._serial, "stale", fp.key))
            outcome = self._resolver.load_or_compile(call, traced, copies, t0, t_trace, texts, watch)
        except GradFallback:
            raise      # the result must carry autograd history: run eagerly
        except FallbackReason as reason:
            reason.result = traced.real_result
            raise
        guards = None
        if traced.guards:
            guards = Guards(traced.guards)
            failed = guards.failing(tensors)
            if failed is not None:       # cannot happen for a sound trace; never serve past a guard
                raise FallbackReason(f"the dynamic trace's own guard fails for this call: {failed}")
        entry = outcome.entry
        self._remember_dynamic(call, texts, guards, entry)
        if fp is not None:
            self._index.write(self._cache_for(), fp.key, entry, traced)
        return entry, outcome.result, True

    def _remember_dynamic(self, call, texts, guards, entry):
        if guards is not None:
            self._dyn.setdefault((call.in_spec, call.mode, texts, call.alias), []).append((guards, entry))

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


# An entry's source -> the closing progress line's words.
_DONE = {"index": "loaded", "cache": "loaded", "compiled": "compiled and stored", "unstored": "compiled, not stored"}

_SHARES_WEIGHT = ("an argument shares storage with a weight the function uses (a frozen graph holds its "
                  "own copy of the weights, or reads them through the argument)")


def _fast_positions(args, call):
    positions = tuple(i for i, a in enumerate(args) if isinstance(a, _Tensor))
    return None if len(positions) == len(args) else positions


def _copies(tensors) -> list:
    """Copies of aliasing inputs that alias each other as the inputs do: each storage cloned once,
    each input rebuilt on its clone with its offset, sizes and strides (the same object twice:
    the same copy twice)."""
    storages: dict = {}
    by_id: dict = {}
    out = []
    for t in tensors:
        copy = by_id.get(id(t))
        if copy is None:
            storage = t.untyped_storage()
            clone = storages.get(storage.data_ptr() or -id(t))
            if clone is None:
                clone = storages[storage.data_ptr() or -id(t)] = storage.clone()
            copy = by_id[id(t)] = torch.empty(0, dtype=t.dtype, device=t.device).set_(
                clone, t.storage_offset(), t.shape, t.stride())
        out.append(copy)
    return out


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
            from .module import JitFreezeModule

            if isinstance(f, JitFreezeModule):
                f = f.module              # wrapped again (other options): the model, not the wrapper
            return JitFreezeModule(f, **options)
        if not callable(f):
            raise TypeError(f"jitfreeze expects a function or a torch.nn.Module, not {type(f).__name__}")
        return JitFreezeFunction(f, **options)

    if fn is None:
        return wrap
    return wrap(fn)
