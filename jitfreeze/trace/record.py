"""A pre-dispatch recorder for real tensors: ``make_fx(f, pre_dispatch=True)``'s graph, without Dynamo.

``make_fx`` imports ``torch._dynamo`` on every trace (its entry point, its proxy mode's
constructor, its trace loop, and every ``FakeTensorMode`` it makes for node metadata do):
1.8-2.5 s in a fresh process here, most of a small model's cold start. For the common case --
a real-tensor trace of plain tensors -- this module records the same graph with one dispatch
mode at the same level (``PreDispatch``, where ``conv2d``, ``linear``, ``batch_norm``,
``layer_norm`` and ``scaled_dot_product_attention`` arrive whole) and nothing else:

* each op runs on the real tensors once, as eagerly; its node takes the op's name, as in
  ``make_fx`` (``linear``, ``linear_1``, ...); ``lift_fresh`` is recorded as ``lift_fresh_copy``;
* inputs are placeholders ``arg0_1``, ``arg1_1``, ...; a tensor the function reaches that is
  neither an input nor computed in the trace is a constant: ``_param_constant<n>`` for a
  ``Parameter``, ``_tensor_constant<n>`` otherwise, read by one ``get_attr`` node per use, as
  ``make_fx`` names and reads them;
* ``node.meta["val"]`` holds a ``meta``-device tensor with the value's dtype, shape and strides,
  and ``node.meta["device"]`` its device (what the pipeline's passes read).

It **declines** -- :class:`NotRecorded`, and the caller traces with ``make_fx`` -- wherever
``make_fx`` would record more than ops on plain tensors, or could fold what the recorder cannot:
autocast, ``torch.vmap``/``torch.func`` transforms, higher-order ops, tensor subclasses, nested,
sparse or quantized tensors, ops returning anything but tensors, reads of constants' values
(``torch.tensor([2.0])[0].item()``), and ``torch._dynamo`` imported during the trace.

It **refuses** -- :class:`~jitfreeze.errors.FallbackReason`: no tracer may compile this -- a read
of a value computed from the inputs (``.item()``, ``bool(t)``, ``t.tolist()``: data-dependent)
and memory of an input or of a traced value reaching an op untraced (``.data``, ``.numpy()``),
which would be baked in as a constant holding this call's numbers (``make_fx`` bakes it).

A decline or refusal is remembered even when the traced code catches the exception it raised:
the graph of a code path that only ran because of that exception is never used (``make_fx``
records such a path as if it were the function's own).

While it records, a pass-through torch-function mode is active, as ``make_fx``'s pre-dispatch
torch-function modes are: library code that asks ``has_torch_function`` (e.g. the
``MultiheadAttention`` fused fast path) takes the path it takes under ``make_fx``, so both tracers
give the same graph, and the same cache key.
"""

from __future__ import annotations

import operator
import sys
import weakref
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from ..errors import FallbackReason

__all__ = ["NotRecorded", "can_record", "record"]


class NotRecorded(Exception):
    """The recorder declines this function: trace it with ``make_fx``."""


def can_record() -> bool:
    """Is the recorder usable here: this torch has the internals it uses, and Dynamo is not tracing us?"""
    compiler = getattr(torch, "compiler", None)
    compiling = getattr(compiler, "is_dynamo_compiling", None)
    return _Recorder is not None and not (compiling is not None and compiling())


def _plain(t: torch.Tensor) -> bool:
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided and not t.is_nested
            and not t.is_quantized and not _functorch_wrapped(t))


def _storage(t: torch.Tensor):
    """``t``'s storage object (torch keeps one Python object per live storage), or None."""
    if not t.numel():
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def _describe(node, t: torch.Tensor) -> None:
    node.meta["val"] = torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype, device="meta")
    node.meta["device"] = t.device


_is_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def _functorch_wrapped(t: torch.Tensor) -> bool:
    """A tensor inside a ``torch.vmap``/``torch.func`` transform (batched or grad-tracking)."""
    return bool(_is_wrapped is not None and _is_wrapped(t))


def _build():
    """The recorder classes, or None where this torch lacks the internals they use."""
    try:
        from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode
        from torch.fx.experimental.proxy_tensor import _side_effectful_need_to_be_preserved_pre_dispatch as special
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.weak import WeakTensorKeyDictionary
        pre_dispatch = torch._C.DispatchKey.PreDispatch
    except (ImportError, AttributeError):
        return None, None

    aten = torch.ops.aten
    value_reads = frozenset({aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default})
    lift_fresh, lift_fresh_copy = torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default
    declined_calls = frozenset(f for f in special if f is not torch._C._set_grad_enabled)

    class Recorder(ProxyTorchDispatchMode):
        """Records every op reaching the PreDispatch key into ``graph``.

        A ``ProxyTorchDispatchMode`` by class only: torch's pre-dispatch mode slot accepts
        nothing else. None of its state is made (its constructor imports ``torch._inductor``):
        every method torch calls on a mode in that slot (``__enter__``, ``__exit__``,
        ``__torch_dispatch__``) is this class's own. Higher-order ops look up handlers by exact
        mode class, find none for this one, and so decline.
        """

        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            # TorchDispatchMode would wrap __torch_dispatch__ in torch._disable_dynamo, which
            # imports Dynamo on its first call. The recorder never runs while Dynamo compiles
            # its caller (can_record), so there is nothing for that wrapper to do.
            return False

        def __init__(self, graph, root):
            TorchDispatchMode.__init__(self, pre_dispatch)
            self.graph = graph
            self.root = root
            self.op = None
            # tensor -> node, held weakly as make_fx holds them: a strong reference would keep every
            # intermediate alive for the whole trace, and makes factory functions (torch.zeros...)
            # hand the caller a shallow copy instead of the tensor the op returned.
            self.nodes = WeakTensorKeyDictionary()
            self.fresh: dict[str, int] = {}
            self.constants: dict[int, tuple] = {}  # id(tensor) -> (tensor, attribute name); root holds them
            self.declined: str | None = None
            self.refused: str | None = None
            # storage address -> weak reference to the storage of an input or op result (while it lives)
            self.storages: dict[int, Any] = {}

        def __enter__(self):
            return TorchDispatchMode.__enter__(self)

        def __exit__(self, *exc):
            return TorchDispatchMode.__exit__(self, *exc)

        def decline(self, why: str):
            if self.declined is None:
                self.declined = why
            raise NotRecorded(why)

        def refuse(self, why: str):
            if self.refused is None:
                self.refused = why
            raise NotRecorded(why)

        def bind(self, t: torch.Tensor, node) -> None:
            """``t`` (an input or an op's result) is ``node``'s value from now on."""
            self.nodes[t] = node
            storage = _storage(t)
            if storage is not None:
                self.storages[storage.data_ptr()] = weakref.ref(storage)
            _describe(node, t)

        def node_of(self, t: torch.Tensor):
            node = self.nodes.get(t)
            if node is not None:
                return node
            known = self.constants.get(id(t))
            if known is None or known[0] is not t:
                known = (t, self.constant_name(t))
                self.constants[id(t)] = known
            # A get_attr node per use, as make_fx emits them (the same code, so the same cache key).
            node = self.graph.get_attr(known[1])
            _describe(node, t)
            return node

        def constant_name(self, t: torch.Tensor) -> str:
            """Make ``t`` a constant of the graph (``_param_constant<n>``/``_tensor_constant<n>``)."""
            if not _plain(t):
                self.decline(f"a {type(t).__name__} tensor (layout {t.layout})")
            storage = _storage(t)
            known = self.storages.get(storage.data_ptr()) if storage is not None else None
            if known is not None and known() is not None:     # alive: its memory cannot be someone else's
                # Memory of an input or of a value computed in the trace, reaching an op by a way no
                # op recorded (.data, .numpy(), a C++ extension's alias): baked in as a constant,
                # it would hold this call's numbers. make_fx would bake it too: refuse outright.
                self.refuse(f"a tensor sharing memory with a traced value reached {self.op} without passing "
                            "through a traced op (e.g. via .data or .numpy()); it would be baked into the graph "
                            "as a constant")
            prefix = "_param_constant" if isinstance(t, torch.nn.Parameter) else "_tensor_constant"
            i = self.fresh.get(prefix, 0)
            while hasattr(self.root, f"{prefix}{i}"):
                i += 1
            self.fresh[prefix] = i + 1
            setattr(self.root, f"{prefix}{i}", t)
            return f"{prefix}{i}"

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.prim.device.default:
                return func(*args, **kwargs)
            if self.declined is not None or self.refused is not None:
                raise NotRecorded(self.declined or self.refused)
            if torch._C._is_any_autocast_enabled():
                self.decline("autocast is enabled")
            if not isinstance(func, torch._ops.OpOverload):
                self.decline(f"{func} is not an ATen-style op")
            for leaf in pytree.tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and not _plain(leaf):
                    self.decline(f"{func} on a {type(leaf).__name__} tensor")
            if func is lift_fresh:
                # As make_fx: the graph copies a literal (torch.tensor([...])) instead of aliasing
                # the constant, which a later in-place op on the literal would otherwise change.
                func = lift_fresh_copy
            self.op = func
            n_args, n_kwargs = pytree.tree_map_only(torch.Tensor, self.node_of, (args, kwargs))
            varies = torch.Tag.nondeterministic_seeded in func.tags or any(
                n.meta.get("varies", False) for n in pytree.tree_leaves((n_args, n_kwargs))
                if isinstance(n, torch.fx.Node))
            if torch.Tag.data_dependent_output in func.tags or func in value_reads:
                if varies:
                    # .item(), bool(t), t.tolist() on a value computed from the inputs: refused even if
                    # the function catches the exception (it would carry on down another path).
                    self.refuse(f"tracing failed: data-dependent control flow or value ({func} reads a traced "
                                "tensor's value); tracing would bake one branch")
                self.decline(f"{func} reads a constant's value (make_fx folds it)")
            out = func(*args, **kwargs)
            name = self.graph._target_to_str(func.overloadpacket.__name__)
            node = self.graph.create_node("call_function", func, tuple(n_args), n_kwargs, name=name)
            node.meta["varies"] = varies
            if isinstance(out, torch.Tensor):
                self.bind(out, node)
            elif isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
                for i, o in enumerate(out):
                    item = self.graph.call_function(operator.getitem, (node, i))
                    item.meta["varies"] = varies
                    self.bind(o, item)
            elif out is not None:
                self.decline(f"{func} returns a {type(out).__name__}")
            return out

    class CallWatch(TorchFunctionMode):
        """Passes calls through; declines the ones ``make_fx`` records as more than ops."""

        def __init__(self, recorder):
            super().__init__()
            self.recorder = recorder

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in declined_calls:
                self.recorder.decline(f"{getattr(func, '__qualname__', func)} (autocast or a torch.func transform)")
            return func(*args, **(kwargs or {}))

    return Recorder, CallWatch


_Recorder, _CallWatch = _build()


def record(fn: Callable[..., Any], tensors: list) -> tuple[Any, Any]:
    """Run ``fn(*tensors)`` once, recording it: ``(GraphModule, fn's return value)``.

    ``fn`` returns a tensor or a list of tensors (the graph's outputs). Raises
    :class:`NotRecorded` where the recorder declines and ``FallbackReason`` where it refuses (``fn``
    may have run, partly or wholly, in both cases); other exceptions from ``fn`` propagate as they are.
    """
    if not can_record():
        raise NotRecorded("Dynamo is compiling the caller" if _Recorder is not None
                          else "this torch lacks the internals the recorder uses")
    had_dynamo = "torch._dynamo" in sys.modules
    from torch._dispatch.python import enable_python_dispatcher

    root = torch.nn.Module()
    graph = torch.fx.Graph()
    recorder = _Recorder(graph, root)
    for i, t in enumerate(tensors):
        if not _plain(t):
            raise NotRecorded(f"input {i} is a {type(t).__name__} tensor (layout {t.layout})")
        node = graph.placeholder(f"arg{i}_1")
        node.meta["varies"] = True
        recorder.bind(t, node)
    try:
        with enable_python_dispatcher(), _CallWatch(recorder), recorder:
            out = fn(*tensors)
        if recorder.declined is None:
            outs = [out] if isinstance(out, torch.Tensor) else list(out)
            nodes = [recorder.node_of(o) for o in outs]
    except Exception:
        if recorder.refused is None and recorder.declined is None:
            raise                        # the function's own exception
    if recorder.refused is not None:
        raise FallbackReason(recorder.refused)
    if recorder.declined is not None:
        raise NotRecorded(recorder.declined)
    if not had_dynamo and "torch._dynamo" in sys.modules:
        # Its import ran under the recorder's modes; what it did there is not the function's.
        raise NotRecorded("torch._dynamo was imported during the trace")
    graph.output(nodes[0] if isinstance(out, torch.Tensor) else nodes)
    return torch.fx.GraphModule(root, graph, fn.__class__.__name__ if isinstance(fn, torch.nn.Module)
                                else getattr(fn, "__name__", "fn")), out
