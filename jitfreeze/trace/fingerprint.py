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

import collections
import contextvars
import enum
import functools
import hashlib
import logging
import os
import re
import sys
import types
from inspect import GEN_CREATED, getgeneratorstate

import torch

from ..digest import digest_tensors

__all__ = ["Unfingerprintable", "function_fingerprint", "module_fingerprint"]

MAX_OBJECTS = 50000      # objects visited (transformers models reach about 5,000-10,000)
MAX_DEPTH = 120          # nesting of the walk: containers in containers, helpers calling helpers
# Fields of objects that differ from process to process without meaning anything for the graph
# (transformers' GenerationConfig keeps a salted hash() of itself; torch._dynamo's wrappers an id()).
_VOLATILE_FIELDS = frozenset({"_original_object_hash", "_torchdynamo_wrapper_id"})
_PLAIN = frozenset({type(None), bool, int, float, str, bytes, complex, range, slice, type(Ellipsis),
                    type(NotImplemented), torch.dtype, torch.device, torch.layout, torch.memory_format})
# Class-namespace entries that describe the class rather than what it runs.
_CLASS_METADATA = frozenset({
    "__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__", "__slots__",
    "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__", "_abc_impl",
    "__abstractmethods__", "__type_params__"})
_CONSTRUCTORS = ("__new__", "__init__", "__post_init__")
# Hooks that run when a class statement executes or for type hints, never during a call.
_CLASS_CREATION = frozenset({"__init_subclass__", "__set_name__", "__class_getitem__", "__subclasshook__"})
# Dunders of a fixed base that run outside a call (printing, pickling, copying, construction):
# the names their code reads don't make a user override reachable.
_NOT_CALL_TIME = _CLASS_CREATION | frozenset({
    "__repr__", "__str__", "__dir__", "__format__", "__sizeof__", "__getstate__", "__setstate__",
    "__reduce__", "__reduce_ex__", "__copy__", "__deepcopy__", "__getnewargs__", "__getnewargs_ex__",
    "__init__", "__new__", "__del__"})
# nn.Module state read by hooks that never run in an inference forward (backward, state_dict),
# or read together with the hooks they flag (see _Walker.nn_module).
_MODULE_SKIPPED = frozenset({
    "_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
    "_backward_pre_hooks", "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs", "_is_full_backward_hook"})
# C types whose instances' state the walker reads in full (items, value): an instance of a
# Python class may derive from these and still be walked.
_LAYOUT_BASES = (object, tuple, list, dict, set, frozenset, int, float, str, bytes, BaseException,
                 collections.OrderedDict, collections.defaultdict, collections.deque)
_UNSET = enum.Enum("_Unset", "UNSET").UNSET      # a ContextVar without a value
_TUPLEGETTER = type(collections.namedtuple("_Pair", "a").a)
_HEAPTYPE, _IMMUTABLETYPE = 1 << 9, 1 << 8
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_C_CALLABLES = (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType,
                types.ClassMethodDescriptorType, types.MethodWrapperType)


_INSTANCE_TYPES: set = set()     # types whose instances _Walker._dispatch walks as objects (a cache)


class Unfingerprintable(Exception):
    """Something the fingerprint can't describe exactly: take the traced path."""


# -- where code lies ------------------------------------------------------------------------------

def _fixed_roots() -> list[tuple[str, str]]:
    """(directory + os.sep, library) for the code whose meaning the versions in the key fix."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # jitfreeze/, above trace/
    roots = [(os.path.dirname(torch.__file__), "torch"), (package, "jitfreeze"),
             (os.path.dirname(os.__file__), "stdlib")]
    out = []
    for path, lib in roots:
        for p in {os.path.abspath(path), os.path.realpath(path)}:
            out.append((p.rstrip(os.sep) + os.sep, lib))
    return out


_roots: list | None = None
_file_libs: dict = {}


def lib_of_file(filename: str | None) -> str | None:
    """'torch', 'stdlib', 'numpy', 'jitfreeze' for a file of fixed code, else None (user code)."""
    if not filename:
        return None
    lib = _file_libs.get(filename, False)
    if lib is not False:
        return lib
    global _roots
    if _roots is None:
        _roots = _fixed_roots()
    lib = None
    if filename.startswith("<frozen "):
        lib = "stdlib"
    else:
        path = os.path.abspath(filename)
        parts = path.split(os.sep)
        for root, name in _roots:
            if path.startswith(root):
                # the standard library's directory can hold site-packages: third-party code is not fixed
                if name != "stdlib" or not ({"site-packages", "dist-packages"} & set(parts)):
                    lib = name
                break
        if lib is None and "numpy" in sys.modules:
            np_dir = os.path.dirname(sys.modules["numpy"].__file__) + os.sep
            if path.startswith(np_dir):
                lib = "numpy"
    _file_libs[filename] = lib
    return lib


def _lib_of_module_name(name: str | None) -> str | None:
    while name:
        if name == "builtins" or name in sys.builtin_module_names:
            return "stdlib"
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__file__", None):
            return lib_of_file(mod.__file__)
        name = name.rpartition(".")[0]      # C submodules (torch._C._nn) have no file: their package's
    return None


def _lib_of_class(cls: type) -> str | None:
    return _lib_of_module_name(getattr(cls, "__module__", None))


@functools.lru_cache(maxsize=None)
def _layout_base(cls: type):
    """The C base whose state the walker reads for instances of ``cls`` (None: some state is hidden).

    A Python class adds only pointers to its instances (``__dict__``, ``__weakref__``, one per
    slot); a C type outside ``_LAYOUT_BASES`` keeps state the walker can't read."""
    b = cls
    while b not in _LAYOUT_BASES:
        base = b.__base__
        if base is None or not (b.__flags__ & _HEAPTYPE) or (b.__flags__ & _IMMUTABLETYPE):
            return None
        slots = vars(b).get("__slots__", ())
        slots = (slots,) if isinstance(slots, str) else slots
        extra = b.__basicsize__ - base.__basicsize__
        if extra < 0 or extra > 8 * (len(slots) + 2):
            return None
        b = base
    return b


@functools.lru_cache(maxsize=None)
def _names_fixed_code_reads(bases: tuple) -> frozenset:
    """Attribute names the fixed classes ``bases`` (torch's ``nn.Module``, ``nn.Conv2d``...) read
    during a call: from their call-time dunders and ``forward``, through the methods those name,
    to a fixed point. A user subclass's override of one of them runs (``_conv_forward``)."""
    namespace: dict = {}
    for base in reversed(bases):
        namespace.update(vars(base))
    todo = [n for n in namespace if n.startswith("__") and n.endswith("__") and n not in _NOT_CALL_TIME]
    todo.append("forward")
    names = set(todo)
    while todo:
        attr = namespace.get(todo.pop())
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        funcs = [attr.fget, attr.fset] if isinstance(attr, property) else [attr]
        codes = [f.__code__ for f in funcs if isinstance(f, types.FunctionType)]
        while codes:
            co = codes.pop()
            codes.extend(c for c in co.co_consts if type(c) is types.CodeType)
            for name in co.co_names:
                if name not in names:
                    names.add(name)
                    todo.append(name)
    return frozenset(names)


def _name(obj) -> str:
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


@functools.lru_cache(maxsize=None)
def _inert_types() -> tuple:
    """Objects no computation reads data from: loggers and handlers only emit text, locks only order threads."""
    import threading

    return (logging.Logger, logging.LoggerAdapter, logging.Handler, type(threading.Lock()),
            type(threading.RLock()))


def _is_annotation(t: type) -> bool:
    """Type hints (``X | None``, ``list[int]``, ``typing.Optional[X]``): names of types, hashed by repr."""
    return t in (types.UnionType, types.GenericAlias) or getattr(t, "__module__", None) == "typing"


class _Namespace:
    """A class's or user module's attributes, covered when covered code names them."""

    __slots__ = ("label", "pending")

    def __init__(self, label: str, pending: dict):
        self.label, self.pending = label, pending


class _Walker:
    def __init__(self):
        self.hash = hashlib.sha256()
        self.seen: dict[int, int] = {}
        self.keep: list = []                     # objects whose ids are in seen stay alive
        self.names: set[str] = set()             # every name covered code reads (co_names, identifier consts)
        self.spaces: list[_Namespace] = []
        self.class_spaces: dict[type, _Namespace] = {}
        self.tensors: list[torch.Tensor] = []   # reached tensors: digested, watched
        self.modules: list[torch.nn.Module] = []
        self.libs: set[str] = set()
        self.path: list[str] = []
        self.count = 0
        self.depth = 0

    def add(self, *items) -> None:
        self.hash.update(repr(items).encode())
        self.hash.update(b"\x00")

    def fail(self, why: str):
        where = ".".join(self.path[-6:])
        raise Unfingerprintable(f"{why} (at {where})" if where else why)

    def _visit(self, obj) -> bool:
        """False when ``obj`` was seen already (a back-reference is recorded instead)."""
        key = id(obj)
        if key in self.seen:
            self.add("ref", self.seen[key])
            return False
        self.seen[key] = len(self.seen)
        self.keep.append(obj)
        return True

    def edge(self, label: str, v) -> None:
        self.path.append(label)
        self.value(v)
        self.path.pop()

    def fixed(self, kind: str, lib: str, name: str) -> None:
        self.libs.add(lib)
        self.add(kind, lib, name)

    # -- the dispatch ---------------------------------------------------------------------------

    def value(self, v) -> None:
        t = type(v)
        if t is str:
            data = v.encode("utf-8", "surrogatepass")
            self.hash.update(b"s%d:" % len(data))
            self.hash.update(data)
            return
        if t in _PLAIN:
            self.add(t.__name__, v)
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
                self.tensors.append(v)
        elif t in (tuple, list):
            if self._visit(v):
                self.add(t.__name__, len(v))
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

    # -- containers and objects -----------------------------------------------------------------

    def items(self, d) -> None:
        self.add("dict", len(d))
        for k, item in d.items():
            self.value(k)
            self.edge(f"[{k!r}]" if type(k) in _PLAIN else "[]", item)

    def state(self, v) -> None:
        """An object's ``__dict__`` and slots."""
        d = getattr(v, "__dict__", None)
        if isinstance(d, dict):
            for k in sorted(d, key=str):
                if k not in _VOLATILE_FIELDS:
                    self.add("field", k)
                    self.edge(str(k), d[k])
        for cls in type(v).__mro__:
            slots = vars(cls).get("__slots__", ())
            for slot in (slots,) if isinstance(slots, str) else slots:
                if slot in ("__dict__", "__weakref__"):
                    continue
                name = f"_{cls.__name__.lstrip('_')}{slot}" if slot.startswith("__") and not slot.endswith("__") \
                    else slot
                try:
                    item = getattr(v, name)
                except AttributeError:
                    self.add("unset-slot", slot)
                    continue
                self.add("slot", slot)
                self.edge(slot, item)

    def instance(self, v, t) -> None:
        base = _layout_base(t)
        if base is None:
            self.fail(f"an object of type {_name(t)} whose state the fingerprint can't read")
        if not self._visit(v):
            return
        self.add("object", _name(t))
        self.klass(t)
        if base in (tuple, list, set, frozenset, collections.deque):
            self.add("items", len(v))
            for i, item in enumerate(sorted(v, key=repr) if base in (set, frozenset) else v):
                self.edge(f"[{i}]", item)
        elif base in (dict, collections.OrderedDict, collections.defaultdict):
            self.items(v)
            if base is collections.defaultdict:
                self.edge("default_factory", v.default_factory)
        elif base in (int, float, str, bytes):
            self.add("base", base(v))
        elif base is BaseException:
            self.edge("args", v.args)
        self.state(v)

    def _numpy(self, v) -> bool:
        np = sys.modules.get("numpy")
        if np is None:
            return False
        if isinstance(v, np.ndarray):
            if v.dtype.hasobject:
                self.fail("a numpy array of Python objects")
            if self._visit(v):
                self.libs.add("numpy")
                data = np.ascontiguousarray(v)
                self.add("ndarray", type(v).__name__, str(v.dtype), v.shape,
                         hashlib.sha256(memoryview(data).cast("B") if data.size else b"").hexdigest())
            return True
        if isinstance(v, np.generic) and not v.dtype.hasobject:
            self.libs.add("numpy")
            self.add("numpy-scalar", str(v.dtype), v.tobytes())
            return True
        if isinstance(v, (np.ufunc, np.dtype)):
            self.fixed("numpy", "numpy", repr(v))
            return True
        return False

    def generator(self, gen) -> None:
        """A generator not started yet is its code and arguments; a running one has hidden state."""
        if getgeneratorstate(gen) != GEN_CREATED:
            self.fail(f"a started generator ({gen.__qualname__})")
        if self._visit(gen):
            frame = gen.gi_frame
            self.add("generator")
            if lib_of_file(gen.gi_code.co_filename) is None:
                self.code(gen.gi_code, frame.f_globals)
            else:
                self.fixed("fixed-generator", lib_of_file(gen.gi_code.co_filename), gen.__qualname__)
            self.edge("locals", dict(frame.f_locals))

    def c_callable(self, v, t) -> None:
        """A function or method implemented in C: fixed when its library is; a bound one hashes its object."""
        owner = getattr(v, "__self__", None)
        name = getattr(v, "__qualname__", None) or getattr(v, "__name__", "?")
        if t in (types.MethodDescriptorType, types.WrapperDescriptorType, types.ClassMethodDescriptorType):
            cls = v.__objclass__
            lib = _lib_of_class(cls)
            if lib is None:
                self.fail(f"C method {_name(cls)}.{v.__name__} is not from torch, numpy or the standard library")
            self.fixed("c-method", lib, f"{_name(cls)}.{v.__name__}")
            return
        if owner is None or isinstance(owner, types.ModuleType):
            module = owner.__name__ if owner is not None else getattr(v, "__module__", None)
            lib = _lib_of_module_name(module)
            if lib is None:
                self.fail(f"C function {module}.{name} is not from torch, numpy or the standard library")
            self.fixed("c-function", lib, f"{module}.{name}")
            return
        cls = owner if isinstance(owner, type) else type(owner)
        lib = _lib_of_class(cls)
        if lib is None:
            self.fail(f"C method {_name(cls)}.{getattr(v, '__name__', name)} is not from torch, numpy or the "
                      "standard library")
        self.fixed("c-bound", lib, f"{_name(cls)}.{getattr(v, '__name__', name)}")
        if not isinstance(owner, type):
            self.edge("__self__", owner)

    # -- code -----------------------------------------------------------------------------------

    def code(self, co: types.CodeType, globals_: dict | None) -> None:
        if not self._visit(co):
            return
        h = self.hash
        h.update(b"code:%d:%d:%d:%d:%d:" % (len(co.co_code), co.co_argcount, co.co_posonlyargcount,
                                              co.co_kwonlyargcount, co.co_flags))
        h.update(co.co_code)
        for names in (co.co_names, co.co_varnames, co.co_freevars, co.co_cellvars):
            h.update(("\x01".join(names) + "\x02").encode())
        self.names.update(co.co_names)
        for const in co.co_consts:
            if type(const) is types.CodeType:
                self.code(const, globals_)
            else:
                if type(const) is str and _IDENTIFIER.match(const):
                    self.names.add(const)         # getattr(obj, "name")
                self.value(const)
        if globals_ is None:
            return
        builtins_ = globals_.get("__builtins__", __builtins__)
        builtins_ = vars(builtins_) if isinstance(builtins_, types.ModuleType) else builtins_
        for name in co.co_names:
            if name in globals_:
                self.add("global", name)
                self.edge(name, globals_[name])
            elif name in builtins_:
                self.add("builtin", name)
                self.edge(name, builtins_[name])

    def function(self, fn: types.FunctionType) -> None:
        if not self._visit(fn):
            return
        lib = lib_of_file(fn.__code__.co_filename)
        self.path.append(fn.__qualname__)
        try:
            if lib is not None:
                # fixed code: its bytecode and the library globals it reads are the library's
                self.fixed("fixed-function", lib, _name(fn))
            else:
                self.add("function", fn.__qualname__)
                self.code(fn.__code__, fn.__globals__)
            # ... but what it was made with is not (torch.no_grad()(user_function))
            self.edge("__defaults__", fn.__defaults__)
            self.edge("__kwdefaults__", fn.__kwdefaults__)
            for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
                try:
                    contents = cell.cell_contents
                except ValueError:
                    self.add("empty-cell", name)
                    continue
                self.add("cell", name)
                if name == "__class__" and isinstance(contents, type):
                    self.klass(contents)       # zero-argument super()'s cell: the class is not called
                else:
                    self.edge(name, contents)
            if fn.__dict__:
                self.add("function-dict")
                self.state(fn)
        finally:
            self.path.pop()

    # -- classes and modules --------------------------------------------------------------------

    def klass(self, cls: type, constructed: bool = False) -> None:
        lib = _lib_of_class(cls)
        if lib is not None:
            self.fixed("class", lib, _name(cls))
            if self._visit(cls):
                self.patched(cls)
            return
        space = self.class_spaces.get(cls)
        if space is None:
            if not self._visit(cls):
                return
            self.path.append(cls.__qualname__)
            try:
                space = self._class_space(cls)
            finally:
                self.path.pop()
        else:
            self.add("class-ref", _name(cls))
        if constructed:
            self.path.append(cls.__qualname__)
            try:
                for name in _CONSTRUCTORS:
                    self.cover(space, name)
            finally:
                self.path.pop()

    def _class_space(self, cls: type) -> _Namespace:
        self.add("class", _name(cls), [_name(b) for b in cls.__mro__])
        meta = type(cls)
        if meta is not type:
            self.klass(meta)
        fixed_bases = tuple(b for b in cls.__mro__ if _lib_of_class(b) is not None)
        user_bases = [b for b in cls.__mro__ if b not in fixed_bases]
        fixed_names = _names_fixed_code_reads(fixed_bases)
        pending: dict = {}
        for base in user_bases:
            for name, attr in vars(base).items():
                if name not in _CLASS_METADATA:
                    pending.setdefault(name, []).append((base, attr))
        space = _Namespace(cls.__qualname__, pending)
        self.class_spaces[cls] = space
        self.spaces.append(space)
        for name in sorted(pending):
            dunder = name.startswith("__") and name.endswith("__")
            if name in _CLASS_CREATION:
                del pending[name]
            elif (dunder and name not in _NOT_CALL_TIME) or (name in fixed_names and not dunder):
                self.cover(space, name)
        return space

    def module(self, mod: types.ModuleType) -> None:
        file = getattr(mod, "__file__", None)
        lib = lib_of_file(file) if file else _lib_of_module_name(mod.__name__)
        if lib is not None:
            self.fixed("module", lib, mod.__name__)
            if self._visit(mod):
                self.patched(mod)
            return
        if not self._visit(mod):
            return
        self.add("module", mod.__name__)
        if type(mod) is not types.ModuleType:
            self.klass(type(mod))
        pending = {name: [(mod, v)] for name, v in vars(mod).items()
                   if not (name.startswith("__") and name.endswith("__")) or name == "__getattr__"}
        space = _Namespace(mod.__name__, pending)
        self.spaces.append(space)
        self.cover(space, "__getattr__")

    def patched(self, owner) -> None:
        """User functions set on a fixed class or module (``nn.Linear.forward = mine``): walked; a fixed
        module's submodules are followed by name (``torch.nn.functional.gelu = mine``)."""
        submodules = {}
        for name, attr in list(vars(owner).items()):
            t = type(attr)       # not isinstance: it would read __class__ (a deprecation warning on some)
            if t is staticmethod or t is classmethod:
                attr = attr.__func__
            if type(attr) is types.FunctionType and lib_of_file(attr.__code__.co_filename) is None \
                    and _lib_of_module_name(attr.__module__) is None:     # not torch's own, decorated
                self.add("patched", name)
                self.edge(name, attr)
            elif issubclass(t, types.ModuleType) and not name.startswith("__"):
                submodules[name] = [(owner, attr)]
        if submodules:
            self.spaces.append(_Namespace(owner.__name__, submodules))

    def cover(self, space: _Namespace, name: str) -> None:
        """Hash every definition of ``name`` in ``space`` (along a class's MRO), once."""
        for owner, attr in space.pending.pop(name, ()):
            self.add("attr", space.label, getattr(owner, "__qualname__", getattr(owner, "__name__", "")), name)
            self.path.append(name)
            try:
                self.value(attr)
            finally:
                self.path.pop()

    def settle(self) -> None:
        """Cover, to a fixed point, the attributes of reached classes and modules that covered code names."""
        changed = True
        while changed:
            changed = False
            for space in list(self.spaces):
                # constructors count when their class is reached (super().__init__ names every __init__)
                hit = (space.pending.keys() & self.names).difference(_CONSTRUCTORS)
                for name in sorted(hit):
                    self.path.append(space.label)
                    try:
                        self.cover(space, name)
                    finally:
                        self.path.pop()
                    changed = True

    # -- modules --------------------------------------------------------------------------------

    def nn_module(self, module: torch.nn.Module) -> None:
        if not self._visit(module):
            return
        if not self.modules:
            glob = torch.nn.modules.module
            for registry in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
                if getattr(glob, registry, None):
                    self.fail(f"global module hooks are registered ({registry})")
        self.modules.append(module)
        self.names.add("forward")         # nn.Module.__call__ (torch's code) calls it
        self.klass(type(module))
        d = vars(module)
        for kind in ("_parameters", "_buffers"):
            for name, t in d.get(kind, {}).items():
                self.add(kind, name, None if t is None else f"{t.dtype}:{tuple(t.shape)}:{t.device}")
                self.edge(name, t)
        for name, sub in d.get("_modules", {}).items():
            self.add("child", name)
            self.edge(name, sub)
        for kind, flags in (("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)),
                            ("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"))):
            for hook_id, hook in d.get(kind, {}).items():
                self.add("hook", kind, [hook_id in d.get(f, ()) for f in flags])
                self.edge(kind, hook)
        for attr in sorted(d):
            if attr not in _MODULE_SKIPPED and attr not in _VOLATILE_FIELDS:
                self.add("attr", attr)
                self.edge(attr, d[attr])

    def digest(self) -> str:
        self.settle()
        if "numpy" in self.libs:
            self.add("numpy", sys.modules["numpy"].__version__)
        self.add("tensors", [f"{t.dtype}:{tuple(t.shape)}:{t.device}" for t in self.tensors])
        self.add("weights-digest", digest_tensors(self.tensors))
        return self.hash.hexdigest()


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
        return walker.digest(), walker.tensors, walker.modules
    except RecursionError:
        raise Unfingerprintable("the walk ran out of Python stack") from None
    except Unfingerprintable:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a user __repr__ that raises: the traced path serves it
        raise Unfingerprintable(f"the walk failed ({type(exc).__name__}: {exc})") from exc


def module_fingerprint(module: torch.nn.Module) -> tuple[str, list, list]:
    return function_fingerprint(module)
