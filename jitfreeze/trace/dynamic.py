"""Dynamic shapes: which dims are symbolic, symbolic traces, and their guards.

A dynamic artifact is traced with some dims symbolic (``make_fx`` in symbolic mode over fake
inputs; the real weights stay real). The trace's ShapeEnv yields guards — Python expressions
over the inputs' sizes and strides such as ``2 <= L['t0'].size()[0]`` — and an artifact may
only serve calls that satisfy them. Guards are stored as text and evaluated by a small
whitelisting evaluator (no ``eval`` of arbitrary code read from the cache).
"""

from __future__ import annotations

import ast
import logging
import operator
from typing import Callable

import torch

from ..cache.persistent import DECISION
from ..key import decision_key
from .sigtext import dynamic_tensor_text

__all__ = ["AutoDynamic", "Guards", "GuardError", "dynamic_texts", "symbolic_inputs", "produce_guards",
           "value_shaped_op"]


log = logging.getLogger("jitfreeze")


class GuardError(ValueError):
    """A guard expression outside the supported grammar."""


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_CMPOPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge}
_METHODS = {"size", "stride", "storage_offset"}
_FUNCS = {"max": max, "min": min, "abs": abs}


def _compile(node):
    """AST -> closure(tensors) -> value; raises GuardError for anything not whitelisted."""
    if isinstance(node, ast.Expression):
        return _compile(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, bool)):
        value = node.value
        return lambda ts: value
    if isinstance(node, ast.BoolOp):
        parts = [_compile(v) for v in node.values]
        if isinstance(node.op, ast.And):
            return lambda ts: all(p(ts) for p in parts)
        return lambda ts: any(p(ts) for p in parts)
    if isinstance(node, ast.UnaryOp):
        inner = _compile(node.operand)
        if isinstance(node.op, ast.Not):
            return lambda ts: not inner(ts)
        if isinstance(node.op, ast.USub):
            return lambda ts: -inner(ts)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        op, left, right = _BINOPS[type(node.op)], _compile(node.left), _compile(node.right)
        return lambda ts: op(left(ts), right(ts))
    if isinstance(node, ast.Compare):
        first = _compile(node.left)
        rest = [(_CMPOPS[type(o)], _compile(c)) for o, c in zip(node.ops, node.comparators)
                if type(o) in _CMPOPS]
        if len(rest) != len(node.ops):
            raise GuardError("unsupported comparison")

        def compare(ts):
            left = first(ts)
            for op, fn in rest:
                right = fn(ts)
                if not op(left, right):
                    return False
                left = right
            return True
        return compare
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        index = node.slice.value
        call = node.value
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and not call.args \
                and call.func.attr in _METHODS and isinstance(index, int):
            tensor = _source(call.func.value)
            method = call.func.attr
            return lambda ts: getattr(ts[tensor], method)()[index]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.args \
            and node.func.attr == "storage_offset":
        tensor = _source(node.func.value)
        return lambda ts: ts[tensor].storage_offset()
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS \
            and not node.keywords:
        fn, args = _FUNCS[node.func.id], [_compile(a) for a in node.args]
        return lambda ts: fn(*[a(ts) for a in args])
    raise GuardError(f"unsupported guard syntax: {ast.dump(node)[:80]}")


def _source(node) -> int:
    """``L['t3']`` -> 3."""
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "L"
            and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)
            and node.slice.value.startswith("t") and node.slice.value[1:].isdigit()):
        return int(node.slice.value[1:])
    raise GuardError("guards may only read L['t<N>']")


class Guards:
    """Compiled guard expressions over the call's tensor leaves (``L['t<N>']``)."""

    __slots__ = ("texts", "_checks")

    def __init__(self, texts):
        self.texts = list(texts)
        self._checks = [(t, _compile(ast.parse(t, mode="eval"))) for t in self.texts]

    def failing(self, tensors) -> str | None:
        """The first guard the call fails, or None when it may use the artifact."""
        for text, check in self._checks:
            try:
                if not check(tensors):
                    return text
            except (IndexError, TypeError, ZeroDivisionError):
                return text
        return None


def dynamic_texts(call, tensors, dims: dict) -> tuple:
    """The call's signature texts with dynamic dims as ``s`` (and strides as contiguity)."""
    texts = list(call.texts)
    for j, leaf in enumerate(call.tensor_idx):
        dyn = dims.get(j)
        if not dyn:
            continue
        t = tensors[j]
        shape = tuple("s" if d in dyn else n for d, n in enumerate(t.shape))
        pos = _text_position(call, leaf)
        texts[pos] = dynamic_tensor_text(t, shape)
    return tuple(texts)


def _text_position(call, leaf: int) -> int:
    return leaf          # texts are per leaf, in leaf order


def symbolic_inputs(tensors, dims: dict):
    """Fake inputs with the chosen dims symbolic (others static), and their ShapeEnv."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    shape_env = ShapeEnv(duck_shape=False)
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=shape_env)
    fakes = []
    for j, t in enumerate(tensors):
        dyn = dims.get(j, ())
        ctx = StatelessSymbolicContext(
            dynamic_sizes=[DimDynamic.DYNAMIC if d in dyn else DimDynamic.STATIC for d in range(t.dim())])
        fakes.append(mode.from_tensor(t, symbolic_context=ctx))
    return fakes, shape_env


def produce_guards(shape_env, placeholder_values, dims: dict) -> tuple[list[str], dict]:
    """The trace's guards, and {tensor leaf number: dims} the function itself specialized.

    ``shape_env.produce_guards`` leaves out every input size that ended up a number (Dynamo checks
    those itself): an input size given as a symbol that the function turned into a Python number
    (``float(x.shape[0])``, ``range(n)``, ``torch.tensor(n)``) is replaced by this call's value
    in the ShapeEnv, and its graph holds that value. Such specializations become guards here
    (``L['t0'].size()[0] == 3``), and so do dynamic dims of size 0 or 1, which the trace never
    made symbols (it specializes 0 and 1: a graph for them is not one for other sizes). The dims
    specialized by the function (not 0/1) are returned too: automatic dynamic shapes trace them
    statically from then on."""
    from torch._dynamo.source import LocalSource

    sources = [LocalSource(f"t{j}") for j in range(len(placeholder_values))]
    fixed, specialized = specializations(placeholder_values, dims)
    texts = fixed + list(shape_env.produce_guards(placeholder_values, sources))
    Guards(texts)          # refuse now what we could not evaluate later
    return texts, specialized


def _as_int(value) -> int | None:
    """``value`` as an int if the trace fixed it (a plain int, or a symbol replaced by a number)."""
    if isinstance(value, torch.SymInt):
        return value.node.maybe_as_int()
    return int(value)


def specializations(placeholder_values, dims: dict) -> tuple[list[str], dict]:
    guards, specialized = [], {}
    for j, t in enumerate(placeholder_values):
        dyn = dims.get(j, ())
        for d, size in enumerate(t.shape):
            n = _as_int(size)
            if d in dyn and n is not None:
                guards.append(f"L['t{j}'].size()[{d}] == {n}")
                if isinstance(size, torch.SymInt):
                    specialized.setdefault(j, set()).add(d)
        for d, stride in enumerate(t.stride()):
            n = _as_int(stride)
            if isinstance(stride, torch.SymInt) and n is not None:
                guards.append(f"L['t{j}'].stride()[{d}] == {n}")
        offset = t.storage_offset()
        if isinstance(offset, torch.SymInt) and _as_int(offset) is not None:
            guards.append(f"L['t{j}'].storage_offset() == {_as_int(offset)}")
    return guards, {j: frozenset(d) for j, d in specialized.items()}


# Composite ops that reach a pre-dispatch trace whole and compute ``nonzero`` inside (untagged).
_COMPOSITE_VALUE_SHAPED = ("where.default", "nonzero_numpy.default", "argwhere.default")


def value_shaped_op(target, args, kwargs, value: Callable, varies: Callable) -> bool:
    """Does op ``target``, run on values computed from the inputs, give a result whose shape
    depends on those values (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ...)
    or read a value as a number (``.item()``)? torch's op tags say so (``dynamic_output_shape``,
    ``data_dependent_output``), but for ``aten.index.Tensor`` with no boolean index computed from
    the inputs (integer indexing, a constant mask) and ``one_hot`` with its number of classes
    given, whose shapes follow from their inputs' shapes. ``value(arg)``: an argument's tensor (or
    its metadata), or None where unknown; ``varies(arg)``: whether it is computed from the inputs."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    tags = target.tags
    if torch.Tag.data_dependent_output in tags:
        return True
    name = f"{target.overloadpacket.__name__}.{target._overloadname}"
    if name in _COMPOSITE_VALUE_SHAPED and target.namespace == "aten":
        return True
    if torch.Tag.dynamic_output_shape not in tags:
        return False
    if target is torch.ops.aten.index.Tensor:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        for index in indices or ():
            if index is None:
                continue
            t = value(index)
            if varies(index) and (not isinstance(t, torch.Tensor) or t.dtype in (torch.bool, torch.uint8)):
                return True
        return False
    if target is torch.ops.aten.one_hot.default:
        classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
        return not (isinstance(classes, int) and classes >= 0)
    return True


def _above_one(dims: dict, shapes) -> dict:
    """``dims`` less those whose size is 0 or 1 in this call: a symbolic trace specializes those
    sizes anyway (a graph guarded on ``== 1``), so the call is traced statically there -- the same
    graph and key as the static trace made before the dim became dynamic, in this process or in
    any other, instead of a second graph for the same size."""
    out = {j: frozenset(d for d in ds if shapes[j][d] > 1) for j, ds in dims.items()}
    return {j: ds for j, ds in out.items() if ds}


class AutoDynamic:
    """Which dims of a call to trace symbolically, by the function's ``dynamic=`` option.

    ``False``: none; ``True``: all; a dict: the named (or numbered) arguments' dims. ``None``
    (automatic): static first; the dims whose size changes between calls of one shape class become
    dynamic, once, unless the function specialized them (:meth:`pin_static`). The decision is
    stored in the persistent cache (``cache()``, namespace ``DECISION``) for later processes.
    """

    def __init__(self, name: str, option, cache: Callable):
        self.name = name
        self.option = option
        self._cache = cache
        self._auto: dict = {}        # shape class -> {"shapes", "dims", "static"}

    def clear(self) -> None:
        self._auto.clear()

    def dims(self, call, tensors) -> dict:
        """{tensor leaf number: frozenset(dims)} to trace symbolically for this call ({}: static)."""
        dynamic = self.option
        if dynamic is False:
            return {}
        if dynamic is True:
            return {j: frozenset(range(t.dim())) for j, t in enumerate(tensors) if t.dim()}
        if isinstance(dynamic, dict):
            dims = {}
            for j, (pos, name) in enumerate(call.tensor_args):
                spec = dynamic.get(name, dynamic.get(pos)) if (name is not None or pos is not None) else None
                if spec:
                    dims[j] = frozenset(d % tensors[j].dim() for d in spec) if tensors[j].dim() else frozenset()
            return {j: d for j, d in dims.items() if d}
        # automatic: static first; dims whose size changes between calls become dynamic, once,
        # unless the function specialized them (see pin_static).
        shape_class = self._shape_class(call, tensors)
        shapes = tuple(tuple(t.shape) for t in tensors)
        state = self._auto.get(shape_class)
        if state is None:
            decided, static = self._load(call, tensors)
            self._auto[shape_class] = {"shapes": shapes, "dims": decided, "static": static}
            if decided:
                log.info("%s: using the stored dynamic-shape decision %s", self.name, _dims_text(decided))
            return _above_one(decided, shapes)
        changed = {j: frozenset(d for d, (a, b) in enumerate(zip(shape, state["shapes"][j])) if a != b)
                   for j, shape in enumerate(shapes)}
        merged = {j: (state["dims"].get(j, frozenset()) | changed.get(j, frozenset()))
                  - state["static"].get(j, frozenset()) for j in range(len(shapes))}
        merged = {j: d for j, d in merged.items() if d}
        if merged != state["dims"]:
            log.info("%s: recompiling: %s changed size (%s vs %s); marking them dynamic", self.name,
                     _dims_text({j: d - state["dims"].get(j, frozenset()) for j, d in merged.items()}),
                     _shapes_text(shapes), _shapes_text(state["shapes"]))
            state["dims"] = merged
            self._store(call, tensors, merged, state["static"])
        return _above_one(state["dims"], shapes)

    def pin_static(self, call, tensors, specialized: dict) -> None:
        """Automatic dynamic shapes: the function turned these dims' sizes into numbers in a
        symbolic trace (``float(x.shape[0])``, ``range(n)``, ...). That trace's entry is guarded on
        their sizes; from now on they are traced statically (one graph per size), in this process
        and, through the stored decision, in later ones."""
        state = self._auto.get(self._shape_class(call, tensors))
        if state is None:
            return
        static = dict(state["static"])
        for j, d in specialized.items():
            static[j] = static.get(j, frozenset()) | d
        dims = {j: d - static.get(j, frozenset()) for j, d in state["dims"].items()}
        state["static"], state["dims"] = static, {j: d for j, d in dims.items() if d}
        log.info("%s: the function uses the size of %s as a number; tracing %s statically from now on",
                 self.name, _dims_text(specialized), "them" if sum(map(len, specialized.values())) > 1 else "it")
        self._store(call, tensors, state["dims"], static)

    @staticmethod
    def _shape_class(call, tensors) -> tuple:
        return (call.in_spec, call.mode, call.alias, tuple(call.texts[i] for i, _ in call.consts),
                tuple((t.dtype, t.device, t.dim()) for t in tensors))

    def _load(self, call, tensors) -> tuple[dict, dict]:
        """The stored decision: ({leaf: dynamic dims}, {leaf: dims kept static}), or two empty dicts."""
        found = self._cache().get(decision_key(self.name, call, tensors), ns=DECISION)
        if found is None:
            return {}, {}
        try:
            dims, static = ({int(j): frozenset(int(d) for d in ds) for j, ds in found[0].get(part, {}).items()}
                            for part in ("dims", "static"))
        except (KeyError, TypeError, ValueError, AttributeError):
            return {}, {}

        def fits(d: dict) -> dict:
            return {j: ds for j, ds in d.items() if j < len(tensors) and all(x < tensors[j].dim() for x in ds)}

        static = fits(static)
        dims = {j: ds - static.get(j, frozenset()) for j, ds in fits(dims).items()}
        return {j: ds for j, ds in dims.items() if ds}, static

    def _store(self, call, tensors, dims, static) -> None:
        meta = {"dims": {str(j): sorted(d) for j, d in dims.items()},
                "static": {str(j): sorted(d) for j, d in static.items()}, "qualname": self.name}
        self._cache().put(decision_key(self.name, call, tensors), meta, b"", ns=DECISION)


def _dims_text(dims) -> str:
    return ", ".join(f"input {j} dim{'s' if len(d) > 1 else ''} {','.join(map(str, sorted(d)))}"
                     for j, d in sorted(dims.items())) or "no dims"


def _shapes_text(shapes) -> str:
    return ", ".join(str(tuple(s)) for s in shapes)
