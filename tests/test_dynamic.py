"""Issue 6: dynamic shapes — one artifact for many sizes, guards, the persisted decision."""

import pytest
import torch
import torch.nn as nn

from jitfreeze import jitfreeze
from jitfreeze.cache.persistent import open_cache
from jitfreeze.config import Config

from .conftest import run_script
from .models import make


def artifacts(cache_dir):
    store = open_cache(cache_dir, Config.from_env()).store
    return [k for k in store.keys() if k.startswith("a/")]


@pytest.mark.parametrize("name,shape", [("cnn", (3, 16, 16)), ("transformer", (10, 32))])
def test_batch_sizes_1_to_64_default_mode(name, shape, cache_dir, no_jf_warnings):
    model, _ = make(name)
    fast = jitfreeze(model, cache_dir=cache_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for b in list(range(1, 17)) + [31, 32, 63, 64]:
            x = torch.randn(b, *shape)
            assert torch.allclose(fast(x), model(x), atol=1e-4, rtol=1e-3), b
    info = fast.cache_info()
    assert info.compiles <= 3 and info.fallbacks == 0
    assert len(artifacts(cache_dir)) <= 3


def test_branch_on_size_follows_eager_at_every_size(cache_dir, no_jf_warnings):
    def f(x):
        if x.shape[0] > 4:
            return x * 2
        return x - 1

    fast = jitfreeze(f, cache_dir=cache_dir)
    for b in range(1, 17):
        x = torch.randn(b, 3)
        assert torch.equal(fast(x), f(x)), b
    for b in range(16, 0, -1):                   # and back down: guards pick the right artifact
        x = torch.randn(b, 3)
        assert torch.equal(fast(x), f(x)), b
    assert fast.cache_info().compiles <= 4


def test_sequence_length_8_to_128_one_artifact(cache_dir, no_jf_warnings):
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    fast = jitfreeze(enc, cache_dir=cache_dir, dynamic=True)
    with torch.no_grad():
        for length in (8, 9, 17, 33, 64, 100, 128):
            x = torch.randn(2, length, 32)
            assert torch.allclose(fast(x), enc(x), atol=1e-4, rtol=1e-3), length
    assert fast.cache_info().compiles == 1
    assert len(artifacts(cache_dir)) == 1


def test_dynamic_spec_per_argument(cache_dir, no_jf_warnings):
    def f(x, mask):
        return (x * mask.unsqueeze(-1)).sum(1)

    fast = jitfreeze(f, cache_dir=cache_dir, dynamic={"x": [1], "mask": [1]})
    for length in (5, 7, 11):
        x, mask = torch.randn(2, length, 4), (torch.rand(2, length) > 0.5).float()
        assert torch.allclose(fast(x, mask), f(x, mask))
    assert fast.cache_info().compiles == 1
    fast(torch.randn(3, 5, 4), torch.ones(3, 5))           # dim 0 is static: a new artifact
    assert fast.cache_info().compiles == 2


def test_exact_shapes_when_dynamic_false(cache_dir, no_jf_warnings):
    fast = jitfreeze(lambda x: x + 1, cache_dir=cache_dir, dynamic=False)
    for b in (2, 3, 4):
        fast(torch.ones(b))
    assert fast.cache_info().compiles == 3


DECISION = """
import json, sys, torch
from jitfreeze import jitfreeze
from tests.models import make
model, _ = make("cnn")
fast = jitfreeze(model, cache_dir=sys.argv[1])
outs = []
with torch.no_grad():
    for b in map(int, sys.argv[2].split(",")):
        x = torch.randn(b, 3, 16, 16)
        outs.append(bool(torch.allclose(fast(x), model(x), atol=1e-4, rtol=1e-3)))
print(json.dumps({"info": fast.cache_info()._asdict(), "ok": all(outs), "traces": fast.traces}))
"""


def test_dynamic_decision_persists_across_processes(cache_dir):
    first, _ = run_script(DECISION, cache_dir, "4,8")          # static, then dynamic (dim 0)
    assert first["ok"] and first["info"]["compiles"] == 2
    second, _ = run_script(DECISION, cache_dir, "13")          # a size never seen: the dynamic artifact
    assert second["ok"] and second["info"]["compiles"] == 0 and second["info"]["loads"] == 1
    assert second["traces"] == 0


_SIZES_AGAIN = """
import json, sys, warnings, torch
from jitfreeze import JitFreezeWarning, jitfreeze
from tests.models import make
warnings.simplefilter("error", JitFreezeWarning)
model, _ = make(sys.argv[2])
fast = jitfreeze(model, cache_dir=sys.argv[1])
torch.manual_seed(1)
ok = True
with torch.no_grad():
    for b in [1, 2, 3, 1, 5, 8, 2, 16, 12]:
        x = torch.randn(b, *json.loads(sys.argv[3]))
        ok = ok and torch.allclose(fast(x), model(x), atol=1e-4, rtol=1e-3)
print(json.dumps(dict(fast.cache_info()._asdict(), traces=fast.traces, ok=bool(ok))))
"""


@pytest.mark.parametrize("name,shape", [("cnn", [3, 16, 16]), ("mlp", None)])
def test_a_second_process_serves_every_size_from_the_first_ones_artifacts(name, shape, cache_dir):
    """Batch 1 first, then larger ones: the dims become dynamic and the decision is stored. A
    second process that uses the stored decision from its first call traces batch 1 statically,
    as the first process did (a symbolic trace would guard it on == 1: another graph for the
    same size), so it loads everything and compiles nothing."""
    import json
    if shape is None:
        _, (x,) = make(name)
        shape = list(x.shape[1:])
    first, _ = run_script(_SIZES_AGAIN, cache_dir, name, json.dumps(shape))
    second, _ = run_script(_SIZES_AGAIN, cache_dir, name, json.dumps(shape))
    assert first["ok"] and second["ok"]
    assert (second["compiles"], second["fallbacks"], second["traces"]) == (0, 0, 0), second
    assert second["loads"] == first["compiles"]
