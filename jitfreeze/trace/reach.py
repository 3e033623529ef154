"""What a function reads from outside itself: names bound in its globals and closure cells.

A frozen graph bakes in what those names held when it was traced: a tensor (``x @ W``), a number
(``x * scale``), a module (``model(x)``), a helper function. Rebinding one of them in the same
process -- ``W = torch.randn(...)``, ``scale = 3.0``, ``model = build()`` in a notebook -- changes
eager's answer while every tensor the graph baked in stays as it was. :func:`reads` lists each
such binding with the object it holds now; :func:`rebound` tells, by identity, whether any name
holds another object since (a few tens of nanoseconds per name: the hot path runs it).

Followed: the function's code (nested code objects too), its closure cells, and, transitively,
the user functions, bound methods and ``functools.partial`` objects reached that way (also inside
dicts, lists and tuples those names hold, a few levels deep), and the ``forward`` of every
user-defined module class reached (a wrapped module's included) -- at most :data:`MAX_FUNCTIONS`
functions. Not followed: fixed code (torch's, the standard library's, numpy's, jitfreeze's:
recognised by file, as the fingerprint does), attributes of objects and imported modules
(``helpers.scale``, ``self.p``) and mutation in place (``cfg["scale"] = 3``, ``OPS["act"] =
other``): the README's contract says what to do for those.
"""

from __future__ import annotations

import functools
import itertools
import types

import torch

__all__ = ["reads", "rebound", "MAX_FUNCTIONS"]

MAX_FUNCTIONS = 256
_CONTAINER_DEPTH = 3         # dicts, lists and tuples followed this deep, this many items each
_CONTAINER_ITEMS = 1024

_MISSING = object()
_Module = torch.nn.Module


def _code_names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _fixed(filename: str) -> bool:
    from .fingerprint_fixed import lib_of_file
    return lib_of_file(filename) is not None


def reads(fn) -> tuple[tuple, tuple]:
    """``(bindings, modules)``: ``bindings`` one ``(namespace dict or cell, name or None, object)``
    per name read, ``modules`` the ``nn.Module`` objects among those objects (and ``fn`` itself,
    or its ``__self__``, when it is one)."""
    bindings: list = []
    modules: list = []
    seen: set = set()
    todo = [fn]
    followed = 0

    def reach(obj, depth=0):
        if id(obj) in seen:
            return
        if isinstance(obj, (dict, list, tuple)) and depth < _CONTAINER_DEPTH:
            seen.add(id(obj))        # functions and modules kept in a container the code reads
            items = obj.values() if isinstance(obj, dict) else obj
            for item in itertools.islice(items, _CONTAINER_ITEMS):
                reach(item, depth + 1)
        elif isinstance(obj, _Module):
            seen.add(id(obj))
            modules.append(obj)
            for sub in obj.modules():
                forward = getattr(type(sub), "forward", None)
                if isinstance(forward, types.FunctionType):
                    todo.append(forward)
        elif isinstance(obj, (types.FunctionType, types.MethodType, functools.partial)):
            todo.append(obj)

    while todo and followed < MAX_FUNCTIONS:
        f = todo.pop()
        if isinstance(f, _Module):
            reach(f)
            continue
        if isinstance(f, types.MethodType):
            reach(f.__self__)
            f = f.__func__
        elif isinstance(f, functools.partial):
            for value in (*f.args, *f.keywords.values()):
                reach(value)
            f = f.func
        f = getattr(f, "__wrapped__", f) if not isinstance(f, types.FunctionType) else f
        if not isinstance(f, types.FunctionType) or id(f) in seen:
            continue
        seen.add(id(f))
        if _fixed(f.__code__.co_filename):
            continue
        followed += 1
        namespace = f.__globals__
        for name in sorted(_code_names(f.__code__)):
            obj = namespace.get(name, _MISSING)
            if obj is not _MISSING and not isinstance(obj, types.ModuleType):
                bindings.append((namespace, name, obj))
                reach(obj)
        for cell in f.__closure__ or ():
            try:
                obj = cell.cell_contents
            except ValueError:               # an empty cell (a name assigned later)
                continue
            bindings.append((cell, None, obj))
            reach(obj)
        if getattr(f, "__wrapped__", None) is not None:
            reach(f.__wrapped__)
    return tuple(bindings), tuple(modules)


def rebound(bindings) -> bool:
    """Whether any name in ``bindings`` (from :func:`reads`) holds another object now."""
    for where, name, obj in bindings:
        if name is None:
            try:
                if where.cell_contents is not obj:
                    return True
            except ValueError:
                return True
        elif where.get(name, _MISSING) is not obj:
            return True
    return False
