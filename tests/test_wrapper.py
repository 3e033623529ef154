"""``jitfreeze(model)`` is an ``nn.Module`` (:class:`jitfreeze.JitFreezeModule`) that behaves like the
model: each test compares it with the eager model on the same inputs."""

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from jitfreeze import JitFreezeModule, JitFreezeWarning, ParametersDiscardedError, jitfreeze

from .conftest import assert_same, run_script


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 4)
        self.scale = 2.0

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x))))) * self.scale


def _net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def _x():
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def _agree(fast, model, x, **tol):
    with torch.no_grad():
        got = fast(x)
        want = model(x)
    assert_same(got, want, **tol)
    return got


def test_is_a_module_holding_the_model(cache_dir):
    m = _net()
    fast = jitfreeze(m, cache_dir=cache_dir)
    assert isinstance(fast, nn.Module) and isinstance(fast, JitFreezeModule)
    assert fast.module is m
    assert [id(p) for p in fast.parameters()] == [id(p) for p in m.parameters()]
    assert [id(b) for b in fast.buffers()] == [id(b) for b in m.buffers()]
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in m.named_parameters()]
    assert [n for n, _ in fast.named_parameters(recurse=False)] == [n for n, _ in m.named_parameters(recurse=False)]
    assert [n for n, _ in fast.named_buffers()] == [n for n, _ in m.named_buffers()]
    assert list(fast.modules())[0] is fast and list(fast.modules())[1:] == list(m.modules())
    _agree(fast, m, _x())
    _agree(fast, m, _x())
    info = fast.cache_info()
    assert info.compiles == 1 and info.hits == 1 and fast.traces == 1
    assert fast.jitfreeze_function.cache_info() == info


def test_repr_says_jitfreeze_wrapped_and_shows_the_model(cache_dir):
    fast = jitfreeze(_net(), cache_dir=cache_dir)
    text = repr(fast)
    assert text.startswith("JitFreezeModule(") and "jitfreeze-wrapped" in text
    assert "(module): Net(" in text and "Linear(in_features=8" in text


def test_eval_train_toggling(cache_dir):
    m = _net()
    fast = jitfreeze(m, cache_dir=cache_dir)
    x = _x()
    _agree(fast, m, x)
    fast.train()
    assert m.training and all(s.training for s in m.modules()) and fast.training
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JitFreezeWarning)        # training mode runs eagerly (and says so)
        torch.manual_seed(3)
        with torch.no_grad():
            got = fast(x)
        torch.manual_seed(3)
        with torch.no_grad():
            want = m(x)
    assert_same(got, want)                       # dropout and batch statistics: eager's
    fast.eval()
    assert not m.training and not any(s.training for s in m.modules())
    _agree(fast, m, x)                           # BatchNorm's running stats moved: eager's new answer


def test_half_then_float(cache_dir):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    fast = jitfreeze(m, cache_dir=cache_dir)
    x = _x()
    _agree(fast, m, x)
    assert fast.half() is fast
    assert all(p.dtype == torch.float16 for p in m.parameters())
    _agree(fast, m, x.half(), atol=2e-2, rtol=2e-2)
    fast.float()
    assert all(p.dtype == torch.float32 for p in m.parameters())
    _agree(fast, m, x)
    fast.to(torch.float64)
    _agree(fast, m, x.double())


def test_load_state_dict_of_new_weights(cache_dir):
    m = _net()
    fast = jitfreeze(m, cache_dir=cache_dir)
    x = _x()
    before = _agree(fast, m, x)
    other = _net(seed=7)
    assert list(fast.state_dict()) == list(m.state_dict()) == list(other.state_dict())
    result = fast.load_state_dict(other.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    after = _agree(fast, m, x)
    assert not torch.allclose(before, after)
    with torch.no_grad():
        assert_same(after, other(x))
    # and the other way: the wrapper's state dict loads into a bare model
    bare = Net().eval()
    bare.load_state_dict(fast.state_dict())
    with torch.no_grad():
        assert_same(bare(x), after)


def test_state_dict_inside_another_module(cache_dir):
    m = _net()
    fast = jitfreeze(m, cache_dir=cache_dir)
    seq = nn.Sequential(fast, nn.ReLU())
    bare = nn.Sequential(_net(seed=5), nn.ReLU())
    assert list(seq.state_dict()) == list(bare.state_dict())
    assert [n for n, _ in seq.named_parameters()] == [n for n, _ in bare.named_parameters()]
    seq.load_state_dict(bare.state_dict())
    x = _x()
    with torch.no_grad():
        assert_same(seq(x), bare(x))
        assert_same(seq(x), torch.relu(m(x)))
    bare[0].load_state_dict(_net(seed=9).state_dict())
    fast.load_state_dict(bare[0].state_dict())          # and back: the answer changes like eager
    with torch.no_grad():
        assert_same(seq(x), bare(x))


def test_sequential_of_the_wrapper(cache_dir):
    m = _net()
    fast = jitfreeze(m, cache_dir=cache_dir)
    seq = nn.Sequential(fast, nn.ReLU())
    x = _x()
    with torch.no_grad():
        assert_same(seq(x), torch.relu(m(x)))
        assert_same(seq(x), torch.relu(m(x)))
    assert fast.cache_info().hits >= 1
    seq.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    with torch.no_grad():
        assert_same(seq(x.double()), torch.relu(m(x.double())))


def test_hooks_on_the_wrapper_run(cache_dir):
    m = _net()
    fast = jitfreeze(m, cache_dir=cache_dir)
    x = _x()
    _agree(fast, m, x)
    seen = []
    pre = fast.register_forward_pre_hook(lambda mod, args: seen.append(("pre", mod)))
    post = fast.register_forward_hook(lambda mod, args, out: out * 10)
    with torch.no_grad():
        got = fast(x)
        want = m(x) * 10
    assert_same(got, want)
    assert seen == [("pre", fast)]
    pre.remove()
    post.remove()
    _agree(fast, m, x)
    assert fast.cache_info().compiles == 1        # hooks on the wrapper are outside the compiled model


def test_global_hooks_run_on_the_wrapper(cache_dir):
    m = nn.Linear(4, 3).eval()
    fast = jitfreeze(m, cache_dir=cache_dir)
    x = torch.randn(2, 4)
    _agree(fast, m, x)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(lambda mod, args: seen.append(type(mod)))
    try:
        _agree(fast, m, x)
    finally:
        handle.remove()
    assert JitFreezeModule in seen


def test_attribute_fallthrough(cache_dir):
    m = _net()
    fast = jitfreeze(m, cache_dir=cache_dir)
    assert fast.scale == 2.0 and fast.fc1 is m.fc1 and fast.fc1.weight is m.fc1.weight
    fast.scale = 3.0                         # the model's attribute: set on the model
    assert m.scale == 3.0 and "scale" not in vars(fast)
    fast.cache_clear()                       # a module attribute the graph baked in: not watched (README)
    _agree(fast, m, _x())
    fast.marker = "mine"                     # a new attribute: the wrapper's own
    assert fast.marker == "mine" and not hasattr(m, "marker")
    with pytest.raises(AttributeError):
        fast.no_such_attribute
    assert "fc1" in dir(fast) and "cache_info" in dir(fast)


def test_the_model_cannot_be_swapped_under_the_function(cache_dir):
    fast = jitfreeze(_net(), cache_dir=cache_dir)
    with pytest.raises(AttributeError, match="jitfreeze"):
        fast.module = _net(seed=3)


def test_transformers_config_fallthrough(cache_dir, no_jf_warnings):
    pytest.importorskip("transformers")
    from .test_hf_models import build, make_inputs

    model = build("bert")
    fast = jitfreeze(model, cache_dir=cache_dir)
    assert fast.config is model.config and fast.config.hidden_size == 32
    assert fast.device == model.device and fast.dtype == model.dtype
    kw = make_inputs("bert")
    with torch.no_grad():
        assert_same(fast(**kw).last_hidden_state, model(**kw).last_hidden_state)


def test_deepcopy_and_pickle_work(cache_dir):
    m = _net()
    fast = jitfreeze(m, cache_dir=cache_dir)
    x = _x()
    want = _agree(fast, m, x)
    for copied in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert isinstance(copied, JitFreezeModule) and copied.module is not m
        assert copied.jitfreeze_function is not fast.jitfreeze_function
        with torch.no_grad():
            assert_same(copied(x), want)
        assert copied.cache_info().loads == 1        # a new function: loaded from the persistent cache
        with torch.no_grad():
            copied.module.fc2.bias.add_(1.0)           # the copy's weights are its own
        _agree(copied, copied.module, x)
    _agree(fast, m, x)


def test_discard_parameters_keeps_working(cache_dir):
    m = _net()
    fast = jitfreeze(m, cache_dir=cache_dir, discard_parameters=True)
    x = _x()
    with torch.no_grad():
        want = m(x)
        assert_same(fast(x), want)
        assert_same(fast(x), want)
    with pytest.raises(ParametersDiscardedError):
        fast.state_dict()
    with pytest.raises(ParametersDiscardedError):
        copy.deepcopy(fast)


def test_wrapping_a_wrapper_wraps_the_model(cache_dir):
    m = _net()
    fast = jitfreeze(jitfreeze(m, cache_dir=cache_dir), cache_dir=cache_dir)
    assert fast.module is m
    _agree(fast, m, _x())


def test_decorator_form_is_unchanged(cache_dir):
    def f(x):
        return x * 2

    fast = jitfreeze(f, cache_dir=cache_dir)
    assert not isinstance(fast, nn.Module)
    assert type(fast).__name__ == "JitFreezeFunction"


SECOND = """
import json, sys, torch
from torch import nn
from jitfreeze import jitfreeze
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
fast = jitfreeze(m, cache_dir=sys.argv[1])
x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    ok = torch.allclose(fast(x), m(x), atol=1e-5)
info = fast.cache_info()
print(json.dumps({"ok": ok, "loads": info.loads, "compiles": info.compiles, "traces": fast.traces,
                  "module": type(fast).__name__}))
"""


def test_second_process_loads(cache_dir):
    first, _ = run_script(SECOND, cache_dir)
    assert first == {"ok": True, "loads": 0, "compiles": 1, "traces": 1, "module": "JitFreezeModule"}
    second, _ = run_script(SECOND, cache_dir)
    assert second["ok"] and second["loads"] == 1 and second["compiles"] == 0 and second["traces"] == 0
