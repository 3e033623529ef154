"""Compatibility hooks for libraries with trace-friendly code paths (Hugging Face transformers, torch.nn).

What lives here:

* :func:`tracing_context` - while jitfreeze traces, ``torch.compiler.is_compiling()`` says True,
  as it does for every ``make_fx`` trace a ``torch.compile`` backend runs. Libraries then take
  the paths they keep for compilers: no data-dependent ``.item()`` checks on inputs.
* :func:`one_fake_mode` - one fake tensor mode for a real-tensor trace's metadata (instead of a
  new one per traced value: a third of the trace's time).
* :func:`explain_unsupported_output` - a hint for output objects a frozen graph cannot return
  (e.g. a transformers key/value ``Cache``), used in the fallback warning.
* :func:`ensure_pytree_output` - make sure output classes such as transformers' ``ModelOutput``
  subclasses are pytree nodes, so they come back as the same class with the same fields.
* :func:`explain_unsafe_constants` - detect a traced graph that baked in values computed inside
  ``torch.vmap`` (which a pre-dispatch ``make_fx`` trace cannot record); such a graph must not be
  compiled.
* :func:`install_fast_paths` - during our traces, ``nn.TransformerEncoderLayer`` and
  ``nn.MultiheadAttention`` take the fused kernels eager inference takes (make_fx makes them
  refuse), so the frozen graph is not a slower decomposition of what eager runs.

Nothing here imports transformers: classes are recognised by name and module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from collections.abc import Mapping
from typing import Any, Iterator

import torch

__all__ = ["tracing_context", "in_tracing_context", "one_fake_mode", "explain_unsupported_output",
           "ensure_pytree_output", "explain_unsafe_constants"]

# The torch.compiler module global behind torch.compiler.is_compiling() (torch >= 2.3). Only this
# one: see tracing_context() for why not _is_exporting_flag.
_FLAG_NAMES = ("_is_compiling_flag",)

_lock = threading.Lock()
_depth = 0                       # active tracing_context() entries, all threads together
_saved: dict[str, bool] = {}     # flag values before the outermost entry
_local = threading.local()       # per-thread depth, for in_tracing_context()


def _flag_names() -> tuple[str, ...]:
    compiler = getattr(torch, "compiler", None)
    return tuple(n for n in _FLAG_NAMES if compiler is not None and hasattr(compiler, n))


@contextlib.contextmanager
def tracing_context() -> Iterator[None]:
    """Present a jitfreeze trace to library code as what it is: a compile.

    **What it sets.** One module global, the one behind the public query::

        torch.compiler._is_compiling_flag = True   # -> torch.compiler.is_compiling() is True

    torch sets the same flag, the same way, for a whole ``torch.compile`` session
    (``torch.compiler._compile_session_context``, entered by ``torch._dynamo.convert_frame``
    "so torch.compiler.is_compiling() is observable in code that runs during the compile session
    but is not directly Dynamo-traced (... make_fx invoked from a custom backend, etc.)") and
    for ``torch.export`` (``torch._export.utils._compiling_state_context``, around its non-strict
    ``make_fx`` trace). A jitfreeze trace is exactly such a ``make_fx`` trace of real Python code.
    transformers' ``is_torchdynamo_compiling()`` and ``is_tracing()`` read this query.

    Deliberately *not* set: ``torch.compiler._is_exporting_flag`` (what ``torch.export`` adds).
    In torch it changes more than library paths, process-wide: TorchScript functions
    (``torch.jit.script``-ed free functions) run their Python original instead of the
    TorchScript interpreter, ``torch.compile(...)`` becomes a no-op with a warning,
    ``invoke_subgraph`` routes through Dynamo, and wrapper-subclass constructors are checked.
    ``torch.jit.is_tracing()`` is not touched either (it would claim a ``torch.jit.trace``).

    **What it changes.** Library code that asks ``torch.compiler.is_compiling()`` takes its
    trace-friendly path. In transformers: no ``.item()``/``bool(tensor)`` checks on input values
    (e.g. "is the attention mask all ones? then drop it": the mask is always built from the input
    tensor instead, so one frozen function serves full and padded masks); deprecation and
    "for information" warnings are skipped; ``ModelOutput`` classes *defined* during the window
    are not registered as pytree nodes (see :func:`ensure_pytree_output`); SSM models
    (FalconMamba, Mamba, Jamba, Zamba) may use ``associative_scan`` instead of a Python loop
    (outside Dynamo it runs, and ``make_fx`` records it, as plain aten ops). Inside
    torch itself: ``nn.Module.__call__`` skips its always-called forward hooks on exceptions;
    ``torch.func.vmap``/``grad`` skip a ``functools.wraps`` step; the ``TransformerEncoder``
    sparsity fast path is skipped when ``mask_check`` is on; optimizers keep step counts as
    tensors and skip device grouping; ``torch.fx``'s ``is_fx_symbolic_tracing()`` reads False;
    flex-attention warnings are silenced. None of these changes the numbers an inference forward
    computes. TorchScript code never sees the flag (``is_compiling()`` checks
    ``torch.jit.is_scripting()`` first and is compiled to the constant False), so the scripted,
    frozen and loaded modules are unaffected.

    **For how long.** Only for the ``with`` block; jitfreeze wraps the ``make_fx`` call with it and
    nothing else (not scripting, freezing, loading, eager fallbacks or compiled calls). The
    previous value is restored on exit, also when the trace raises.

    **Threads.** torch keeps the flag as a process-wide global with no thread-local variant, so
    during the window *other threads* also see ``is_compiling()`` as True: their eager
    transformers calls take the trace-friendly paths (same results, possibly slightly slower,
    fewer warnings). Entries are reference-counted under a lock, so concurrent or nested jitfreeze
    traces (any threads) keep the flag up until the last one leaves, then restore the value seen
    before the first one entered. ``torch.compile``/``torch.export`` in another thread save and
    restore the flag on their own, uncoordinated with ours: if such a compile *ends* while a
    jitfreeze trace runs, it can restore False under it, and that trace then fails on a
    data-dependent check and falls back to eager - never a wrong graph, because ``make_fx``
    refuses data-dependent reads of real traced tensors.
    """
    global _depth
    names = _flag_names()
    compiler = getattr(torch, "compiler", None)
    with _lock:
        if _depth == 0:
            _saved.clear()
            _saved.update({n: getattr(compiler, n) for n in names})
        for n in names:
            setattr(compiler, n, True)
        _depth += 1
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1
        with _lock:
            _depth -= 1
            if _depth == 0:
                for n, v in _saved.items():
                    setattr(compiler, n, v)
                _saved.clear()


def in_tracing_context() -> bool:
    """True when the calling thread is inside :func:`tracing_context`."""
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def one_fake_mode() -> Iterator[None]:
    """For a *real-tensor* ``make_fx`` trace: one ``FakeTensorMode`` for all of its metadata.

    ``make_fx`` records each traced value's metadata (``node.meta["val"]``) as a fake tensor made
    by ``proxy_tensor.extract_val``, under the fake mode ``torch._guards.detect_fake_mode`` finds.
    A real-tensor trace has none, so torch makes a new ``FakeTensorMode`` per value, whose
    ``__init__`` records ``traceback.extract_stack()`` of the (deep) tracing stack: ~1 ms each,
    0.1 s of a conv net's 0.35 s trace, 0.2-0.4 s of a BERT-base-size encoder's 1.0-1.2 s
    (measured: same graph code either way). A ``TracingContext`` holding one mode is where
    ``detect_fake_mode`` looks first, so every value's metadata comes from that one mode.

    The context is thread-local and lives only for the ``with`` block. Besides
    ``detect_fake_mode``, what reads it in torch is compiler machinery that a real-tensor
    inference trace does not reach (Dynamo, AOTAutograd, invoke_subgraph's cache, Inductor
    passes; ``Graph.eliminate_dead_code`` with no purity predicate -- make_fx passes its own).
    Not for fake or symbolic traces: their fake mode is the inputs', which this would override.
    An enclosing ``TracingContext`` (jitfreeze called inside a compiler) is left as it is. Where
    torch lacks these internals, this does nothing.
    """
    context = contextlib.nullcontext()
    try:
        from torch._guards import TracingContext, tracing
        from torch._subclasses.fake_tensor import FakeTensorMode
        if TracingContext.try_get() is None:
            context = tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True)))
    except Exception:  # noqa: BLE001 - an optimization only: trace without it
        pass
    with context:
        yield


# ----------------------------------------------------------------------------- traced graphs

def explain_unsafe_constants(gm: Any) -> str | None:
    """Why a traced graph must not be compiled, when its constants show a value was baked in; else None.

    ``make_fx(..., pre_dispatch=True)`` cannot record ``torch.vmap``/``torch.func`` transforms (torch
    records them only under torch.export's own pre-dispatch torch-function mode, as calls that
    TorchScript cannot run). What runs inside such a transform escapes the trace: its results are
    stored in the graph as ``_tensor_constant`` attributes holding functorch-wrapped (batched)
    tensors, computed from *this* call's inputs. The frozen graph then reproduces this call and
    silently returns wrong results for any other input. Seen with transformers' FalconMamba (and
    Mamba-family models with ``use_associative_scan=True``): under ``is_compiling()`` they run
    ``associative_scan``, which vmaps its combine function. Call on the ``GraphModule`` right after
    ``make_fx``; a non-None answer means: fall back to eager.
    """
    functorch = getattr(torch._C, "_functorch", None)
    is_wrapped = getattr(functorch, "is_functorch_wrapped_tensor", None)
    if is_wrapped is None:
        return None
    names = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = getattr(gm, node.target, None)
        if isinstance(value, torch.Tensor) and is_wrapped(value):
            names.append(node.target)
    if not names:
        return None
    return (f"{len(names)} value(s) computed inside torch.vmap/torch.func transforms escaped the trace and would "
            f"be baked into the graph as constants (e.g. {names[0]}); transforms can't be traced at the "
            "pre-dispatch level. For transformers Mamba-family models, build them with use_associative_scan=False "
            "in the config (or set module.use_associative_scan = False on each mixer) to compile them")


# ----------------------------------------------------------------------------- outputs

def _mro_names(obj: Any) -> list[tuple[str, str]]:
    return [(getattr(c, "__module__", "") or "", c.__name__) for c in type(obj).__mro__]


def _is_hf_cache(obj: Any) -> bool:
    """A transformers key/value cache (``Cache`` and subclasses) or one of its layers."""
    for module, name in _mro_names(obj):
        if not module.startswith("transformers"):
            continue
        if name == "Cache" or name.endswith("Cache") or name.endswith("CacheLayerMixin"):
            return True
    return False


def _explain_leaf(obj: Any) -> str | None:
    cls = type(obj)
    qual = f"{cls.__module__}.{cls.__qualname__}"
    if _is_hf_cache(obj):
        return (f"{qual} is a transformers key/value cache, which is mutable state a frozen graph "
                "cannot return; call the model with use_cache=False (or set model.config.use_cache = False) "
                "to compile it, and run generation loops that need the cache eagerly")
    if _is_model_output_class(cls) and not _is_pytree_node(cls):
        return (f"{qual} is a transformers ModelOutput that is not registered as a pytree node (transformers "
                "skips that for classes defined while a compile is in progress); import the module that "
                "defines it before the first call, or call jitfreeze.trace.libraries.ensure_pytree_output(output) once")
    if isinstance(obj, torch.nn.Module):
        return "return tensors computed by the module, not the module itself"
    if isinstance(obj, (torch.device, torch.dtype, torch.Size)):
        return f"a {cls.__name__} is not a tensor; return it from outside the compiled function"
    return None


def explain_unsupported_output(obj: Any) -> str | None:
    """A hint on how to make ``obj`` (or the first known offender inside it) returnable, else None.

    Accepts a single output leaf or a whole output (tuples, lists, dicts and ``ModelOutput``
    values are searched). Recognises classes by module and name; imports no third-party library.
    """
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        hint = _explain_leaf(item)
        if hint is not None:
            return hint
        if isinstance(item, Mapping):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, (tuple, list)):
            stack.extend(reversed(item))
    return None


# ----------------------------------------------------------------------------- pytree

def _is_pytree_node(cls: type) -> bool:
    from torch.utils import _pytree as pytree

    return cls in pytree.SUPPORTED_NODES


def _is_model_output_class(cls: type) -> bool:
    return any(c.__name__ == "ModelOutput" and (c.__module__ or "").startswith("transformers")
               for c in cls.__mro__[1:]) or (cls.__name__ == "ModelOutput"
                                             and (cls.__module__ or "").startswith("transformers"))


def _register_model_output(cls: type) -> None:
    """Register a transformers ModelOutput subclass exactly as transformers itself does."""
    from torch.utils import _pytree as pytree

    generic = sys.modules.get("transformers.utils.generic")
    flatten = getattr(generic, "_model_output_flatten", None)
    unflatten = getattr(generic, "_model_output_unflatten", None)
    if flatten is None or unflatten is None:
        # transformers' convention: children are the values, context the keys (fields that are not None).
        def flatten(output):
            return list(output.values()), list(output.keys())

        def unflatten(values, context, output_type):
            return output_type(**dict(zip(context, values)))

    import functools

    kwargs = {"serialized_type_name": f"{cls.__module__}.{cls.__qualname__}"}
    if hasattr(pytree, "_dict_flatten_with_keys"):
        kwargs["flatten_with_keys_fn"] = pytree._dict_flatten_with_keys
    try:
        pytree.register_pytree_node(cls, flatten, functools.partial(unflatten, output_type=cls), **kwargs)
    except ValueError:
        pass  # registered meanwhile (another thread, or transformers itself)
    registered = getattr(generic, "_registered_model_output_types", None)
    if isinstance(registered, set):
        registered.add(cls)


def ensure_pytree_output(obj: Any) -> Any:
    """Register the output classes inside ``obj`` that should be pytree nodes but are not.

    transformers registers every ``ModelOutput`` subclass with ``torch.utils._pytree`` when the
    class is defined (``__init_subclass__``) - but skips it while ``torch.compiler.is_compiling()``
    is True, so a class first defined during a trace (a lazily imported module) stays a leaf.
    Such a class is registered here with transformers' own flatten/unflatten functions (values
    as children, field names as context, ``serialized_type_name`` = module.qualname so
    ``treespec_dumps`` works). Other dataclasses are left alone (registering a foreign class is a
    process-wide decision). Returns ``obj`` unchanged; call it outside :func:`tracing_context`
    or inside, both work.
    """
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, torch.Tensor):
            continue
        seen.add(id(item))
        cls = type(item)
        if _is_model_output_class(cls) and not _is_pytree_node(cls) and dataclasses.is_dataclass(cls):
            with _lock:
                if not _is_pytree_node(cls):
                    _register_model_output(cls)
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
    return obj



# ----------------------------------------------------------------------------- torch's own fast paths

_fastpath_installed = False


def _fused_encoder_layer(layer, src, src_mask, src_key_padding_mask):
    """The fused kernel eager inference runs for ``nn.TransformerEncoderLayer``, or None.

    In eval mode under no_grad, eager ``TransformerEncoderLayer.forward`` calls the fused
    ``torch._transformer_encoder_layer_fwd``; under ``make_fx`` torch deliberately avoids it
    (``MultiheadAttention`` refuses its fast path while make_fx traces), so the frozen graph
    would be a slower decomposition than eager. The fused op traces, scripts and freezes fine,
    so during our (static-shape) traces we take the same path eager takes, under the same
    conditions as torch's own check (``torch/nn/modules/transformer.py``).
    """
    sa = layer.self_attn
    if not (torch.backends.mha.get_fastpath_enabled() and src.dim() == 3 and not layer.training
            and sa.batch_first and sa.in_proj_bias is not None and sa._qkv_same_embed_dim
            and layer.activation_relu_or_gelu and layer.norm1.eps == layer.norm2.eps
            and not src.is_nested and sa.num_heads % 2 == 0 and not torch.is_autocast_enabled()):
        return None
    if any(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in layer.modules()):
        return None
    if any(isinstance(d, torch.SymInt) for d in src.shape):
        return None                      # symbolic traces keep the decomposed path
    weights = (sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias,
               layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias,
               layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias)
    if src.device.type not in ("cpu", "cuda") or any(w.device != src.device for w in weights):
        return None
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights + (src,)):
        return None
    merged_mask, mask_type = sa.merge_masks(src_mask, src_key_padding_mask, src)
    return torch._transformer_encoder_layer_fwd(
        src, sa.embed_dim, sa.num_heads, sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight,
        sa.out_proj.bias, layer.activation_relu_or_gelu == 2, layer.norm_first, layer.norm1.eps,
        layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias,
        layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias,
        merged_mask, mask_type)


def _fused_attention(mha, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                     is_causal):
    """The fused kernel eager inference runs for ``nn.MultiheadAttention``, or None.

    Eager self-attention in eval mode under no_grad calls ``torch._native_multi_head_attention``
    (one kernel: the QKV projection, attention and the output projection); ``MultiheadAttention``
    refuses it while make_fx traces, and the decomposition that is traced instead transposes its
    input to (L, N, E) and runs every projection on that non-contiguous view: a ViT-B/16 block
    (1x197x768, one thread) ran 1.12-1.15x eager's time frozen, 1.5-1.7x once
    ``optimize_for_inference`` turned those linears into matmuls. Taken under torch's own
    conditions (``torch/nn/modules/activation.py``), for unmasked, non-causal calls only (masks
    keep the decomposed path), in static-shape traces.
    """
    if not (query is key and key is value and query.dim() == 3 and attn_mask is None and key_padding_mask is None
            and not is_causal and torch.backends.mha.get_fastpath_enabled() and not mha.training
            and mha.batch_first and mha._qkv_same_embed_dim and mha.num_heads % 2 == 0
            and mha.in_proj_weight is not None and mha.in_proj_bias is not None
            and mha.bias_k is None and mha.bias_v is None and not mha.add_zero_attn
            and query.dtype == mha.in_proj_weight.dtype == mha.in_proj_bias.dtype
            and not query.is_nested and not torch.is_autocast_enabled()):
        return None
    if any(isinstance(d, torch.SymInt) for d in query.shape):
        return None                      # symbolic traces keep the decomposed path
    weights = (mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias)
    if query.device.type not in ("cpu", "cuda") or any(w is None or w.device != query.device for w in weights):
        return None
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights + (query,)):
        return None
    merged_mask, mask_type = mha.merge_masks(None, None, query)
    return torch._native_multi_head_attention(
        query, key, value, mha.embed_dim, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias,
        mha.out_proj.weight, mha.out_proj.bias, merged_mask, need_weights, average_attn_weights, mask_type)


def install_fast_paths() -> None:
    """Wrap ``nn.TransformerEncoderLayer.forward`` and ``nn.MultiheadAttention.forward`` once:
    outside our traces they are the originals."""
    global _fastpath_installed
    with _lock:
        if _fastpath_installed:
            return
        _fastpath_installed = True
        _wrap_attention()
        cls = torch.nn.TransformerEncoderLayer
        original = cls.forward

        def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
            if in_tracing_context() and type(self) is cls:
                fused = _fused_encoder_layer(self, src, src_mask, src_key_padding_mask)
                if fused is not None:
                    return fused
            return original(self, src, src_mask, src_key_padding_mask, is_causal)

        forward.__wrapped__ = original
        forward.__doc__ = original.__doc__
        cls.forward = forward


def _wrap_attention() -> None:
    cls = torch.nn.MultiheadAttention
    original = cls.forward

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if in_tracing_context() and type(self) is cls:
            fused = _fused_attention(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                     average_attn_weights, is_causal)
            if fused is not None:
                return fused
        return original(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                        average_attn_weights, is_causal)

    forward.__wrapped__ = original
    forward.__doc__ = original.__doc__
    cls.forward = forward
