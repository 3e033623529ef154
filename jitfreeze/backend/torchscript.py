"""The TorchScript backend: ``torch.jit.script`` -> ``torch.jit.freeze`` -> ``torch.jit.save``, and back.

TorchScript is deprecated upstream (warnings on every ``torch.jit`` call, filtered here where we
make them); it works in torch 2.13 and 2.14.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import re
import tempfile
import threading
import time

import torch

from ..errors import FallbackReason
from ..key import tensor_layout
from ..trace.pipeline import _HOISTED_OPS, Traced, _first_line, _quiet_torchscript
from . import BindingError, SavedArtifact, room_for

__all__ = ["TorchScriptBackend"]

log = logging.getLogger("jitfreeze")

_PLAN_LOCK = threading.Lock()

# The artifact's record of which graph attributes are the module's own weights.
_BINDINGS_FILE = "jitfreeze-bindings.json"


def _save(module, path: str | None, extra: dict, estimate: int) -> SavedArtifact:
    """torch.jit.save to ``path`` (e.g. straight into a cache's directory), or to a temporary
    file when no path is given or there is no room there (a full disk): the compiled function is
    still good, only storing it is not.

    Free space is checked first because torch.jit.save does not fail cleanly on a full disk: its
    zip writer throws again from its destructor and the process aborts (seen here on a full
    tmpfs). ``estimate`` is the artifact's expected size (its constants, plus a margin)."""
    error = None
    if path is not None:
        if room_for(path, estimate):
            try:
                torch.jit.save(module, path, _extra_files=extra)
                return SavedArtifact(path)
            except Exception as exc:  # noqa: BLE001 - torch reports write errors as RuntimeError
                error = exc
                with contextlib.suppress(OSError):
                    os.unlink(path)
        else:
            error = OSError(errno.ENOSPC, f"no room for a {estimate / 1e6:.1f} MB artifact",
                            os.path.dirname(path))
            with contextlib.suppress(OSError):
                os.unlink(path)
    fd, tmp = tempfile.mkstemp(prefix="jitfreeze-", suffix=".pt")
    os.close(fd)
    try:
        if not room_for(tmp, estimate):
            raise FallbackReason(f"no room to save the frozen function ({estimate / 1e6:.1f} MB) in "
                                 f"{os.path.dirname(tmp)}")
        torch.jit.save(module, tmp, _extra_files=extra)
    except BaseException:
        os.unlink(tmp)
        raise
    return SavedArtifact(tmp, error)


class TorchScriptBackend:
    """strip overloads (done in trace) -> torch.jit.script -> [torch.jit.freeze] -> torch.jit.save;
    at load: [bind the module's weights -> torch.jit.freeze] -> post-load passes.

    When the module's own weights are large (:attr:`BIND_MIN_BYTES`), the stored artifact is the
    scripted graph with them left out: they are bound again when it is loaded (the loading process
    holds the module, and the key covers the weights, their names and layouts), then frozen there.
    So a warm start reads and materializes kilobytes of code instead of a second copy of the
    weights (BERT-size: 434 MB, 0.6-0.8 s here), and the frozen graph's unfolded constants share
    the module's storage: one copy in memory. Tensors that are not the module's (a closure's or a
    global's) are stored in the artifact. Smaller functions are stored frozen, weights inside.

    ``compile`` returns a :class:`SavedArtifact` (a temporary file); ``load`` takes bytes or
    anything with a ``.path`` (loaded in place)."""

    def __init__(self, optimize: bool = True):
        self.optimize = optimize
        # The backend's part of every key: what compile() and load() produce depends on ``optimize``.
        self.name = "torchscript-bind-freeze-2" + ("+optimize" if optimize else "")

    # Module weights below this size are frozen into the artifact instead of bound at load:
    # freezing at load costs 16-30 ms (conv-BN folding included), while loading frozen weights costs
    # ~1 ms per MB (1.5 with a cold page cache): binding pays from a few tens of MB.
    BIND_MIN_BYTES = 32 * 2**20

    # The linear-layout choice (:meth:`_linear_layout`) times a few calls: only where one costs
    # less than this, and a layout must win by this factor to be taken.
    TUNE_MAX_CALL_S = 5e-3
    TUNE_MARGIN = 0.95

    def bindings(self, traced: Traced, names: dict) -> dict:
        """The bindings to use: ``names`` ({graph attribute: the module's name for that tensor},
        the constants that are the module's own) when they weigh at least :attr:`BIND_MIN_BYTES`,
        else none (everything frozen into the artifact)."""
        size = sum(t.untyped_storage().nbytes() for a, t in traced.constants if a in names)
        return dict(names) if names and size >= self.BIND_MIN_BYTES else {}

    def compile(self, traced: Traced, path: str | None = None, bindings: dict | None = None,
                example: list | None = None) -> SavedArtifact:
        """The scripted function saved to ``path`` (or a temporary file: see :func:`_save`).

        ``bindings`` ({graph attribute: the module's name for that tensor}, from :meth:`bindings`)
        are left out of the artifact and recorded in it, to be bound and frozen at :meth:`load`.
        Without bindings the function is frozen now and stored frozen, weights inside, its linear
        layers in the layout that ran faster on ``example`` (the call's inputs, not modified; see
        :meth:`_linear_layout`)."""
        bindings = bindings or {}
        with _quiet_torchscript(), _no_jit_autocast():
            try:
                scripted = torch.jit.script(_scriptable(traced.graph_module))
            except Exception as exc:  # noqa: BLE001
                raise FallbackReason(f"torch.jit.script failed: {type(exc).__name__}: {_first_line(exc)}") from exc
            record = []
            for attr, tensor in traced.constants:
                if attr in bindings:
                    record.append([attr, bindings[attr], *tensor_layout(tensor)])
                    scripted._c.setattr(attr, torch.empty(0, dtype=tensor.dtype))
            if not bindings:
                scripted = _freeze(scripted)
                if example is not None:
                    scripted = self._linear_layout(scripted, example)
            extra = {_BINDINGS_FILE: json.dumps({"format": 1, "frozen": not bindings, "bindings": record})}
            # Through a file, not a BytesIO: torch.jit.save/load through Python file objects is
            # 4-6x slower (434 MB BERT-size artifact: save 3.6 s vs 0.8 s, load 1.7 s vs 0.3 s).
            # Expected size: the stored tensors (64-byte aligned records), the code (a few hundred
            # bytes per node) and the zip's own records.
            stored = sum(t.untyped_storage().nbytes() + 64 for a, t in traced.constants if a not in bindings)
            code = 400 * len(traced.graph_module.graph.nodes)
            return _save(scripted, path, extra, estimate=stored + stored // 16 + code + 64 * 1024)

    def _linear_layout(self, frozen, example):
        """``frozen``, or a copy with each linear layer's weight transposed once, at compile time
        (``matmul`` + ``add``: what ``optimize_for_inference``'s FrozenLinearTranspose makes),
        whichever ran faster on ``example``.

        Which is faster depends on the CPU and the shapes: on the benchmark MLP (batch 64,
        256-512-512-10) the transposed graph ran at 0.82x on one machine and within 2% on another;
        single linears measured 0.56-1.33x (one-row inputs gain most, wide outputs can lose). So
        both are timed, taking turns, on the call's own inputs (copies), with the executor's
        optimization off as calls run, and the transposed one is kept only if its median is under
        ``TUNE_MARGIN`` of the other's. CPU graphs with ``aten::linear`` and no convolution only
        (graphs with convolutions get ``optimize_for_inference``, which transposes too, after
        loading), and only where a call costs under ``TUNE_MAX_CALL_S``: the timing costs about
        ten calls. The transposed weights replace the originals in the artifact (no second
        copy), which is why bound artifacts, whose weights are the module's own, keep theirs."""
        if not self.optimize or not example or any(t.device.type != "cpu" for t in example):
            return frozen
        kinds = set(_node_kinds(frozen.graph.block()))
        if "aten::linear" not in kinds or any("conv" in k for k in kinds):
            return frozen
        args = [t.clone() for t in example]
        # No autograd, and the caller's random stream as it was (a graph may draw random numbers).
        with torch.no_grad(), torch.random.fork_rng(devices=[]), torch.jit.optimized_execution(False):
            try:
                frozen(*args)
                t0 = time.perf_counter()
                frozen(*args)
                once = time.perf_counter() - t0
                if once > self.TUNE_MAX_CALL_S:
                    return frozen
                buffer = io.BytesIO()            # an independent copy: deepcopy shares the graph
                torch.jit.save(frozen, buffer)
                buffer.seek(0)
                transposed = torch.jit.load(buffer)
                torch._C._jit_pass_transpose_frozen_linear(transposed.graph)
                transposed(*args)
                as_is_s, transposed_s = medians_side_by_side([frozen, transposed], args, once)
            except Exception as exc:  # noqa: BLE001 - a choice of speed: the frozen graph stands
                log.debug("jitfreeze: linear layers as traced (timing them failed: %s)", exc)
                return frozen
        chosen = transposed if transposed_s < self.TUNE_MARGIN * as_is_s else frozen
        log.debug("jitfreeze: linear layers %s (per call: as traced %.1f us, transposed %.1f us)",
                  "transposed" if chosen is transposed else "as traced", as_is_s * 1e6, transposed_s * 1e6)
        return chosen

    def first_call(self, module, tensors):
        """Call a freshly loaded ``module`` once: ``(its outputs, the function to call it with)``.

        TorchScript's default (profiling) executor spends a graph's first call recording it and the
        second optimizing it; on CPU, with no fuser there, the optimized plan is no faster per call
        than the plain one for graphs of real operators (measured side by side: BERT-base
        0.98-1.02x, conv+BN net 1.00x, transformer encoder 1.00-1.02x, MLP 1.00x), while those two
        calls cost 3-6 calls' time (first call after loading: BERT-base 0.6 s vs 0.43 s, conv+BN
        net 125 vs 57 ms, transformer encoder 90 vs 23 ms). So this call plans the graph once with
        the executor's simple mode (a bailout depth of 0 while the plan is made): its
        profiling-insensitive passes, no profiling runs. When those passes leave the graph as it
        is (checked on the plan itself), later calls go straight to the ``ScriptMethod``. They do
        not when the graph has out-of-place add/sub/mul/div of a 0-dim tensor constant: their
        canonicalization turns it back into a number (undoing :func:`_hoist_scalars`: a few
        elementwise operators on 16 floats, 20 us vs 16 us). Then, or when the caller runs with
        executor optimization off, calls go through :meth:`runner`."""
        fwd = module.forward
        if torch._C._get_graph_executor_optimize() and not canonicalized_scalars(fwd.graph):
            with _PLAN_LOCK:             # the bailout depth is process-wide: our plans take turns
                strategy = torch._C._jit_set_fusion_strategy([("STATIC", 0)])
                try:
                    outs = fwd(*tensors)
                finally:
                    torch._C._jit_set_fusion_strategy(strategy)
            if planned_as_is(module, fwd.graph):
                return outs, fwd
            # A change the test above did not foresee: drop the plan and run the graph as it is
            # (this call again too: it costs one call, so the test should foresee what it can).
            log.debug("jitfreeze: TorchScript's plan changed the graph; calls run it unprofiled")
            fwd._debug_flush_compilation_cache()
        run = self.runner(module)
        return run(*tensors), run

    def runner(self, module):
        """The function that calls ``module`` unplanned: tensors in, its outputs out. It runs with
        TorchScript's graph-executor optimization off (a thread-local flag, set around each call
        and restored), so the executor runs the graph as it is, with no profiling runs (see
        :meth:`first_call`)."""
        return _unprofiled(module.forward)

    def load(self, data, device: torch.device | None, weights: dict | None = None):
        """bytes (or a verified file: anything with ``.path``) -> the frozen module, post-load passes
        run: call it through :meth:`runner`. ``weights``: the module's tensors by name (the
        artifact's bindings are looked up there); :class:`BindingError` when they don't fit."""
        return self.post_load(self.load_frozen(data, device, weights), device)

    def load_frozen(self, data, device: torch.device | None, weights: dict | None = None):
        """The artifact loaded, its weights bound, frozen (no post-load passes: this one can be saved)."""
        path = getattr(data, "path", None)
        extra = {_BINDINGS_FILE: ""}
        with _quiet_torchscript():
            module = torch.jit.load(path if path is not None else io.BytesIO(data), map_location=device,
                                    _extra_files=extra)
            record = json.loads(extra[_BINDINGS_FILE] or "{}")
            if record.get("frozen"):
                return module
            for attr, name, *layout in record.get("bindings", []):
                tensor = (weights or {}).get(name)
                if tensor is None:
                    raise BindingError(f"the artifact binds the module's {name!r}, which it does not have")
                if tensor_layout(tensor) != layout:
                    raise BindingError(f"the module's {name!r} is {tensor_layout(tensor)}; the artifact was "
                                       f"compiled for {layout} (dtype, shape, strides, offset, device)")
                module._c.setattr(attr, tensor.detach())
            return _freeze(module)

    def post_load(self, module, device: torch.device | None):
        """The passes that run on a frozen module after loading: on CPU, graphs with convolutions
        get optimize_for_inference (conv-BN folding already ran in freeze; this adds MKLDNN
        layouts and conv+add+relu fusion: 0.67x eager per call on the conv net vs 0.86x frozen only).

        Other graphs are left as frozen: there the pass only pre-transposes linear weights, which
        measured no faster per call (BERT-base, transformer encoder, MLP: within 2%) and copies
        them (BERT-size: 0.4-0.5 s at load and a second copy of most weights). Its output does
        not survive save/load (MKLDNN-prepacked constants), so it runs after loading."""
        if not self.optimize or (device is not None and device.type != "cpu"):
            return module
        if not any("conv" in kind for kind in _node_kinds(module.graph.block())):
            return module
        with _quiet_torchscript():
            try:
                return torch.jit.optimize_for_inference(module)
            except Exception as exc:  # noqa: BLE001 - the frozen module is still correct
                log.debug("optimize_for_inference failed, using the frozen module: %s", exc)
                return module


def _scriptable(gm):
    """``gm`` with its FX bookkeeping (``_graph``, ``_code``, ``_lineno_map``, ``meta``, hooks, ...)
    marked as ignored by ``torch.jit.script`` (TorchScript's own ``__jit_ignored_attributes__``):
    the generated ``forward`` reads only what ``get_attr`` nodes name. Otherwise scripting infers a
    type for each: it tries to compile ``torch.fx.Graph`` as a TorchScript class (reading its
    source: 40 ms of a tiny function's 60 ms script, then failing) and stores ``_code`` and the line
    map in the artifact (a second copy of the code: 31 KB on a BERT-size graph)."""
    used = {node.target.split(".")[0] for node in gm.graph.nodes if node.op == "get_attr"}
    gm.__jit_ignored_attributes__ = [
        name for name, value in vars(gm).items()
        if name not in used and name != "training" and not isinstance(value, (torch.Tensor, torch.nn.Module))]
    return gm


def medians_side_by_side(fns, args, once: float, rounds: int = 5) -> list:
    """Median seconds per call of each of ``fns``, timed in turns (order alternating each round)
    in blocks of about half a millisecond (``once``: one call's time)."""
    n = max(1, int(5e-4 / max(once, 1e-7)))
    samples: list = [[] for _ in fns]
    clock = time.perf_counter
    for r in range(rounds):
        for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
            fn = fns[i]
            t0 = clock()
            for _ in range(n):
                fn(*args)
            samples[i].append((clock() - t0) / n)
    return [sorted(s)[len(s) // 2] for s in samples]


def _freeze(module):
    try:
        return torch.jit.freeze(module.eval())
    except Exception as exc:  # noqa: BLE001
        raise FallbackReason(f"torch.jit.freeze failed: {type(exc).__name__}: {_first_line(exc)}") from exc


def _unprofiled(fwd):
    get, set_ = torch._C._get_graph_executor_optimize, torch._C._set_graph_executor_optimize

    def call(*tensors):
        if get():
            set_(False)
            try:
                return fwd(*tensors)
            finally:
                set_(True)
        return fwd(*tensors)

    call.graph = fwd.graph
    return call


_CANONICALIZED = frozenset(f"aten::{name}" for name in _HOISTED_OPS)   # out of place: hoisting's ops


def canonicalized_scalars(graph) -> bool:
    """Whether TorchScript's CanonicalizeOps pass would turn a 0-dim tensor constant of this graph
    back into a number: the ``other`` of an out-of-place add/sub/mul/div."""
    for node in graph.findAllNodes("prim::Constant"):
        value = node.output().toIValue()
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            for use in node.output().uses():
                if use.user.kind() in _CANONICALIZED and use.offset == 1:
                    return True
    return False


_VALUE_NAME = re.compile(r"%[\w.]+")
_CONSTANT_LINE = re.compile(r"(%[\w.]+) : .*? = prim::Constant(.*)$")


def graph_structure(graph) -> list:
    """A graph's lines with the values renamed in order of definition and each constant written
    where it is used (so the passes' pooling and reordering of constants don't count): equal for
    a graph and a copy the executor's passes left alone. Text, not the graph's Python bindings:
    those cost ~12 us per node (``node.inputs()``), the text ~0.3 us."""
    constants: dict = {}
    names: dict = {}
    lines = []

    def name(match):
        value = match.group(0)
        return constants.get(value) or names.setdefault(value, f"%{len(names)}")

    for line in graph.str(False).splitlines():
        line = line.strip()
        constant = _CONSTANT_LINE.match(line)
        if constant:
            constants[constant.group(1)] = f"[{constant.group(2)}]"    # no type: a plan's copy drops sizes
        else:
            lines.append(_VALUE_NAME.sub(name, line))
    return lines


def planned_as_is(module, graph) -> bool:
    """Whether the executor's plan for ``module.forward`` runs ``graph`` as it is."""
    try:
        plans = list(module._c.get_debug_state().execution_plans.values())
    except RuntimeError:          # no plan made (the executor ran unoptimized)
        return False
    return len(plans) == 1 and graph_structure(plans[0].graph) == graph_structure(graph)


def _node_kinds(block):
    for node in block.nodes():
        yield node.kind()
        for sub in node.blocks():
            yield from _node_kinds(sub)


@contextlib.contextmanager
def _no_jit_autocast():
    old = torch._C._jit_set_autocast_mode(False)
    try:
        yield
    finally:
        torch._C._jit_set_autocast_mode(old)
