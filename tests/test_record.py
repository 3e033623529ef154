"""Issue 3: the pre-dispatch recorder (jitfreeze.trace.record) -- make_fx's graph without Dynamo's imports."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from jitfreeze.trace import pipeline
from jitfreeze.errors import FallbackReason
from jitfreeze.trace.record import NotRecorded, record
from jitfreeze.trace.signature import call_mode, describe

from .conftest import run_script
from .models import make

GLOBAL_TABLE = torch.arange(12.0).reshape(3, 4)


def _trace(fn, *args, recorder):
    module = fn if isinstance(fn, nn.Module) else None
    call = describe(args, {}, call_mode(module))
    tensors = [leaf for leaf in pytree.tree_leaves(args) if isinstance(leaf, torch.Tensor)]
    with torch.no_grad():
        return pipeline.trace(fn, call, tensors, recorder=recorder)


def _in_place_and_views(x):
    y = x * 3.0
    y.add_(1.0)
    head, tail = y[:, :2], y[:, 2:].t()
    return head.sum(dim=1, keepdim=True) * tail.mean(), y.view(-1)[::2]


def _splits_and_tuples(x):
    a, b = x.split(2, dim=1)
    values, indices = x.max(dim=1)
    parts = torch.unbind(x, dim=0)
    return torch.cat([a, b.flip(1)], dim=0), values, indices, parts[-1]


def _constants_and_factories(x):
    table = torch.tensor([[1.0, -2.0, 0.5, 4.0]])
    steps = torch.arange(x.shape[1], dtype=x.dtype)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, 1] = True
    return torch.where(mask, x + table, x * steps) @ GLOBAL_TABLE.t()


def _integers(x):
    return (x.long() * 3 // 2).clamp(min=0).to(torch.float32) + torch.ones(1, dtype=torch.int32)


def _attention(q):
    k = q.flip(1)
    return F.scaled_dot_product_attention(q, k, q, is_causal=True), F.softmax(q @ k.transpose(-1, -2), dim=-1)


def _returns_input_and_constant(x):
    return x, GLOBAL_TABLE, (x.sigmoid() - 0.5).tanh()


def _grad_toggles(x):
    with torch.enable_grad():
        y = x.exp()
    with torch.no_grad():
        return y.log1p() * 0.5


class _Tied(nn.Module):
    """One weight used twice (tied embeddings, shared layers): a get_attr per use, as make_fx emits."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(torch.relu(self.proj(x)))


CASES = {
    "mlp": lambda: make("mlp"),
    "cnn": lambda: make("cnn"),
    "transformer": lambda: make("transformer"),
    "in_place_and_views": lambda: (_in_place_and_views, (torch.randn(3, 4),)),
    "splits_and_tuples": lambda: (_splits_and_tuples, (torch.randn(4, 4),)),
    "constants_and_factories": lambda: (_constants_and_factories, (torch.randn(2, 4),)),
    "integers": lambda: (_integers, (torch.randn(5, 3) * 10,)),
    "attention": lambda: (_attention, (torch.randn(2, 2, 5, 8),)),
    "returns_input_and_constant": lambda: (_returns_input_and_constant, (torch.randn(3, 4),)),
    "grad_toggles": lambda: (_grad_toggles, (torch.randn(3, 4),)),
    "tied_weights": lambda: (_Tied().eval(), (torch.randn(2, 4),)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_recorder_gives_make_fx_graph(name):
    """Same generated code (so the same cache key), the same constants by identity, the same values."""
    fn, args = CASES[name]()
    rec = _trace(fn, *args, recorder=True)
    ref = _trace(fn, *args, recorder=False)
    assert rec.graph_module.code == ref.graph_module.code
    assert [n for n, _ in rec.constants] == [n for n, _ in ref.constants]
    for (_, a), (_, b) in zip(rec.constants, ref.constants):
        assert a is b or torch.equal(a, b)      # weights by identity; numbers made in the trace by value
    assert rec.out_spec == ref.out_spec and rec.out_tensor_idx == ref.out_tensor_idx
    with torch.no_grad():
        got = rec.graph_module(*[a.clone() for a in args])
        want = fn(*[a.clone() for a in args])
    got = got if isinstance(got, (list, tuple)) else [got]
    want = [w for w in pytree.tree_leaves(want) if isinstance(w, torch.Tensor)]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_recorder_records_every_value_as_metadata():
    fn, (x,) = make("cnn")
    with torch.no_grad():
        gm, out = record(lambda t: fn(t), [x])
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "call_function"):
            val = node.meta["val"]
            assert val.device.type == "meta" and node.meta["device"] == torch.device("cpu")
    (result,) = [n for n in gm.graph.nodes if n.op == "output"][0].args
    assert result.meta["val"].shape == out.shape and result.meta["val"].stride() == out.stride()


def _autocast(x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return x @ x.t()


def _vmapped(x):
    return torch.vmap(torch.dot)(x, x)


def _swallows_a_read(x):
    try:
        if x.sum() > 0:          # raises under the recorder; this code carries on without it
            return x * 2
    except Exception:  # noqa: BLE001
        pass
    return x - 1


@pytest.mark.parametrize("fn", [_autocast, _vmapped])
def test_recorder_declines_what_it_cannot_see_whole(fn):
    x = torch.randn(3, 3)
    with torch.no_grad(), pytest.raises(NotRecorded):
        record(fn, [x])


def test_declined_functions_go_to_make_fx():
    x = torch.randn(3, 3)
    traced = _trace(_autocast, x, recorder=True)          # make_fx records the autocast region
    assert "_enter_autocast" in traced.graph_module.code


def _reads_through_data(x):
    return (x * 2).data + 1


def _reads_through_numpy(x):
    return torch.from_numpy((x * 2).numpy()) + x


@pytest.mark.parametrize("fn, match", [(_swallows_a_read, "data-dependent"),
                                       (_reads_through_data, "sharing memory with a traced value"),
                                       (_reads_through_numpy, "sharing memory with a traced value")])
def test_recorder_refuses_values_that_would_be_baked_in(fn, match):
    """A read of a traced value -- even one the function catches -- or memory of a traced value reaching
    an op untraced: no graph from any tracer (make_fx would record the except branch, or bake the alias
    in as a constant)."""
    x = torch.randn(3, 3)
    with torch.no_grad(), pytest.raises(FallbackReason, match=match):
        record(fn, [x])
    declined = _trace(fn, x, recorder=True)
    assert isinstance(declined, pipeline.Declined) and re.search(match, declined.reason), declined


def test_recorder_declines_nested_tensors():
    nested = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)])
    with pytest.raises(NotRecorded, match="input 0"):
        record(lambda t: t * 2, [nested])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        encoder = nn.TransformerEncoder(layer, 1).eval()       # nested-tensor fast path with a padding mask
    x = torch.randn(2, 5, 8)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad(), pytest.raises(NotRecorded):
        record(lambda t: encoder(t, src_key_padding_mask=pad), [x])


SCRIPT = """
import json, sys
import torch
from jitfreeze import jitfreeze
from tests.models import make
model, inputs = make(sys.argv[2])
fast = jitfreeze(model, cache_dir=sys.argv[1])
with torch.no_grad():
    out = fast(*inputs)
    ref = model(*inputs)
print(json.dumps({"info": fast.cache_info()._asdict(), "ok": bool(torch.allclose(out, ref, atol=1e-5, rtol=1e-4)),
                  "dynamo": "torch._dynamo" in sys.modules}))
"""


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_a_miss_imports_no_dynamo_and_make_fx_finds_the_same_entry(cache_dir, name):
    first, _ = run_script(SCRIPT, cache_dir, name)
    assert first["info"]["compiles"] == 1 and first["ok"] and first["dynamo"] is False
    # make_fx re-traces (verify=True compares the graph key with the stored entry's): same key, a load.
    second, _ = run_script(SCRIPT, cache_dir, name, env={"JITFREEZE_TRACER": "make_fx", "JITFREEZE_VERIFY": "1"})
    assert second["info"]["loads"] == 1 and second["info"]["compiles"] == 0 and second["ok"]
    assert second["dynamo"] is True


def test_tracer_setting_is_checked():
    from jitfreeze.config import Config
    assert Config.from_env({"JITFREEZE_TRACER": "MAKE_FX"}).tracer == "make_fx"
    assert Config.from_env({}).tracer == "auto"
    with pytest.raises(ValueError, match="JITFREEZE_TRACER"):
        Config.from_env({"JITFREEZE_TRACER": "jit"})


class _Boxed:
    def __init__(self, value):
        self.value = value


def test_trace_declines_with_the_result_of_the_run():
    """An output no graph can return: the trace is Declined, carrying the function's own result (the
    caller returns it rather than run the function again); a symbolic trace's run has none."""
    x = torch.randn(2, 3)
    declined = _trace(lambda t: _Boxed(t * 2), x, recorder=True)
    assert isinstance(declined, pipeline.Declined) and "_Boxed" in declined.reason
    assert isinstance(declined.result, _Boxed) and torch.equal(declined.result.value, x * 2)
    call = describe((x,), {}, call_mode(None))
    with torch.no_grad():
        symbolic = pipeline.trace(lambda t: _Boxed(t * 2), call, [x], dims={0: frozenset({0})})
    assert isinstance(symbolic, pipeline.Declined) and symbolic.result is pipeline.NO_RESULT
    failed = _trace(lambda t: t.nonexistent(), x, recorder=True)
    assert isinstance(failed, pipeline.Declined) and failed.reason.startswith("tracing failed: AttributeError")
    assert failed.result is pipeline.NO_RESULT
