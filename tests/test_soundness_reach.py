"""Names a function reads from its globals and closure cells, rebound after the first call (a
notebook's ``W = ...``, ``scale = ...``, ``model = build()``), and modules reached through them
changed after it: every call gives eager's answer on the same inputs (jitfreeze.trace.reach, jitfreeze.runtime.watch.Watch)."""

import types
import warnings

import pytest
import torch
import torch.nn as nn

from jitfreeze import JitFreezeWarning, jitfreeze

from jitfreeze.trace import reach

from .conftest import assert_same

# Module-level names the functions below read (rebound by the tests).
W = torch.ones(4, 4)
SCALE = 2.0
MODEL = nn.Linear(4, 4)


def _helper(x):
    return x * SCALE


def uses_tensor_global(x):
    return x @ W


def uses_number_global(x):
    return x * SCALE


def uses_module_global(x):
    return MODEL(x)


def uses_helper(x):
    return _helper(x) + 1


HELPERS = {"scale": lambda x: x * SCALE}


def uses_helper_in_a_dict(x):
    return HELPERS["scale"](x)


@pytest.fixture
def globals_restored():
    saved = dict(W=W, SCALE=SCALE, MODEL=MODEL, _helper=_helper)
    yield globals()
    globals().update(saved)


@pytest.mark.parametrize("fn, name, new", [
    (uses_tensor_global, "W", lambda: torch.randn(4, 4)),
    (uses_number_global, "SCALE", lambda: 3.0),
    (uses_module_global, "MODEL", lambda: nn.Linear(4, 4)),
    (uses_helper, "SCALE", lambda: -1.5),                         # read by a helper the function calls
    (uses_helper, "_helper", lambda: (lambda x: x - 7.0)),         # the helper itself rebound
    (uses_helper_in_a_dict, "SCALE", lambda: 5.0),                 # read by a function kept in a dict
])
def test_rebound_globals_give_eagers_answer(fn, name, new, cache_dir, globals_restored):
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    fast = jitfreeze(fn, cache_dir=cache_dir)
    with torch.no_grad():
        assert_same(fast(x), fn(x))
        assert_same(fast(x), fn(x))                  # a hit
        hits = fast.cache_info().hits
        globals_restored[name] = new()
        assert_same(fast(x), fn(x))
        assert_same(fast(x), fn(x))
        assert fast.cache_info().hits > hits         # served again once re-resolved


def test_rebound_closure_cells_give_eagers_answer(cache_dir):
    torch.manual_seed(0)
    weight, scale, model = torch.randn(4, 4), 2.0, nn.Linear(4, 4).eval()

    def f(x):
        return model(x @ weight) * scale

    fast = jitfreeze(f, cache_dir=cache_dir)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert_same(fast(x), f(x))
        weight = torch.randn(4, 4)                   # noqa: F841 - read through f's closure
        assert_same(fast(x), f(x))
        scale = -0.5                                 # noqa: F841
        assert_same(fast(x), f(x))
        model = nn.Linear(4, 4).eval()               # noqa: F841
        assert_same(fast(x), f(x))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.norm = nn.BatchNorm1d(4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.norm(self.lin(x)))


def _running_stats_pass(m):
    m.norm.train()
    m.norm(torch.randn(8, 4) * 3 + 1)
    m.norm.eval()


@pytest.mark.parametrize("change", [
    lambda m: m.norm.train(),                                         # a submodule in training mode
    _running_stats_pass,                                              # BatchNorm statistics moved
    lambda m: setattr(m, "act", nn.Tanh()),                           # a parameter-free submodule swapped
    lambda m: m.lin.register_forward_hook(lambda mod, i, o: o * 2),    # a hook added
    lambda m: setattr(m.lin.weight, "data", torch.randn(4, 4)),       # p.data = t
], ids=["submodule-train", "bn-stats", "swap", "hook", "data-assign"])
def test_a_module_reached_through_a_closure_is_watched_like_a_wrapped_one(change, cache_dir):
    torch.manual_seed(0)
    block = _Block().eval()
    fast = jitfreeze(lambda x: block(x) + 1.0, cache_dir=cache_dir)
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert_same(fast(x), block(x) + 1.0)
        change(block)
        ref = block(x) + 1.0
        with warnings.catch_warnings():     # a train-mode BatchNorm writes its statistics: eager, warned
            warnings.simplefilter("ignore", JitFreezeWarning)
            assert_same(fast(x), ref)


def test_nothing_rebound_stays_a_hit(cache_dir):
    fast = jitfreeze(uses_helper, cache_dir=cache_dir)
    x = torch.randn(3, 4)
    with torch.no_grad():
        fast(x)
        for _ in range(5):
            fast(x)
    info = fast.cache_info()
    assert (info.compiles, info.hits) == (1, 5)


def test_reads_follows_user_code_not_fixed_code():
    bindings, modules = reach.reads(uses_helper)
    names = {name for _, name, _ in bindings}
    assert {"_helper", "SCALE"} <= names                 # the helper's global, one call deep
    assert "torch" not in names                          # imported modules are not bindings
    _, modules = reach.reads(uses_module_global)
    assert modules == (MODEL,)
    assert reach.reads(torch.nn.functional.relu) == ((), ())      # torch's own code: fixed
    assert not reach.rebound(reach.reads(uses_helper)[0])
    f = types.FunctionType(uses_number_global.__code__, {"SCALE": 1.0})
    bindings, _ = reach.reads(f)
    f.__globals__["SCALE"] = float("3")
    assert reach.rebound(bindings)
    del f.__globals__["SCALE"]                        # a name gone is rebound too
    assert reach.rebound(bindings)
