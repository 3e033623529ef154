"""Fingerprints that need no trace: the first-level index of the warm path.

A fingerprint describes everything a call can reach, walked from the function (or module):
code objects (bytecode, constants, nested code), the globals, builtins and closure cells its
names resolve to, functions and whatever they hold (defaults, closures, ``__wrapped__``,
partials, static/class methods, properties, ``lru_cache`` wrappers), classes and their
attributes, the attributes of user modules, objects' state (``__dict__``, slots, container
items), numpy arrays (dtype, shape, bytes), and ``nn.Module`` instances (class, state,
submodules, parameters and buffers). Tensors reached are digested by the caller's rule
(dtype, shape, bytes) and watched.

It is sound by construction: the walker hashes only what it knows how to hash exactly and raises
``Unfingerprintable`` (with the path to the object and why) for anything else — an object whose
state it can't see, a C callable outside the fixed libraries, a walk deeper or larger than its
bounds. The caller then traces and compares graph keys instead of trusting an index entry.

Fixed code: functions, classes and C callables whose source lies inside torch's installed package,
the standard library, numpy (its version goes into the fingerprint) or jitfreeze itself are
identified by name, not walked: the key holds the torch, Python and jitfreeze versions. Where code
lies is decided by its file (``co_filename``, the module's ``__file__``), never by a module-name
prefix: ``torchnets.py`` is user code. User functions set on a fixed class or module
(``nn.Linear.forward = mine``) are user code too, and walked.

Attributes are covered by name, lazily: a class's (or a user module's) attribute counts once code
the fingerprint covers names it (``co_names``, or an identifier-like string constant, as in
``getattr(self, "act")``). Dunder attributes of user classes, and attributes that override a fixed
base class's (``forward``, ``_conv_forward``: torch's code calls them), count always; constructors
(``__init__``, ``__new__``, ``__post_init__``) count when the class itself is reached as a value.
What remains unseen: attributes reached through names computed at run time
(``getattr(self, f"layer{i}")`` on a class or module — an ``nn.Module``'s submodules and state are
all covered anyway), global state of the fixed libraries (``torch.backends`` flags), and code
reached only from inside C code. ``verify=True`` re-traces index hits and compares graph keys.
"""

from __future__ import annotations

import contextvars
import enum
import functools
import hashlib
import itertools
import re
import sys
import types

import torch

from ..digest import TensorDigest
from .fingerprint_code import CodeWalk, _Namespace
from .fingerprint_fixed import (_C_CALLABLES, _PLAIN, _TUPLEGETTER, _UNSET, Unfingerprintable, _inert_types,
                                _is_annotation, _name)
from .fingerprint_objects import ObjectWalk

__all__ = ["Unfingerprintable", "function_fingerprint", "module_fingerprint"]

MAX_OBJECTS = 50000      # objects visited (transformers models reach about 5,000-10,000)
MAX_DEPTH = 120          # nesting of the walk: containers in containers, helpers calling helpers

SCALAR_TYPES = frozenset({int, float, bool, type(None)})    # hashed as value() does, without its dispatch
_INSTANCE_TYPES: set = set()     # types whose instances _Walker._dispatch walks as objects (a cache)


class _Walker(CodeWalk, ObjectWalk):
    """One walk: the hash, what it reached (tensors, modules, fixed libraries), and the dispatch
    from a value to the method that hashes it (code: :class:`CodeWalk`; objects: :class:`ObjectWalk`)."""

    def __init__(self):
        # What is hashed, in order: sha256 over the pieces joined (one hash call, not one per piece).
        self.pieces: list[bytes] = []
        self.put = self.pieces.append
        self.seen: dict[int, int] = {}
        self.keep: list = []                     # objects whose ids are in seen stay alive
        self.names: set[str] = set()             # every name covered code reads (co_names, identifier consts)
        self.spaces: list[_Namespace] = []
        self.class_spaces: dict[type, _Namespace] = {}
        self.tensors = TensorDigest()            # reached tensors: digested (on a thread as they come), watched
        self.modules: list[torch.nn.Module] = []
        self.libs: set[str] = set()
        self.count = 0
        self.depth = 0

    def add(self, *items) -> None:
        self.put(repr(items).encode() + b"\x00")

    def fail(self, why: str):
        raise Unfingerprintable(why)

    def _visit(self, obj) -> bool:
        """False when ``obj`` was seen already (a back-reference is recorded instead)."""
        key = id(obj)
        seen = self.seen
        if key in seen:
            self.put(b"('ref', %d)\x00" % seen[key])
            return False
        seen[key] = len(seen)
        self.keep.append(obj)
        return True

    def edge(self, label: str, v) -> None:
        try:
            self.value(v)
        except Unfingerprintable as exc:
            exc.labels.append(label)
            raise

    def fixed(self, kind: str, lib: str, name: str) -> None:
        self.libs.add(lib)
        self.add(kind, lib, name)

    # -- the dispatch ---------------------------------------------------------------------------

    def value(self, v) -> None:
        t = type(v)
        if t is str:
            data = v.encode("utf-8", "surrogatepass")
            self.put(b"s%d:" % len(data))
            self.put(data)
            return
        if t in _PLAIN:
            self.put(repr((t.__name__, v)).encode() + b"\x00")
            return
        self.count += 1
        if self.count > MAX_OBJECTS:
            self.fail(f"more than {MAX_OBJECTS} objects reachable")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                self.fail(f"the walk is nested more than {MAX_DEPTH} levels deep")
            self._dispatch(v, t)
        finally:
            self.depth -= 1

    def _dispatch(self, v, t) -> None:  # noqa: C901 - one case per kind of object, in one place
        if t in _INSTANCE_TYPES:         # every case below is decided by the type alone
            self.instance(v, t)
        elif isinstance(v, torch.Tensor):
            if self._visit(v):
                self.add("tensor", len(self.tensors))
                self.tensors.add(v)
        elif t in (tuple, list):
            if self._visit(v):
                self.add(t.__name__, len(v))
                kinds = set(map(type, v))
                kind = kinds.pop() if len(kinds) == 1 else None
                if kind in SCALAR_TYPES:
                    # what value() hashes for each, in one pass (LeViT's modules keep lists of 38,416 ints)
                    self.put(("\x00".join(map(repr, zip(itertools.repeat(kind.__name__), v))) + "\x00").encode())
                else:
                    for i, item in enumerate(v):
                        self.edge(f"[{i}]", item)
        elif t is dict:
            if self._visit(v):
                self.items(v)
        elif t in (set, frozenset):
            if self._visit(v):
                self.add(t.__name__, len(v))
                for item in sorted(v, key=repr):
                    self.edge("{}", item)
        elif t is types.FunctionType:
            self.function(v)
        elif isinstance(v, type):
            self.klass(v, constructed=True)
        elif isinstance(v, torch.nn.Module):
            self.nn_module(v)
        elif t is types.MethodType:
            if self._visit(v):
                self.add("method")
                self.edge("__func__", v.__func__)
                self.edge("__self__", v.__self__)
        elif isinstance(v, enum.Enum):
            if self._visit(v):
                self.add("enum", v.name)
                self.klass(t)
                self.edge(v.name, v.value)
        elif isinstance(v, functools.partial):
            if self._visit(v):
                self.add("partial")
                self.klass(t)
                self.edge("func", v.func)
                self.edge("args", v.args)
                self.edge("keywords", v.keywords)
                self.state(v)
        elif isinstance(v, (staticmethod, classmethod)):
            if self._visit(v):
                self.add(t.__name__)
                self.edge("__func__", v.__func__)
        elif isinstance(v, property):
            if self._visit(v):
                self.add("property")
                for part in ("fget", "fset", "fdel"):
                    self.edge(part, getattr(v, part))
        elif isinstance(v, functools.cached_property):
            if self._visit(v):
                self.add("cached_property")
                self.edge("func", v.func)
        elif t is functools._lru_cache_wrapper:
            if self._visit(v):
                self.add("lru_cache", v.cache_parameters().get("typed"))
                self.edge("__wrapped__", v.__wrapped__)
        elif isinstance(v, types.ModuleType) and not isinstance(v, torch._ops._OpNamespace):
            self.module(v)
        elif isinstance(v, _C_CALLABLES):
            self.c_callable(v, t)
        elif t is _TUPLEGETTER:
            self.add("field-index", v.__reduce__()[1][0])            # a namedtuple's field accessor
        elif isinstance(v, (types.MemberDescriptorType, types.GetSetDescriptorType)):
            self.add("descriptor", _name(v.__objclass__), v.__name__)    # a slot or C attribute: no code
        elif isinstance(v, (torch._ops.OpOverloadPacket, torch._ops.OpOverload, torch._ops._OpNamespace)):
            self.fixed("op", "torch", str(v))
        elif t is types.CodeType:
            self.code(v, None)
        elif t is torch.Size:
            self.add("size", tuple(v))
        elif t in (torch.finfo, torch.iinfo, re.Pattern):
            self.add(t.__name__, repr(v))
        elif t is types.MappingProxyType:
            if self._visit(v):
                self.items(v)
        elif t is types.SimpleNamespace:
            if self._visit(v):
                self.add("namespace")
                self.state(v)
        elif t is contextvars.ContextVar:
            self.add("contextvar", v.name)
            self.edge(v.name, v.get(_UNSET))
        elif t is types.GeneratorType:
            self.generator(v)
        elif _is_annotation(t):
            self.add("annotation", repr(v))
        elif self._numpy(v):
            pass
        elif isinstance(v, _inert_types()):
            self.add("inert", _name(t))
        elif _is_jitfreeze_function(v):
            self.edge("fn", v.fn)
        else:
            _INSTANCE_TYPES.add(t)
            self.instance(v, t)

    def digest(self) -> str:
        self.settle()
        if "numpy" in self.libs:
            self.add("numpy", sys.modules["numpy"].__version__)
        self.add("tensors", [f"{t.dtype}:{tuple(t.shape)}:{t.device}" for t in self.tensors.tensors])
        self.add("weights-digest", self.tensors.result())
        return hashlib.sha256(b"".join(self.pieces)).hexdigest()


#: the decorator's function wrapper class(es), registered by jitfreeze.runtime.function when it is
#: defined (no instance can exist before): walked as the function they wrap
WRAPPER_TYPES: list = []


def _is_jitfreeze_function(v) -> bool:
    return isinstance(v, tuple(WRAPPER_TYPES))


def function_fingerprint(fn) -> tuple[str, list, list]:
    """(digest, tensors reached, modules reached) for a function, bound method, module or callable.

    Raises ``Unfingerprintable`` (why, and where) for anything it can't hash exactly."""
    walker = _Walker()
    try:
        walker.value(fn)
        return walker.digest(), walker.tensors.tensors, walker.modules
    except RecursionError:
        raise Unfingerprintable("the walk ran out of Python stack") from None
    except Unfingerprintable:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a user __repr__ that raises: the traced path serves it
        raise Unfingerprintable(f"the walk failed ({type(exc).__name__}: {exc})") from exc


def module_fingerprint(module: torch.nn.Module) -> tuple[str, list, list]:
    return function_fingerprint(module)
