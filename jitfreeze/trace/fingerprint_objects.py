"""The fingerprint's walk of objects (:mod:`jitfreeze.trace.fingerprint`): containers, object state,
numpy arrays, generators, C callables and ``nn.Module`` instances."""

from __future__ import annotations

import collections
import hashlib
import sys
import types
from inspect import GEN_CREATED, getgeneratorstate

import torch

from .fingerprint_fixed import (_MODULE_SKIPPED, _PLAIN, _VOLATILE_FIELDS, _layout_base, _lib_of_class,
                                lib_of_file, _lib_of_module_name, _name)

__all__ = ["ObjectWalk"]


class ObjectWalk:
    """The walker's methods for objects; mixed into :class:`jitfreeze.trace.fingerprint._Walker`,
    whose core (``add``, ``edge``, ``fail``, ``_visit``, ``fixed``, ``value``) they call."""

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
