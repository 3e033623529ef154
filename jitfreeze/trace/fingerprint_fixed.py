"""Fixed code for the fingerprint (:mod:`jitfreeze.trace.fingerprint`): where code lies, and the
constants that say what the walk hashes and skips.

Functions, classes and C callables whose source lies inside torch's installed package, the
standard library, numpy or jitfreeze itself are identified by name, not walked; where code lies
is decided by its file (``co_filename``, the module's ``__file__``), never by a module-name prefix.
"""

from __future__ import annotations

import collections
import enum
import functools
import logging
import os
import re
import sys
import types

import torch

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


class Unfingerprintable(Exception):
    """Something the fingerprint can't describe exactly: take the traced path.

    Its text says why and where: the labels of the walk's last six steps to the object, which
    the walk adds as the exception leaves each step (no path is kept while nothing fails)."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why
        self.labels: list[str] = []       # innermost first

    def __str__(self) -> str:
        where = ".".join(reversed(self.labels[:6]))
        return f"{self.why} (at {where})" if where else self.why


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
