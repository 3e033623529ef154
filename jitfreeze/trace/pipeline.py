"""The trace: a call -> a flat FX graph of aten operators, cleaned (overloads stripped, in-place
operators made out of place where that is safe, scalar constants hoisted), and the check that
a compiled function's outputs agree with eager's.

Knows nothing of caching or of the backend that compiles the graph (:mod:`jitfreeze.backend`).
The tracing machinery (``make_fx``, functorch) pulls in ``torch._dynamo`` (about a second of
imports), so it is imported lazily, on the first trace; loading a stored artifact needs none of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import operator
import threading
import warnings
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from ..errors import FallbackReason
from .signature import CallSpec

__all__ = ["Traced", "Declined", "NO_RESULT", "trace", "HOISTED_PREFIX", "outputs_match"]

log = logging.getLogger("jitfreeze")

_TRACE_LOCK = threading.RLock()

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


# A result that does not exist: the function did not run on this call's real values (a symbolic
# trace runs it on fake inputs; a trace that failed may not have run it to the end).
NO_RESULT = object()


@dataclasses.dataclass
class Declined:
    """A function that can't be traced for this signature (``reason``): it runs eagerly. ``result``:
    its result when the trace already ran it to the end on the real inputs (calling it again would
    repeat its side effects), else ``NO_RESULT``."""

    reason: str
    result: Any = NO_RESULT


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
    writes_inputs: bool = True             # the graph may write to its inputs (see _writes_inputs)


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


# Targets without a schema that only read their arguments.
_READ_ONLY = frozenset({operator.getitem, torch._C._set_grad_enabled})


def _writes_inputs(gm) -> bool:
    """Whether the graph may write to one of its inputs (``x.add_(1)``, ``out=x``): what an op's
    schema marks as written, traced back through views to a placeholder. A target with no schema
    that is not known to only read counts as writing."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            if node.target not in _READ_ONLY and any(
                    isinstance(a, torch.fx.Node) and _root(a).op == "placeholder"
                    for a in (*node.args, *node.kwargs.values())):
                return True
            continue
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            given = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            for g in given if isinstance(given, (list, tuple)) else (given,):
                if isinstance(g, torch.fx.Node) and _root(g).op == "placeholder":
                    return True
    return False


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


def trace(fn: Callable, call: CallSpec, tensors: list, dims: dict | None = None,
          recorder: bool = True) -> Traced | Declined:
    """Trace ``fn`` at the pre-dispatch level for one signature; non-tensor leaves are baked in.
    Returns the :class:`Traced` graph, or :class:`Declined` with why it can't be compiled.

    A real-tensor trace goes to :mod:`jitfreeze.trace.record` first (``recorder``; the same graph as
    ``make_fx``, without importing Dynamo), and to ``make_fx`` where the recorder declines.

    ``dims`` ({tensor leaf number: dims}) makes those dims symbolic: the trace then runs on fake
    inputs (weights stay real), computes no real output, and records shape guards.

    The trace runs in :func:`jitfreeze.trace.libraries.tracing_context` (libraries such as transformers then
    take their trace-friendly paths), and its graph is refused when values computed inside
    ``torch.vmap``-style transforms escaped into it as constants.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    from . import libraries

    output_hint = libraries.explain_unsupported_output
    libraries.install_fast_paths()

    captured: list = []
    ran: list = []                       # the result of a run whose output can't be a graph's

    def flat_fn(*flat_tensors):
        args, kwargs = call.rebuild(flat_tensors)
        out = libraries.ensure_pytree_output(fn(*args, **kwargs))
        try:
            leaves, spec, tensor_idx, consts = _split_output(out, output_hint)
        except FallbackReason:
            ran.append(out)              # the function ran: its result is the answer to this call
            raise
        captured.append((out, spec, tensor_idx, consts, [leaves[i] for i in tensor_idx]))
        if spec.is_leaf() and tensor_idx == (0,):
            return leaves[0]          # a lone tensor: the graph returns it as is (no list to build)
        return [leaves[i] for i in tensor_idx]

    try:
        # make_fx's mode stacks and the "being compiled" flags are not safe to share between
        # threads tracing at once: one trace at a time per process (tracing holds the GIL anyway).
        with _TRACE_LOCK, torch.no_grad(), libraries.tracing_context():
            if dims:
                from .dynamic import symbolic_inputs
                fakes, shape_env = symbolic_inputs(tensors, dims)
                gm = make_fx(flat_fn, tracing_mode="symbolic", _allow_non_fake_inputs=True,
                             pre_dispatch=True)(*fakes)
            else:
                gm = _record(flat_fn, tensors) if recorder else None
                if gm is None:
                    with libraries.one_fake_mode():
                        gm = make_fx(flat_fn, pre_dispatch=True)(*tensors)
    except FallbackReason as reason:
        # a symbolic trace ran on fake inputs: no real result
        return Declined(str(reason), ran[-1] if ran and not dims else NO_RESULT)
    except Exception as exc:  # noqa: BLE001 - any trace failure is a fallback with its reason
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "data-dependent" in msg.lower() or "tracing tensor" in msg.lower() or "GuardOnDataDependent" in type(exc).__name__:
            msg = f"data-dependent control flow or value ({msg}); tracing would bake one branch"
        return Declined(f"tracing failed: {type(exc).__name__}: {msg}")
    out, out_spec, out_tensor_idx, out_consts, real = captured[-1]
    guards, specialized = [], {}
    try:
        unsafe = libraries.explain_unsafe_constants(gm) or _value_shaped(gm)
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
        writes_inputs = _writes_inputs(gm)
        _clean(gm)
    except FallbackReason as reason:
        return Declined(str(reason), NO_RESULT if dims else out)
    if dims:
        out, real = NO_RESULT, None
    constants = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = getattr(gm, node.target)
            if isinstance(value, torch.Tensor):
                constants.append((node.target, value))
    return Traced(gm, constants, out_spec, out_tensor_idx, out_consts, real, out, guards, specialized,
                  writes_inputs)


def _value_shaped(gm) -> str | None:
    """Why ``gm`` must not be compiled, when an op in it gives a result whose shape depends on the
    values of a tensor computed from the inputs (``nonzero``, boolean-mask indexing, ``unique``,
    ...; see :func:`jitfreeze.trace.dynamic.value_shaped_op`), else None. Every tracer records such an
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
