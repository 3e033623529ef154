"""Soundness class 7: silent loss of the benefit or of data.

A call that runs eagerly because grad is enabled says so, once per function, with the fix; a
module whose parameters were discarded refuses to save, load or run eagerly with a clear
ParametersDiscardedError instead of an empty checkpoint or a shape error.
"""

import io
import warnings

import pytest
import torch
import torch.nn as nn

from jitfreeze import JitFreezeWarning, ParametersDiscardedError, jitfreeze
from jitfreeze.errors import FallbackReason
from jitfreeze.cache.store import MemoryStore

from .conftest import assert_same
from .models import make

FIX = r"torch\.no_grad\(\) or torch\.inference_mode\(\)"


def _warnings(fn, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", JitFreezeWarning)
        out = fn(*args)
    return out, [str(w.message) for w in caught if issubclass(w.category, JitFreezeWarning)]


def test_grad_enabled_eager_call_warns_once_per_function_with_the_fix():
    """Parameters that require grad, an input that requires grad, closed-over weights that require
    grad: each function warns once (not once per signature), naming the fix; the results carry
    autograd history; under no_grad the frozen graph serves, without a warning."""
    model, (x,) = make("mlp")
    fast = jitfreeze(model, cache_dir=MemoryStore())
    with pytest.warns(JitFreezeWarning, match=FIX) as caught:
        out = fast(x)
    assert len(caught) == 1 and "while grad is enabled" in str(caught[0].message)
    assert out.requires_grad
    out2, again = _warnings(fast, torch.cat([x, x]))            # another signature: no second warning
    assert again == [] and out2.requires_grad
    with torch.no_grad():
        _, none = _warnings(fast, x)
    assert none == [] and fast.cache_info().compiles == 1

    def double(t):
        return t * 2

    fdouble = jitfreeze(double, cache_dir=MemoryStore())
    with pytest.warns(JitFreezeWarning, match=f"an input requires grad.*{FIX}"):
        assert fdouble(x.clone().requires_grad_()).requires_grad
    assert _warnings(fdouble, torch.ones(3, requires_grad=True))[1] == []

    weight = nn.Parameter(torch.randn(16, 4))

    def project(t):
        return t @ weight

    fproject = jitfreeze(project, cache_dir=MemoryStore())
    with pytest.warns(JitFreezeWarning, match=f"weights the function uses require grad.*{FIX}"):
        assert fproject(x).requires_grad
    assert _warnings(fproject, torch.cat([x, x]))[1] == []


def test_grad_enabled_eager_call_raises_under_strict(monkeypatch):
    monkeypatch.setenv("JITFREEZE_STRICT", "1")
    model, (x,) = make("mlp")
    with pytest.raises(FallbackReason, match=FIX):
        jitfreeze(model, cache_dir=MemoryStore())(x)


def _discarded():
    model, (x,) = make("mlp")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    fast = jitfreeze(model, cache_dir=MemoryStore(), discard_parameters=True)
    with torch.no_grad():
        ref = model(x)
        assert_same(fast(x), ref)
    assert all(p.numel() == 0 for p in model.parameters())
    return model, fast, x, ref, saved


def test_discarded_module_refuses_to_save_load_or_run_eagerly():
    """No empty checkpoint, no shape error: ParametersDiscardedError saying why and what to do,
    from the module and from each submodule; the frozen graph keeps serving."""
    model, fast, x, ref, saved = _discarded()
    for target in (model, model.fc1):
        with pytest.raises(ParametersDiscardedError, match="discard_parameters=True.*Save the state dict before"):
            target.state_dict()
    with pytest.raises(ParametersDiscardedError):
        torch.save(model.state_dict(), io.BytesIO())
    with pytest.raises(ParametersDiscardedError, match="Load the weights into a fresh module"):
        model.load_state_dict(saved)
    with torch.no_grad():
        for target in (model, model.fc2):
            with pytest.raises(ParametersDiscardedError, match="calling .* directly"):
                target(x if target is model else torch.randn(4, 32))
        assert_same(fast(x), ref)                       # jitfreeze's compiled path is not affected
    assert all(p.numel() == 0 for p in model.parameters())
    other, _ = make("mlp")
    assert set(other.state_dict()) == set(saved)        # modules not discarded are untouched


class _Decorated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    @jitfreeze(cache_dir=MemoryStore(), discard_parameters=True)
    def forward(self, x):
        return torch.relu(self.fc(x))


def test_decorated_forward_still_served_after_discard():
    """A module whose forward is the jitfreeze function: calling the module is jitfreeze's compiled
    path and keeps working; its submodules refuse eager calls."""
    torch.manual_seed(0)
    model, x = _Decorated().eval(), torch.randn(4, 16)
    with torch.no_grad():
        ref = torch.relu(model.fc(x))
        assert_same(model(x), ref)
        assert model.fc.weight.numel() == 0
        assert_same(model(x), ref)
        with pytest.raises(ParametersDiscardedError, match="calling Linear directly"):
            model.fc(x)
    with pytest.raises(ParametersDiscardedError):
        model.state_dict()
