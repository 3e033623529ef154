"""Linear layers stored in the layout that ran faster at compile time (as traced, or pre-transposed)."""

import pytest
import torch
import torch.nn as nn

from jitfreeze import jitfreeze
from jitfreeze.backend import torchscript
from jitfreeze.backend.torchscript import TorchScriptBackend

from .conftest import assert_same

_REAL_MEDIANS = torchscript.medians_side_by_side       # before conftest's autouse fixture replaces it


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _kinds(g):
    entry = g.signatures()[0]
    return {n.kind() for n in entry.compiled.graph.nodes()}


@pytest.fixture
def timings(monkeypatch):
    """Records each side-by-side timing and lets the test decide its outcome: (as traced, transposed)."""
    seen = []
    outcome = {"as_is": 1.0, "transposed": 0.5}

    def fake(fns, args, once, rounds=5):
        seen.append([str(f.graph) for f in fns])
        return [outcome["as_is"], outcome["transposed"]]

    monkeypatch.setattr(torchscript, "medians_side_by_side", fake)
    monkeypatch.setattr(TorchScriptBackend, "TUNE_MAX_CALL_S", float("inf"))   # a loaded machine times it too
    return seen, outcome


@pytest.mark.parametrize("transposed_wins", [True, False])
def test_the_faster_layout_is_stored_and_served_warm(cache_dir, timings, transposed_wins):
    seen, outcome = timings
    outcome["transposed"] = 0.5 if transposed_wins else 0.97     # 0.97: inside the margin, not taken
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(16, 32)
    with torch.no_grad():
        expected = model(x)
        g = jitfreeze(model, cache_dir=cache_dir)
        assert_same(g(x), expected)
        assert len(seen) == 1
        as_is, transposed = seen[0]
        assert "aten::linear" in as_is and "aten::linear" not in transposed and "aten::matmul" in transposed
        kinds = _kinds(g)
        assert ("aten::linear" not in kinds and "aten::matmul" in kinds) if transposed_wins else "aten::linear" in kinds
        assert_same(g(x), expected)
        warm = jitfreeze(model, cache_dir=cache_dir)         # a fresh function: loads the stored artifact
        assert_same(warm(x), expected)
        assert warm.cache_info().loads == 1 and _kinds(warm) == kinds
    assert len(seen) == 1                                   # loading does not time anything


def test_real_timing_keeps_outputs_right_and_the_random_stream(cache_dir, monkeypatch):
    """The timing itself (not faked) runs the graph on copies: the inputs are untouched, and the
    caller's random stream is where it would be without the timing."""
    monkeypatch.setattr(torchscript, "medians_side_by_side", _REAL_MEDIANS)     # conftest forces a layout
    model = MLP().eval()

    def f(x):
        x.add_(1.0)                     # writes its input in place: the timing must use copies
        return model(x) + torch.rand(()) * 0

    def after_first_call(max_call_s):
        monkeypatch.setattr(TorchScriptBackend, "TUNE_MAX_CALL_S", max_call_s)
        torch.manual_seed(1)
        x = torch.randn(4, 32)
        with torch.no_grad():
            out = jitfreeze(f, cache_dir=cache_dir / str(max_call_s))(x)
        return out, torch.get_rng_state()

    tuned, rng_tuned = after_first_call(10.0)
    untuned, rng_untuned = after_first_call(0.0)               # too slow to time: no timing at all
    assert_same(tuned, untuned)
    assert torch.equal(rng_tuned, rng_untuned)


def test_no_timing_where_the_layout_is_not_ours_to_choose(cache_dir, timings, monkeypatch):
    seen, _ = timings
    with torch.no_grad():
        x = torch.randn(2, 32)
        # no linear layer
        jitfreeze(lambda t: t * 2, cache_dir=cache_dir)(x)
        # convolutions: optimize_for_inference transposes after loading anyway
        conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
        jitfreeze(conv, cache_dir=cache_dir)(torch.randn(1, 3, 8, 8))
        # optimize=False: no post-load passes, no layout choice
        jitfreeze(MLP().eval(), cache_dir=cache_dir, optimize=False)(x)
        # bound weights (the module's own, not copied): they keep their layout
        monkeypatch.setattr(TorchScriptBackend, "BIND_MIN_BYTES", 0)
        bound = jitfreeze(MLP().eval(), cache_dir=cache_dir)
        bound(x)
        assert "aten::linear" in _kinds(bound)
    assert seen == []
