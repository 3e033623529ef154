"""Is a compiled entry still what eager would compute? The freshness check run on every hit.

:class:`Watch` records what an entry baked in (weights' versions and storages, the module tree's
training flags, hooks and structure, the names the function reads) and :meth:`Watch.fresh`
checks it again. Module registration hooks bump a generation counter so that structure is
re-checked only after some module (re)assigned a parameter, buffer or submodule.
"""

from __future__ import annotations

import torch

from ..errors import FallbackReason
from ..trace.reach import rebound as _rebound

__all__ = ["Watch", "install_hooks", "storages", "module_tensors"]

_Tensor = torch.Tensor

# Bumped whenever any module registers a parameter or buffer (e.g. ``m.weight = Parameter(...)``):
# entries then re-check that the tensors they baked in are still the module's.
_generation = [0]


def _bump(*_args):
    _generation[0] += 1


_HOOKS_INSTALLED = False


def install_hooks() -> None:
    global _HOOKS_INSTALLED
    if _HOOKS_INSTALLED:
        return
    _HOOKS_INSTALLED = True
    mm = torch.nn.modules.module
    for name in ("register_module_parameter_registration_hook", "register_module_buffer_registration_hook",
                 "register_module_module_registration_hook"):
        hook = getattr(mm, name, None)
        if hook is not None:
            hook(_bump)


class Watch:
    """Is the entry still what eager would compute? Checked on every hit.

    - The weights it baked in (and, for a module, all its parameters and buffers): each one's
      version counter (in-place writes) and data pointer (``p.data = t``, ``vector_to_parameters``,
      ``.half().float()``: a new storage under the same tensor, and its version counter does not
      move). The old storages are kept alive while the entry lives, so that a new one cannot get
      the old address. A BatchNorm train-mode pass writes its running statistics without a
      version bump but bumps ``num_batches_tracked``: a module's buffers are all watched.
    - Torch's global forward (pre-)hooks, and for a module every submodule's ``training`` flag
      and forward (pre-)hooks: counts on every hit; which hooks, when any hook was registered
      anywhere since (``RemovableHandle.next_id`` moved).
    - For a module, after any parameter, buffer or submodule was (re)assigned anywhere
      (``_generation``): that it still has the same submodules and tensors.
    - The names the function reads from its globals and closure cells (:mod:`jitfreeze.trace.reach`):
      that each still holds the object it held (``W = torch.randn(...)``, ``scale = 3.0``,
      ``model = build()`` rebound in a notebook). Modules reached that way are watched like a
      wrapped module: their tensors, submodules' ``training`` flags, hooks and structure.
    - Grad mode on: that no watched tensor requires grad.
    - That no tensor argument shares storage with a watched tensor: a graph traced without that
      aliasing holds a frozen copy of the weight, which an in-place write to the argument misses
      (and one traced with it reads the weight through the argument).
    """

    __slots__ = ("tensors", "versions", "ptrs", "keep", "roots", "ids", "gen", "check_grad", "mods", "flags",
                 "nhooks", "hook_keys", "hook_id", "storages", "bindings")

    def __init__(self, tensors, module, check_grad: bool, reads=((), ())):
        """``module``: the wrapped module (or None); ``reads``: :func:`jitfreeze.trace.reach.reads` of the
        function (the names it reads, and the modules they hold)."""
        bindings, reached = reads
        roots = [module] if module is not None else []
        roots += [m for m in reached if all(m is not r for r in roots)]
        mods: dict = {}
        for root in roots:
            for m in root.modules():
                mods.setdefault(id(m), m)
        tensors = list(tensors)
        seen = {id(t) for t in tensors}
        for root in roots:
            tensors += [t for t in module_tensors(root) if id(t) not in seen and not seen.add(id(t))]
        self.tensors = tuple(tensors)
        if any(t.is_inference() for t in self.tensors):
            # made under torch.inference_mode: no version counter, so an in-place change (allowed
            # inside inference mode) could not be seen
            raise FallbackReason("the weights are inference tensors (created under torch.inference_mode), whose "
                                 "in-place changes jitfreeze cannot see; create the module outside inference mode")
        self.keep = tuple(t.detach() for t in self.tensors)
        self.versions = tuple(t._version for t in self.keep)
        self.ptrs = tuple(t.data_ptr() for t in self.tensors)
        self.storages = storages(self.tensors)
        self.roots = tuple(roots)
        self.bindings = bindings
        self.mods = tuple(mods.values())
        self.flags = tuple(m.training for m in self.mods)
        self.ids = tuple(_structure(r) for r in self.roots)
        self.gen = _generation[0]
        self.nhooks = _hook_count(self.mods)
        self.hook_keys = _hook_keys(self.mods)
        self.hook_id = _Handle.next_id
        self.check_grad = check_grad

    def fresh(self, args) -> bool:
        """``args``: the call's positional arguments (the hot path) or its leaves."""
        # versions read on the detached aliases: they share the tensors' version counters, and
        # reading a plain tensor's is ~4x cheaper than a Parameter's
        for t, k, v, p in zip(self.tensors, self.keep, self.versions, self.ptrs):
            if k._version != v or t.data_ptr() != p:
                return False
        n = len(_global_hooks) + len(_global_pre_hooks)
        for m, training in zip(self.mods, self.flags):
            if m.training is not training:
                return False
            n += len(m._forward_hooks) + len(m._forward_pre_hooks)
        if n != self.nhooks:
            return False
        if self.hook_id != _Handle.next_id:
            if _hook_keys(self.mods) != self.hook_keys:
                return False
            self.hook_id = _Handle.next_id
        if self.bindings and _rebound(self.bindings):
            return False
        if self.gen != _generation[0]:
            if tuple(_structure(r) for r in self.roots) != self.ids:
                return False
            self.gen = _generation[0]
        if self.check_grad:
            for t in self.tensors:
                if t.requires_grad:
                    return False
        storages = self.storages
        for a in args:
            if isinstance(a, _Tensor) and a.untyped_storage().data_ptr() in storages:
                return False
        return True


_mm = torch.nn.modules.module
_global_hooks = _mm._global_forward_hooks
_global_pre_hooks = _mm._global_forward_pre_hooks
_Handle = torch.utils.hooks.RemovableHandle


def storages(tensors) -> frozenset:
    """The data pointers of the tensors' storages (0, no storage, left out)."""
    return frozenset(t.untyped_storage().data_ptr() for t in tensors) - {0}


def module_tensors(module) -> list:
    return list(module.parameters()) + list(module.buffers())


def _structure(module) -> tuple:
    """Which submodules and tensors the module has (by identity)."""
    return tuple(id(m) for m in module.modules()), tuple(id(t) for t in module_tensors(module))


def _hook_count(mods) -> int:
    return len(_global_hooks) + len(_global_pre_hooks) + sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods)


def _hook_keys(mods) -> tuple:
    return (tuple(_global_hooks), tuple(_global_pre_hooks)) + tuple(
        (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for m in mods)

