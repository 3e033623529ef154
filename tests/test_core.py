"""Issue 2: the decorator end to end, in one process."""

import io
import collections
import enum
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

import jitfreeze as jf
from jitfreeze import CacheInfo, JitFreezeWarning, jitfreeze
from jitfreeze.backend import module_weights
from jitfreeze.cache.store import MemoryStore

from .conftest import assert_same, force_linear_layout, stored_payload
from .models import make


def eager_and_fast(name, cache_dir):
    model, inputs = make(name)
    fast = jitfreeze(model, cache_dir=cache_dir)
    with torch.no_grad():
        ref = model(*inputs)
        out1 = fast(*inputs)
        out2 = fast(*inputs)
    return ref, out1, out2, fast


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_models_match_eager(name, cache_dir, no_jf_warnings):
    ref, out1, out2, fast = eager_and_fast(name, cache_dir)
    assert_same(out1, ref)
    assert_same(out2, ref, atol=1e-4, rtol=1e-3)
    assert fast.cache_info() == CacheInfo(hits=1, loads=0, compiles=1, fallbacks=0, entries=1)


def test_conv_bn_is_folded_and_optimized(cache_dir):
    _, _, _, fast = eager_and_fast("cnn", cache_dir)
    (entry,) = fast.signatures()
    graph = str(entry.compiled.graph)
    assert "batch_norm" not in graph                  # folded into the convolution by freeze
    assert "mkldnn" in graph                          # optimize_for_inference ran after loading


def test_gelu_mlp_function_and_cache_info(cache_dir, no_jf_warnings):
    @jitfreeze(cache_dir=cache_dir)
    def gelu_mlp(x, w1, w2):
        return torch.nn.functional.gelu(x @ w1) @ w2

    x, w1, w2 = torch.randn(4, 8), torch.randn(8, 16), torch.randn(16, 4)
    ref = torch.nn.functional.gelu(x @ w1) @ w2
    for _ in range(3):
        assert_same(gelu_mlp(x, w1, w2), ref, atol=1e-5)
    assert gelu_mlp.cache_info() == CacheInfo(2, 0, 1, 0, 1)
    assert gelu_mlp.__name__ == "gelu_mlp" and gelu_mlp.__wrapped__ is not None
    # another shape is another signature; weights passed as inputs are not baked in
    assert_same(gelu_mlp(x[:2], w1 * 2, w2), torch.nn.functional.gelu(x[:2] @ (w1 * 2)) @ w2, atol=1e-5)
    assert gelu_mlp.cache_info().entries == 2
    gelu_mlp.cache_clear()
    assert gelu_mlp.cache_info() == CacheInfo(0, 0, 0, 0, 0)
    gelu_mlp(x, w1, w2)
    assert gelu_mlp.cache_info() == CacheInfo(0, 1, 0, 0, 1)   # from the persistent cache


def test_scalars_kwargs_and_structured_outputs(cache_dir, no_jf_warnings):
    Pair = collections.namedtuple("Pair", "a b")

    class Mode(enum.Enum):
        SUM = 1
        MAX = 2

    def f(x, y=None, *, scale: float = 1.0, mode=Mode.SUM, extra=(1, 2)):
        z = x * scale + extra[0]
        red = z.sum(0) if mode is Mode.SUM else z.amax(0)
        return {"z": z, "pair": Pair(red, [x - 1, y]), "n": extra[1], "tag": "ok"}

    fast = jitfreeze(f, cache_dir=cache_dir)
    x = torch.randn(3, 4)
    for kwargs in [dict(scale=2.0), dict(scale=0.5), dict(scale=2.0, mode=Mode.MAX), dict(extra=(3, 4))]:
        assert_same(fast(x, **kwargs), f(x, **kwargs))
        assert_same(fast(x, **kwargs), f(x, **kwargs))
    assert_same(fast(x, x + 1, scale=-0.0), f(x, x + 1, scale=-0.0))
    info = fast.cache_info()
    assert info.compiles == 5 and info.fallbacks == 0 and info.hits == 4


def test_tuple_and_list_outputs(cache_dir, no_jf_warnings):
    def f(x):
        return (x + 1, [x * 2, (x.sum(),)])

    fast = jitfreeze(f, cache_dir=cache_dir)
    x = torch.randn(5)
    assert_same(fast(x), f(x))
    assert_same(fast(x), f(x))


def test_method_binds_per_instance(cache_dir, no_jf_warnings):
    class Net(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.fc = nn.Linear(4, 3)

        @jitfreeze(cache_dir=cache_dir)
        def forward(self, x):
            return torch.tanh(self.fc(x))

    a, b = Net(0).eval(), Net(1).eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        ya, yb = a(x), b(x)
        assert_same(ya, torch.tanh(a.fc(x)))
        assert_same(yb, torch.tanh(b.fc(x)))
        assert not torch.allclose(ya, yb)
        a(x)
    assert a.forward is a.forward
    assert a.forward.cache_info() == CacheInfo(1, 0, 1, 0, 1)
    assert b.forward.cache_info() == CacheInfo(0, 0, 1, 0, 1)


def test_in_place_weight_update_is_seen(cache_dir, no_jf_warnings):
    model, (x,) = make("mlp")
    fast = jitfreeze(model, cache_dir=cache_dir)
    with torch.no_grad():
        fast(x)
        model.fc1.weight.mul_(2)                 # in place: version counter moves
        assert_same(fast(x), model(x))
        model.fc2.weight = nn.Parameter(torch.randn_like(model.fc2.weight))  # replaced
        assert_same(fast(x), model(x))
        model.load_state_dict(make("mlp", seed=3)[0].state_dict())
        assert_same(fast(x), model(x))
    assert fast.cache_info().compiles == 4


def test_key_differs_for_weights_dtype_shape(cache_dir):
    def key_of(model, x):
        fast = jitfreeze(model, cache_dir=MemoryStore())
        with torch.no_grad():
            fast(x)
        (entry,) = fast.signatures()
        return entry.key

    m0, (x,) = make("mlp", seed=0)
    m1, _ = make("mlp", seed=1)
    base = key_of(m0, x)
    assert key_of(make("mlp", seed=0)[0], x) == base          # same weights, same key
    assert key_of(m1, x) != base                               # other weights
    assert key_of(m0, x[:2]) != base                           # other shape
    assert key_of(m0.double(), x.double()) != base             # other dtype


def test_key_parts_include_device_and_versions():
    from jitfreeze.key import KeyParts, device_text, environment_parts
    parts = dict(environment_parts())
    assert parts["torch"] == torch.__version__ and parts["jitfreeze"] == jf.__version__
    assert device_text(torch.device("cpu")) != device_text(torch.device("meta"))
    a = KeyParts(environment_parts()).add("device", device_text(torch.device("cpu")))
    b = KeyParts(environment_parts()).add("device", device_text(torch.device("meta")))
    assert a.key() != b.key()


def test_data_dependent_control_flow_falls_back_once(cache_dir):
    calls = []

    def f(x):
        calls.append(1)
        if x.sum() > 0:
            return x + 1
        return x - 1

    fast = jitfreeze(f, cache_dir=cache_dir)
    pos, neg = torch.ones(3), -torch.ones(3)
    with pytest.warns(JitFreezeWarning, match="data-dependent"):
        assert torch.equal(fast(pos), pos + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(fast(neg), neg - 1)            # same signature: remembered, no new warning
        assert torch.equal(fast(pos), pos + 1)
    assert fast.cache_info().fallbacks == 1 and fast.cache_info().compiles == 0


def test_unhashable_argument_falls_back_naming_it(cache_dir):
    def f(x, cfg):
        return x * cfg["scale"]

    fast = jitfreeze(f, cache_dir=cache_dir)
    x = torch.ones(2)
    with pytest.warns(JitFreezeWarning, match=r"argument 'cfg'\['scale'\].*can't be hashed"):
        assert torch.equal(fast(x, {"scale": _Unhashable()}), x * 3)
    assert fast.cache_info().compiles == 0


def test_unsupported_argument_type_falls_back(cache_dir):
    fast = jitfreeze(lambda x, g: x + next(g), cache_dir=cache_dir)
    with pytest.warns(JitFreezeWarning, match="argument .g. of type generator"):
        assert torch.equal(fast(torch.ones(2), (i for i in [5])), torch.full((2,), 6.0))


class _Unhashable:
    __hash__ = None

    def __rmul__(self, other):
        return other * 3


def test_grad_mode_runs_eagerly(cache_dir, no_jf_warnings):
    model, (x,) = make("mlp")
    fast = jitfreeze(model, cache_dir=cache_dir)
    with pytest.warns(JitFreezeWarning, match=r"while grad is enabled.*torch\.no_grad\(\)"):
        out = fast(x)                                   # grad enabled, parameters require grad
    assert out.requires_grad
    out.sum().backward()
    assert model.fc1.weight.grad is not None
    assert fast.cache_info().compiles == 0 and fast.cache_info().fallbacks == 1
    with torch.no_grad():
        fast(x)
    assert fast.cache_info().compiles == 1


def test_training_mode_runs_eagerly_with_warning(cache_dir):
    model, (x,) = make("mlp")
    fast = jitfreeze(model.train(), cache_dir=cache_dir)
    with torch.no_grad(), pytest.warns(JitFreezeWarning, match="training mode"):
        assert_same(fast(x), model(x))
    assert fast.cache_info().compiles == 0


def test_mutating_module_state_falls_back(cache_dir):
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("n", torch.zeros(()))

        def forward(self, x):
            self.n += 1
            return x + self.n

    m = Counter().eval()
    fast = jitfreeze(m, cache_dir=cache_dir)
    with torch.no_grad(), pytest.warns(JitFreezeWarning, match="mutates module state"):
        fast(torch.zeros(2))
    with torch.no_grad():
        assert torch.equal(fast(torch.zeros(2)), torch.full((2,), 2.0))


def test_input_mutation_happens_once(cache_dir, no_jf_warnings):
    def f(x):
        x.add_(1)
        return x * 2

    fast = jitfreeze(f, cache_dir=cache_dir)
    x = torch.zeros(3)
    assert torch.equal(fast(x), torch.full((3,), 2.0))
    assert torch.equal(x, torch.ones(3))
    assert torch.equal(fast(x), torch.full((3,), 4.0))
    assert torch.equal(x, torch.full((3,), 2.0))


def test_module_wrapper_rejects_non_callables():
    with pytest.raises(TypeError):
        jitfreeze(42)


def test_transformer_layer_takes_the_fused_kernel_eager_uses(cache_dir, no_jf_warnings):
    model, (x,) = make("transformer")
    mask = torch.zeros(x.shape[:2], dtype=torch.bool)
    mask[1, 6:] = True
    fast = jitfreeze(model, cache_dir=cache_dir, dynamic=False)
    with torch.no_grad():
        assert_same(fast(x), model(x))
        out, ref = fast(x, src_key_padding_mask=mask), model(x, src_key_padding_mask=mask)
        assert torch.allclose(out, ref, atol=1e-5, equal_nan=True)
    graphs = [str(s.compiled.graph) for s in fast.signatures()]
    assert graphs and all("_transformer_encoder_layer_fwd" in g for g in graphs)
    # outside a jitfreeze trace the layer is torch's own forward
    assert torch.nn.TransformerEncoderLayer.forward.__wrapped__ is not None


def _stored_graphs(monkeypatch):
    """Record the graph of every artifact compile() writes, as torch.jit.load reads it back."""
    from jitfreeze.backend import torchscript
    graphs, real = [], torchscript.TorchScriptBackend.compile

    def compile_and_record(self, traced, *args):
        saved = real(self, traced, *args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            graphs.append(str(torch.jit.load(saved.path).graph))
        return saved
    monkeypatch.setattr(torchscript.TorchScriptBackend, "compile", compile_and_record)
    return graphs


class _SelfAttention(torch.nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.norm = torch.nn.LayerNorm(32)
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.mlp = torch.nn.Linear(32, 32)

    def forward(self, x, need_weights: bool = False, mask=None):
        y = self.norm(x)
        y, w = self.attn(y, y, y, need_weights=need_weights, key_padding_mask=mask)
        x = x + y
        return (x + self.mlp(x), w) if need_weights else x + self.mlp(x)


@pytest.mark.parametrize("case", ["plain", "weights", "masked", "seq_first"])
def test_self_attention_takes_the_fused_kernel_eager_uses(cache_dir, no_jf_warnings, monkeypatch, case):
    """Eager self-attention (eval, no_grad) runs ``_native_multi_head_attention``; so does the frozen
    graph, with eager's answer bit for bit. Masked calls and sequence-first modules, which eager
    or jitfreeze runs decomposed, keep the decomposed graph (still eager's answer)."""
    graphs = _stored_graphs(monkeypatch)
    torch.manual_seed(0)
    model = _SelfAttention(batch_first=case != "seq_first").eval()
    x = torch.randn(2, 7, 32)
    kwargs = {"weights": {"need_weights": True},
              "masked": {"mask": torch.tensor([[False] * 7, [False] * 5 + [True] * 2])}}.get(case, {})
    fast = jitfreeze(model, cache_dir=cache_dir, dynamic=False)
    with torch.no_grad():
        out, ref = fast(x, **kwargs), model(x, **kwargs)
    if case == "masked":
        assert torch.allclose(out, ref, atol=1e-5, equal_nan=True)
    else:
        assert_same(out, ref)
    assert len(graphs) == 1
    assert ("_native_multi_head_attention" in graphs[0]) == (case in ("plain", "weights")), graphs[0]
    assert torch.nn.MultiheadAttention.forward.__wrapped__ is not None


def _tensor_constants(graph) -> list:
    return [n.output().toIValue() for n in graph.nodes()
            if n.kind() == "prim::Constant" and isinstance(n.output().type(), torch._C.TensorType)]


def _stored_artifact(fast):
    """The artifact stored for ``fast``'s (one) compiled signature, loaded as torch.jit.load loads it."""
    payload = stored_payload(fast)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(io.BytesIO(payload) if isinstance(payload, bytes) else payload.path)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_artifacts_bind_the_module_weights_instead_of_storing_them(name, cache_dir, monkeypatch, no_jf_warnings):
    # The stored graph leaves the module's weights out (placeholders) and binds them when it loads;
    # the frozen graph's unfolded constants are the module's own storage (one copy in memory),
    # binding and freezing change nothing in the module, and conv graphs get optimize_for_inference
    # after loading (MKLDNN) while others keep their linear ops (no transposed copies).
    # optimize=False is another key. (Binding is for large weights: here every size binds.)
    from jitfreeze.backend.torchscript import TorchScriptBackend
    monkeypatch.setattr(TorchScriptBackend, "BIND_MIN_BYTES", 0)
    graphs = _stored_graphs(monkeypatch)
    model, inputs = make(name)
    before = {n: (t.clone(), t._version) for n, t in model.state_dict(keep_vars=True).items()}
    with torch.no_grad():
        ref = model(*inputs)
        fast = jitfreeze(model, cache_dir=cache_dir)
        assert_same(fast(*inputs), ref, atol=1e-5)
        plain = jitfreeze(model, cache_dir=cache_dir, optimize=False)
        assert_same(plain(*inputs), ref, atol=1e-5)
    assert plain.cache_info().compiles == 1            # not served the optimized artifact
    for n, t in model.state_dict(keep_vars=True).items():
        assert torch.equal(t, before[n][0]) and t._version == before[n][1], n
    for stored in graphs:
        assert stored.count("prim::GetAttr") >= len(list(model.parameters()))
    artifact = _stored_artifact(fast)
    attrs = [v for k, v in artifact.state_dict().items() if "_param_constant" in k or "_tensor_constant" in k]
    assert attrs and all(v.numel() == 0 for v in attrs)          # placeholders only
    loaded = str(fast.signatures()[0].compiled.graph)
    unoptimized = plain.signatures()[0].compiled.graph
    module_ptrs = {t.data_ptr() for t in model.parameters()}
    if name == "mlp":
        assert "aten::linear" in loaded and "aten::matmul" not in loaded
        shared = [c for c in _tensor_constants(unoptimized) if c.data_ptr() in module_ptrs]
        assert len(shared) == len(module_ptrs)                   # every weight is the module's storage
    else:
        assert "mkldnn" in loaded.lower() and "mkldnn" not in str(unoptimized).lower()


def test_small_weights_are_stored_frozen(cache_dir, monkeypatch, no_jf_warnings):
    # Below BIND_MIN_BYTES the artifact is the frozen function, weights inside (loading a few MB
    # costs less than freezing at load); the loaded graph still runs on its own copy, correctly.
    graphs = _stored_graphs(monkeypatch)
    model, (x,) = make("mlp")
    fast = jitfreeze(model, cache_dir=cache_dir)
    with torch.no_grad():
        assert_same(fast(x), model(x), atol=1e-5)
    (stored,) = graphs
    # (its linear layers as traced or pre-transposed, whichever ran faster: tests/test_layout.py)
    assert "prim::GetAttr" not in stored and ("aten::linear" in stored or "aten::matmul" in stored)
    fresh = jitfreeze(model, cache_dir=cache_dir)
    with torch.no_grad():
        assert_same(fresh(x), model(x), atol=1e-5)
    assert fresh.cache_info().loads == 1
    module_ptrs = {t.data_ptr() for t in model.parameters()}
    graph = fresh.signatures()[0].compiled.graph
    assert not any(c.data_ptr() in module_ptrs for c in _tensor_constants(graph))


def test_binding_errors_are_clear_and_a_plain_miss(cache_dir, monkeypatch, no_jf_warnings):
    from jitfreeze.backend import BindingError
    from jitfreeze.backend.torchscript import TorchScriptBackend

    monkeypatch.setattr(TorchScriptBackend, "BIND_MIN_BYTES", 0)
    model, (x,) = make("mlp")
    fast = jitfreeze(model, cache_dir=cache_dir)
    with torch.no_grad():
        ref = fast(x)
    payload = stored_payload(fast)
    backend, weights = TorchScriptBackend(), module_weights(model)
    with pytest.raises(BindingError, match="does not have"):
        backend.load(payload, None, {k: v for k, v in weights.items() if not k.endswith("bias")})
    with pytest.raises(BindingError, match="compiled for"):
        backend.load(payload, None, {k: v.double() for k, v in weights.items()})
    with pytest.raises(BindingError, match="compiled for"):
        backend.load(payload, None, {k: (v.t().contiguous().t() if v.dim() == 2 else v) for k, v in weights.items()})
    # in a wrapper, a binding that fails is a miss (nothing evicted, no warning): the index hit
    # (and the hinted load started ahead of it) fails, the traced path finds the same artifact and loads it
    real = TorchScriptBackend.load
    failed = []

    def load_failing_until_traced(self, data, device, weights=None):
        if again.traces == 0:
            failed.append(1)
            raise BindingError("the module changed")
        return real(self, data, device, weights)
    monkeypatch.setattr(TorchScriptBackend, "load", load_failing_until_traced)
    again = jitfreeze(model, cache_dir=cache_dir)
    with torch.no_grad():
        assert_same(again(x), ref)
    info = again.cache_info()
    assert failed and again.traces == 1 and info.loads == 1 and info.compiles == 0


def test_loaded_graphs_run_unprofiled(cache_dir, no_jf_warnings):
    """Graphs run with TorchScript's executor optimization off (no profiling run on the first
    calls), set around each call and restored, even when the call raises."""
    from jitfreeze.backend.torchscript import TorchScriptBackend

    model, (x,) = make("mlp")
    fast = jitfreeze(model, cache_dir=cache_dir)
    with torch.no_grad():
        fast(x)
    entry = fast.signatures()[0]
    backend = TorchScriptBackend()
    module = backend.load(stored_payload(fast, entry), None, module_weights(model))
    run = backend.runner(module)
    assert not isinstance(run, torch._C.ScriptMethod) and run.graph is module.forward.graph
    assert torch._C._get_graph_executor_optimize()
    with torch.no_grad():
        torch.testing.assert_close(run(x), model(x))
    assert torch._C._get_graph_executor_optimize()                 # restored
    with pytest.raises(RuntimeError):
        run(torch.randn(3, 5))                                     # wrong width: the graph raises
    assert torch._C._get_graph_executor_optimize()                 # restored on the error path too
    try:                                                           # a caller that turned it off keeps it off
        torch._C._set_graph_executor_optimize(False)
        with torch.no_grad():
            run(x)
        assert not torch._C._get_graph_executor_optimize()
    finally:
        torch._C._set_graph_executor_optimize(True)


def _hoist_cases():
    f32, f64 = torch.randn(7), torch.randn(3, 4, dtype=torch.float64)
    return [
        # (function, inputs, operands hoisted)
        (lambda x: torch.relu(x) * 2.0 + 1.0, (f32,), 2),
        (lambda x: x / 3.0 - 0.1, (f32,), 2),
        (lambda x: (x * (1 / 3)).add(0.7, alpha=2) / 10, (f32,), 3),       # alpha kept; an int divisor
        (lambda x: x * 1e300 + float("nan") * 0 - (-0.0), (f32,), 3),       # overflow to inf, nan, -0.0
        (lambda x: x * 16777217 + 3, (f32,), 2),                            # an int the float32 cast rounds
        (lambda x: x * 0.1 + 2.5, (f64,), 2),
        (lambda x: x.t() * 0.3, (f64,), 1),                                 # a non-contiguous operand
        (lambda x: x.sum() * 0.1, (f32,), 1),                               # a 0-dim operand
        # left alone: integer and reduced-precision tensors, promotion to another dtype
        (lambda x: x * 2 + 1, (torch.arange(6),), 0),
        (lambda x: x + 1.5, (torch.arange(6),), 0),
        (lambda x: x * 0.1 + 0.3, (torch.randn(5).half(),), 0),
        (lambda x: x.bool() * 2.0, (f32,), 0),
        (lambda x: x * True, (f32,), 0),
    ]


@pytest.mark.parametrize("case", range(len(_hoist_cases())))
def test_hoisted_scalar_operands_give_the_same_bits(case, cache_dir, no_jf_warnings):
    """``x * 2.0``: the number becomes a 0-dim constant of x's dtype (converted once, as every
    call would convert it): the results are bit for bit eager's, also after a reload; where that
    would not hold exactly (int, half, promotion, bool) nothing is hoisted."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from jitfreeze.trace.pipeline import _hoist_scalars

    fn, inputs, expected = _hoist_cases()[case]
    assert _hoist_scalars(make_fx(fn, pre_dispatch=True)(*inputs)) == expected
    fast = jitfreeze(fn, cache_dir=cache_dir)
    ref = fn(*inputs)
    for _ in range(3):                       # compile, then the table, then the C++-checked path
        out = fast(*inputs)
        assert out.dtype == ref.dtype and torch.equal(out.isnan(), ref.isnan())
        assert torch.equal(torch.nan_to_num(out), torch.nan_to_num(ref))
        assert torch.equal(out.signbit(), ref.signbit())
    again = jitfreeze(fn, cache_dir=cache_dir)
    assert torch.equal(torch.nan_to_num(again(*inputs)), torch.nan_to_num(ref)) and again.cache_info().loads == 1
    (entry,) = fast.signatures()
    assert not entry.watched                 # hoisted numbers are not weights to watch


def test_hoisted_scalars_with_convolutions_and_optimize(cache_dir, no_jf_warnings):
    """A conv graph goes through optimize_for_inference (MKLDNN layouts) with hoisted constants."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()

    def fn(x):
        return model(x) * 0.5 + 1.0 - model(x) / 3.0

    x = torch.randn(2, 3, 16, 16)
    fast = jitfreeze(fn, cache_dir=cache_dir)
    with torch.no_grad():
        ref = fn(x)
        for _ in range(3):
            torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-5)


def _relu_scale(x):
    return torch.relu(x) * 2.0 + 1.0          # hoisted numbers, in place on relu's result


def _scale(x):
    return x / 8.0                            # out of place: a hoisted number TorchScript would undo


def _fusion_strategy():
    strategy = torch._C._jit_set_fusion_strategy([("STATIC", 0)])
    torch._C._jit_set_fusion_strategy(strategy)
    return strategy


def test_first_call_plans_the_graph_once_as_it_is(cache_dir, no_jf_warnings):
    """A loaded graph is planned on its first call by TorchScript's simple executor (no profiling
    runs); when that plan is the graph as it is, later calls go straight to the ScriptMethod."""
    from jitfreeze.backend.torchscript import TorchScriptBackend, graph_structure

    strategy = _fusion_strategy()
    x = torch.randn(16)
    for source in ("compiled", "index"):
        f = jitfreeze(_relu_scale, cache_dir=cache_dir)
        assert_same(f(x), _relu_scale(x))
        entry = f.signatures()[0]
        assert entry.source == source and isinstance(entry.compiled, torch._C.ScriptMethod)
        plans = list(entry.compiled.owner.get_debug_state().execution_plans.values())
        assert len(plans) == 1 and graph_structure(plans[0].graph) == graph_structure(entry.compiled.graph)
        assert "aten::mul_" in str(plans[0].graph) and "prim::Constant[value={2}]" in str(plans[0].graph)
        assert_same(f(x), _relu_scale(x))
        assert torch._C._get_graph_executor_optimize() and _fusion_strategy() == strategy
    backend = TorchScriptBackend()                  # a first call that raises restores the strategy
    module = backend.load(stored_payload(f, entry), None)
    with pytest.raises(RuntimeError):
        backend.first_call(module, [torch.randn(3), torch.randn(3)])
    assert _fusion_strategy() == strategy


def test_first_call_leaves_graphs_the_plan_would_change_unplanned(cache_dir, no_jf_warnings, monkeypatch):
    """Out-of-place arithmetic with a hoisted number: TorchScript's plan would turn the 0-dim
    constant back into a number, so the graph runs unprofiled, as it is. When the prediction
    misses a change, the plan itself is checked: dropped, and the graph runs unprofiled."""
    from jitfreeze.backend import torchscript

    x = torch.randn(16)
    f = jitfreeze(_scale, cache_dir=cache_dir)
    assert_same(f(x), _scale(x))
    entry = f.signatures()[0]
    assert not isinstance(entry.compiled, torch._C.ScriptMethod)
    assert "prim::Constant[value={8}]" in str(entry.compiled.graph)

    checked = []
    real, predict = torchscript.planned_as_is, torchscript.canonicalized_scalars

    def spy(module, graph):
        checked.append(real(module, graph))
        return checked[-1]

    monkeypatch.setattr(torchscript, "canonicalized_scalars", lambda graph: False)
    monkeypatch.setattr(torchscript, "planned_as_is", spy)
    again = jitfreeze(_scale, cache_dir=cache_dir)
    assert_same(again(x), _scale(x))
    assert checked == [False]
    entry = again.signatures()[0]
    assert entry.source == "index" and not isinstance(entry.compiled, torch._C.ScriptMethod)
    assert_same(again(x), _scale(x))

    monkeypatch.setattr(torchscript, "canonicalized_scalars", predict)
    off = jitfreeze(_relu_scale, cache_dir=cache_dir)       # the caller runs unoptimized: no plan made
    with torch.jit.optimized_execution(False):
        assert_same(off(x), _relu_scale(x))
    assert not isinstance(off.signatures()[0].compiled, torch._C.ScriptMethod)
    assert_same(off(x), _relu_scale(x))


def test_the_hot_path_checks_every_call(cache_dir, no_jf_warnings):
    """After a tensors-only signature has been served, the next calls are checked in C++
    (TensorGuards) first: any other shape, dtype, strides, requires_grad, grad mode, autocast or
    training flag goes to the full path and gets the right answer; hits are counted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).eval()
    fast = jitfreeze(model, cache_dir=cache_dir)
    x = torch.randn(4, 8)
    with torch.no_grad():
        ref = model(x)
        for _ in range(3):
            assert_same(fast(x), ref)
        assert fast.cache_info().hits == 2
        for other in [torch.randn(5, 8), torch.randn(8, 4).t(), x.clone().requires_grad_()]:
            assert_same(fast(other), model(other))
            assert_same(fast(x), ref)
        # another shape and other strides compiled (they were not taken for x's signature);
        # requires_grad under no_grad is x's signature again
        assert fast.cache_info().compiles == 3 and fast.cache_info().hits == 2 + 4
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(JitFreezeWarning, match="autocast"):
            auto = fast(x)
        assert auto.dtype == torch.bfloat16
        model.train()
        with pytest.warns(JitFreezeWarning):
            trained = fast(x)
        assert not torch.equal(trained, ref)         # dropout ran: the eager module in training mode
        model.eval()
        assert_same(fast(x), ref)
    with pytest.warns(JitFreezeWarning, match="while grad is enabled"):
        out = fast(x)                                # grad mode: weights require grad -> eager, with grad
    assert out.requires_grad
    with torch.no_grad():
        assert_same(fast(x), ref)
        hits = fast.cache_info().hits
        fast(x)
        assert fast.cache_info().hits == hits + 1
        fast.cache_clear()
        assert fast.signatures() == []
        assert_same(fast(x), ref)
    double = jitfreeze(lambda t: t * 3.0 - 1.0, cache_dir=cache_dir)
    for t in [x, x, x, x.double(), x, x.half(), x.double()]:
        out = double(t)
        assert out.dtype == t.dtype and torch.equal(out, t * 3.0 - 1.0)
    assert double.cache_info().compiles == 3


def _in_place_cases():
    lin = nn.Linear(6, 6).eval()
    return [
        # (function, ops turned in place)
        (lambda x: torch.relu(x) * 2.0 + 1.0, 2),
        (lambda x: (torch.relu(x) * x - x) / 4.0, 3),
        (lambda x: lin(x) * 0.5, 1),
        (lambda x: x * 2.0, 0),                                      # the input itself: never
        (lambda x: nn.functional.dropout(x, 0.5, False) * 2.0, 0),   # eval dropout returns its input
        (lambda x: (torch.relu(x) * 2.0, torch.relu(x)), 1),         # the second relu is another tensor
        (lambda x: torch.relu(x).t() * 2.0, 0),                      # a view of it
        (lambda x: torch.relu(x) * x.sum(), 1),                      # a 0-dim tensor operand
        (lambda x: torch.relu(x[:1]) + x, 0),                        # broadcast: another shape
        (lambda x: torch.relu(x).double() * 2.0, 0),
        (lambda x: [y := torch.relu(x), y * 2.0, y], 0),             # used twice
        (lambda x: lin.weight * 2.0, 0),                             # a weight
    ]


@pytest.mark.parametrize("layout", ["traced", "transposed"])
@pytest.mark.parametrize("case", range(len(_in_place_cases())))
def test_in_place_ops_only_on_tensors_nothing_else_sees(case, layout, cache_dir, no_jf_warnings, monkeypatch):
    """``relu(x) * 2.0`` -> ``relu(x).mul_(c)``: only on a tensor the graph just made and uses
    nowhere else, same dtype, shape and strides; inputs, weights and other outputs are never
    written. Results are eager's bit for bit, except where the stored linear layout is the
    transposed one (``matmul`` + ``add`` instead of ``addmm``: another summation order), which is
    within the verification tolerance (``pipeline.outputs_match``) -- the README's contract."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from jitfreeze.trace.pipeline import _hoist_scalars, _in_place, outputs_match

    force_linear_layout(monkeypatch, layout)
    fn, expected = _in_place_cases()[case]
    torch.manual_seed(0)
    x = torch.randn(6, 6)
    with torch.no_grad():
        gm = make_fx(fn, pre_dispatch=True)(x)
        _hoist_scalars(gm)
        assert _in_place(gm) == expected
        has_linear = any(n.target is torch.ops.aten.linear.default for n in gm.graph.nodes)
        fast = jitfreeze(fn, cache_dir=cache_dir)
        keep = x.clone()
        for _ in range(3):
            ref = fn(x)
            out = fast(x)
            assert torch.equal(x, keep)                              # the input is untouched
            kinds = {n.kind() for n in fast.signatures()[0].compiled.graph.nodes()}
            rearranged = "aten::matmul" in kinds and "aten::linear" not in kinds
            assert rearranged == (layout == "transposed" and has_linear)
            outs, refs = pytree.tree_leaves(out), pytree.tree_leaves(ref)
            assert [o.dtype for o in outs] == [r.dtype for r in refs]
            if rearranged:
                assert outputs_match(outs, refs) is None
            else:
                assert all(torch.equal(o, r) for o, r in zip(outs, refs))


def test_in_place_leaves_weights_and_symbolic_sizes_alone(cache_dir, no_jf_warnings):
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU()).eval()
    before = [p.clone() for p in model.parameters()]

    def fn(x):
        return model(x) * 2.0 + model[0].weight.sum()

    fast = jitfreeze(fn, cache_dir=cache_dir, dynamic={0: [0]})
    with torch.no_grad():
        for n in (3, 5, 7):
            x = torch.randn(n, 6)
            torch.testing.assert_close(fast(x), fn(x))     # (the linear layer may be stored transposed)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_real_traces_make_their_metadata_in_one_fake_mode(cache_dir, monkeypatch, no_jf_warnings):
    """A real-tensor make_fx trace's per-value metadata comes from one FakeTensorMode (torch would make
    one per traced value, ~1 ms each): the same graph, no context left afterwards (also after a failed
    trace), and symbolic traces keep their inputs' mode. The recorder (the default) makes none."""
    from contextlib import nullcontext

    from torch._guards import TracingContext
    from torch._subclasses.fake_tensor import FakeTensorMode

    from jitfreeze.trace import libraries as compat
    from jitfreeze.trace.pipeline import trace
    from jitfreeze.trace.signature import call_mode, describe

    from .models import ConvBN

    made = []
    init = FakeTensorMode.__init__

    def counting(self, *args, **kwargs):
        made.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(FakeTensorMode, "__init__", counting)
    model = ConvBN().eval()
    x = torch.randn(2, 3, 8, 8)
    call = describe((x,), {}, call_mode(model))
    made.clear()
    recorded = trace(model, call, [x])
    assert made == [] and TracingContext.try_get() is None
    ours = trace(model, call, [x], recorder=False)
    assert len(made) == 1, f"{len(made)} fake modes for one real trace"
    assert TracingContext.try_get() is None
    metas = {n.meta["val"].fake_mode for n in ours.graph_module.graph.nodes
             if isinstance(n.meta.get("val"), torch.Tensor)}
    assert metas == {made[0]}
    with monkeypatch.context() as m:
        m.setattr(compat, "one_fake_mode", nullcontext)
        made.clear()
        theirs = trace(model, call, [x], recorder=False)
        assert len(made) > 10                    # what it saves: torch makes one per traced value
    assert recorded.graph_module.code == ours.graph_module.code == theirs.graph_module.code
    assert all(torch.equal(a, b) for a, b in zip(ours.real_outputs, theirs.real_outputs))

    def data_dependent(x):
        return x + 1 if x.sum() > 0 else x - 1

    monkeypatch.setenv("JITFREEZE_TRACER", "make_fx")
    with pytest.warns(JitFreezeWarning, match="data-dependent"):
        jitfreeze(data_dependent, cache_dir=cache_dir / "dd")(torch.ones(3))
    assert TracingContext.try_get() is None
    monkeypatch.delenv("JITFREEZE_TRACER")
    # Symbolic traces run without it (their fake mode is the symbolic inputs').
    seen = []
    monkeypatch.setattr(compat, "one_fake_mode", lambda: seen.append(1) or nullcontext())
    fast = jitfreeze(model, cache_dir=cache_dir / "sym", dynamic={0: [0]})
    with torch.no_grad():
        for n in (2, 3):
            x = torch.randn(n, 3, 8, 8)
            assert_same(fast(x), model(x))
    assert seen == [] and fast.cache_info().compiles == 1


@pytest.mark.parametrize("bound", [True, False])
def test_artifacts_carry_the_graph_not_fx_bookkeeping(bound, cache_dir, monkeypatch, no_jf_warnings):
    """Scripting ignores the GraphModule's own attributes (its code text, line map, graph object):
    the artifact holds the forward and the tensors it reads, and nothing else."""
    from jitfreeze.backend.torchscript import TorchScriptBackend
    if bound:
        monkeypatch.setattr(TorchScriptBackend, "BIND_MIN_BYTES", 0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    fast = jitfreeze(model, cache_dir=cache_dir)
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert_same(fast(x), model(x))
    artifact = _stored_artifact(fast)
    for attr in ("_code", "_lineno_map", "_prologue_start", "meta", "_graph", "_tracer_cls"):
        assert not artifact._c.hasattr(attr), attr
    if bound:                      # scripted, not frozen: the module's attributes are all there
        assert artifact._c.hasattr("training") and any("_param_constant" in k for k in artifact.state_dict())
    again = jitfreeze(model, cache_dir=cache_dir)
    with torch.no_grad():
        assert_same(again(x), model(x))
    assert again.cache_info().compiles == 0


def test_in_place_writes_into_intermediates_are_kept(cache_dir, no_jf_warnings):
    """`mask[:, 1] = True` is an in-place op whose result nothing uses: dead code only to a pass that
    cannot see it writes (an overload packet has no schema), so dead code goes before overloads are
    stripped. It used to be dropped, the load-back check caught the disagreement, and the call ran eagerly."""
    def masked(x):
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask[:, 1] = True
        return torch.where(mask, x, -x)

    fast = jitfreeze(masked, cache_dir=cache_dir)
    for _ in range(2):
        x = torch.randn(3, 4)
        assert_same(fast(x), masked(x))
    assert fast.cache_info().compiles == 1
