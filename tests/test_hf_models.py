"""Issue 8: Hugging Face transformers compatibility suite.

Tiny seeded models built from configs (no downloads, ``HF_HUB_OFFLINE=1``): encoders, decoders
(``use_cache=False``, including a state-space one), a vision model and the encoders of two seq2seq
models. Each must compile
once without falling back, return the same ``ModelOutput`` class with the same fields as eager,
give eager's answer for a padded attention mask on the same compiled function, and load from the
persistent cache in a second process. The ``tracing_context`` unit tests at the end need no
transformers.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import threading  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

from jitfreeze import JitFreezeWarning, jitfreeze  # noqa: E402
from jitfreeze.trace import libraries  # noqa: E402

from .conftest import assert_same, run_script  # noqa: E402

VOCAB = 100
BATCH, SEQ = 2, 8

_SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64, max_position_embeddings=64)


def _configs(T):
    """name -> (model factory, input kind). Decoders are called with use_cache=False."""
    return {
        # encoders
        "bert": (lambda: T.BertModel(T.BertConfig(**_SMALL)), "text"),
        "roberta": (lambda: T.RobertaModel(T.RobertaConfig(**_SMALL, pad_token_id=1)), "text"),
        "distilbert": (lambda: T.DistilBertModel(T.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64)), "text"),
        "albert": (lambda: T.AlbertModel(T.AlbertConfig(**_SMALL, embedding_size=16)), "text"),
        "electra": (lambda: T.ElectraForSequenceClassification(T.ElectraConfig(**_SMALL, embedding_size=16)), "text"),
        # decoders
        "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)),
            "decoder"),
        "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**_SMALL, num_key_value_heads=1)), "decoder"),
        "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
            max_position_embeddings=64, word_embed_proj_dim=32)), "decoder"),
        "gpt_neo": (lambda: T.GPTNeoForCausalLM(T.GPTNeoConfig(
            vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]],
            window_size=4, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)), "decoder"),
        # state-space decoder (associative_scan vmaps; see test_vmapped_scan_is_never_baked_in)
        "falcon_mamba": (lambda: T.FalconMambaForCausalLM(T.FalconMambaConfig(
            vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4,
            time_step_rank=4, use_associative_scan=False)), "decoder"),
        "falcon_mamba_scan": (lambda: T.FalconMambaForCausalLM(T.FalconMambaConfig(
            vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4,
            time_step_rank=4, use_associative_scan=True)), "decoder"),
        # seq2seq encoders
        "t5_encoder": (lambda: T.T5EncoderModel(T.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)), "text"),
        "bart_encoder": (lambda: T.BartModel(T.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_position_embeddings=64)).get_encoder(), "text"),
        # vision
        "vit": (lambda: T.ViTModel(T.ViTConfig(
            image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64)), "image"),
    }


ARCHS = ["bert", "roberta", "distilbert", "albert", "electra", "gpt2", "llama", "opt", "gpt_neo",
         "falcon_mamba", "t5_encoder", "bart_encoder", "vit"]


def build(name):
    """The seeded eval-mode model (same weights in every process)."""
    import transformers as T

    factory, _ = _configs(T)[name]
    torch.manual_seed(0)
    return factory().eval()


def kind(name):
    import transformers as T

    return _configs(T)[name][1]


def make_inputs(name, padded=False):
    """Keyword arguments for one call; ``padded``: zeros at the end of some mask rows (same shapes)."""
    g = torch.Generator().manual_seed(1 + int(padded))
    k = kind(name)
    if k == "image":
        return {"pixel_values": torch.randn(BATCH, 3, 32, 32, generator=g)}
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padded:
        mask[0, -1:] = 0
        mask[1, -3:] = 0
    kw = {"input_ids": ids, "attention_mask": mask}
    if k == "decoder":
        kw["use_cache"] = False
    return kw


def max_diff(a, b) -> float:
    return max((float((x - y).abs().max()) for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b))),
               default=0.0)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def hf_cache_dir(tmp_path_factory):
    """One cache directory for the whole run, so one second process can check every architecture
    (session-scoped: a module-scoped one is made anew each time a shuffled order comes back to
    this module, and the second process then found an empty directory)."""
    return tmp_path_factory.mktemp("hf") / "jf"


_COMPILED: set = set()          # (cache directory, architecture) filled in this process


# ----------------------------------------------------------------------------- one process

@pytest.mark.hf
@pytest.mark.parametrize("name", ARCHS)
def test_matches_eager_full_and_padded_mask(name, transformers, hf_cache_dir, no_jf_warnings):
    model = build(name)
    fast = jitfreeze(model, cache_dir=hf_cache_dir)
    full, padded = make_inputs(name), make_inputs(name, padded=True)
    with torch.no_grad():
        out = fast(**full)
        info = fast.cache_info()
        # compiled here, or loaded: the session's directory may already hold it (in a shuffled
        # order the second-process test below can run first and fill it)
        assert (info.compiles + info.loads, info.fallbacks) == (1, 0), info
        ref = model(**full)
        assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
        assert_same(out, ref)

        # Same shapes, other mask values: the same compiled function must give eager's answer,
        # so the mask (and whether it is all ones) was not baked into the graph.
        out_p = fast(**padded)
        ref_p = model(**padded)
        assert_same(out_p, ref_p)
        info = fast.cache_info()
        assert (info.compiles + info.loads, info.fallbacks, info.entries) == (1, 0, 1), info
        assert info.hits >= 1, info
        # The padded call really is different (a baked-in mask would be caught above).
        assert max_diff(ref, ref_p) > 1e-4
    assert not torch.compiler.is_compiling()
    _COMPILED.add((hf_cache_dir, name))


# ----------------------------------------------------------------------------- second process

_SECOND_PROCESS = """
import json, os, sys, warnings
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from jitfreeze import JitFreezeWarning, jitfreeze
from tests.test_hf_models import ARCHS, build, make_inputs, max_diff

warnings.simplefilter("error", JitFreezeWarning)
result = {}
for name in ARCHS:
    model = build(name)
    fast = jitfreeze(model, cache_dir=sys.argv[1])
    with torch.no_grad():
        out = fast(**make_inputs(name))
        ref = model(**make_inputs(name))
        out_p = fast(**make_inputs(name, padded=True))
        ref_p = model(**make_inputs(name, padded=True))
    info = fast.cache_info()
    result[name] = dict(info._asdict(), same_class=type(out) is type(ref),
                        same_fields=list(out.keys()) == list(ref.keys()), traces=fast.traces,
                        diff=max_diff(out, ref), diff_padded=max_diff(out_p, ref_p))
# The same weights and code with another config: the fingerprint covers the config's fields, so
# this misses the index (a trace) instead of serving a graph without the hidden states.
model = build("bert")
model.config.output_hidden_states = True
fast = jitfreeze(model, cache_dir=sys.argv[1])
with torch.no_grad():
    out, ref = fast(**make_inputs("bert")), model(**make_inputs("bert"))
result["config_change"] = dict(traces=fast.traces, fields=list(out.keys()), ref_fields=list(ref.keys()),
                               diff=max_diff(out, ref))
print(json.dumps(result))
"""


@pytest.mark.hf
def test_second_process_loads_every_architecture(transformers, hf_cache_dir, no_jf_warnings):
    with torch.no_grad():
        for name in ARCHS:
            if (hf_cache_dir, name) not in _COMPILED:  # not filled by the test above: fill it first
                fast = jitfreeze(build(name), cache_dir=hf_cache_dir)
                fast(**make_inputs(name))
                assert fast.cache_info().compiles == 1, (name, fast.cache_info())
                _COMPILED.add((hf_cache_dir, name))
    result, _ = run_script(_SECOND_PROCESS, hf_cache_dir, env={"HF_HUB_OFFLINE": "1"}, timeout=600)
    for name in ARCHS:
        r = result[name]
        assert (r["loads"], r["compiles"], r["fallbacks"]) == (1, 0, 0), (name, r)
        assert r["same_class"] and r["same_fields"], (name, r)
        assert r["diff"] < 1e-4 and r["diff_padded"] < 1e-4, (name, r)
    r = result["config_change"]
    assert r["traces"] == 1 and "hidden_states" in r["fields"] and r["fields"] == r["ref_fields"], r
    assert r["diff"] < 1e-4, r


_FINGERPRINTS = """
import json, os
os.environ["HF_HUB_OFFLINE"] = "1"
from jitfreeze.trace.fingerprint import module_fingerprint
from tests.test_hf_models import ARCHS, build
print(json.dumps({name: module_fingerprint(build(name))[0] for name in ARCHS}))
"""


@pytest.mark.hf
def test_fingerprints_are_the_same_in_every_process(transformers, tmp_path):
    # The fingerprint covers the configs' fields: none of them may differ from process to process
    # (transformers' GenerationConfig keeps a salted hash of itself), or warm starts would re-trace.
    first, _ = run_script(_FINGERPRINTS, tmp_path, env={"HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "1"})
    second, _ = run_script(_FINGERPRINTS, tmp_path, env={"HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "2"})
    assert first == second


# ----------------------------------------------------------------------------- what cannot be compiled

@pytest.mark.hf
def test_use_cache_true_falls_back_with_a_hint(transformers, tmp_path):
    model = build("gpt2")
    fast = jitfreeze(model, cache_dir=tmp_path / "jf")
    kw = make_inputs("gpt2")
    kw["use_cache"] = True
    with torch.no_grad():
        with pytest.warns(JitFreezeWarning, match="use_cache=False"):
            out = fast(**kw)
        ref = model(**kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error", JitFreezeWarning)  # warned once per signature
            fast(**kw)
    assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
    torch.testing.assert_close(out.logits, ref.logits)
    info = fast.cache_info()
    assert (info.compiles, info.fallbacks, info.entries) == (0, 1, 0), info


@pytest.mark.hf
def test_vmapped_scan_is_never_baked_in(transformers, tmp_path):
    """FalconMamba with use_associative_scan=True vmaps under is_compiling(); a pre-dispatch trace
    can't record vmap, so the scan's values would be baked in. Falling back is fine, wrong results are not."""
    model = build("falcon_mamba_scan")
    fast = jitfreeze(model, cache_dir=tmp_path / "jf")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", JitFreezeWarning)
        for padded in (False, True):  # other ids and another mask on the second call
            kw = make_inputs("falcon_mamba_scan", padded=padded)
            assert_same(fast(**kw), model(**kw))
    info = fast.cache_info()
    assert info.compiles + info.fallbacks == 1, info


@pytest.mark.hf
@pytest.mark.parametrize("name, unsafe", [("falcon_mamba_scan", True), ("falcon_mamba", False), ("bert", False)])
def test_explain_unsafe_constants(name, unsafe, transformers):
    from torch.fx.experimental.proxy_tensor import make_fx

    model = build(name)
    kw = make_inputs(name)
    names = list(kw)
    tensors = [kw[n] for n in names if isinstance(kw[n], torch.Tensor)]
    consts = {n: v for n, v in kw.items() if not isinstance(v, torch.Tensor)}

    def f(*ts):
        return model(**dict(zip([n for n in names if n not in consts], ts)), **consts)[0]

    with torch.no_grad(), libraries.tracing_context():
        gm = make_fx(f, pre_dispatch=True)(*tensors)
    reason = libraries.explain_unsafe_constants(gm)
    assert (reason is not None) == unsafe, reason
    if unsafe:
        assert "use_associative_scan=False" in reason


@pytest.mark.hf
def test_cache_classes_get_the_use_cache_hint(transformers):
    from transformers.cache_utils import DynamicCache

    hint = libraries.explain_unsupported_output(DynamicCache())
    assert hint is not None and "use_cache=False" in hint


@pytest.mark.hf
def test_model_outputs_are_serializable_pytree_nodes(transformers):
    model = build("bert")
    with torch.no_grad():
        out = model(**make_inputs("bert"))
    assert type(out) in pytree.SUPPORTED_NODES
    leaves, spec = pytree.tree_flatten(out)
    again = pytree.tree_unflatten(leaves, pytree.treespec_loads(pytree.treespec_dumps(spec)))
    assert type(again) is type(out) and list(again.keys()) == list(out.keys())


@pytest.mark.hf
def test_ensure_pytree_output_registers_a_class_defined_during_a_trace(transformers):
    import dataclasses

    from transformers.utils import ModelOutput

    # transformers skips pytree registration while torch.compiler.is_compiling() is True.
    with libraries.tracing_context():
        @dataclasses.dataclass
        class LateOutput(ModelOutput):
            a: torch.Tensor = None
            b: torch.Tensor = None

        out = LateOutput(a=torch.ones(1), b=torch.zeros(2))
    if LateOutput not in pytree.SUPPORTED_NODES:
        assert "pytree" in libraries.explain_unsupported_output(out)
    assert libraries.ensure_pytree_output(out) is out
    assert LateOutput in pytree.SUPPORTED_NODES
    leaves, spec = pytree.tree_flatten(out)
    again = pytree.tree_unflatten(leaves, pytree.treespec_loads(pytree.treespec_dumps(spec)))
    assert type(again) is LateOutput and list(again.keys()) == ["a", "b"]


# ----------------------------------------------------------------------------- tracing_context (no transformers)

def _flags():
    return torch.compiler.is_compiling(), torch.compiler.is_exporting()


def test_tracing_context_sets_and_restores_flags_even_on_error():
    assert _flags() == (False, False)
    with pytest.raises(KeyError):
        with libraries.tracing_context():
            # is_compiling() only: is_exporting() has process-wide side effects in torch.
            assert _flags() == (True, False) and libraries.in_tracing_context()
            with libraries.tracing_context():
                pass
            assert _flags() == (True, False)  # a nested exit keeps the outer's flag
            raise KeyError("boom")
    assert _flags() == (False, False) and not libraries.in_tracing_context()


def test_tracing_context_is_reference_counted_across_threads():
    entered, release = threading.Event(), threading.Event()
    seen = []

    def first():
        with libraries.tracing_context():
            entered.set()
            release.wait(10)
            seen.append(("first, after second left", _flags()))

    def second():
        entered.wait(10)
        with libraries.tracing_context():
            seen.append(("second inside", libraries.in_tracing_context()))
        seen.append(("second left", libraries.in_tracing_context(), _flags()))
        release.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert ("second inside", True) in seen
    assert ("second left", False, (True, False)) in seen        # the other thread is still tracing
    assert ("first, after second left", (True, False)) in seen
    assert _flags() == (False, False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_flags_are_not_visible_to_torchscript():
    def f(x):
        if torch.compiler.is_compiling():
            return x + 1
        return x

    f = torch.jit.script(f)

    with libraries.tracing_context():
        assert torch.equal(f(torch.zeros(1)), torch.zeros(1))


def test_explain_unsupported_output_is_none_for_ordinary_values():
    assert libraries.explain_unsupported_output(torch.ones(1)) is None
    assert libraries.explain_unsupported_output((1, "a", None)) is None
    assert libraries.explain_unsupported_output(object()) is None


@pytest.mark.parametrize("tune", ["1", "0"])
def test_a_variant_that_does_not_run_is_skipped(transformers, tmp_path, monkeypatch, no_jf_warnings, tune):
    """EfficientNet's graph after ``optimize_for_inference`` fails to run ("Schema not found for
    node" on an MKLDNN group): the compile skips that variant for one that runs, with or without
    the timing, and a later load applies the recorded one (before: the RuntimeError reached the caller)."""
    monkeypatch.setenv("JITFREEZE_TUNE", tune)
    T = transformers
    torch.manual_seed(0)
    model = T.EfficientNetModel(T.EfficientNetConfig(image_size=64, width_coefficient=0.25, depth_coefficient=0.25,
                                                     hidden_dim=320)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x).last_hidden_state
        fast = jitfreeze(model, cache_dir=tmp_path / "jf")
        assert torch.allclose(fast(x).last_hidden_state, ref, atol=1e-4, rtol=1e-4)
        again = jitfreeze(model, cache_dir=tmp_path / "jf")
        assert torch.allclose(again(x).last_hidden_state, ref, atol=1e-4, rtol=1e-4)
    assert fast.cache_info().compiles == 1 and again.cache_info().loads == 1
