"""Issue 5: the trace-free warm path (fingerprint index), verify=True, discard_parameters."""

import pytest
import torch

from jitfreeze import JitFreezeWarning, ParametersDiscardedError, jitfreeze

from .conftest import run_script
from .models import make

USER_MODULE = '''
import torch
import torch.nn as nn
import helpers


class Base(nn.Module):
    def forward(self, x):
        return x{base_extra}

    def unused(self):
        return {unused}


class Block(Base):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return super().forward(self.scale(torch.relu(self.fc(x)))){block_extra}

    def scale(self, x):
        return x{scale_extra}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out({act_ref}(self.block(x))){net_extra}
'''

HELPERS = '''
import torch
def act(x):
    return {act}
'''

RUNNER = """
import json, sys, warnings
sys.path.insert(0, sys.argv[1])
import torch
import usermodel
from jitfreeze import jitfreeze
torch.manual_seed(0)
net = usermodel.Net().eval()
if len(sys.argv) > 3 and sys.argv[3] == "poke":
    with torch.no_grad():
        net.out.weight[0, 0] += 1.0
fast = jitfreeze(net, cache_dir=sys.argv[2], verify=(len(sys.argv) > 3 and sys.argv[3] == "verify"))
x = torch.randn(4, 8)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with torch.no_grad():
        out = fast(x)
        ref = net(x)
print(json.dumps({"info": fast.cache_info()._asdict(), "traces": fast.traces,
                  "ok": bool(torch.allclose(out, ref, atol=1e-5)),
                  "warnings": [str(w.message) for w in caught if "JitFreeze" in w.category.__name__],
                  "dynamo": "torch._dynamo" in sys.modules, "diskcache": "diskcache" in sys.modules}))
"""


def write_user_code(path, block_extra="", net_extra="", act="torch.tanh(x)", base_extra="", scale_extra="",
                    unused="2", act_ref="helpers.act"):
    path.mkdir(exist_ok=True)
    (path / "usermodel.py").write_text(USER_MODULE.format(
        block_extra=block_extra, net_extra=net_extra, base_extra=base_extra, scale_extra=scale_extra,
        unused=unused, act_ref=act_ref))
    (path / "helpers.py").write_text(HELPERS.format(act=act))
    for pyc in path.rglob("__pycache__"):
        for f in pyc.iterdir():
            f.unlink()


@pytest.fixture
def user_code(tmp_path):
    path = tmp_path / "user"
    write_user_code(path)
    return path


def run_user(user_code, cache_dir, *extra):
    result, _ = run_script(RUNNER, user_code, cache_dir, *extra)
    return result


def test_index_hit_in_fresh_process_does_not_trace(user_code, cache_dir):
    cold = run_user(user_code, cache_dir)
    assert cold["info"]["compiles"] == 1 and cold["traces"] == 1 and cold["ok"]
    warm = run_user(user_code, cache_dir)
    assert warm["info"]["loads"] == 1 and warm["info"]["compiles"] == 0
    assert warm["traces"] == 0 and warm["ok"] and warm["warnings"] == []
    assert warm["dynamo"] is False           # the tracing machinery was never imported
    assert warm["diskcache"] is False        # nor diskcache: a read goes through a plain SQLite connection
    assert cold["diskcache"] is True


@pytest.mark.parametrize("edit", [
    dict(net_extra=" * 2"),                  # the function's (forward's) source
    dict(block_extra=" + 1"),                # a submodule's class
    dict(scale_extra=" * 3"),                # a method forward calls (self.scale)
    dict(base_extra=" - 1"),                 # a base class's forward, reached through super()
    "weight",                                # one weight
])
def test_changes_miss_the_index_and_stay_correct(user_code, cache_dir, edit):
    run_user(user_code, cache_dir)
    if edit == "weight":
        after = run_user(user_code, cache_dir, "poke")
    else:
        write_user_code(user_code, **edit)
        after = run_user(user_code, cache_dir)
    assert after["traces"] == 1 and after["info"]["compiles"] == 1 and after["ok"]


def test_methods_forward_does_not_reach_are_not_covered(user_code, cache_dir):
    # The fingerprint follows the methods covered code names, not every method of the class: an
    # edit to one nothing calls keeps the index entry (no trace) and the answer stays right.
    run_user(user_code, cache_dir)
    write_user_code(user_code, unused="3")
    after = run_user(user_code, cache_dir)
    assert after["traces"] == 0 and after["info"]["loads"] == 1 and after["ok"]


def test_helper_function_code_is_covered(user_code, cache_dir):
    """A helper reached through a module attribute (helpers.act) is covered: an edit misses the index."""
    run_user(user_code, cache_dir)
    write_user_code(user_code, act="torch.sigmoid(x)")
    after = run_user(user_code, cache_dir)
    assert after["traces"] == 1 and after["ok"]
    again = run_user(user_code, cache_dir)              # the new entry serves from now on
    assert again["traces"] == 0 and again["ok"]


def test_verify_catches_what_the_fingerprint_cannot_see(tmp_path, cache_dir):
    # A name computed at run time (getattr(helpers, "a" "ct" joined)) is the fingerprint's one
    # documented blind spot: without verify the index serves the old graph; verify=True traces,
    # compares graph keys, warns and replaces the entry.
    user_code = tmp_path / "user"
    computed = 'getattr(helpers, "".join(("a", "ct")))'
    write_user_code(user_code, act_ref=computed)
    run_user(user_code, cache_dir)
    write_user_code(user_code, act="torch.sigmoid(x)", act_ref=computed)
    stale = run_user(user_code, cache_dir)
    assert stale["traces"] == 0 and stale["ok"] is False
    checked = run_user(user_code, cache_dir, "verify")
    assert checked["traces"] == 1 and checked["ok"]
    assert len(checked["warnings"]) == 1 and "stale fingerprint index entry" in checked["warnings"][0]
    fixed = run_user(user_code, cache_dir)              # the index entry was replaced
    assert fixed["traces"] == 0 and fixed["ok"]


def test_global_function_and_closure_changes_miss(tmp_path, cache_dir):
    code = """
import json, sys
import torch
from jitfreeze import jitfreeze
scale = float(sys.argv[2])
def helper(x):
    return x * SCALE
SCALE = float(sys.argv[3])
def make():
    w = torch.full((3,), scale)
    @jitfreeze(cache_dir=sys.argv[1])
    def f(x):
        return helper(x) + w
    return f
f = make()
x = torch.ones(3)
out = f(x)
print(json.dumps({"traces": f.traces, "out": out.tolist()}))
"""
    a, _ = run_script(code, cache_dir, 1.0, 2.0)
    b, _ = run_script(code, cache_dir, 1.0, 2.0)
    c, _ = run_script(code, cache_dir, 5.0, 2.0)      # closure tensor changed
    d, _ = run_script(code, cache_dir, 1.0, 3.0)      # a global the helper reads changed
    assert (a["traces"], b["traces"], c["traces"], d["traces"]) == (1, 0, 1, 1)
    assert a["out"] == b["out"] == [3.0] * 3 and c["out"] == [7.0] * 3 and d["out"] == [4.0] * 3


@pytest.mark.parametrize("bind", [False, True], ids=["frozen-in", "bound"])
def test_discard_parameters_releases_and_errors_clearly(cache_dir, monkeypatch, bind):
    # bound: the frozen graph's constants are the module's storage; discarding the module's
    # parameters must leave the graph's references (and its answers) intact
    if bind:
        from jitfreeze.backend.torchscript import TorchScriptBackend
        monkeypatch.setattr(TorchScriptBackend, "BIND_MIN_BYTES", 0)
    model, (x,) = make("mlp")
    ref = model(x).detach()
    fast = jitfreeze(model, cache_dir=cache_dir, discard_parameters=True)
    with torch.no_grad():
        out = fast(x)
        assert torch.allclose(out, ref, atol=1e-5)
        assert all(p.numel() == 0 for p in model.parameters())      # storage released
        assert torch.allclose(fast(x), ref, atol=1e-5)              # the frozen copy still serves
        with pytest.raises(ParametersDiscardedError, match="discard"):
            fast(x[:2])                                              # a new signature needs eager
    with pytest.raises(ParametersDiscardedError), pytest.warns(JitFreezeWarning, match="torch.no_grad"):
        fast(x)                                                      # grad mode needs eager


def test_discard_parameters_on_warm_start(user_code, cache_dir):
    code = RUNNER.replace("fast = jitfreeze(net, cache_dir=sys.argv[2],", "fast = jitfreeze(net, cache_dir=sys.argv[2], discard_parameters=True,")
    code = code.replace("        ref = net(x)\n", "        ref = usermodel.Net.forward(torch.manual_seed(0) and usermodel.Net().eval(), x)\n")
    run_script(code, user_code, cache_dir)
    warm, _ = run_script(code, user_code, cache_dir)
    assert warm["traces"] == 0 and warm["ok"]


def test_an_indexed_graph_that_fails_on_the_call_is_dropped_and_traced(cache_dir, monkeypatch):
    """An index entry whose graph raises on the call it was chosen for (its guards missed
    something) never passes the error on: the entry is dropped with one warning, the call traced,
    and the answer is eager's."""
    import jitfreeze as jf
    from jitfreeze.backend.torchscript import TorchScriptBackend

    def f(x):
        return torch.relu(x) * 2.0

    x = torch.randn(4, 3)
    with torch.no_grad():
        jf.jitfreeze(f, cache_dir=cache_dir)(x)                     # fills the cache and the index
        real = TorchScriptBackend.first_call
        failures = []

        def first_call_failing_once(self, module, tensors):
            if not failures:
                failures.append(1)
                raise RuntimeError("The size of tensor a (4) must match the size of tensor b (7)")
            return real(self, module, tensors)

        monkeypatch.setattr(TorchScriptBackend, "first_call", first_call_failing_once)
        g = jf.jitfreeze(f, cache_dir=cache_dir)
        with pytest.warns(jf.JitFreezeWarning, match="failed on this call"):
            out = g(x)
    assert torch.equal(out, f(x))
    assert failures == [1] and g.traces == 1
