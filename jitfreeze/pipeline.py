"""The compile-and-freeze pipeline: trace -> clean -> script -> freeze -> bytes.

Knows nothing of caching. The tracing machinery (``make_fx``, functorch) pulls
in ``torch._dynamo`` (about a second of imports), so it is imported lazily, on
the first trace; loading a stored artifact needs none of it.

The backend seam: :class:`TorchScriptBackend` turns a traced graph into bytes
and bytes into a loaded module, and makes a loaded module's first call (which
returns the function later calls use). Another backend would implement the
same methods (``name``, ``bindings``, ``compile``, ``load``, ``first_call``,
``runner``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import re
import tempfile
import threading
import time
import warnings
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from .errors import NO_RESULT, FallbackReason
from .key import tensor_layout
from .signature import CallSpec

__all__ = ["Traced", "trace", "HOISTED_PREFIX", "TorchScriptBackend", "BindingError", "module_weights",
           "tensor_layout", "outputs_match"]

log = logging.getLogger("jitfreeze")

_TRACE_LOCK = threading.RLock()
_PLAN_LOCK = threading.Lock()

# Plain constants allowed among a function's outputs (returned as they were traced).
_OUT_CONST_TYPES = (type(None), bool, int, float, str, bytes, complex)


@contextlib.contextmanager
def _quiet_torchscript():
    """TorchScript is deprecated upstream; we call it knowingly.

    Also one TorchScript compile/load at a time per process: ``torch.jit.script`` in two threads
    at once fails ("AST constructor recursion depth mismatch"), and ``catch_warnings`` changes
    process-wide filters."""
    with _TRACE_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*TorchScript.*")
        yield


@dataclasses.dataclass
class Traced:
    """A function traced for one signature."""

    graph_module: Any                      # torch.fx.GraphModule, cleaned and ready to script
    constants: list                        # [(name, tensor)] the weights baked into the graph
    out_spec: Any                          # pytree spec of the output
    out_tensor_idx: tuple                  # positions of tensor leaves in the output
    out_consts: tuple                      # (position, value) of constant leaves in the output
    real_outputs: list | None              # the eager output's tensor leaves (None: a symbolic trace)
    real_result: Any                       # the eager result itself (NO_RESULT: a symbolic trace)
    guards: list = dataclasses.field(default_factory=list)   # shape guards of a symbolic trace
    specialized: dict = dataclasses.field(default_factory=dict)   # {leaf: dims} the function made numbers


def _is_mutating(target) -> bool:
    schema = getattr(target, "_schema", None)
    return schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _is_view(node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return (node.op == "call_function" and schema is not None and len(schema.returns) == 1
            and schema.returns[0].alias_info is not None)


def _root(node):
    while _is_view(node) and node.args:
        node = node.args[0]
    return node


def _clean(gm) -> None:
    """Make a pre-dispatch FX graph scriptable and check it is a pure inference graph."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch._C._set_grad_enabled:
            # Grad-mode toggles (a `with torch.no_grad():` in the function): the frozen
            # function runs inference only, so they have no meaning there.
            graph.erase_node(node)
            continue
        if _is_mutating(node.target):
            for arg in node.args[:1]:
                if isinstance(arg, torch.fx.Node) and _root(arg).op == "get_attr":
                    raise FallbackReason(
                        f"the function mutates module state in place ({node.target}); "
                        "a frozen graph cannot keep state between calls")
    # Dead code goes while targets are overloads: an overload's schema tells FX which ops write
    # to their inputs (impure: kept, e.g. `mask[:, 1] = True`); an overload packet has none, and
    # FX would take the unused result of an in-place op on an intermediate for dead code.
    graph.eliminate_dead_code()
    for node in graph.nodes:
        # Strip op overloads (aten.add.Tensor -> aten.add), as torch._functorch.compilers'
        # strip_overloads does (without importing that module and what it imports).
        if isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket
        if any(isinstance(v, torch.device) for v in node.kwargs.values()):
            node.kwargs = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in node.kwargs.items()}
    graph.lint()
    gm.recompile()


# Graph attributes holding hoisted numbers: constants of jitfreeze's own, not the user's weights.
HOISTED_PREFIX = "_jitfreeze_scalar_"
# Elementwise ops whose Python-number operand _hoist_scalars turns into a tensor constant.
_HOISTED_OPS = ("add", "sub", "mul", "div")
# Only where the op computes in the tensor's own dtype (its "opmath" type): there the number,
# converted once to that dtype, is exactly what every call would convert it to.
_HOISTED_DTYPES = (torch.float32, torch.float64)


def _hoist_scalars(gm) -> int:
    """Turn ``x * 2.0``-style Python-number operands into 0-dim tensor constants; returns how many
    operands it turned.

    Eager (and TorchScript, for ``aten::mul.Scalar``) wraps the number into a new 0-dim tensor on
    every call, then casts it to the tensor's dtype: 2-3 us per op on CPU, more than the op itself
    on small tensors (``x * 2.0`` 5.6 us vs ``x * c`` 2.8 us with ``c`` a 0-dim float32 tensor,
    16 floats). Hoisted, that happens once, at compile time, by the same cast: the results are
    the same bits. Only where that holds exactly: ``aten.{add,sub,mul,div}.Tensor(t, number)``
    with ``t`` float32/float64 on CPU and the result in ``t``'s dtype (an int tensor times a float
    promotes: left alone), since with ``t``'s dtype the constant promotes exactly as the wrapped
    number does, and float32/float64 ops compute in that dtype (half/bfloat16 compute in float32:
    left alone)."""
    aten = torch.ops.aten
    ops = {getattr(aten, name).Tensor for name in _HOISTED_OPS}
    made: dict = {}
    hoisted = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in ops or len(node.args) != 2:
            continue
        t, number = node.args
        if not isinstance(t, torch.fx.Node) or type(number) not in (float, int) or set(node.kwargs) - {"alpha"}:
            continue
        (tv, t_device), (out, out_device) = _value(t), _value(node)
        if not (isinstance(tv, torch.Tensor) and isinstance(out, torch.Tensor)):
            continue
        if tv.dtype not in _HOISTED_DTYPES or out.dtype != tv.dtype or t_device.type != "cpu" or out_device.type != "cpu":
            continue
        key = (tv.dtype, type(number), float.hex(number) if type(number) is float else number)
        name = made.get(key)
        if name is None:
            try:
                wrapped = torch.tensor(number, dtype=torch.float64 if type(number) is float else torch.int64)
            except (OverflowError, RuntimeError):
                continue
            name = made[key] = f"{HOISTED_PREFIX}{len(made)}"
            setattr(gm, name, wrapped.to(tv.dtype))
        with graph.inserting_before(node):
            const = graph.create_node("get_attr", name)
        node.args = (t, const)
        hoisted += 1
    return hoisted


# Ops whose result is always a new tensor (checked by name: a schema without alias annotations
# is not enough -- aten.dropout returns its input itself in eval mode).
_FRESH_OPS = frozenset({"relu", "gelu", "sigmoid", "tanh", "exp", "linear", "addmm", "mm", "bmm",
                        *_HOISTED_OPS})


def _fresh_result(node) -> bool:
    """Does ``node`` compute a new tensor, one nothing else (an input, a weight) shares?"""
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target.namespace == "aten" and node.target.overloadpacket.__name__ in _FRESH_OPS
            and node.target._overloadname in ("default", "Tensor"))


def _value(node) -> tuple:
    """A traced node's value metadata and the device of its value: ``(val, device)``. make_fx's
    fake values carry their device; the recorder's are ``meta`` tensors, with the device beside
    them in ``node.meta["device"]``."""
    val = node.meta.get("val")
    return val, node.meta.get("device", getattr(val, "device", None))


def _static_layout(node) -> tuple | None:
    v, device = _value(node)
    if not isinstance(v, torch.Tensor) or device.type != "cpu":
        return None
    shape, stride = tuple(v.shape), tuple(v.stride())
    if not all(type(d) is int for d in shape + stride):
        return None                      # symbolic sizes: left alone
    return v.dtype, shape, stride


def _in_place(gm) -> int:
    """``t * c`` -> ``t.mul_(c)`` where ``t`` is a tensor the graph itself just computed and uses
    nowhere else; returns how many ops it turned.

    Each elementwise op on a new result costs an allocation (0.5-0.8 us on CPU, more on big
    tensors: memory traffic). Only ``aten.{add,sub,mul,div}.Tensor`` whose first operand was made
    by one of :data:`_FRESH_OPS` (or by an op this pass made in place on such a tensor), has no
    other user, and has the result's dtype, shape and strides (CPU, static sizes): the same
    kernel then writes the same values into that tensor instead of a new one. Graphs with
    convolutions are left alone (their MKLDNN passes after loading match out-of-place ops)."""
    aten = torch.ops.aten
    if any(n.op == "call_function" and "conv" in str(n.target) for n in gm.graph.nodes):
        return 0
    ops = {getattr(aten, name).Tensor: getattr(aten, name + "_").Tensor for name in _HOISTED_OPS}
    fresh: set = set()
    turned = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in ops and node.args and isinstance(node.args[0], torch.fx.Node):
            t = node.args[0]
            layout = _static_layout(node)
            if (t in fresh and len(t.users) == 1 and layout is not None
                    and _static_layout(t) == layout):
                node.target = ops[node.target]
                fresh.add(node)
                turned += 1
                continue
        if _fresh_result(node):
            fresh.add(node)
    return turned


def _split_output(out, hint: Callable[[Any], str | None] | None):
    leaves, spec = pytree.tree_flatten(out)
    tensor_idx, consts = [], []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            tensor_idx.append(i)
        elif isinstance(leaf, _OUT_CONST_TYPES):
            consts.append((i, leaf))
        else:
            extra = hint(leaf) if hint is not None else None
            raise FallbackReason(
                f"the output contains a {type(leaf).__module__}.{type(leaf).__qualname__}, which a frozen "
                f"graph can't return (only tensors, plain constants and pytree containers)"
                + (f"; {extra}" if extra else ""))
    return leaves, spec, tuple(tensor_idx), tuple(consts)


def trace(fn: Callable, call: CallSpec, tensors: list, dims: dict | None = None, recorder: bool = True) -> Traced:
    """Trace ``fn`` at the pre-dispatch level for one signature; non-tensor leaves are baked in.

    A real-tensor trace goes to :mod:`jitfreeze.record` first (``recorder``; the same graph as
    ``make_fx``, without importing Dynamo), and to ``make_fx`` where the recorder declines.

    ``dims`` ({tensor leaf number: dims}) makes those dims symbolic: the trace then runs on fake
    inputs (weights stay real), computes no real output, and records shape guards.

    The trace runs in :func:`jitfreeze.compat.tracing_context` (libraries such as transformers then
    take their trace-friendly paths), and its graph is refused when values computed inside
    ``torch.vmap``-style transforms escaped into it as constants.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    from . import compat

    output_hint = compat.explain_unsupported_output
    compat.install_fast_paths()

    captured: list = []

    def flat_fn(*flat_tensors):
        args, kwargs = call.rebuild(flat_tensors)
        out = compat.ensure_pytree_output(fn(*args, **kwargs))
        try:
            leaves, spec, tensor_idx, consts = _split_output(out, output_hint)
        except FallbackReason as reason:
            reason.result = out          # the function ran: its result is the answer to this call
            raise
        captured.append((out, spec, tensor_idx, consts, [leaves[i] for i in tensor_idx]))
        if spec.is_leaf() and tensor_idx == (0,):
            return leaves[0]          # a lone tensor: the graph returns it as is (no list to build)
        return [leaves[i] for i in tensor_idx]

    try:
        # make_fx's mode stacks and the "being compiled" flags are not safe to share between
        # threads tracing at once: one trace at a time per process (tracing holds the GIL anyway).
        with _TRACE_LOCK, torch.no_grad(), compat.tracing_context():
            if dims:
                from .dynamic import symbolic_inputs
                fakes, shape_env = symbolic_inputs(tensors, dims)
                gm = make_fx(flat_fn, tracing_mode="symbolic", _allow_non_fake_inputs=True,
                             pre_dispatch=True)(*fakes)
            else:
                gm = _record(flat_fn, tensors) if recorder else None
                if gm is None:
                    with compat.one_fake_mode():
                        gm = make_fx(flat_fn, pre_dispatch=True)(*tensors)
    except FallbackReason as reason:
        if dims:
            reason.result = NO_RESULT      # a symbolic trace ran on fake inputs: no real result
        raise
    except Exception as exc:  # noqa: BLE001 - any trace failure is a fallback with its reason
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "data-dependent" in msg.lower() or "tracing tensor" in msg.lower() or "GuardOnDataDependent" in type(exc).__name__:
            msg = f"data-dependent control flow or value ({msg}); tracing would bake one branch"
        raise FallbackReason(f"tracing failed: {type(exc).__name__}: {msg}") from exc
    out, out_spec, out_tensor_idx, out_consts, real = captured[-1]
    guards, specialized = [], {}
    try:
        unsafe = compat.explain_unsafe_constants(gm) or _value_shaped(gm)
        if unsafe is not None:
            raise FallbackReason(unsafe)
        if dims:
            from .dynamic import GuardError, produce_guards
            placeholders = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
            try:
                guards, specialized = produce_guards(shape_env, placeholders, dims)
            except GuardError as exc:
                raise FallbackReason(f"shape guards outside what jitfreeze evaluates: {exc}") from exc
        _hoist_scalars(gm)
        _in_place(gm)
        _clean(gm)
    except FallbackReason as reason:
        if not dims:
            reason.result = out
        raise
    if dims:
        out, real = NO_RESULT, None
    constants = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = getattr(gm, node.target)
            if isinstance(value, torch.Tensor):
                constants.append((node.target, value))
    return Traced(gm, constants, out_spec, out_tensor_idx, out_consts, real, out, guards, specialized)


def _value_shaped(gm) -> str | None:
    """Why ``gm`` must not be compiled, when an op in it gives a result whose shape depends on the
    values of a tensor computed from the inputs (``nonzero``, boolean-mask indexing, ``unique``,
    ...; see :func:`jitfreeze.dynamic.value_shaped_op`), else None. Every tracer records such an
    op on this call's values (real tensors) or on a fresh size symbol (symbolic), so what follows
    it (views, new tensors, loops over its rows) keeps this call's shapes. The same op on the
    function's own constants is left alone: its shapes are the same on every call."""
    from .dynamic import value_shaped_op

    def value(arg):
        return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg

    varies: set = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            varies.add(node)
            continue
        seeded = isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags
        if not (seeded or any(n in varies for n in node.all_input_nodes)):
            continue
        varies.add(node)
        if node.op == "call_function" and value_shaped_op(node.target, node.args, node.kwargs, value, varies.__contains__):
            return (f"{node.target} gives a result whose shape (or value as a number) depends on the input's "
                    "values (data-dependent); a traced graph would keep this call's shapes for every later call")
    return None


def _record(flat_fn: Callable, tensors: list):
    """The recorder's graph of ``flat_fn``, or None where it declines (then ``make_fx`` traces;
    an exception of the function's own is left for ``make_fx`` to meet and word, too)."""
    from .record import NotRecorded, record

    try:
        return record(flat_fn, tensors)[0]
    except FallbackReason:
        raise                            # jitfreeze's own verdict on the function's output
    except NotRecorded as exc:
        log.debug("recorder declined: %s; tracing with make_fx", exc)
    except Exception as exc:  # noqa: BLE001 - make_fx traces it again and decides
        log.debug("recorder stopped on %s: %s; tracing with make_fx", type(exc).__name__, exc)
    return None


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    if dtype in (torch.float16, torch.bfloat16):
        return 2e-2, 2e-2
    return 1e-3, 1e-4


def outputs_match(outputs, reference) -> str | None:
    """None when the compiled outputs agree with eager's, else why not."""
    if len(outputs) != len(reference):
        return f"{len(outputs)} outputs instead of {len(reference)}"
    for i, (a, b) in enumerate(zip(outputs, reference)):
        if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            got = (tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else type(a).__name__
            return f"output {i} is {got} instead of {(tuple(b.shape), b.dtype, b.device)}"
        if a.is_floating_point() or a.is_complex():
            rtol, atol = _tolerance(a.dtype)
            scale = float(b.detach().abs().max()) if b.numel() else 0.0
            if not torch.allclose(a, b, rtol=rtol, atol=atol * max(1.0, scale), equal_nan=True):
                diff = float((a.double() - b.double()).abs().max())
                return f"output {i} differs from eager by up to {diff:.3g}"
        elif not torch.equal(a, b):
            return f"output {i} differs from eager"
    return None


class SavedArtifact:
    """A freshly saved artifact in a file: load it in place, read its bytes, remove it.

    ``error`` is the exception that kept it from the path the caller asked for (it was then saved
    to a temporary file instead), or None. :meth:`release` hands the file over to whoever now
    owns it (a cache that adopted it): :meth:`remove` then leaves it alone."""

    __slots__ = ("path", "error")

    def __init__(self, path: str, error: Exception | None = None):
        self.path = path
        self.error = error

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def release(self) -> None:
        self.path = None

    def remove(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def __len__(self) -> int:
        return os.path.getsize(self.path)


def _room_for(path: str, need: int) -> bool:
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return True          # unknown: let the write tell
    return st.f_bavail * st.f_frsize >= need


def _save(module, path: str | None, extra: dict, estimate: int) -> SavedArtifact:
    """torch.jit.save to ``path`` (e.g. straight into a cache's directory), or to a temporary
    file when no path is given or there is no room there (a full disk): the compiled function is
    still good, only storing it is not.

    Free space is checked first because torch.jit.save does not fail cleanly on a full disk: its
    zip writer throws again from its destructor and the process aborts (seen here on a full
    tmpfs). ``estimate`` is the artifact's expected size (its constants, plus a margin)."""
    error = None
    if path is not None:
        if _room_for(path, estimate):
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
        if not _room_for(tmp, estimate):
            raise FallbackReason(f"no room to save the frozen function ({estimate / 1e6:.1f} MB) in "
                                 f"{os.path.dirname(tmp)}")
        torch.jit.save(module, tmp, _extra_files=extra)
    except BaseException:
        os.unlink(tmp)
        raise
    return SavedArtifact(tmp, error)


class BindingError(RuntimeError):
    """An artifact binds weights that the module at hand does not have (or not in that form)."""


# The artifact's record of which graph attributes are the module's own weights.
_BINDINGS_FILE = "jitfreeze-bindings.json"


def module_weights(module) -> dict | None:
    """A module's tensors by name -- what bound artifacts bind -- or None for anything else."""
    if not isinstance(module, torch.nn.Module):
        return None
    weights = dict(module.named_parameters(remove_duplicate=False))
    weights.update(module.named_buffers(remove_duplicate=False))
    return weights


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
                as_is_s, transposed_s = _medians_side_by_side([frozen, transposed], args, once)
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
        if torch._C._get_graph_executor_optimize() and not _canonicalized_scalars(fwd.graph):
            with _PLAN_LOCK:             # the bailout depth is process-wide: our plans take turns
                strategy = torch._C._jit_set_fusion_strategy([("STATIC", 0)])
                try:
                    outs = fwd(*tensors)
                finally:
                    torch._C._jit_set_fusion_strategy(strategy)
            if _planned_as_is(module, fwd.graph):
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


def _medians_side_by_side(fns, args, once: float, rounds: int = 5) -> list:
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


def _canonicalized_scalars(graph) -> bool:
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


def _structure(graph) -> list:
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


def _planned_as_is(module, graph) -> bool:
    """Whether the executor's plan for ``module.forward`` runs ``graph`` as it is."""
    try:
        plans = list(module._c.get_debug_state().execution_plans.values())
    except RuntimeError:          # no plan made (the executor ran unoptimized)
        return False
    return len(plans) == 1 and _structure(plans[0].graph) == _structure(graph)


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
