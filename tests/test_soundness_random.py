"""Differential property test: small random functions, called with random sizes, scalars and
aliasing patterns, with the module's state changed between calls -- jitfreeze's answer is
eager's on the same inputs, every time (outputs, and what the function wrote into its inputs).

Hypothesis generates the programs (``derandomize=True``: the same examples every run, so CI is
deterministic; ``JITFREEZE_HYPOTHESIS_EXAMPLES`` asks for more). A program is a chain of ops on
``h`` (starting from ``x``) that may read the second input ``y``, write into it, use ``h``'s size
as a Python number, and call the module's submodules; between calls the test changes the module
the way users do (``.data`` writes, a swapped activation, a submodule in training mode, running
statistics updated by a train-mode pass, a hook, a module-level name an op reads rebound).
Fallbacks are fine (eager's answer); a different answer is not.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings

import pytest
import torch
import torch.nn as nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from jitfreeze import JitFreezeWarning, jitfreeze  # noqa: E402

F = 4          # features

# -- the ops -----------------------------------------------------------------------------------


def _size_range_sum(h):
    acc = torch.zeros_like(h[:1]) if h.shape[0] else torch.zeros(1, h.shape[1])
    for i in range(h.shape[0]):
        acc = acc + h[i]
    return h + acc


GAIN = 1.5                 # a module-level name an op reads; the "rebind_gain" mutation rebinds it

OPS = {
    "gain": lambda m, h, y, c: h * GAIN,
    "relu": lambda m, h, y, c: torch.relu(h),
    "scale": lambda m, h, y, c: h * c,
    "lin": lambda m, h, y, c: m.lin(h),
    "norm": lambda m, h, y, c: m.norm(h),
    "act": lambda m, h, y, c: m.act(h),
    "drop": lambda m, h, y, c: m.drop(h),
    "size_float": lambda m, h, y, c: h * float(h.shape[0]),
    "size_sqrt": lambda m, h, y, c: h / math.sqrt(h.shape[0] + 1),
    "size_int": lambda m, h, y, c: h + int(h.shape[0]) * c,
    "size_range": lambda m, h, y, c: _size_range_sum(h),
    "size_tensor": lambda m, h, y, c: h + torch.tensor(float(h.shape[0])),
    "new_tensor": lambda m, h, y, c: h * h.new_tensor([h.shape[0] + 1.0]),
    "center": lambda m, h, y, c: h - h.sum(0, keepdim=True) / max(h.shape[0], 1),
    "add_y": lambda m, h, y, c: h + y,
    "mul_y": lambda m, h, y, c: h * y,
    "write_y": lambda m, h, y, c: h + y.mul_(c),          # writes its input: aliasing decides x too
    "weight": lambda m, h, y, c: h + m.lin.weight.sum(),
}

MUTATIONS = {
    "data_add": lambda m: m.lin.weight.data.add_(0.25),
    "data_assign": lambda m: setattr(m.lin.weight, "data", torch.randn_like(m.lin.weight)),
    "bias_copy": lambda m: m.lin.bias.copy_(torch.randn_like(m.lin.bias)),
    "swap_act": lambda m: setattr(m, "act", nn.Tanh() if isinstance(m.act, nn.ReLU) else nn.ReLU()),
    "norm_train": lambda m: m.norm.train(not m.norm.training),
    "drop_train": lambda m: m.drop.train(not m.drop.training),
    "bn_stats": lambda m: _update_running_stats(m),
    "hook": lambda m: m.lin.register_forward_hook(lambda mod, inp, out: out * 2.0),
    "half_float": lambda m: m.half().float(),
    "rebind_gain": lambda m: globals().__setitem__("GAIN", -GAIN + 0.25),
}


# In-place writes through ``.data`` move no version counter and no pointer: the README's contract
# asks for ``cache_clear()`` after them, and so does this test.
NEEDS_CACHE_CLEAR = {"data_add"}


def _update_running_stats(m):
    training = m.norm.training
    m.norm.train()
    m.norm(torch.randn(6, F) * 3 + 1)
    m.norm.train(training)


class Net(nn.Module):
    def __init__(self, ops, consts):
        super().__init__()
        self.lin = nn.Linear(F, F)
        self.norm = nn.BatchNorm1d(F)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.0)      # p=0: train/eval differ in nothing but the flag
        self.ops, self.consts = ops, consts
        with torch.no_grad():            # running statistics that are not the defaults
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x, y):
        h = x
        for op, c in zip(self.ops, self.consts):
            h = OPS[op](self, h, y, c)
        return h


def _inputs(seed: int, batch: int, alias: str):
    g = torch.Generator().manual_seed(seed)
    if alias == "overlap":               # x and y: overlapping rows of one buffer
        base = torch.randn(batch + 1, F, generator=g)
        return base[:-1], base[1:]
    x = torch.randn(batch, F, generator=g)
    if alias == "same":
        return x, x
    if alias == "view":
        return x, x[:]
    return x, torch.randn(batch, F, generator=g)


def _same(a, b) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    scale = float(b.abs().max()) if b.numel() and torch.isfinite(b).all() else 1.0
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, scale), equal_nan=True)


ops_st = st.lists(st.sampled_from(sorted(OPS)), min_size=1, max_size=5)
call_st = st.tuples(st.just("call"), st.sampled_from([0, 1, 2, 3, 5]),
                    st.sampled_from(["separate", "same", "view", "overlap"]), st.integers(0, 3))
mutation_st = st.tuples(st.just("mutate"), st.sampled_from(sorted(MUTATIONS)))
steps_st = st.lists(st.one_of(call_st, call_st, mutation_st), min_size=2, max_size=10)


# Shrinking a failure costs minutes here (every example compiles): JITFREEZE_HYPOTHESIS_SHRINK=1 asks for it.
_PHASES = [Phase.explicit, Phase.generate] + ([Phase.shrink] if os.environ.get("JITFREEZE_HYPOTHESIS_SHRINK") else [])


@settings(max_examples=int(os.environ.get("JITFREEZE_HYPOTHESIS_EXAMPLES", "60")), deadline=None,
          derandomize=True, suppress_health_check=list(HealthCheck), database=None, phases=_PHASES)
# One explicit example per class of wrong answer seen before (then the generated ones).
@example(ops=["size_sqrt", "size_range", "lin"], consts=[0.5] * 5, wrap="module", dynamic=None,
         steps=[("call", 0, "separate", 0), ("call", 1, "separate", 0), ("call", 2, "separate", 0),
                ("call", 3, "separate", 1)])                                         # sizes as numbers
@example(ops=["write_y", "add_y"], consts=[2.0] * 5, wrap="module", dynamic=False,
         steps=[("call", 3, "same", 0), ("call", 3, "separate", 0), ("call", 3, "view", 0),
                ("call", 3, "overlap", 0), ("call", 3, "same", 1)])                  # aliasing
@example(ops=["lin", "norm", "act", "drop"], consts=[1.0] * 5, wrap="module", dynamic=False,
         steps=[("call", 2, "separate", 0), ("mutate", "data_assign"), ("call", 2, "separate", 0),
                ("mutate", "swap_act"), ("call", 2, "separate", 0), ("mutate", "bn_stats"),
                ("call", 2, "separate", 0), ("mutate", "hook"), ("call", 2, "separate", 0),
                ("mutate", "half_float"), ("call", 2, "separate", 0)])              # module state
@example(ops=["norm", "gain"], consts=[1.0] * 5, wrap="closure", dynamic=False,
         steps=[("call", 2, "separate", 0), ("mutate", "rebind_gain"), ("call", 2, "separate", 0),
                ("mutate", "norm_train"), ("call", 2, "separate", 0)])              # names rebound
@given(ops=ops_st, consts=st.lists(st.sampled_from([0.5, 2.0, -1.0, 3.0]), min_size=5, max_size=5),
       steps=steps_st, wrap=st.sampled_from(["module", "closure"]), dynamic=st.sampled_from([None, False]))
def test_random_programs_answer_as_eager(ops, consts, steps, wrap, dynamic):
    torch.manual_seed(0)
    model = Net(ops, consts).eval()
    if wrap == "module":
        fast = jitfreeze(model, cache_dir=tempfile.mkdtemp(prefix="jf-hyp-"), dynamic=dynamic)
    else:
        fast = jitfreeze(lambda x, y: model(x, y), cache_dir=tempfile.mkdtemp(prefix="jf-hyp-"), dynamic=dynamic)
    log = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", JitFreezeWarning)      # fallbacks are allowed, wrong answers not
        warnings.simplefilter("ignore", UserWarning)
        for step in steps:
            log.append(step)
            if step[0] == "mutate":
                MUTATIONS[step[1]](model)
                if step[1] in NEEDS_CACHE_CLEAR:
                    fast.cache_clear()
                continue
            _, batch, alias, seed = step
            if batch == 0 and "norm" in ops and model.norm.training:
                continue                 # eager raises for a train-mode BatchNorm on no rows
            ref_in = _inputs(seed, batch, alias)
            out_in = _inputs(seed, batch, alias)
            try:
                ref = model(*ref_in)
            except (RuntimeError, ValueError):
                continue                 # eager itself refuses these inputs: nothing to compare
            out = fast(*out_in)
            assert _same(out, ref), f"output differs from eager after {log}"
            for a, b in zip(out_in, ref_in):
                assert _same(a, b), f"inputs written differently from eager after {log}"
