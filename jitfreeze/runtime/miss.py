"""The miss path: a signature not in the in-process table -> an entry and this call's result, or eager.

Stages, in order, each returning an outcome rather than raising:

1. dynamic entries: a symbolic entry already in this process whose guards this call passes;
2. the fingerprint index (:mod:`jitfreeze.runtime.index`): a stored graph found without tracing;
3. the trace (:func:`jitfreeze.trace.pipeline.trace`: :class:`Traced` or :class:`Declined`), with
   the dynamic-shape policy (:class:`jitfreeze.trace.dynamic.AutoDynamic`) choosing symbolic dims;
4. the resolver (:mod:`jitfreeze.runtime.resolve`): load the traced graph's artifact, or compile it.

:meth:`Miss.resolve` returns :class:`Resolved` or a :class:`~jitfreeze.runtime.fallback.Fallback`
(with the function's result where a stage already ran it on this call's inputs).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from ..errors import FallbackReason, ParametersDiscardedError, trouble
from ..key import graph_key
from ..trace.dynamic import AutoDynamic, Guards, dynamic_texts
from ..trace.pipeline import Declined, trace
from . import fallback
from .entry import Entry
from .fallback import Fallback, from_reason
from .progress import Progress
from .resolve import Loaded, short_sig
from .watch import module_tensors, storages

__all__ = ["Miss", "Resolved", "DynamicEntries"]

log = logging.getLogger("jitfreeze")

# An entry's source -> the closing progress line's words.
_DONE = {"index": "loaded", "cache": "loaded", "compiled": "compiled and stored", "unstored": "compiled, not stored"}

_SHARES_WEIGHT = ("an argument shares storage with a weight the function uses (a frozen graph holds its "
                  "own copy of the weights, or reads them through the argument)")


@dataclasses.dataclass
class Resolved:
    """An entry for this call's signature, and this call's result. ``new``: the entry is a new
    artifact in this process (a signature that counts), not one already here serving a new shape."""

    entry: Entry
    result: Any
    new: bool = True


class DynamicEntries:
    """The symbolic (dynamic-shape) entries in this process, with the guards under which each serves:
    {(input structure, mode, dynamic texts, aliasing): [(Guards, entry)]}."""

    def __init__(self):
        self.by_class: dict = {}

    def add(self, call, texts, guards: Guards | None, entry: Entry) -> None:
        if guards is not None:
            self.by_class.setdefault((call.in_spec, call.mode, texts, call.alias), []).append((guards, entry))

    def find(self, name: str, call, texts, tensors) -> Resolved | None:
        """The first entry whose guards these tensors pass (and whose weights are unchanged), called."""
        failures = []
        for guards, entry in self.by_class.get((call.in_spec, call.mode, texts, call.alias), ()):
            failed = guards.failing(tensors)
            if failed is None:
                if entry.watch is not None and not entry.watch.fresh(tensors):
                    continue          # its weights changed: traced again
                return Resolved(entry, entry.call_leaves_tensors(tensors), new=False)
            failures.append(failed)
        if failures:
            log.info("%s: recompiling: %s fails for %s", name, " / ".join(failures), short_sig(call))
        return None

    def clear(self) -> None:
        self.by_class.clear()


class Miss:
    """The miss path of one function (``fn`` named ``name``, bound to ``module`` or None).

    ``index``: its :class:`~jitfreeze.runtime.index.FingerprintIndex` (None: not used);
    ``resolver``: its :class:`~jitfreeze.runtime.resolve.Resolver`; ``cache()``: its persistent
    cache; ``serial``: names the function in once-per-function warnings. Counts its traces."""

    def __init__(self, name: str, fn, module, dynamic, index, resolver, cache: Callable, serial: int):
        self.name, self.fn, self.module, self.dynamic = name, fn, module, dynamic
        self.index = index
        self.resolver = resolver
        self.cache = cache
        self.serial = serial
        self.shapes = AutoDynamic(name, dynamic, cache)      # which dims trace symbolically
        self.dynamic_entries = DynamicEntries()
        self.traces = 0

    def clear(self) -> None:
        self.dynamic_entries.clear()
        self.shapes.clear()

    def resolve(self, call, args, kwargs, config, verify: bool, cap: Fallback | None) -> Resolved | Fallback:
        """This call's entry and result, or why it runs eagerly. ``cap``: the fallback to return
        when a new signature would be one too many (None: there is room)."""
        leaves = pytree.tree_leaves((args, kwargs))
        tensors = [leaves[i] for i in call.tensor_idx]
        dims = self.shapes.dims(call, tensors) if tensors else {}
        texts = call.texts
        if dims:
            texts = dynamic_texts(call, tensors, dims)
            found = self.dynamic_entries.find(self.name, call, texts, tensors)
            if found is not None:
                return found
        if self.module is not None and getattr(self.module, "_jitfreeze_discarded", False):
            raise ParametersDiscardedError(
                f"{self.name}: a new signature needs the module's weights (to trace it, or to bind them to "
                "a stored graph), but its parameters were discarded (discard_parameters=True)")
        if cap is not None:
            return cap
        after = config.progress_after
        where = None
        if after is not None:
            cache = self.cache()
            where = cache.location if cache.store is not None else None
        with Progress(self.name, short_sig(call) if after is not None else "", where, after) as progress:
            try:
                outcome = self._resolve(call, args, kwargs, tensors, dims, texts, config, verify, progress)
            except FallbackReason as reason:     # a stage stopped before the function ran
                outcome = from_reason(reason)
            if isinstance(outcome, Fallback):
                progress.eager = True
            else:
                progress.done = _DONE.get(outcome.entry.source, "done")
            return outcome

    def _resolve(self, call, args, kwargs, tensors, dims, texts, config, verify, progress) -> Resolved | Fallback:
        """Index, or trace + key, then load or compile; ``progress``: the miss's progress line."""
        spec = self._speculate(call, texts, tensors) if self.index is not None and not verify and not dims \
            else None
        try:
            fp = self.index.fingerprint(call, texts) if self.index is not None else None
            weights = (list(fp.tensors) if fp is not None else []) + (
                module_tensors(self.module) if self.module is not None else [])
            if storages(tensors) & storages(weights):
                return Fallback(_SHARES_WEIGHT)
            indexed = None
            if fp is not None:
                grad = fallback.grad_weights(call, fp.tensors)
                if grad is not None:
                    return grad
                progress.phase = "loading"
                indexed = self.resolver.from_index(call, fp, self.index, tensors, spec)
                progress.phase = "compiling"
                if indexed is not None and not verify:
                    self.dynamic_entries.add(call, texts, indexed.guards, indexed.entry)
                    return Resolved(indexed.entry, indexed.result)
        finally:
            if spec is not None:
                spec.drop()          # not this call's graph (or taken already): gone before the trace
        # The trace runs the function for real (it may mutate its inputs); verification runs the
        # compiled function on copies taken before.
        copies = _copies(tensors) if call.alias else [t.detach().clone() for t in tensors]
        t0 = time.perf_counter()
        self.traces += 1
        traced = trace(self.fn, call, tensors, dims, recorder=config.tracer == "auto")
        if isinstance(traced, Declined):
            return Fallback(traced.reason, result=traced.result)
        t_trace = time.perf_counter() - t0
        if traced.specialized and self.dynamic is None:
            self.shapes.pin_static(call, tensors, traced.specialized)
        if storages(tensors) & storages([t for _, t in traced.constants]):
            return Fallback(_SHARES_WEIGHT, result=traced.real_result)
        if dims:
            # A symbolic trace computed nothing real: run eagerly once for this call's answer
            # (and as the reference the compiled function must match).
            with torch.no_grad():
                traced.real_result = self.fn(*args, **kwargs)
            real_leaves = pytree.tree_leaves(traced.real_result)
            traced.real_outputs = [real_leaves[i] for i in traced.out_tensor_idx] \
                if len(real_leaves) == traced.out_spec.num_leaves else []
        try:
            found = self._compiled(call, traced, copies, t0, t_trace, texts, config, progress, fp, indexed)
        except FallbackReason as reason:       # the compile stopped: the trace's result is this call's
            return from_reason(reason, traced.real_result)
        if not isinstance(found, Loaded):
            return found
        guards = None
        if traced.guards:
            guards = Guards(traced.guards)
            failed = guards.failing(tensors)
            if failed is not None:       # cannot happen for a sound trace; never serve past a guard
                return Fallback(f"the dynamic trace's own guard fails for this call: {failed}")
        entry = found.entry
        self.dynamic_entries.add(call, texts, guards, entry)
        if fp is not None:
            self.index.write(self.cache(), fp.key, entry, traced, call, texts)
        return Resolved(entry, found.result)

    def _speculate(self, call, texts, tensors):
        """The hinted graph's first call, started while the fingerprint is computed
        (:mod:`jitfreeze.runtime.speculate`), or None: no hint, or state a thread does not share
        (autocast, a CUDA stream) that the call depends on."""
        if call.mode[1] or any(d.type != "cpu" for d in call.devices):
            return None
        key = self.index.hint(self.cache(), call, texts)
        return self.resolver.speculate(call, key, tensors) if key is not None else None

    def _compiled(self, call, traced, copies, t0, t_trace, texts, config, progress, fp, indexed):
        """The index hit the trace confirms (``verify=True``: :class:`Resolved`), or the traced graph
        loaded or compiled (:class:`Loaded`), or a grad-mode :class:`Fallback`."""
        if indexed is not None:
            key, _ = graph_key(self.name, self.resolver.backend_name, call, traced, texts,
                               self.resolver.bindings(traced))
            if key == indexed.entry.key:
                log.info("%s: verify=True: the index entry matches the traced graph", self.name)
                return Resolved(indexed.entry, traced.real_result)
            trouble(f"jitfreeze: {self.name}: stale fingerprint index entry (the traced graph differs from "
                    "the indexed one: something the fingerprint cannot see changed, e.g. a helper in "
                    "another module); replacing it", None, strict=config.strict,
                    once=(self.serial, "stale", fp.key))
        grad = fallback.grad_weights(call, [t for _, t in traced.constants])
        if grad is not None:
            return grad        # the result must carry autograd history: run eagerly
        return self.resolver.load_or_compile(call, traced, copies, t0, t_trace, texts, progress)


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
