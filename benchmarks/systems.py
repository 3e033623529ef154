"""The systems compared: each turns (function, inputs) into a callable whose FIRST call does
all of the system's work (trace, compile, load...), so the worker can time that call alone.

Add a system by registering a factory::

    @system("name", "label in tables")
    def make(fn, inputs, ctx):          # ctx: Context (cache directories, model name)
        ...                             # untimed set-up (e.g. reading artifact bytes)
        return callable

and naming it in a case of ``benchmarks.run.CASES``. ``needs`` tells the runner which
cache directories the system uses: ``"jitfreeze"`` (a jitfreeze cache, empty when cold,
filled by an earlier process when warm) and ``"inductor"`` (TORCHINDUCTOR_CACHE_DIR).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable

import torch

__all__ = ["SYSTEMS", "SystemSpec", "Context", "system", "graph_summary"]


@dataclasses.dataclass(frozen=True)
class SystemSpec:
    name: str
    label: str
    make: Callable
    needs: tuple


@dataclasses.dataclass
class Context:
    model: str
    cache_dir: str | None = None     # the jitfreeze cache directory, when the system needs one
    info: dict = dataclasses.field(default_factory=dict)   # filled by the system, reported by the worker


SYSTEMS: dict[str, SystemSpec] = {}


def system(name: str, label: str, needs: tuple = ()):
    def register(make):
        SYSTEMS[name] = SystemSpec(name, label, make, tuple(needs))
        return make
    return register


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class _Lazy:
    """A callable that builds the real one on its first call (inside the timed region).

    Every system but eager is one: wrapping (``torch.compile(fn)`` imports dynamo,
    ``jitfreeze(fn)`` imports jitfreeze) counts as part of the first call. The steady
    measurements call ``unwrap(callable)`` after the first call, so no indirection is timed.
    """

    def __init__(self, build: Callable):
        self._build = build
        self._fn = None

    def __call__(self, *args):
        fn = self._fn
        if fn is None:
            fn = self._fn = self._build(args)
        return fn(*args)


class _Then:
    """Returns the outputs of a first call already made, then calls ``fwd``."""

    def __init__(self, first, fwd):
        self._first, self._fwd = [first], fwd

    def __call__(self, *args):
        return self._first.pop() if self._first else self._fwd(*args)


class _AsModule(torch.nn.Module):
    """A plain function as a module (torch.jit.freeze takes modules only)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


# -- the systems ------------------------------------------------------------------------------

@system("eager", "eager")
def _eager(fn, inputs, ctx):
    return fn


def _jitfreeze_with(**options):
    def make(fn, inputs, ctx):
        def build(args):
            from jitfreeze import jitfreeze
            return jitfreeze(fn, cache_dir=ctx.cache_dir, **options)

        return _Lazy(build)
    return make


# jitfreeze's defaults: automatic dynamic shapes, max_signatures 8, parameters kept.
system("jitfreeze", "jitfreeze", needs=("jitfreeze",))(_jitfreeze_with())
# Warm start with the module's weights released once the frozen function exists (issue 5's peak RSS).
system("jitfreeze-discard", "jitfreeze (discard_parameters=True)", needs=("jitfreeze",))(
    _jitfreeze_with(discard_parameters=True))
# Exact shapes: one compile and one artifact per batch size. max_signatures=64 (default 8, after
# which new shapes run eagerly) so that the variable-batch case really compiles every size 1..64.
system("jitfreeze-static", "jitfreeze (dynamic=False, max_signatures=64)", needs=("jitfreeze",))(
    _jitfreeze_with(dynamic=False, max_signatures=64))
# Issue 24: the torch.export + AOTInductor backend, side by side with the default (TorchScript) one. Its
# entries live in the same cache directory under other keys; "needs" keeps its own filled-or-not state.
system("jitfreeze-aoti", "jitfreeze (backend='aoti')", needs=("jitfreeze-aoti",))(_jitfreeze_with(backend="aoti"))


@system("bare", "bare pipeline (no cache)")
def _bare(fn, inputs, ctx):
    """trace + strip overloads + script + freeze + optimize_for_inference, as ts_compile does."""

    def build(args):
        from jitfreeze.trace import signature
        from jitfreeze.trace.pipeline import Declined, trace

        module = fn if isinstance(fn, torch.nn.Module) else None
        call = signature.describe(args, {}, signature.call_mode(module))
        # The pre-dispatch trace a jitfreeze miss runs (its recorder: make_fx's graph without Dynamo;
        # make_fx where the recorder declines) + strip_overloads: jf / bare is what the cache costs.
        traced = trace(fn, call, list(args))
        if isinstance(traced, Declined):
            raise RuntimeError(f"jitfreeze declines to trace it: {traced.reason}")
        gm = traced.graph_module
        old = torch._C._jit_set_autocast_mode(False)     # ts_compile's _disable_jit_autocast
        try:
            with _quiet():
                scripted = torch.jit.script(gm)
                torch._C._jit_pass_remove_mutation(scripted.graph)
                frozen = torch.jit.freeze(scripted.eval())
                return torch.jit.optimize_for_inference(frozen)
        finally:
            torch._C._jit_set_autocast_mode(old)

    return _Lazy(build)


@system("floor", "make_fx floor")
def _make_fx_floor(fn, inputs, ctx):
    """What any pipeline that traces with ``make_fx`` pays before its own work: the process's
    first pre-dispatch ``make_fx`` trace, of a function that copies its inputs. In torch 2.13,
    ``make_fx`` imports ``torch._inductor.config`` and its trace imports ``torch._dynamo``.
    jitfreeze's recorder (and so the bare pipeline here) does not pay it."""

    def build(args):
        from torch.fx.experimental.proxy_tensor import make_fx

        make_fx(lambda *xs: [x.clone() for x in xs], pre_dispatch=True)(*args)
        return lambda *xs: None

    return _Lazy(build)


@system("cachefloor", "cache floor (filelock + diskcache)")
def _cache_floor(fn, inputs, ctx):
    """What any cache built on ``filelock`` and ``diskcache`` adds to a miss in a fresh process
    before doing anything of its own: importing filelock, taking and releasing one lock,
    importing diskcache, creating its database in an empty directory and writing one small row.
    jitfreeze pays these (and then saves the artifact, loads it back and checks it against the
    trace), so jf / bare cannot go below (bare + this floor) / bare. The collector is paused as
    jitfreeze pauses it on a miss. Each part is reported (``parts``)."""
    import os
    import shutil
    import tempfile

    parent = os.path.dirname(os.path.abspath(ctx.cache_dir)) if ctx.cache_dir else None
    directory = tempfile.mkdtemp(prefix="cachefloor-", dir=parent if parent and os.path.isdir(parent) else None)

    def build(args):
        import gc
        import time

        parts, clock = {}, time.perf_counter
        enabled = gc.isenabled()
        gc.disable()
        try:
            t = clock()
            import filelock
            parts["import filelock"], t = clock() - t, clock()
            with filelock.FileLock(os.path.join(directory, "key.lock")):
                parts["lock"], t = clock() - t, clock()
                import diskcache
                parts["import diskcache"], t = clock() - t, clock()
                with diskcache.Cache(os.path.join(directory, "cache")) as cache:
                    parts["create the database"], t = clock() - t, clock()
                    cache.set("key", b"x" * 512)
                    parts["write a row"], t = clock() - t, clock()
        finally:
            if enabled:
                gc.enable()
            shutil.rmtree(directory, ignore_errors=True)
        ctx.info["parts"] = parts
        return lambda *xs: None

    return _Lazy(build)


@system("compile", "torch.compile", needs=("inductor",))
def _compile(fn, inputs, ctx):
    return _Lazy(lambda args: torch.compile(fn))      # torch.compile() imports dynamo: timed too


@system("trace", "jit.trace+freeze+ofi")
def _trace(fn, inputs, ctx):
    def build(args):
        module = fn if isinstance(fn, torch.nn.Module) else _AsModule(fn).eval()
        with _quiet():
            traced = torch.jit.trace(module, args)
            return torch.jit.optimize_for_inference(torch.jit.freeze(traced))

    return _Lazy(build)


@system("limit", "jit.load limit", needs=("jitfreeze",))
def _limit(fn, inputs, ctx):
    """torch.jit.load of jitfreeze's stored artifact + the post-load passes + the first call.

    The artifact is written to a file before the timer; what is timed is jitfreeze's backend
    alone: ``torch.jit.load`` of that file, for artifacts that bind the module's weights binding
    them and ``torch.jit.freeze``, ``optimize_for_inference`` where jitfreeze runs it, and the first
    call as jitfreeze makes it. This is the floor for a warm start, with no import of jitfreeze's
    cache, no fingerprint, no lookup, no verification.
    """
    from jitfreeze.backend import module_weights

    path, _ = artifact_file(ctx.cache_dir, ctx.info)
    weights = module_weights(fn)

    def build(args):
        from jitfreeze.backend.torchscript import TorchScriptBackend
        backend = TorchScriptBackend()
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        with _quiet():
            module = backend.load(InPlaceFile(path), device, weights)
        outs, fwd = backend.first_call(module, list(args))
        return _Then(outs, fwd)

    return _Lazy(build)


class InPlaceFile:
    """A file to load in place (what jitfreeze's backend takes besides bytes)."""

    def __init__(self, path: str):
        self.path = path


def artifact_file(cache_dir, info: dict | None = None) -> tuple[str, bytes]:
    """The one artifact in ``cache_dir`` (verified), written to a file next to the cache directory
    (removed with it by the runner): (the file's path, its bytes)."""
    import os

    payload = read_artifact(cache_dir, info)
    path = os.path.join(os.path.dirname(os.path.abspath(cache_dir)), "limit-artifact.pt")
    with open(path, "wb") as f:
        f.write(payload)
    return path, payload


def read_artifact(cache_dir, info: dict | None = None) -> bytes:
    """The payload (torch.jit.save'd frozen module) of the one TorchScript artifact in a jitfreeze cache.

    Read through jitfreeze's own verified path, with the store opened read-only and strict
    mode on: a bad entry raises here instead of being dropped from the cache.
    """
    import dataclasses as dc

    from jitfreeze.cache.persistent import ARTIFACT, PersistentCache
    from jitfreeze.config import Config
    from jitfreeze.cache.disk import DiskStore

    config = dc.replace(Config.from_env(), strict=True)
    store = DiskStore(cache_dir, config.size_limit, readonly=True)
    try:
        keys = [k for k in store.keys() if k.startswith(ARTIFACT)]
        if not keys:
            raise RuntimeError(f"no artifact in {cache_dir}: fill it first")
        cache = PersistentCache(store, config, None)
        found = None
        for k in reversed(keys):          # the TorchScript backend's (backend='aoti' may share the directory)
            found = cache.get(k[len(ARTIFACT):])
            if found is None:
                raise RuntimeError(f"the artifact in {cache_dir} does not verify")
            if not str(found[0].get("parts", {}).get("backend", "torchscript")).startswith("aoti"):
                break
            found = None
        if found is None:
            raise RuntimeError(f"no TorchScript artifact in {cache_dir}: fill it first")
        payload = found[1]
        if not isinstance(payload, bytes):       # a verified file left in place (cache.FilePayload)
            payload = payload.read() if hasattr(payload, "read") else bytes(payload)
    finally:
        store.close()
    if info is not None:
        info["artifacts"] = len(keys)
        info["artifact_mb"] = round(len(payload) / 1e6, 2)
    return payload


def unwrap(fn):
    """The real callable behind a _Lazy (after its first call)."""
    inner = getattr(fn, "_fn", None) if isinstance(fn, _Lazy) else None
    return inner if inner is not None else fn


# -- introspection ----------------------------------------------------------------------------

def compiled_graph(fn):
    """The TorchScript graph a system runs in the steady state, when it has one."""
    fn = unwrap(fn)
    compiled = [s.compiled for s in fn.signatures() if s.compiled is not None] \
        if hasattr(fn, "signatures") else []
    if compiled:                                          # jitfreeze: the entry's ScriptMethod (aoti: none)
        return getattr(compiled[0], "graph", None)
    if isinstance(fn, torch.jit.ScriptModule):
        return fn.graph
    return None


def graph_summary(fn) -> dict | None:
    """Node counts that show whether conv-BN folding and the MKLDNN passes took effect."""
    graph = compiled_graph(fn)
    if graph is None:
        return None
    kinds = [node.kind() for node in graph.nodes()]
    text = str(graph)
    return {
        "nodes": len(kinds),
        "batch_norm": sum(k == "aten::batch_norm" for k in kinds),
        "conv": sum("conv" in k for k in kinds),
        "mkldnn": sum("mkldnn" in k.lower() for k in kinds) + text.count("MKLDNN"),
        "kinds": sorted(set(kinds)),
    }
