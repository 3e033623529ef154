"""The fingerprint's walk of code (:mod:`jitfreeze.trace.fingerprint`): code objects, functions,
classes and user modules, whose attributes count once covered code names them."""

from __future__ import annotations

import types

from .fingerprint_fixed import (_CLASS_CREATION, _CLASS_METADATA, _CONSTRUCTORS, _IDENTIFIER, _NOT_CALL_TIME,
                                Unfingerprintable,
                                _lib_of_class, lib_of_file, _lib_of_module_name, _name,
                                _names_fixed_code_reads)

__all__ = ["CodeWalk"]


class _Namespace:
    """A class's or user module's attributes, covered when covered code names them."""

    __slots__ = ("label", "pending")

    def __init__(self, label: str, pending: dict):
        self.label, self.pending = label, pending


class CodeWalk:
    """The walker's methods for code, classes and modules; mixed into
    :class:`jitfreeze.trace.fingerprint._Walker`, whose core (``add``, ``edge``, ``value``,
    ``_visit``, ``fixed``) they call."""

    def code(self, co: types.CodeType, globals_: dict | None) -> None:
        if not self._visit(co):
            return
        put = self.put
        put(b"code:%d:%d:%d:%d:%d:" % (len(co.co_code), co.co_argcount, co.co_posonlyargcount,
                                         co.co_kwonlyargcount, co.co_flags))
        put(co.co_code)
        for names in (co.co_names, co.co_varnames, co.co_freevars, co.co_cellvars):
            put(("\x01".join(names) + "\x02").encode())
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
        except Unfingerprintable as exc:
            exc.labels.append(fn.__qualname__)
            raise

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
            try:
                space = self._class_space(cls)
            except Unfingerprintable as exc:
                exc.labels.append(cls.__qualname__)
                raise
        else:
            self.add("class-ref", _name(cls))
        if constructed:
            try:
                for name in _CONSTRUCTORS:
                    self.cover(space, name)
            except Unfingerprintable as exc:
                exc.labels.append(cls.__qualname__)
                raise

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
            try:
                self.value(attr)
            except Unfingerprintable as exc:
                exc.labels.append(name)
                raise

    def settle(self) -> None:
        """Cover, to a fixed point, the attributes of reached classes and modules that covered code names."""
        changed = True
        while changed:
            changed = False
            for space in list(self.spaces):
                # constructors count when their class is reached (super().__init__ names every __init__)
                hit = (space.pending.keys() & self.names).difference(_CONSTRUCTORS)
                for name in sorted(hit):
                    try:
                        self.cover(space, name)
                    except Unfingerprintable as exc:
                        exc.labels.append(space.label)
                        raise
                    changed = True
