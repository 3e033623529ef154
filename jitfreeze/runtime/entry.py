"""An in-process entry: a compiled function for one signature, fed and rebuilt on every hit."""

from __future__ import annotations

from torch.utils import _pytree as pytree

__all__ = ["Entry"]


class Entry:
    """A compiled function for one signature, plus how to feed it and rebuild its output."""

    __slots__ = ("fwd", "key", "fast_idx", "tensor_idx", "out_kind", "out_spec", "out_n", "out_tensor_idx",
                 "out_consts", "watch", "source")

    def __init__(self, fwd, key, call, out_spec, out_tensor_idx, out_consts, watch, source):
        self.fwd = fwd
        self.key = key
        self.tensor_idx = call.tensor_idx
        self.fast_idx = None
        self.out_spec = out_spec
        self.out_n = out_spec.num_leaves
        self.out_tensor_idx = tuple(out_tensor_idx)
        self.out_consts = tuple(out_consts)
        self.watch = watch
        self.source = source
        if out_spec.is_leaf() and self.out_tensor_idx == (0,):
            self.out_kind = 0                       # a single tensor: the graph returns it as is
        elif (out_spec.type is tuple and not out_consts and self.out_n == len(out_tensor_idx)
              and all(c.is_leaf() for c in out_spec.children())):
            self.out_kind = 1                       # a flat tuple of tensors
        else:
            self.out_kind = 2

    def rebuild(self, outs):
        kind = self.out_kind
        if kind == 0:
            return outs
        if kind == 1:
            return tuple(outs)
        leaves = [None] * self.out_n
        for i, t in zip(self.out_tensor_idx, outs):
            leaves[i] = t
        for i, v in self.out_consts:
            leaves[i] = v
        return pytree.tree_unflatten(leaves, self.out_spec)

    def call_fast(self, args):
        idx = self.fast_idx
        outs = self.fwd(*args) if idx is None else self.fwd(*[args[i] for i in idx])
        if self.out_kind == 0:
            return outs
        return self.rebuild(outs)

    def call_leaves(self, leaves):
        return self.rebuild(self.fwd(*[leaves[i] for i in self.tensor_idx]))

    def call_leaves_tensors(self, tensors):
        return self.rebuild(self.fwd(*tensors))
