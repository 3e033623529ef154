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

import torch

from ..errors import FallbackReason
from ..key import tensor_layout
from ..trace.pipeline import _HOISTED_OPS, Traced, _first_line, _quiet_torchscript
from .base import EagerIsFaster, SavedArtifact, bound_tensor, room_for
from .tuning import Choice, choose

__all__ = ["TorchScriptBackend", "variants"]

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

    def bindings(self, traced: Traced, names: dict) -> dict:
        """The bindings to use: ``names`` ({graph attribute: the module's name for that tensor},
        the constants that are the module's own) when they weigh at least :attr:`BIND_MIN_BYTES`,
        else none (everything frozen into the artifact)."""
        size = sum(t.untyped_storage().nbytes() for a, t in traced.constants if a in names)
        return dict(names) if names and size >= self.BIND_MIN_BYTES else {}

    def compile(self, traced: Traced, path: str | None = None, bindings: dict | None = None,
                example: list | None = None, tune: bool = True) -> SavedArtifact:
        """The scripted function saved to ``path`` (or a temporary file: see :func:`_save`).

        ``bindings`` ({graph attribute: the module's name for that tensor}, from :meth:`bindings`)
        are left out of the artifact and recorded in it, to be bound and frozen at :meth:`load`.
        Without bindings the function is frozen now and stored frozen, weights inside.

        With ``example`` (the call's inputs, not modified) and ``tune``, the graph's variants
        (:func:`variants`) are timed against each other and against eager
        (:func:`jitfreeze.backend.tuning.choose`); the choice is recorded in the artifact, and
        applied when it loads (a pre-transposed layout is stored as such). When eager was faster
        than every variant, :meth:`load` raises :class:`~jitfreeze.backend.EagerIsFaster`."""
        bindings = bindings or {}
        with _quiet_torchscript(), _no_jit_autocast():
            try:
                scripted = torch.jit.script(_scriptable(traced.graph_module))
            except Exception as exc:  # noqa: BLE001
                raise FallbackReason(f"torch.jit.script failed: {type(exc).__name__}: {_first_line(exc)}") from exc
            kinds = set(_node_kinds(scripted.graph.block()))
            cpu = example is not None and all(t.device.type == "cpu" for t in example)
            names = variants(kinds, self.optimize and cpu, bound=bool(bindings))
            lazies = {name: _Lazy(scripted, name) for name in names}
            if example is not None and len(names) > 1:
                names = runs_from(names, lazies, example)
            choice = Choice(names[0])
            if example is not None and tune:
                # Before the bound weights are left out: each variant is frozen from the scripted
                # module with its real weights (freezing shares them: no copy).
                choice = choose(names[0], {name: lazies[name] for name in names}, traced.graph_module, example)
            record = []
            for attr, tensor in traced.constants:
                if attr in bindings:
                    record.append([attr, bindings[attr], *tensor_layout(tensor)])
                    scripted._c.setattr(attr, torch.empty(0, dtype=tensor.dtype))
            if not bindings:
                scripted = _variant(_freeze(scripted), "transposed" if choice.variant == "transposed" else "frozen")
            extra = {_BINDINGS_FILE: json.dumps({"format": 1, "frozen": not bindings, "bindings": record,
                                                 "tuned": choice.record()})}
            # Through a file, not a BytesIO: torch.jit.save/load through Python file objects is
            # 4-6x slower (434 MB BERT-size artifact: save 3.6 s vs 0.8 s, load 1.7 s vs 0.3 s).
            # Expected size: the stored tensors (64-byte aligned records), the code (a few hundred
            # bytes per node) and the zip's own records.
            stored = sum(t.untyped_storage().nbytes() + 64 for a, t in traced.constants if a not in bindings)
            code = 400 * len(traced.graph_module.graph.nodes)
            return _save(scripted, path, extra, estimate=stored + stored // 16 + code + 64 * 1024)

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
        artifact's bindings are looked up there); :class:`BindingError` when they don't fit;
        :class:`~jitfreeze.backend.EagerIsFaster` when the artifact records that eager was faster."""
        module, record = self._read(data, device)
        tuned = record.get("tuned") or {}
        if tuned.get("eager"):
            raise EagerIsFaster(tuned)
        return self.post_load(self._bind(module, record, weights), device, tuned.get("variant"))

    def load_frozen(self, data, device: torch.device | None, weights: dict | None = None):
        """The artifact loaded, its weights bound, frozen (no post-load passes: this one can be saved)."""
        module, record = self._read(data, device)
        return self._bind(module, record, weights)

    def _read(self, data, device):
        path = getattr(data, "path", None)
        extra = {_BINDINGS_FILE: ""}
        with _quiet_torchscript():
            module = torch.jit.load(path if path is not None else io.BytesIO(data), map_location=device,
                                    _extra_files=extra)
        return module, json.loads(extra[_BINDINGS_FILE] or "{}")

    def _bind(self, module, record: dict, weights: dict | None):
        if record.get("frozen"):
            return module
        with _quiet_torchscript():
            for attr, name, *layout in record.get("bindings", []):
                module._c.setattr(attr, bound_tensor(weights, name, layout, "artifact"))
            return _freeze(module)

    def post_load(self, module, device: torch.device | None, variant: str | None = None):
        """The passes that run on a frozen module after loading: the recorded ``variant``'s
        (``mkldnn``: conv-add-relu fusion and MKLDNN layouts; ``ofi``: those and pre-transposed
        linear weights, ``torch.jit.optimize_for_inference``), whose output does not survive
        save/load (MKLDNN-prepacked constants). Artifacts from before variants were recorded
        (``variant`` None) get ``ofi`` on CPU graphs with convolutions, as then."""
        if not self.optimize or (device is not None and device.type != "cpu"):
            return module
        if variant is None:
            variant = "ofi" if any("conv" in kind for kind in _node_kinds(module.graph.block())) else "frozen"
        if variant not in ("ofi", "mkldnn"):
            return module
        with _quiet_torchscript():
            try:
                return _variant(module, variant)
            except Exception as exc:  # noqa: BLE001 - the frozen module is still correct
                log.debug("%s passes failed, using the frozen module: %s", variant, exc)
                return module


def variants(kinds: set, optimize: bool, bound: bool) -> list:
    """The variants worth timing for a graph with these node ``kinds``, its default first.

    On CPU, with ``optimize``: graphs with convolutions get ``ofi`` (``optimize_for_inference``:
    conv-add-relu fusion, MKLDNN layouts, pre-transposed linear weights), ``mkldnn`` (the same
    without transposing: a transpose turns ``linear`` into ``matmul``, which runs a
    non-contiguous input as a batched matmul) and ``frozen`` (none of it); graphs of linear
    layers stored with their weights get ``frozen`` and ``transposed`` (which ran at 0.56-1.33x
    on single linears: one-row inputs gain most, wide outputs can lose). Otherwise ``frozen``."""
    if not optimize:
        return ["frozen"]
    if any("conv" in kind for kind in kinds):
        return ["ofi", "mkldnn", "frozen"]
    if "aten::linear" in kinds and not bound:
        return ["frozen", "transposed"]
    return ["frozen"]


def _variant(frozen, name: str):
    """``frozen`` (a frozen module) made into variant ``name``, in place where the passes allow."""
    if name == "transposed":
        torch._C._jit_pass_transpose_frozen_linear(frozen.graph)
    elif name == "mkldnn":
        torch._C._jit_pass_fuse_frozen_conv_add_relu(frozen.graph)
        torch._C._jit_pass_convert_frozen_ops_to_mkldnn(frozen.graph)
    elif name == "ofi":
        frozen = torch.jit.optimize_for_inference(frozen)
    return frozen


def runs_from(names: list, lazies: dict, example: list) -> list:
    """``names`` from the first variant that runs on (copies of) ``example`` on: the passes can
    make a graph that fails to run (EfficientNet-B0 after ``optimize_for_inference``: "Schema not
    found for node" on an MKLDNN group, measured 2026-12-03); ``frozen`` applies none of them."""
    args = [t.clone() for t in example]
    for i, name in enumerate(names):
        if name == "frozen" or i == len(names) - 1:
            return names[i:]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[]), torch.jit.optimized_execution(False):
                lazies[name](*args)
            return names[i:]
        except Exception as exc:  # noqa: BLE001 - that variant is out; the next one is tried
            log.debug("jitfreeze: variant %s does not run (%s: %s); trying the next", name, type(exc).__name__,
                      _first_line(exc))
    return names[-1:]


class _Lazy:
    """A variant made on its first call (freezing the scripted module then), for timing."""

    def __init__(self, scripted, name: str):
        self.scripted, self.name, self.fn = scripted, name, None

    def __call__(self, *tensors):
        if self.fn is None:
            with _quiet_torchscript():
                self.fn = _variant(_freeze(self.scripted), self.name).forward
        return self.fn(*tensors)


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
