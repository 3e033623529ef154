"""Output structures (pytree specs) to and from JSON, without pickle.

The trace-free warm path rebuilds a function's output without tracing it, so
the output's structure is stored with the index entry. Supported: tuples,
lists, dicts and OrderedDicts with str/int keys, None, namedtuples and other
pytree-registered classes (e.g. transformers' ``ModelOutput``) that can be
imported by module and qualified name. Anything else: :func:`dumps` returns
None and the function simply takes the traced path.
"""

from __future__ import annotations

import collections
import importlib
import json

from torch.utils import _pytree as pytree

__all__ = ["dumps", "loads"]

_BUILTIN = {tuple: "tuple", list: "list", dict: "dict", collections.OrderedDict: "odict", type(None): "none"}
_BY_NAME = {v: k for k, v in _BUILTIN.items()}


_LEAF = pytree.tree_flatten(0)[1]


class _Unsupported(Exception):
    pass


def _type_name(cls) -> str:
    qual = cls.__qualname__
    if "<locals>" in qual or cls.__module__ == "__main__":
        raise _Unsupported(f"{cls!r} can't be imported by name")
    return f"{cls.__module__}:{qual}"


def _import(name: str):
    module, _, qual = name.partition(":")
    obj = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _json_context(ctx):
    if ctx is None or isinstance(ctx, (str, int, float, bool)):
        return ctx
    if isinstance(ctx, (list, tuple)) and all(isinstance(c, (str, int)) for c in ctx):
        return {"seq": list(ctx), "tuple": isinstance(ctx, tuple)}
    raise _Unsupported(f"context {ctx!r}")


def _unjson_context(ctx):
    if isinstance(ctx, dict):
        return tuple(ctx["seq"]) if ctx["tuple"] else list(ctx["seq"])
    return ctx


def _encode(spec):
    if spec.is_leaf():
        return "*"
    children = [_encode(c) for c in spec.children()]
    if spec.type in _BUILTIN:
        return {"k": _BUILTIN[spec.type], "x": _json_context(spec.context), "c": children}
    if spec.type is collections.namedtuple or pytree.is_namedtuple_class(spec.type):
        cls = spec.context if isinstance(spec.context, type) else spec.type
        return {"k": "namedtuple", "cls": _type_name(cls), "c": children}
    return {"k": "node", "cls": _type_name(spec.type), "x": _json_context(spec.context), "c": children}


def _decode(obj):
    if obj == "*":
        return _LEAF
    children = [_decode(c) for c in obj["c"]]
    kind = obj["k"]
    if kind in _BY_NAME:
        return pytree.TreeSpec(_BY_NAME[kind], _unjson_context(obj["x"]), children)
    if kind == "namedtuple":
        cls = _import(obj["cls"])
        return pytree.tree_flatten(cls(*[_placeholder(c) for c in children]))[1]
    cls = _import(obj["cls"])
    return pytree.TreeSpec(cls, _unjson_context(obj["x"]), children)


def _placeholder(spec):
    """A value whose flattening gives ``spec`` (used to build namedtuple specs the way pytree does)."""
    return pytree.tree_unflatten([0] * spec.num_leaves, spec)


def dumps(spec) -> str | None:
    """JSON text for ``spec``, or None when it can't be stored faithfully."""
    try:
        text = json.dumps(_encode(spec), sort_keys=True)
        if _decode(json.loads(text)) != spec:
            return None
        return text
    except Exception:  # noqa: BLE001 - unsupported structure: no index entry, traced path instead
        return None


def loads(text: str):
    return _decode(json.loads(text))
