"""``jitfreeze(model)``: an ``nn.Module`` that is the model, served by jitfreeze.

:class:`JitFreezeModule` holds the model as its one submodule, ``module``, and calls it through a
:class:`~jitfreeze.runtime.function.JitFreezeFunction` (``jitfreeze_function``). Everything else is the model's:

* ``.eval()``, ``.train()``, ``.to()``, ``.half()``, ``.apply()``, ``.requires_grad_()`` reach it as
  torch's own recursion reaches any submodule; the function's freshness check
  (:mod:`jitfreeze.runtime.watch`) sees the change on the next call (new storages, training flags), which
  then reloads or recompiles, or runs eagerly in training mode.
* Names have no ``module.`` prefix: ``state_dict()``, ``named_parameters()``, ``named_buffers()``
  and ``named_modules()`` give the bare model's names, and ``load_state_dict()`` takes them, also
  when the wrapper sits inside another module (e.g. ``nn.Sequential(wrapped, nn.ReLU())``): a
  load pre-hook puts the ``module.`` back for torch's recursion over ``_modules``. The model stays a
  registered submodule (not hidden outside ``_modules``) so that every other piece of torch that
  walks children (``_apply``, ``train``, ``apply``, ``zero_grad``, ``repr``) needs nothing from
  here.
* Attributes the wrapper lacks fall through to the model (``wrapped.config``), then to the
  jitfreeze function (``traces``, ``cache_info()``); assigning one the model (or the function)
  holds sets it there.

Calls skip ``nn.Module.__call__`` (its hook machinery costs microseconds) unless the wrapper has
hooks of its own, global module hooks exist, or it was ``compile()``\\ d: then torch's call runs
them around :meth:`JitFreezeModule.forward`. Copies (``copy.deepcopy``, pickling) copy the model
and start a new jitfreeze function with the same options (it loads from the persistent cache).
"""

from __future__ import annotations

import torch

from ..errors import ParametersDiscardedError
from .function import JitFreezeFunction

__all__ = ["JitFreezeModule"]

_mm = torch.nn.modules.module
_g_fwd, _g_fwd_pre = _mm._global_forward_hooks, _mm._global_forward_pre_hooks    # torch mutates these in place
_g_bwd, _g_bwd_pre = _mm._global_backward_hooks, _mm._global_backward_pre_hooks
_module_call = torch.nn.Module.__call__
_module_getattr = torch.nn.Module.__getattr__
_PREFIX = "module."


class JitFreezeModule(torch.nn.Module):
    """What ``jitfreeze(model)`` returns: the model (submodule ``module``), called through jitfreeze."""

    def __init__(self, model: torch.nn.Module, **options):
        super().__init__()
        self.module = model
        self._jitfreeze_options = _Options(options)
        self._jitfreeze_function = JitFreezeFunction(model, module=model, **options)
        self.register_load_state_dict_pre_hook(_insert_prefix)

    # -- calls ----------------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        # One attribute lookup (a class with __getattr__ gets no specialized attribute access),
        # then dict reads. compile() puts _compiled_call_impl in the instance dict.
        d = self.__dict__
        if (_g_fwd or _g_fwd_pre or _g_bwd or _g_bwd_pre or d["_forward_pre_hooks"] or d["_forward_hooks"]
                or d["_backward_hooks"] or d["_backward_pre_hooks"] or "_compiled_call_impl" in d):
            return _module_call(self, *args, **kwargs)
        if kwargs:
            return d["_jitfreeze_function"](*args, **kwargs)
        return d["_jitfreeze_function"](*args)

    def forward(self, *args, **kwargs):
        return self._jitfreeze_function(*args, **kwargs)

    # -- jitfreeze's side ------------------------------------------------------------------------

    @property
    def jitfreeze_function(self) -> JitFreezeFunction:
        return self._jitfreeze_function

    @property
    def traces(self) -> int:
        return self._jitfreeze_function.traces

    def cache_info(self):
        return self._jitfreeze_function.cache_info()

    def cache_clear(self) -> None:
        self._jitfreeze_function.cache_clear()

    def signatures(self):
        """:meth:`JitFreezeFunction.signatures` of the function that serves the model."""
        return self._jitfreeze_function.signatures()

    @property
    def cache_location(self) -> str | None:
        """:attr:`JitFreezeFunction.cache_location` of the function that serves the model."""
        return self._jitfreeze_function.cache_location

    def extra_repr(self) -> str:
        return f"jitfreeze-wrapped: {self._jitfreeze_function.name}"

    # -- the model's names, unprefixed ------------------------------------------------------------

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        return self.module.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict, assign)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self.module.named_parameters(prefix, recurse, remove_duplicate)

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return self.module.named_buffers(prefix, recurse, remove_duplicate)

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        """The wrapper, then the model's modules under the wrapper's own name (the model's names)."""
        if memo is None:
            memo = set()
        if self not in memo or not remove_duplicate:
            if remove_duplicate:
                memo.add(self)
            yield prefix, self
        yield from self.module.named_modules(memo, prefix, remove_duplicate)

    # -- the model's attributes -----------------------------------------------------------------

    def __getattr__(self, name: str):
        try:
            return _module_getattr(self, name)        # the wrapper's own submodule ``module``
        except AttributeError:
            pass
        d = self.__dict__
        model = d["_modules"].get("module") if "_modules" in d else None
        # Not built yet (__init__, unpickling): no fall-through. Nor for protocol names
        # (``__deepcopy__``, ``__array__``...): the model's would act on the model, not the wrapper.
        if model is None or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        try:
            return getattr(model, name)
        except AttributeError:
            function = d.get("_jitfreeze_function")
            if function is None or not hasattr(function, name):
                raise
            return getattr(function, name)

    def __setattr__(self, name: str, value) -> None:
        d = self.__dict__
        if name == "module" and "_jitfreeze_function" in d:
            raise AttributeError("the wrapped model cannot be replaced (its jitfreeze function serves the old "
                                 "one): wrap the new model instead, jitfreeze(new_model)")
        if "_modules" in d and name not in d and name not in d["_modules"] and not hasattr(type(self), name):
            for target in (d["_modules"].get("module"), d.get("_jitfreeze_function")):
                if target is not None and _holds(target, name):
                    setattr(target, name, value)
                    return
        super().__setattr__(name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(dir(self.module)))

    # -- copies ---------------------------------------------------------------------------------

    def __getstate__(self):
        if getattr(self.module, "_jitfreeze_discarded", False):
            raise ParametersDiscardedError(
                "cannot copy or pickle a jitfreeze-wrapped module whose parameters were discarded "
                "(discard_parameters=True): only its frozen graphs hold the weights")
        state = super().__getstate__()
        state.pop("_jitfreeze_function", None)     # locks and compiled graphs: a new one is made
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        model = self._modules["module"]
        object.__setattr__(self, "_jitfreeze_function",
                           JitFreezeFunction(model, module=model, **self._jitfreeze_options))


class _Options(dict):
    """The jitfreeze options, shared by copies (a ``cache_dir`` Store is the same store)."""

    def __deepcopy__(self, memo):
        return self


def _holds(obj, name: str) -> bool:
    """Is ``name`` ``obj``'s own instance state (not a class attribute)?"""
    d = vars(obj)
    if name in d:
        return True
    if not isinstance(obj, torch.nn.Module):
        return False
    return any(name in d.get(k, ()) for k in ("_parameters", "_buffers", "_modules"))


def _insert_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Inside another module's ``load_state_dict``: torch recurses into ``_modules``, where the model
    is ``module``; the keys (the model's names, as :meth:`JitFreezeModule.state_dict` gives them) get
    that name back."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + _PREFIX + key[len(prefix):]] = state_dict.pop(key)
