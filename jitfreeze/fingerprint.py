"""Fingerprints that need no trace: the first-level index of the warm path.

A fingerprint covers, for one call:

* the function's code: bytecode, constants (nested code objects too), names, defaults, and its
  closure cells' values; and, followed through ``co_names``, the module-level functions and
  plain constants it reads (recursively, to a bounded depth), and the code of any ``nn.Module``
  class it names;
* for a bound or wrapped module: for every submodule, its class (qualified name, its plain class
  attributes, and for classes outside torch the code of the methods ``forward`` reaches: ``forward``
  (``__call__``, ``__getattr__`` where a class defines them) and, to a fixed point, every method or
  property of the class and its bases below ``nn.Module`` whose name appears in code the
  fingerprint covers, every definition along the MRO so that ``super()`` calls are covered), its
  plain attributes (``eps``, ``num_heads``, flags), the functions held in its attributes, the
  code of its forward hooks, and a digest of every parameter and buffer (names, dtypes, shapes,
  bytes); and the plain data its other attributes hold (e.g. a transformers config: the fields of
  objects, a few levels deep);
* the input signature, the device, the versions and the pipeline options (added by the caller).

It cannot see: methods reached without their name appearing in covered code (``getattr(self,
name)`` with a computed name), attributes of imported *modules* it reads (``helpers.act(x)`` where ``helpers``
is a module: only the name ``helpers`` is covered), objects other than plain constants, tensors,
functions, classes and modules (they count by type name only), mutable global state read at
call time, or C extensions' behaviour. ``verify=True`` (``JITFREEZE_VERIFY=1``) re-traces on
index hits and compares graph keys, which catches all of these.
"""

from __future__ import annotations

import enum
import hashlib
import types

import torch

from .digest import digest_tensors

__all__ = ["Unfingerprintable", "function_fingerprint", "module_fingerprint"]

_MAX_DEPTH = 4
_MAX_OBJECTS = 20000     # a bound on the walk (transformers models reach 2,500-4,500)
_MAX_DATA_DEPTH = 3       # levels of plain objects followed from a module attribute (config.text_config...)
# Fields of plain objects that differ from process to process without meaning anything for the
# graph (transformers' GenerationConfig keeps a salted hash() of itself).
_VOLATILE_FIELDS = frozenset({"_original_object_hash"})
_PLAIN = (type(None), bool, int, float, str, bytes, complex, torch.dtype, torch.device, torch.layout,
          torch.memory_format)
_TORCH_PREFIXES = ("torch.", "torch")
# Methods a module's call starts from; the rest of a class's methods count when covered code names them.
_ROOT_METHODS = ("forward", "__call__", "__getattr__", "__getattribute__")


class Unfingerprintable(Exception):
    """Something the fingerprint can't describe: take the traced path."""


class _Walker:
    def __init__(self):
        self.parts: list[str] = []
        self.seen: dict[int, int] = {}
        self.names: set[str] = set()             # every name covered code reads (co_names)
        self.classes: list[type] = []            # module classes reached, in order
        self.methods: dict[type, dict] = {}      # class -> {name: [(base, function), ...]} not yet covered
        self.tensors: list[torch.Tensor] = []   # reached tensors (closure weights): digested, watched
        self.modules: list[torch.nn.Module] = []
        self.count = 0

    def add(self, *items) -> None:
        self.parts.append(repr(items))

    def _visit(self, obj) -> bool:
        """False when ``obj`` was seen already (a back-reference is recorded instead)."""
        self.count += 1
        if self.count > _MAX_OBJECTS:
            raise Unfingerprintable("too many objects reachable from the function")
        key = id(obj)
        if key in self.seen:
            self.add("ref", self.seen[key])
            return False
        self.seen[key] = len(self.seen)
        return True

    def code(self, co: types.CodeType, depth: int, globals_: dict | None) -> None:
        if not self._visit(co):
            return
        self.add("code", co.co_name, co.co_code, co.co_names, co.co_varnames, co.co_freevars,
                 co.co_argcount, co.co_kwonlyargcount, co.co_flags)
        self.names.update(co.co_names)
        for const in co.co_consts:
            if isinstance(const, types.CodeType):
                self.code(const, depth, globals_)
            else:
                self.value(const, depth)
        if globals_ is not None and depth < _MAX_DEPTH:
            for name in co.co_names:
                if name in globals_:
                    self.add("global", name)
                    self.value(globals_[name], depth + 1, shallow_modules=True)

    def function(self, fn, depth: int) -> None:
        if isinstance(fn, types.MethodType):
            self.add("method")
            self.function(fn.__func__, depth)
            self.value(fn.__self__, depth)
            return
        if isinstance(fn, torch.nn.Module):
            self.module(fn)
            return
        if not isinstance(fn, types.FunctionType):
            raise Unfingerprintable(f"{type(fn).__name__} is not a Python function")
        if not self._visit(fn):
            return
        self.add("function", fn.__module__, fn.__qualname__)
        self.code(fn.__code__, depth, fn.__globals__)
        self.value(fn.__defaults__, depth)
        self.value(fn.__kwdefaults__, depth)
        for cell in fn.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:
                self.add("empty-cell")
                continue
            self.value(contents, depth)

    def value(self, v, depth: int, shallow_modules: bool = False) -> None:
        if isinstance(v, enum.Enum):
            self.add("enum", type(v).__module__, type(v).__qualname__, v.name)
        elif isinstance(v, _PLAIN):
            self.add(type(v).__name__, v)
        elif isinstance(v, torch.Tensor):
            if self._visit(v):
                self.add("tensor", len(self.tensors))
                self.tensors.append(v)
        elif isinstance(v, (tuple, list, frozenset, set)):
            if self._visit(v):
                items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v
                self.add(type(v).__name__, len(v))
                for item in items:
                    self.value(item, depth, shallow_modules)
        elif isinstance(v, dict):
            if self._visit(v):
                self.add("dict", len(v))
                for k, item in v.items():
                    self.value(k, depth, shallow_modules)
                    self.value(item, depth, shallow_modules)
        elif isinstance(v, torch.nn.Module):
            self.module(v)
        elif isinstance(v, (types.FunctionType, types.MethodType)):
            mod = getattr(v, "__module__", "") or ""
            if mod.startswith(_TORCH_PREFIXES) or depth >= _MAX_DEPTH:
                self.add("function-ref", mod, getattr(v, "__qualname__", ""))
            else:
                self.function(v, depth + 1)
        elif isinstance(v, types.ModuleType):
            self.add("module-ref", v.__name__)      # not followed: see the module docstring
        elif isinstance(v, type):
            self.add("class", v.__module__, v.__qualname__)
            if issubclass(v, torch.nn.Module):
                self.klass(v)
        else:
            self.add("object", type(v).__module__, type(v).__qualname__)

    def data(self, v, depth: int) -> None:
        """Plain data reachable from a module attribute: values, containers, and the ``__dict__``
        of plain objects (``depth`` levels of them), e.g. a transformers ``PretrainedConfig``."""
        self.count += 1
        if self.count > _MAX_OBJECTS:
            raise Unfingerprintable("too many objects reachable from the function")
        if isinstance(v, enum.Enum):
            self.add("enum", type(v).__module__, type(v).__qualname__, v.name)
        elif isinstance(v, _PLAIN):
            self.add(type(v).__name__, v)
        elif isinstance(v, (tuple, list, dict, set, frozenset)):
            if self._visit(v):
                self.add(type(v).__name__, len(v))
                if isinstance(v, dict):
                    for k, item in v.items():
                        self.data(k, 0)
                        self.data(item, depth)
                else:
                    for item in sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v:
                        self.data(item, depth)
        elif isinstance(v, (torch.Tensor, torch.nn.Module, types.FunctionType, types.MethodType, type,
                            types.ModuleType)):
            self.value(v, _MAX_DEPTH)        # tensors digested, the rest by reference
        elif depth > 0 and isinstance(getattr(v, "__dict__", None), dict):
            if self._visit(v):
                self.add("object", type(v).__module__, type(v).__qualname__)
                for k, item in sorted(vars(v).items()):
                    if k in _VOLATILE_FIELDS:
                        continue
                    self.add("field", k)
                    self.data(item, depth - 1)
        else:
            self.add("object", type(v).__module__, type(v).__qualname__)

    def klass(self, cls: type) -> None:
        if not self._visit(cls):
            return
        self.add("class", cls.__module__, cls.__qualname__)
        methods: dict[str, list] = {}
        for base in cls.__mro__:
            if base is torch.nn.Module or base is object or base.__module__.startswith(_TORCH_PREFIXES):
                continue     # torch's own classes: covered by the torch version
            for name, attr in sorted(vars(base).items()):
                if isinstance(attr, (staticmethod, classmethod)):
                    attr = attr.__func__
                if isinstance(attr, property):
                    funcs = [f for f in (attr.fget, attr.fset) if isinstance(f, types.FunctionType)]
                    if funcs:
                        methods.setdefault(name, []).extend((base, f) for f in funcs)
                elif isinstance(attr, types.FunctionType):
                    methods.setdefault(name, []).append((base, attr))
                elif isinstance(attr, _PLAIN) and not name.startswith("__"):
                    self.add("attr", name, attr)
        self.classes.append(cls)
        self.methods[cls] = methods
        for name in _ROOT_METHODS:
            self._cover(cls, name)

    def _cover(self, cls: type, name: str) -> None:
        """Hash every definition of ``name`` along ``cls``'s MRO (outside torch), once."""
        defs = self.methods[cls].pop(name, None)
        for base, fn in defs or ():
            self.add("def", cls.__qualname__, base.__module__, base.__qualname__, name)
            self.function(fn, 1)

    def reachable_methods(self) -> None:
        """Cover, to a fixed point, the methods of reached classes that covered code names."""
        changed = True
        while changed:
            changed = False
            for cls in self.classes:
                pending = self.methods[cls]
                for name in sorted(pending.keys() & self.names):
                    self._cover(cls, name)
                    changed = True

    def module(self, module: torch.nn.Module) -> None:
        if not self._visit(module):
            return
        self.modules.append(module)
        glob = torch.nn.modules.module
        for registry in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
            if getattr(glob, registry, None):
                raise Unfingerprintable("global module hooks are registered")
        for name, sub in module.named_modules():
            cls = type(sub)
            self.add("submodule", name, cls.__module__, cls.__qualname__)
            self.klass(cls)
            for attr, v in sorted(vars(sub).items()):
                if attr in ("_parameters", "_buffers", "_modules") or attr.startswith("_forward") \
                        or attr.startswith("_backward") or attr.startswith("_state_dict") \
                        or attr.startswith("_load_state_dict"):
                    continue
                if isinstance(v, _PLAIN) or isinstance(v, enum.Enum) or (
                        isinstance(v, (tuple, list)) and all(isinstance(i, _PLAIN) for i in v)):
                    self.add("attr", attr, v)
                elif isinstance(v, torch.Tensor):
                    self.add("tensor-attr", attr)
                    self.value(v, 0)
                elif isinstance(v, (types.FunctionType, types.MethodType)) and not (
                        isinstance(v, types.MethodType) and v.__self__ is sub):
                    self.add("function-attr", attr)      # e.g. self.act = some_function
                    self.value(v, 1)
                elif not isinstance(v, (torch.nn.Module, types.FunctionType, types.MethodType, type,
                                        types.ModuleType)):
                    # plain data held in an object: a transformers config (output_hidden_states,
                    # attention implementation...) decides the graph as much as the code does
                    self.add("data-attr", attr)
                    self.data(v, _MAX_DATA_DEPTH)
            for hooks in (sub._forward_hooks, sub._forward_pre_hooks):
                for hook in hooks.values():
                    self.add("hook")
                    self.function(hook, 1)
        names, tensors = [], []
        for name, t in list(module.named_parameters(remove_duplicate=False)) + \
                list(module.named_buffers(remove_duplicate=False)):
            names.append(f"{name}:{t.dtype}:{tuple(t.shape)}:{t.device}")
            tensors.append(t)
        self.add("weights", names)
        self.tensors.extend(tensors)

    def digest(self) -> str:
        self.reachable_methods()
        self.add("tensors", [f"{t.dtype}:{tuple(t.shape)}:{t.device}" for t in self.tensors])
        self.add("weights-digest", digest_tensors(self.tensors))
        return hashlib.sha256("\x00".join(self.parts).encode()).hexdigest()


def function_fingerprint(fn) -> tuple[str, list, list]:
    """(digest, tensors reached, modules reached) for a function, bound method or module."""
    walker = _Walker()
    walker.function(fn, 0)
    return walker.digest(), walker.tensors, walker.modules


def module_fingerprint(module: torch.nn.Module) -> tuple[str, list, list]:
    return function_fingerprint(module)
