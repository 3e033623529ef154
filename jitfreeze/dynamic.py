"""Dynamic shapes: which dims are symbolic, symbolic traces, and their guards.

A dynamic artifact is traced with some dims symbolic (``make_fx`` in symbolic mode over fake
inputs; the real weights stay real). The trace's ShapeEnv yields guards — Python expressions
over the inputs' sizes and strides such as ``2 <= L['t0'].size()[0]`` — and an artifact may
only serve calls that satisfy them. Guards are stored as text and evaluated by a small
whitelisting evaluator (no ``eval`` of arbitrary code read from the cache).
"""

from __future__ import annotations

import ast
import operator


__all__ = ["Guards", "GuardError", "dynamic_texts", "symbolic_inputs", "produce_guards"]


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
        texts[pos] = (f"Tensor(shape={shape}, dtype={t.dtype}, device={t.device}, "
                      f"contiguous={t.is_contiguous()}, layout={t.layout})")
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


def produce_guards(shape_env, placeholder_values) -> list[str]:
    from torch._dynamo.source import LocalSource

    sources = [LocalSource(f"t{j}") for j in range(len(placeholder_values))]
    texts = list(shape_env.produce_guards(placeholder_values, sources))
    Guards(texts)          # refuse now what we could not evaluate later
    return texts
