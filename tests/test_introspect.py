"""The introspection API: ``signatures()`` (what each signature resolved to) and ``cache_location``."""

import dataclasses
import os

import pytest
import torch
import torch.nn as nn

from jitfreeze import JitFreezeWarning, jitfreeze
from jitfreeze.cache.store import MemoryStore

from .conftest import assert_same, persistent_cache
from .models import make


def scale(x, k):
    return x * k + 1


def test_signatures_say_where_each_entry_came_from(cache_dir, no_jf_warnings):
    fast = jitfreeze(scale, cache_dir=cache_dir, dynamic=False)
    assert fast.signatures() == []
    x = torch.randn(4, 8)
    with torch.no_grad():
        fast(x, 3)
        fast(x, 3)                                   # a hit: no new record
        fast(torch.randn(8, 4).t(), 2.5)
    first, second = fast.signatures()
    assert (first.text, second.text) == ("(4x8 float32, int:3)", "(4x8 float32 stride=(1, 4), float:2.5)")
    assert first.source == second.source == "compiled" and first.reason is None
    assert first.backend.startswith("torchscript") and not first.dynamic and not first.watched
    assert len(first.key) == 64 and first.key != second.key
    assert persistent_cache(fast).get(first.key) is not None            # the stored artifact's key
    assert "aten::mul" in str(first.compiled.graph)
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.source = "cache"

    again = jitfreeze(scale, cache_dir=cache_dir, dynamic=False)       # another process, in effect
    with torch.no_grad():
        assert_same(again(x, 3), scale(x, 3))
    (loaded,) = again.signatures()
    assert loaded.source == "index" and loaded.key == first.key and loaded.text == first.text
    assert loaded == dataclasses.replace(first, source="index")          # ``compiled`` is not compared

    fast.cache_clear()
    assert fast.signatures() == []


def test_eager_signatures_carry_their_reason(cache_dir):
    fast = jitfreeze(scale, cache_dir=cache_dir)
    x = torch.randn(3, requires_grad=True)
    with pytest.warns(JitFreezeWarning, match="while grad is enabled"):
        fast(x, 2)
    (eager,) = fast.signatures()
    assert eager.source == "eager" and eager.text == "(3 float32 requires_grad, int:2)"
    assert "requires grad" in eager.reason and eager.key is None and eager.compiled is None
    assert fast.cache_info().fallbacks == 1


def test_dynamic_and_watched(cache_dir, no_jf_warnings):
    model = nn.Linear(3, 2).eval()
    fast = jitfreeze(model, cache_dir=cache_dir, dynamic={"input": [0]})
    with torch.no_grad():
        for b in (2, 5, 7):
            x = torch.randn(b, 3)
            assert_same(fast(x), model(x))
    records = fast.signatures()
    assert [r.text for r in records] == ["(2x3 float32)", "(5x3 float32)", "(7x3 float32)"]
    assert all(r.dynamic and r.watched for r in records)            # one symbolic graph; the weights are watched
    assert len({r.key for r in records}) == 1 and fast.cache_info().compiles == 1


def test_methods_and_modules(cache_dir, no_jf_warnings):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        @jitfreeze(cache_dir=cache_dir)
        def forward(self, x):
            return self.lin(x).relu()

    net = Net().eval()
    with torch.no_grad():
        net(torch.randn(2, 4))
    assert len(net.forward.signatures()) == 1 and Net.forward.signatures() == []    # per instance
    model, (x,) = make("mlp")
    wrapped = jitfreeze(model, cache_dir=cache_dir)
    with torch.no_grad():
        wrapped(x)
    assert wrapped.signatures() == wrapped.jitfreeze_function.signatures() and len(wrapped.signatures()) == 1
    assert wrapped.cache_location == str(cache_dir)


def test_cache_location(cache_dir, tmp_path, monkeypatch, no_jf_warnings):
    assert jitfreeze(scale, cache_dir=cache_dir).cache_location == str(cache_dir)
    assert jitfreeze(scale, cache_dir=MemoryStore()).cache_location is None
    monkeypatch.setenv("JITFREEZE_CACHE_DIR", str(tmp_path / "env"))
    fast = jitfreeze(scale)
    assert fast.cache_location == str(tmp_path / "env")                   # before the first call too
    with torch.no_grad():
        fast(torch.randn(2), 2)
    assert fast.cache_location == str(tmp_path / "env") and os.path.isdir(fast.cache_location)
    monkeypatch.delenv("JITFREEZE_CACHE_DIR")
    assert fast.cache_location == str(tmp_path / "env")                   # what it opened, not today's env
    assert jitfreeze(scale).cache_location == str(tmp_path / "xdg" / "jitfreeze")


def test_an_uncached_function_says_so(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    fast = jitfreeze(scale, cache_dir=blocker / "jf")
    with pytest.warns(JitFreezeWarning, match="running uncached"), torch.no_grad():
        assert_same(fast(torch.ones(2), 2), scale(torch.ones(2), 2))
    assert fast.cache_location is None and fast.signatures()[0].source == "unstored"
