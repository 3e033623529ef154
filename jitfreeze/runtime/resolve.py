"""Resolving a traced call to an entry: load its artifact from the persistent cache, or compile it.

Load or compile: look the graph key up; else take the key's cross-process lock, look again
(another process may have compiled it meanwhile), compile into the cache's directory, load it
back, verify its first outputs against the trace's eager ones, and store it. A loaded artifact
is verified the same way, and evicted when it disagrees. The bound module's large weights are
left out of artifacts and bound again at load (:meth:`Resolver.bindings`).

Both return a :class:`Loaded` entry; a compile that must stop (the artifact does not load back,
or disagrees with eager) raises :class:`~jitfreeze.errors.FallbackReason`, which the miss path
(:mod:`jitfreeze.runtime.miss`) turns into a fallback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Callable

import torch

from ..backend import BindingError, module_weights
from ..cache.persistent import INDEX
from ..backend import EagerIsFaster
from ..errors import FallbackReason
from ..key import graph_key
from ..trace.pipeline import HOISTED_PREFIX, _first_line, outputs_match
from ..trace.reach import reads as _reads
from ..trace.sigtext import short_signature
from .entry import Entry
from .speculate import Speculation
from .watch import Watch

__all__ = ["Resolver", "Loaded", "short_sig"]

log = logging.getLogger("jitfreeze")


@dataclasses.dataclass
class Loaded:
    """An artifact loaded or compiled for this call."""

    entry: Entry
    result: object                 # this call's result
    guards: object = None          # an index hit's dynamic guards (None: static)


class Resolver:
    """Loads or compiles the entries of one function (``fn``, named ``name``, bound to ``module``
    or None) with ``backend``; ``cache()``: its persistent cache. Counts what it loaded and compiled."""

    def __init__(self, name: str, fn, module, backend, cache: Callable):
        self.name = name
        self.fn = fn
        self.module = module
        self._backend = backend
        self._cache = cache
        self.loads = self.compiles = 0

    @property
    def backend_name(self) -> str:
        return self._backend.name

    def speculate(self, call, key: str, tensors) -> Speculation | None:
        """Load the graph ``key`` and start its first call on ``tensors`` on a thread (see
        :mod:`jitfreeze.runtime.speculate`), or None when it does not load here."""
        cache = self._cache()
        artifact = cache.get(key)
        if artifact is None:
            return None
        try:
            module = self._load(cache, key, artifact[1], call)
        except EagerIsFaster:
            return None              # a stored decision: the index path meets it too
        if module is None:
            return None
        log.debug("%s: started %s's first call while the fingerprint is computed", self.name, key[:16])
        return Speculation(key, module, self._first_call, tensors)

    def from_index(self, call, fp, index, tensors, spec: Speculation | None = None) -> Loaded | None:
        """The first candidate of the fingerprint ``index``'s entry for ``fp`` that loads, or None. No trace.
        ``spec``: a graph loaded and called already, taken when it is the candidate's (the caller
        drops it otherwise). (The caller has checked grad mode:
        :func:`jitfreeze.runtime.fallback.grad_weights`.)"""
        cache = self._cache()
        for candidate in index.candidates(cache, fp.key, tensors):
            key = candidate.graph_key
            taken = spec if spec is not None and key == spec.key else None
            if taken is not None:
                module = taken.module
            else:
                artifact = cache.get(key)
                if artifact is None:
                    continue
                module = self._load(cache, key, artifact[1], call)
                if module is None:
                    continue
            watch = self._watch(fp.tensors, call)
            try:
                outs, fwd = taken.take() if taken is not None else self._first_call(module, tensors)
            except Exception as exc:  # noqa: BLE001 - a graph that can't run this call doesn't fit it
                # The index said this graph fits the call and it raised: the index entry is wrong
                # (it was written by code whose guards missed something). Never let its error reach
                # the caller: drop the entry and trace.
                cache.evict(fp.key, "the indexed graph failed on this call", exc, ns=INDEX)
                return None
            entry = Entry(fwd, key, call, candidate.out_spec, candidate.out_tensor_idx, candidate.out_consts,
                           watch, "index")
            result = entry.rebuild(outs)
            self.loads += 1
            log.info("%s: loaded %s for %s from %s (index hit, no trace%s)", self.name, key[:16], short_sig(call),
                     cache.where(), "; first call run while the fingerprint was computed" if taken else "")
            return Loaded(entry, result, candidate.guards)
        return None


    def load_or_compile(self, call, traced, copies, t0, t_trace, texts, progress=None) -> Loaded:
        """``progress``: the miss's :class:`jitfreeze.runtime.progress.Progress` (its phase is set here), or None.
        (The caller has checked grad mode: :func:`jitfreeze.runtime.fallback.grad_weights`.)"""
        progress = progress if progress is not None else _NoProgress()
        bindings = self.bindings(traced)
        key, parts = graph_key(self.name, self._backend.name, call, traced, texts, bindings)
        cache = self._cache()
        found = cache.get(key)
        if found is not None:
            meta, payload = found
            progress.phase = "loading"
            module = self._load(cache, key, payload, call)
            if module is not None:
                try:
                    outs, fwd = self._first_call(module, copies)
                    why = outputs_match(as_list(outs), traced.real_outputs)
                    why = why and f"its outputs differ from eager: {why}"
                except Exception as exc:  # noqa: BLE001 - a stored graph that can't run this call: compiled again
                    why = f"it failed on this call: {type(exc).__name__}: {_first_line(exc)}"
                if why is None:
                    self.loads += 1
                    log.info("%s: loaded %s for %s from %s", self.name, key[:16], short_sig(call), cache.where())
                    return Loaded(self._entry(fwd, key, call, traced, "cache"), traced.real_result)
                cache.evict(key, why)
        progress.phase = "waiting" if cache.store is not None else "compiling"
        with cache.lock(key) as held:
            progress.phase = "compiling"
            if held:
                found = cache.get(key)
                if found is not None:
                    progress.phase = "loading"
                    module = self._load(cache, key, found[1], call)
                    if module is not None:
                        self.loads += 1
                        log.info("%s: loaded %s (compiled by another process) from %s", self.name, key[:16], cache.where())
                        return Loaded(self._entry(self._backend.runner(module), key, call, traced, "cache"),
                                       traced.real_result)
            progress.phase = "compiling"
            t1 = time.perf_counter()
            # Saved straight into the cache's directory where it can be: storing it is then
            # sealing it in place, not reading, packing and writing it again (BERT-size: 434 MB).
            file = cache.new_file() if held else None
            with file if file is not None else contextlib.nullcontext():     # closed once stored
                try:
                    saved = self._backend.compile(traced, file.path if file else None, bindings, copies,
                                                  cache.config.tune)
                except BaseException:
                    if file is not None:
                        file.discard()
                    raise
                if saved.error is not None:
                    cache.write_failed(saved.error, key)
                    file = None          # saved elsewhere (a temporary file): nothing to adopt
                try:
                    t2 = time.perf_counter()
                    try:
                        module = self._load(None, key, saved, call)
                    except EagerIsFaster as decision:
                        # Timed at compile time: stored, so later processes run eagerly without compiling.
                        stored = held and cache.put(key, self._meta(call, parts), saved, file=file)
                        log.info("%s: %s for %s%s", self.name, decision, short_sig(call),
                                 f"; stored as {key[:16]}" if stored else "")
                        raise
                    if module is None:
                        raise FallbackReason("the frozen artifact does not load back")
                    t3 = time.perf_counter()
                    try:
                        outs, fwd = self._first_call(module, copies)
                    except Exception as exc:  # noqa: BLE001 - what the compiled function can't run runs eagerly
                        raise FallbackReason(f"the compiled function failed on its first call: "
                                             f"{type(exc).__name__}: {_first_line(exc)}") from exc
                    why = outputs_match(as_list(outs), traced.real_outputs)
                    if why is not None:
                        raise FallbackReason(f"the compiled function disagrees with eager: {why}")
                    t4 = time.perf_counter()
                    self.compiles += 1
                    size = len(saved)
                    stored = held and cache.put(key, self._meta(call, parts), saved, file=file)
                finally:
                    saved.remove()
            log.info("%s: compiled %s in %.2fs (trace %.2fs, script+save %.2fs, load+bind+freeze %.2fs, "
                     "first call %.2fs, store %.2fs)%s", self.name, short_sig(call), time.perf_counter() - t0,
                     t_trace, t2 - t1, t3 - t2, t4 - t3, time.perf_counter() - t4,
                     f"; stored {size / 1e6:.1f} MB as {key[:16]}" if stored else "; not stored")
            return Loaded(self._entry(fwd, key, call, traced, "compiled" if stored else "unstored"),
                           traced.real_result)

    def weights(self) -> dict | None:
        """The bound module's tensors by name (what stored graphs bind), or None."""
        return module_weights(self.module)

    def bindings(self, traced) -> dict:
        """{graph attribute: the module's name for it} for the traced constants that are the bound
        module's own tensors, left out of the artifact and bound again when it loads -- when the
        backend binds them (large weights) rather than freezing them in."""
        weights = self.weights()
        if not weights:
            return {}
        names: dict = {}
        for name, t in weights.items():
            names.setdefault(id(t), name)
        return self._backend.bindings(traced, {attr: names[id(t)] for attr, t in traced.constants if id(t) in names})

    def _load(self, cache, key, payload, call):
        device = call.devices[0] if call.devices else None
        try:
            return self._backend.load(payload, device, self.weights())
        except BindingError as exc:
            # Not the artifact's fault: the key covers the weights' names and layouts, so the module
            # changed since (another thread, or its parameters were discarded). A plain miss.
            if cache is None:
                raise FallbackReason(f"the compiled function does not bind the module's weights: {exc}") from exc
            log.info("%s: %s not used: %s", self.name, key[:16], exc)
            return None
        except EagerIsFaster:
            raise                    # a stored decision, not trouble: the call runs eagerly
        except FallbackReason:
            if cache is None:
                raise
            cache.evict(key, "torch.jit.freeze failed after loading")
            return None
        except Exception as exc:  # noqa: BLE001
            path = getattr(payload, "path", None)
            if cache is not None and path is not None and not os.path.exists(path):
                return None          # evicted between verification and loading: a plain miss
            if cache is None:
                raise FallbackReason(f"the frozen artifact does not load back: {type(exc).__name__}: {exc}") from exc
            cache.evict(key, "loading the artifact failed", exc)
            return None

    def _first_call(self, module, tensors):
        """Call a freshly loaded module once: (its outputs, the function to call it with from now on)."""
        return self._backend.first_call(module, tensors)

    def _entry(self, fwd, key, call, traced, source):
        """``fwd``: a loaded module's runner (:meth:`TorchScriptBackend.runner`)."""
        # The weights to watch: the function's and module's, not the numbers the pipeline hoisted.
        watch_tensors = [t for name, t in traced.constants if not name.startswith(HOISTED_PREFIX)]
        return Entry(fwd, key, call, traced.out_spec, traced.out_tensor_idx, traced.out_consts,
                      self._watch(watch_tensors, call), source)

    def _watch(self, tensors, call):
        """The freshness check of a new entry (None: nothing to watch)."""
        reads = _reads(self.fn)
        if not tensors and self.module is None and not reads[0] and not reads[1]:
            return None
        return Watch(tensors, self.module, check_grad=call.mode[0], reads=reads)


    def _meta(self, call, parts):
        import platform
        return {"qualname": self.name, "signature": list(call.texts), "spec": call.spec_text(),
                "device": [str(d) for d in call.devices], "torch": torch.__version__,
                "python": platform.python_version(), "created": time.time(), "parts": parts.summary(),
                "part_digests": parts.digests()}


class _NoProgress:
    phase = ""


def as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def short_sig(call) -> str:
    """``(4x8 float32, 8x16 float32, scale=2.0)``-style text for log lines."""
    return short_signature(call.texts)
