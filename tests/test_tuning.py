"""Compile-time timing: the fastest variant of a graph is stored and served, and where eager is
faster, later calls and processes run eagerly (jitfreeze.backend.tuning)."""

import logging
import textwrap

import pytest
import torch
import torch.nn as nn

from jitfreeze import JitFreezeWarning, jitfreeze
from jitfreeze.backend import tuning
from jitfreeze.backend.torchscript import TorchScriptBackend

from .conftest import assert_same, run_script

_REAL_MEASURE = tuning.measure          # before conftest's autouse fixture replaces it


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _conv_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


@pytest.fixture
def served(monkeypatch):
    """The node kinds of every module served (after its post-load passes), in order."""
    kinds = []
    real = TorchScriptBackend.first_call

    def first_call(self, module, tensors):
        kinds.append({n.kind() for n in module.graph.nodes()})
        return real(self, module, tensors)
    monkeypatch.setattr(TorchScriptBackend, "first_call", first_call)
    return kinds


@pytest.fixture
def timings(monkeypatch):
    """Fake timings: ``times`` ({name: seconds per call}, default 1.0; eager 2.0) decide the outcome;
    ``seen`` records the candidates of each timing."""
    seen, times = [], {"eager": 2.0}

    def measure(fns, args):
        seen.append(sorted(fns))
        return {name: (times.get(name, 1.0), [times.get(name, 1.0)] * 3) for name in fns}
    monkeypatch.setattr(tuning, "measure", measure)
    return seen, times


@pytest.mark.parametrize("transposed_wins", [True, False])
def test_the_faster_linear_layout_is_stored_and_served_warm(cache_dir, timings, served, transposed_wins):
    seen, times = timings
    times["transposed"] = 0.5 if transposed_wins else 0.97     # 0.97: inside the margin, not taken
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(16, 32)
    with torch.no_grad():
        expected = model(x)
        g = jitfreeze(model, cache_dir=cache_dir)
        assert_same(g(x), expected)
        assert seen == [["eager", "frozen", "transposed"]]
        transposed = "aten::linear" not in served[0] and "aten::matmul" in served[0]
        assert transposed == transposed_wins
        warm = jitfreeze(model, cache_dir=cache_dir)         # a fresh function: loads the stored artifact
        assert_same(warm(x), expected)
        assert warm.cache_info().loads == 1 and served[-1] == served[0]
    assert len(seen) == 1                                   # loading does not time anything


@pytest.mark.parametrize("fastest", ["ofi", "mkldnn", "frozen"])
def test_conv_graphs_keep_the_fastest_of_their_variants_warm(cache_dir, timings, served, fastest):
    """A graph with convolutions: ``optimize_for_inference`` by default (MKLDNN and pre-transposed
    linears), its MKLDNN part only, or none of it: whichever timed fastest, in this process and
    after a warm load."""
    seen, times = timings
    times[fastest] = 0.5
    torch.manual_seed(0)
    model, x = _conv_net(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        out = jitfreeze(model, cache_dir=cache_dir)(x)
        torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-4)   # MKLDNN changes the arithmetic
        warm = jitfreeze(model, cache_dir=cache_dir)
        torch.testing.assert_close(warm(x), expected, rtol=1e-3, atol=1e-4)
    assert seen == [["eager", "frozen", "mkldnn", "ofi"]]
    mkldnn = {k for k in served[0] if "mkldnn" in k}
    assert bool(mkldnn) == (fastest != "frozen")
    assert ("aten::matmul" in served[0]) == (fastest == "ofi")
    assert served[1] == served[0]


def test_bound_weights_keep_their_layout(cache_dir, timings, served, monkeypatch):
    """Weights bound at load are the module's own: no transposed variant is offered for them."""
    seen, times = timings
    times["transposed"] = 0.1
    monkeypatch.setattr(TorchScriptBackend, "BIND_MIN_BYTES", 0)
    with torch.no_grad():
        jitfreeze(MLP().eval(), cache_dir=cache_dir)(torch.randn(2, 32))
    assert seen == [["eager", "frozen"]]
    assert "aten::linear" in served[0]


def test_eager_faster_runs_eagerly_here_and_in_a_later_process(cache_dir, timings, caplog, tmp_path):
    """Eager faster than every variant, in every round: the decision is stored; this call and the
    next run eagerly with one INFO line and no warning; a later process neither compiles nor
    times, and runs eagerly too."""
    seen, times = timings
    times["eager"] = 0.5
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 32)
    fast = jitfreeze(model, cache_dir=cache_dir)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="jitfreeze"), _no_warnings():
        assert_same(fast(x), model(x))
        assert_same(fast(x), model(x))
    info = fast.cache_info()
    assert info.compiles == 0 and info.fallbacks == 1 and info.hits == 0
    said = [r.getMessage() for r in caplog.records if "eager is faster here" in r.getMessage()]
    assert len([m for m in said if "runs eagerly" in m]) == 1, said
    assert len(seen) == 1
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        import json, logging, sys, warnings
        import torch, torch.nn as nn
        sys.path.insert(0, {str(tmp_path)!r})
        from jitfreeze import jitfreeze
        from jitfreeze.backend import tuning
        def measure(fns, args):
            raise AssertionError("a later process must not time anything")
        tuning.measure = measure
        class MLP(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 8)
            def forward(self, x):
                return self.fc2(torch.relu(self.fc1(x)))
        MLP.__module__ = {MLP.__module__!r}
        MLP.__qualname__ = {MLP.__qualname__!r}
        torch.manual_seed(0)
        model, x = MLP().eval(), torch.randn(4, 32)
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        warnings.simplefilter("error")
        fast = jitfreeze(model, cache_dir={str(cache_dir)!r})
        with torch.no_grad():
            assert torch.equal(fast(x), model(x))
        info = fast.cache_info()
        print(json.dumps([info.compiles, info.loads, info.fallbacks]))
    """))
    result, proc = run_script(script.read_text())
    assert result == [0, 0, 1], proc.stdout
    assert "eager is faster here" in proc.stdout, proc.stdout


def test_eager_within_the_noise_is_not_taken():
    """Eager's lead must exceed EAGER_MARGIN in the median and hold in every round."""
    def fake(rounds_eager, rounds_compiled):
        def measure(fns, args):
            return {"frozen": (sorted(rounds_compiled)[1], rounds_compiled),
                    "eager": (sorted(rounds_eager)[1], rounds_eager)}
        return measure

    x = [torch.randn(2)]
    cases = [([1.0, 1.0, 1.0], [1.03, 1.03, 1.03], False),      # 3%: noise
             ([1.0, 1.0, 1.0], [1.2, 1.2, 0.9], False),         # one round compiled won
             ([1.0, 1.0, 1.0], [1.2, 1.2, 1.2], True)]
    for eager, compiled, expected in cases:
        tuning.measure, saved = fake(eager, compiled), tuning.measure
        try:
            choice = tuning.choose("frozen", {"frozen": lambda t: t}, lambda t: t, x)
        finally:
            tuning.measure = saved
        assert choice.eager is expected and choice.variant == "frozen"


def test_tune_off_times_nothing_and_keeps_the_default(cache_dir, timings, served, monkeypatch):
    seen, times = timings
    times["eager"] = 0.1
    monkeypatch.setenv("JITFREEZE_TUNE", "0")
    with torch.no_grad():
        model, x = MLP().eval(), torch.randn(2, 32)
        fast = jitfreeze(model, cache_dir=cache_dir)
        assert_same(fast(x), model(x))
    assert seen == [] and fast.cache_info().compiles == 1
    assert "aten::linear" in served[0]


def test_real_timing_keeps_outputs_side_effects_and_the_random_stream(cache_dir, monkeypatch):
    """The timing itself (not faked) runs the graph and eager's operators on copies: the inputs
    are written once (by the call itself), the function's Python runs once (its side effects are
    not repeated), and the caller's random stream is where it would be without the timing."""
    monkeypatch.setattr(tuning, "measure", _REAL_MEASURE)     # conftest fakes the timing
    model = MLP().eval()
    ran = []

    def f(x):
        ran.append(1)                   # a side effect of the function's own Python
        x.add_(1.0)                     # writes its input in place: the timing must use copies
        return model(x) + torch.rand(()) * 0

    def first_call(max_call_s, where):
        monkeypatch.setattr(tuning, "MAX_CALL_S", max_call_s)
        ran.clear()
        torch.manual_seed(1)
        x = torch.randn(4, 32)
        with torch.no_grad():
            out = jitfreeze(f, cache_dir=cache_dir / where)(x)
        return out, x, torch.get_rng_state(), len(ran)

    tuned, x_tuned, rng_tuned, ran_tuned = first_call(10.0, "tuned")
    untuned, x_untuned, rng_untuned, ran_untuned = first_call(0.0, "untuned")    # too slow to time
    assert_same(tuned, untuned)
    assert_same(x_tuned, x_untuned)
    assert torch.equal(rng_tuned, rng_untuned)
    assert ran_tuned == ran_untuned == 1


class _no_warnings:
    """No JitFreezeWarning inside the block."""

    def __enter__(self):
        import warnings
        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        bad = [w for w in self.caught if issubclass(w.category, JitFreezeWarning)]
        assert not bad, [str(w.message) for w in bad]
