"""A model zoo: real transformers architectures at their real sizes, timed start-up to steady state.

    python -m benchmarks.zoo                        # every architecture, batch 1 and 8, 3 runs
    python -m benchmarks.zoo --quick                # 3 small real models, batch 1, 1 run
    python -m benchmarks.zoo --models vit bert --batches 1 --systems eager,jitfreeze --repeat 1
    python -m benchmarks.zoo --size tiny --models bert vit --systems eager,jitfreeze   # harness check
    python -m benchmarks.zoo --varbatch --models bert --varbatch-max 16   # batches 1..16, two processes
    python -m benchmarks.zoo --quick --backend torchscript,aoti      # jitfreeze's two backends side by side

Models are built in code from transformers' configs (``XxxConfig()`` defaults where they are the
real checkpoint's size, the checkpoint's figures where they are not: ``ZOO`` names the checkpoint
each one matches), seeded, random weights, no hub access (``HF_HUB_OFFLINE=1``); ``--size tiny``
builds the same architectures small (the smoke test's size). Every model is called with keyword
arguments through ``Keywords`` (the harness's systems call ``fn(*tensors)``), which returns the
output as a tuple (``torch.jit.trace`` takes no ``ModelOutput``); decoders get ``use_cache=False``.

The figures come from ``benchmarks.run``'s machinery: a zoo model is the benchmark model
``zoo:ARCH:SIZE:BATCH`` (``benchmarks.models`` asks this module to build it), and
``run.run_all`` runs its cold, warm and steady cases, each start-up figure in a fresh
``benchmarks.worker`` process, the systems taking turns. ``--varbatch`` runs
``benchmarks.worker``'s variable-batch case twice per model on one jitfreeze cache: batch sizes
1..N in a first fresh process, then the same in a second fresh process reading what the first
stored (the target: no compile and nothing run eagerly in the second).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "zoo"


@dataclasses.dataclass(frozen=True)
class Arch:
    cls: str                  # transformers class (a dotted path below transformers.models for inner classes)
    config: str               # its config class
    checkpoint: str           # the real model the "base" size matches
    kind: str                 # input kind, see INPUTS
    real: dict                # config arguments over XxxConfig()'s defaults for the checkpoint's size
    tiny: dict                # config arguments of the tiny size
    image: int = 224          # image side (real size)
    small: bool = False       # in --quick


_TEXT_TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64)
_VISION_TINY = dict(image_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
_CONV_TINY = dict(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1])
_T5_TINY = dict(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)

ZOO: dict[str, Arch] = {
    # vision, 224x224 images
    "vit": Arch("ViTModel", "ViTConfig", "google/vit-base-patch16-224", "image", {}, dict(_VISION_TINY, patch_size=8)),
    "deit": Arch("DeiTModel", "DeiTConfig", "facebook/deit-base-distilled-patch16-224", "image", {},
                 dict(_VISION_TINY, patch_size=8)),
    "dinov2": Arch("Dinov2Model", "Dinov2Config", "facebook/dinov2-base (at 224)", "image", dict(patch_size=14),
                   dict(_VISION_TINY, patch_size=8)),
    "swin": Arch("SwinModel", "SwinConfig", "microsoft/swin-tiny-patch4-window7-224", "image", {},
                 dict(image_size=64, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)),
    "convnext": Arch("ConvNextModel", "ConvNextConfig", "facebook/convnext-tiny-224", "image", {},
                     dict(image_size=64, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1])),
    "resnet": Arch("ResNetModel", "ResNetConfig", "microsoft/resnet-50", "image", {}, _CONV_TINY, small=True),
    "regnet": Arch("RegNetModel", "RegNetConfig", "facebook/regnet-y-040", "image", {},
                   dict(_CONV_TINY, groups_width=8)),
    "efficientnet": Arch("EfficientNetModel", "EfficientNetConfig", "google/efficientnet-b0", "image",
                         dict(image_size=224, width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280,
                              dropout_rate=0.2),
                         dict(image_size=64, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320)),
    "mobilenet_v2": Arch("MobileNetV2Model", "MobileNetV2Config", "google/mobilenet_v2_1.0_224", "image", {},
                         dict(image_size=64, depth_multiplier=0.25), small=True),
    "mobilevit": Arch("MobileViTModel", "MobileViTConfig", "apple/mobilevit-small (at 256, its resolution)",
                      "image", {}, dict(image_size=64, hidden_sizes=[16, 16, 16],
                                        neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32]), image=256),
    "levit": Arch("LevitModel", "LevitConfig", "facebook/levit-128S", "image", {},
                  dict(image_size=64, hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3], depths=[1, 1, 1],
                       key_dim=[8, 8, 8])),
    # text encoders, 128 tokens
    "bert": Arch("BertModel", "BertConfig", "bert-base-uncased", "text", {}, _TEXT_TINY),
    "roberta": Arch("RobertaModel", "RobertaConfig", "roberta-base", "text", dict(max_position_embeddings=514),
                    dict(_TEXT_TINY, pad_token_id=1)),
    "distilbert": Arch("DistilBertModel", "DistilBertConfig", "distilbert-base-uncased", "text", {},
                       dict(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64),
                       small=True),
    "albert": Arch("AlbertModel", "AlbertConfig", "albert-base-v2", "text",
                   dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072),
                   dict(_TEXT_TINY, embedding_size=16)),
    "electra": Arch("ElectraModel", "ElectraConfig", "google/electra-small-discriminator", "text", {},
                    dict(_TEXT_TINY, embedding_size=16)),
    "t5_encoder": Arch("T5EncoderModel", "T5Config", "t5-small (encoder)", "text", {}, _T5_TINY),
    # decoders and encoder-decoders, 128 tokens, use_cache=False
    "gpt2": Arch("GPT2LMHeadModel", "GPT2Config", "gpt2 (124M)", "decoder", {},
                 dict(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)),
    "opt": Arch("OPTForCausalLM", "OPTConfig", "facebook/opt-125m", "decoder", {},
                dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                     max_position_embeddings=64, word_embed_proj_dim=32)),
    "llama": Arch("LlamaForCausalLM", "LlamaConfig", "HuggingFaceTB/SmolLM-135M (Llama architecture)", "decoder",
                  dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       tie_word_embeddings=True, rope_theta=10000.0),
                  dict(_TEXT_TINY, num_key_value_heads=1)),
    "t5": Arch("T5ForConditionalGeneration", "T5Config", "t5-small (full forward, 128 decoder tokens)", "seq2seq",
               {}, _T5_TINY),
    # audio
    "wav2vec2": Arch("Wav2Vec2Model", "Wav2Vec2Config", "facebook/wav2vec2-base (2 s at 16 kHz)", "wave", {},
                     dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          conv_dim=[16, 16], conv_stride=[5, 4], conv_kernel=[10, 4], num_conv_pos_embeddings=8,
                          num_conv_pos_embedding_groups=2)),
    "whisper_encoder": Arch("whisper.modeling_whisper.WhisperEncoder", "WhisperConfig",
                            "openai/whisper-base (encoder; 30 s of log-mel frames, the window any clip is padded to)",
                            "mel", dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                                        decoder_layers=6, decoder_attention_heads=8, decoder_ffn_dim=2048),
                            dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                                 num_mel_bins=8, max_source_positions=16, vocab_size=100)),
}

SIZES = {   # batches: batch 1 and a serving batch
    "base": dict(batches=(1, 8), tokens=128, audio_s=2.0),
    "tiny": dict(batches=(1, 2), tokens=8, audio_s=0.1, image=64),
}
QUICK = [name for name, a in ZOO.items() if a.small]

# input kind -> the keyword arguments' names, and fixed keyword arguments
INPUTS = {
    "image": (("pixel_values",), {}),
    "text": (("input_ids", "attention_mask"), {}),
    "decoder": (("input_ids", "attention_mask"), {"use_cache": False}),
    "seq2seq": (("input_ids", "attention_mask", "decoder_input_ids"), {"use_cache": False}),
    "wave": (("input_values",), {}),
    "mel": (("input_features",), {}),
}


class Keywords(torch.nn.Module):
    """Calls ``model`` with keyword arguments ``names`` bound to its positional tensors (the
    harness's systems call ``fn(*tensors)``) and the fixed ones, and returns its output as a tuple
    (``torch.jit.trace`` takes no ``ModelOutput``; ``return_dict=False`` in the config breaks
    several transformers 5 models). It computes nothing itself."""

    def __init__(self, model, names, fixed):
        super().__init__()
        self.model, self.names, self.fixed = model, tuple(names), dict(fixed)

    def forward(self, *tensors):
        return self.model(**dict(zip(self.names, tensors)), **self.fixed).to_tuple()


def model_name(arch: str, size: str, batch: int | None = None) -> str:
    """The benchmark model's name (``benchmarks.models.build`` resolves it here)."""
    return f"{PREFIX}:{arch}:{size}" + ("" if batch is None else f":{batch}")


def _parse(name: str):
    parts = name.split(":")
    if parts[0] != PREFIX or len(parts) not in (3, 4) or parts[1] not in ZOO or parts[2] not in SIZES:
        raise KeyError(f"not a zoo model: {name!r} (zoo:ARCH:SIZE[:BATCH], ARCH in {sorted(ZOO)})")
    return parts[1], parts[2], int(parts[3]) if len(parts) == 4 else None


def make_config(arch: str, size: str):
    import transformers as T

    a = ZOO[arch]
    return getattr(T, a.config)(**(a.tiny if size == "tiny" else a.real))


def _model_class(arch: str):
    import importlib

    import transformers as T

    path = ZOO[arch].cls
    if "." not in path:
        return getattr(T, path)
    module, _, cls = path.rpartition(".")
    return getattr(importlib.import_module(f"transformers.models.{module}"), cls)


def build_module(arch: str, size: str) -> Keywords:
    """The model with random (seeded by the caller) weights, wrapped to take positional tensors."""
    model = _model_class(arch)(make_config(arch, size)).eval()
    names, fixed = INPUTS[ZOO[arch].kind]
    return Keywords(model, names, fixed)


def make_inputs(arch: str, size: str, config, batch: int, g: torch.Generator) -> tuple:
    """The positional tensors of one call (``INPUTS[kind]``'s names, in order)."""
    z, kind = SIZES[size], ZOO[arch].kind
    if kind == "image":
        side = z.get("image", ZOO[arch].image)
        return (torch.randn(batch, 3, side, side, generator=g),)
    if kind == "wave":
        return (torch.randn(batch, int(16000 * z["audio_s"]), generator=g),)
    if kind == "mel":        # Whisper's encoder takes exactly 2 x max_source_positions frames (30 s)
        return (torch.randn(batch, config.num_mel_bins, 2 * config.max_source_positions, generator=g),)
    ids = torch.randint(3, config.vocab_size, (batch, z["tokens"]), generator=g)
    mask = torch.ones(batch, z["tokens"], dtype=torch.long)
    return (ids, mask, ids.clone()) if kind == "seq2seq" else (ids, mask)


def build(name: str):
    """``benchmarks.models.build``'s builder for ``zoo:ARCH:SIZE:BATCH``: (module, inputs)."""
    arch, size, batch = _parse(name)
    module = build_module(arch, size)
    return module, make_inputs(arch, size, module.model.config, batch, torch.Generator().manual_seed(1))


def build_varbatch(name: str):
    """``benchmarks.models.build_varbatch``'s builder for ``zoo:ARCH:SIZE``: (module, make(batch, generator))."""
    arch, size, _ = _parse(name)
    module = build_module(arch, size)
    return module, lambda b, g: make_inputs(arch, size, module.model.config, b, g)


def params(arch: str, size: str) -> int:
    """Parameter count, from a model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = _model_class(arch)(make_config(arch, size))
    return sum(p.numel() for p in model.parameters())


# -- running ----------------------------------------------------------------------------------

# --systems names -> the harness's systems; the limit comes with jitfreeze.
USER_SYSTEMS = {"eager": ("eager",), "trace": ("trace",), "compile": ("compile",), "jitfreeze": ("jitfreeze", "limit")}
CASES = ["cold", "warm", "steady"]


def run_zoo(names, systems, repeat, budget, timeout, tmp_root, log, progress=print):
    from . import run

    return run.run_all(names, CASES, set(systems), repeat, budget, timeout, tmp_root, log=log, progress=progress)


def run_varbatch(archs, size, max_batch, timeout, tmp_root, log, progress=print):
    """Per model, batch sizes 1..max_batch in a first fresh process, then in a second fresh
    process on the same jitfreeze cache (empty before the first)."""
    from . import run

    run.VARBATCH_MAX = max_batch
    records = []
    for arch in archs:
        name = model_name(arch, size)
        d = Path(tempfile.mkdtemp(prefix=f"zoo-varbatch-{arch}-", dir=tmp_root))
        try:
            for process in ("first", "second"):
                r = run.run_worker("varbatch", "jitfreeze", name, d / "jf", d / "inductor", 0.0, timeout, log)
                r.update(rep=0, process=process)
                records.append(r)
                progress(f"{process} process: " + run._line(0, 1, r))
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return records


# -- summarizing ------------------------------------------------------------------------------

def _geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarize(records, names) -> dict:
    """Per model (zoo:ARCH:SIZE:BATCH): the medians of every figure and the ratios; plus geometric means."""
    from . import run

    summary = run.aggregate([r for r in records if r.get("case") in CASES])
    get = lambda case, m, s, metric="first_s": run._get(summary, case, m, s, metric)  # noqa: E731
    rows = {}
    for m in names:
        ok = [r for r in records if r.get("model") == m and r.get("ok")]
        jf = [r for r in ok if r.get("system") == "jitfreeze" and r.get("cache_info")]
        cold = [r for r in jf if r["case"] == "cold"]
        reasons = sorted({t for r in jf for t in r.get("fallback_reasons", [])})
        steady = {s: get("steady", m, s, "per_call_s") for s in ("eager", "trace", "compile", "jitfreeze")}
        row = {
            "compiled": bool(cold) and all(r["cache_info"]["compiles"] >= 1 and not r["cache_info"]["fallbacks"]
                                           for r in cold),
            "loaded_warm": all(r["cache_info"]["loads"] >= 1 and not r["cache_info"]["compiles"]
                               for r in jf if r["case"] == "warm") if any(r["case"] == "warm" for r in jf) else None,
            "fallback_reasons": reasons,
            "max_abs_diff": max((r["max_abs_diff"] for r in ok if r.get("system") == "jitfreeze"
                                 and r.get("max_abs_diff") is not None), default=None),
            "max_rel_diff": max((r["max_rel_diff"] for r in ok if r.get("system") == "jitfreeze"
                                 and r.get("max_rel_diff") is not None), default=None),
            "diffs": {r["system"]: [r["max_abs_diff"], r["max_rel_diff"]] for r in ok     # every system's, vs eager
                      if r["case"] == "steady" and r.get("max_abs_diff") is not None},
            "first": {"eager": get("warm", m, "eager"), "jitfreeze_cold": get("cold", m, "jitfreeze"),
                      "jitfreeze_warm": get("warm", m, "jitfreeze"), "limit": get("warm", m, "limit"),
                      "compile_cold": get("cold", m, "compile"), "compile_warm": get("warm", m, "compile")},
            "steady": steady,
            "rss_mb": {f"{case} {s}": get(case, m, s, "rss_mb") for case in ("cold", "warm", "steady")
                       for s in ("eager", "jitfreeze", "compile", "limit") if get(case, m, s, "rss_mb")},
            "errors": [f"{r['case']} {r['system']} (run {r.get('rep', 0) + 1}): {r.get('error')}"
                       for r in records if r.get("model") == m and not r.get("ok")],
        }
        f = row["first"]
        aoti = {"cold": get("cold", m, "jitfreeze-aoti"), "warm": get("warm", m, "jitfreeze-aoti"),
                "steady": get("steady", m, "jitfreeze-aoti", "per_call_s"),
                "rss_mb": get("warm", m, "jitfreeze-aoti", "rss_mb")}
        if any(v is not None for v in aoti.values()):
            row["aoti"] = aoti
            row["aoti_ratios"] = {"steady_aoti_ts": run._ratio(aoti["steady"], steady["jitfreeze"]),
                                  "steady_aoti_compile": run._ratio(aoti["steady"], steady["compile"]),
                                  "warm_aoti_compile": run._ratio(aoti["warm"], f["compile_warm"]),
                                  "warm_aoti_ts": run._ratio(aoti["warm"], f["jitfreeze_warm"])}
        row["ratios"] = {"steady_jf_eager": run._ratio(steady["jitfreeze"], steady["eager"]),
                         "steady_jf_compile": run._ratio(steady["jitfreeze"], steady["compile"]),
                         "warm_jf_limit": run._ratio(f["jitfreeze_warm"], f["limit"]),
                         "warm_jf_compile": run._ratio(f["jitfreeze_warm"], f["compile_warm"]),
                         "cold_jf_compile": run._ratio(f["jitfreeze_cold"], f["compile_cold"])}
        rows[m] = row
    geo = {k: _geomean([row["ratios"][k] for row in rows.values()]) for k in
           ("steady_jf_eager", "steady_jf_compile", "warm_jf_limit", "warm_jf_compile", "cold_jf_compile")}
    with_aoti = [row for row in rows.values() if "aoti_ratios" in row]
    if with_aoti:
        geo.update({k: _geomean([row["aoti_ratios"][k] for row in with_aoti]) for k in
                    ("steady_aoti_ts", "steady_aoti_compile", "warm_aoti_compile", "warm_aoti_ts")})
    return {"models": rows, "geomean": geo}


def summarize_varbatch(records) -> list[dict]:
    out = []
    for r in records:
        row = {"model": r["model"], "process": r["process"], "ok": r.get("ok", False), "error": r.get("error")}
        if r.get("ok"):
            ci = r["cache_info"]
            row.update(sizes=r["sizes"], compiles=ci["compiles"], loads=ci["loads"], hits=ci["hits"],
                       fallbacks=ci["fallbacks"], entries=ci["entries"], signatures=r.get("signatures"),
                       warnings=r.get("warnings", []), all_close=r["all_close"], loop_s=r["loop_s"],
                       eager_loop_s=r["eager_loop_s"], artifacts=r.get("artifacts"), rss_mb=r["rss_mb"])
            if r["process"] == "second":
                row["pass"] = ci["compiles"] == 0 and ci["fallbacks"] == 0 and r["all_close"]
        out.append(row)
    return out


# -- output -----------------------------------------------------------------------------------

def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _md(text: str) -> str:
    return " ".join(str(text).replace("|", "\\|").split())


def _head(title: str, columns: list[str], intro: str = "") -> list[str]:
    """A section's title, its introduction and the header of its table."""
    return ["", f"## {title}\n"] + ([intro + "\n"] if intro else []) + [
        "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def write_table(path: Path, result: dict) -> str:
    from .run import _x, fmt_time

    meta, machine, info = result["meta"], result["machine"], result["models"]
    L = [f"Measured {meta['date']} on {machine['cpu']}, {machine['logical_cpus']} logical CPUs (torch threads: "
         f"{', '.join(map(str, machine['torch_threads'])) or '?'}); Python {machine['python']}, torch "
         f"{machine['torch']}, transformers {machine.get('transformers')}, jitfreeze {machine['jitfreeze']}. "
         f"Size {meta['size']}; "
         + (f"{meta['repeat']} run(s) per figure, each start-up figure in a fresh process; median. "
            if result.get("summary") else "")
         + f"Whole run {meta['wall_s'] / 60:.1f} min; load average at start {meta['loadavg_start']}, at end "
         f"{meta['loadavg_end']}."]
    summary = result.get("summary")
    if summary:
        rows = summary["models"]
        L += _head("Start-up", ["model", "batch", "params", "jitfreeze", "max abs / rel diff", "eager", "jf cold",
                                "jf warm", "limit", "compile cold", "compile warm", "warm jf / limit",
                                "warm jf / compile", "cold jf / compile"],
                   "First calls, each in a fresh process: eager; jitfreeze cold (empty cache) and warm (the cache a "
                   "cold process filled); the limit (`torch.jit.load` of the same artifact + post-load passes + "
                   "first call); torch.compile cold (fresh inductor cache) and warm (filled).")
        for m, row in rows.items():
            arch, _, batch = _parse(m)
            if row["compiled"]:
                what = "compiled" + ("" if row["loaded_warm"] in (None, True) else " (**not loaded warm**)")
            elif row["fallback_reasons"]:
                what = "fallback (" + _md("; ".join(row["fallback_reasons"])) + ")"
            elif row["errors"]:
                what = "failed (" + _md("; ".join(row["errors"]))[:300] + ")"
            else:
                what = "n/a"
            diff = (f"{row['max_abs_diff']:.2g} / {row['max_rel_diff']:.2g}"
                    if row["max_abs_diff"] is not None else "n/a")
            f, x = row["first"], row["ratios"]
            L.append(f"| {arch} | {batch} | {_params(info[arch]['params'])} | {what} | {diff} | "
                     + " | ".join(fmt_time(f[k]) for k in ("eager", "jitfreeze_cold", "jitfreeze_warm", "limit",
                                                          "compile_cold", "compile_warm"))
                     + f" | {_x(x['warm_jf_limit'])} | {_x(x['warm_jf_compile'])} | {_x(x['cold_jf_compile'])} |")
        L += _head("Steady state and memory", ["model", "batch", "eager", "jit.trace+freeze+ofi", "torch.compile",
                                               "jitfreeze", "jf / eager", "jf / torch.compile", "peak RSS (MB)"],
                   "Per call, all systems taking turns in one process; peak RSS (`ru_maxrss`) of each fresh process.")
        for m, row in rows.items():
            arch, _, batch = _parse(m)
            s, x = row["steady"], row["ratios"]
            rss = ", ".join(f"{k} {v:.0f}" for k, v in row["rss_mb"].items()) or "n/a"
            L.append(f"| {arch} | {batch} | " + " | ".join(fmt_time(s[k]) for k in ("eager", "trace", "compile",
                                                                                   "jitfreeze"))
                     + f" | {_x(x['steady_jf_eager'])} | {_x(x['steady_jf_compile'])} | {rss} |")
        g = summary["geomean"]
        L += ["", "Geometric means over the rows: " + ", ".join(
            f"{label} {_x(g[k])}" for k, label in (("steady_jf_eager", "steady jf / eager"),
                                                  ("steady_jf_compile", "steady jf / torch.compile"),
                                                  ("warm_jf_limit", "warm jf / limit"),
                                                  ("warm_jf_compile", "warm jf / torch.compile"),
                                                  ("cold_jf_compile", "cold jf / torch.compile"))) + "."]
        if any("aoti" in row for row in rows.values()):
            L += _head("Backends side by side: jitfreeze with backend='aoti' (issue 24)",
                       ["model", "batch", "aoti cold", "aoti warm", "torchscript warm", "torch.compile warm",
                        "aoti steady", "torchscript steady", "torch.compile steady", "aoti / torchscript",
                        "aoti / torch.compile", "warm aoti / torch.compile", "aoti warm peak RSS (MB)"],
                       "The same runs: cold and warm first calls each in a fresh process, steady per call with "
                       "every system taking turns in one process.")
            for m, row in rows.items():
                if "aoti" not in row:
                    continue
                arch, _, batch = _parse(m)
                a, r, f, s = row["aoti"], row["aoti_ratios"], row["first"], row["steady"]
                rss = f"{a['rss_mb']:.0f}" if a["rss_mb"] is not None else "n/a"
                L.append(f"| {arch} | {batch} | " + " | ".join(fmt_time(v) for v in (
                    a["cold"], a["warm"], f["jitfreeze_warm"], f["compile_warm"], a["steady"], s["jitfreeze"],
                    s["compile"])) + f" | {_x(r['steady_aoti_ts'])} | {_x(r['steady_aoti_compile'])} | "
                    f"{_x(r['warm_aoti_compile'])} | {rss} |")
            L += ["", "Geometric means: " + ", ".join(
                f"{label} {_x(g.get(k))}" for k, label in (("steady_aoti_ts", "steady aoti / torchscript"),
                                                          ("steady_aoti_compile", "steady aoti / torch.compile"),
                                                          ("warm_aoti_compile", "warm aoti / torch.compile"),
                                                          ("warm_aoti_ts", "warm aoti / torchscript"))) + "."]
        errors = [f"{m}: {e}" for m, row in rows.items() for e in row["errors"]]
        if errors:
            L += ["", "### Failures\n"] + [f"- {_md(e)[:500]}" for e in errors]
    if result.get("varbatch"):
        L += _head(f"Variable batch sizes 1..{meta['varbatch_max']}, two fresh processes on one jitfreeze cache",
                   ["model", "process", "compiles", "loads", "hits", "signatures", "fallbacks (eager)", "warnings",
                    "allclose to eager", "loop", "eager loop", "target (second: 0 compiles, no eager)"])
        for v in result["varbatch"]:
            arch = _parse(v["model"])[0]
            if not v["ok"]:
                L.append(f"| {arch} | {v['process']} | failed: {_md(v['error'])[:300]} |" + " |" * 9)
                continue
            target = "" if "pass" not in v else ("PASS" if v["pass"] else "**MISS**")
            L.append(f"| {arch} | {v['process']} | {v['compiles']} | {v['loads']} | {v['hits']} | {v['signatures']} "
                     f"| {v['fallbacks']} | {_md('; '.join(v['warnings'])) or 'none'} | {v['all_close']} | "
                     f"{fmt_time(v['loop_s'])} | {fmt_time(v['eager_loop_s'])} | {target} |")
    L += _head("Models", ["model", "class", "matches", "params"])
    for arch, i in info.items():
        L.append(f"| {arch} | {ZOO[arch].cls.rpartition('.')[2]} | {_md(ZOO[arch].checkpoint)} | "
                 f"{_params(i['params'])} |")
    text = "\n".join(L) + "\n"
    path.write_text(text)
    return text


def write_chart(path: Path, summary: dict) -> str | None:
    """Two panels: first calls per model (log scale), and the steady ratio jitfreeze / eager."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or .[bench]): no chart"
    rows = summary["models"]
    labels = [f"{_parse(m)[0]}@{_parse(m)[2]}" for m in rows]
    series = [("eager", "eager"), ("jitfreeze_cold", "jitfreeze cold"), ("jitfreeze_warm", "jitfreeze warm"),
              ("limit", "jit.load limit"), ("compile_cold", "torch.compile cold"),
              ("compile_warm", "torch.compile warm")]
    series = [(k, lab) for k, lab in series if any(r["first"][k] for r in rows.values())]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(8, 0.6 * len(rows) + 3), 8))
    width = 0.8 / max(1, len(series))
    for i, (k, lab) in enumerate(series):
        pts = [(j + (i - (len(series) - 1) / 2) * width, r["first"][k]) for j, r in enumerate(rows.values())
               if r["first"][k]]
        if pts:
            a1.bar(*zip(*pts), width, label=lab)
    a1.set_yscale("log")
    a1.set_title("first call, fresh process (s)", fontsize=10)
    a1.legend(fontsize=7)
    for i, (k, lab) in enumerate((("steady_jf_eager", "jitfreeze / eager"),
                                  ("steady_jf_compile", "jitfreeze / torch.compile"))):
        pts = [(j + (i - 0.5) * 0.4, r["ratios"][k]) for j, r in enumerate(rows.values()) if r["ratios"][k]]
        if pts:
            a2.bar(*zip(*pts), 0.4, label=lab)
    a2.axhline(1.0, color="gray", linewidth=0.8)
    a2.set_title("steady per call, ratio", fontsize=10)
    a2.legend(fontsize=7)
    for ax in (a1, a2):
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -- main -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(ZOO), help="default: all (--quick: " + ", ".join(QUICK) + ")")
    p.add_argument("--quick", action="store_true", help="a few small real models, batch 1, 1 run, short budgets")
    p.add_argument("--size", choices=list(SIZES), default="base", help="base: real sizes; tiny: the smoke test's")
    p.add_argument("--batches", nargs="+", type=int, help="batch sizes (default: 1 and 8; tiny: 1 and 2; quick: 1)")
    p.add_argument("--systems", default="eager,trace,compile,jitfreeze",
                   help="comma-separated, of " + ",".join(USER_SYSTEMS) + " (jitfreeze brings its load limit)")
    p.add_argument("--backend", default="torchscript",
                   help="jitfreeze backends, comma-separated: torchscript (the default, always the reference) "
                        "and aoti (jitfreeze with backend='aoti' runs next to it: cold, warm, steady)")
    p.add_argument("--repeat", type=int, help="runs per figure (default 3; 1 with --quick)")
    p.add_argument("--budget", type=float, help="seconds of timed calls per system, steady (default 1; quick 0.3)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
    p.add_argument("--varbatch", action="store_true", help="also the variable-batch measurement (two processes)")
    p.add_argument("--varbatch-only", action="store_true", help="only the variable-batch measurement")
    p.add_argument("--varbatch-max", type=int, default=16, help="batch sizes 1..N (default 16)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS / MKL_NUM_THREADS for every worker")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "zoo")
    args = p.parse_args(argv)

    from . import run

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(USER_SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)} (choose from {list(USER_SYSTEMS)})")
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    if not backends or not set(backends) <= {"torchscript", "aoti"}:
        p.error(f"--backend {args.backend!r}: expected torchscript, aoti or torchscript,aoti")
    archs = args.models or (QUICK if args.quick else list(ZOO))
    batches = args.batches or ([1] if args.quick else list(SIZES[args.size]["batches"]))
    repeat = args.repeat or (1 if args.quick else 3)
    budget = args.budget or (0.3 if args.quick else 1.0)
    run.THREADS = args.threads
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")   # the workers inherit it (run._env)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    run.precompile()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tmp_root = out / "tmp"
    tmp_root.mkdir(exist_ok=True)
    names = [model_name(a, args.size, b) for a in archs for b in batches]
    started = datetime.datetime.now().astimezone()
    load_start = [round(v, 2) for v in os.getloadavg()]
    print(f"zoo: {archs}, size {args.size}, batches {batches}, systems {systems}, {repeat} run(s), out {out}",
          flush=True)
    t0 = time.perf_counter()
    records, varbatch = [], []
    log_path = out / "failures.log"
    with open(log_path, "w") as log:
        if not args.varbatch_only:
            chosen = [s for u in systems for s in USER_SYSTEMS[u]]
            if "aoti" in backends and "jitfreeze" in systems:
                chosen.append("jitfreeze-aoti")
            records = run_zoo(names, chosen, repeat, budget, args.timeout, tmp_root, log,
                              progress=lambda s: print(s, flush=True))
        if args.varbatch or args.varbatch_only:
            varbatch = run_varbatch(archs, args.size, args.varbatch_max, args.timeout, tmp_root, log,
                                    progress=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    shutil.rmtree(tmp_root, ignore_errors=True)
    if log_path.stat().st_size == 0:
        log_path.unlink()
    import importlib.metadata as md

    machine = run.machine_info(records + varbatch)
    machine["transformers"] = md.version("transformers")
    meta = {"date": started.strftime("%Y-%m-%d %H:%M %Z"), "size": args.size, "archs": archs, "batches": batches,
            "systems": systems, "backends": backends, "repeat": repeat, "budget_s": budget, "varbatch_max": args.varbatch_max,
            "wall_s": wall, "loadavg_start": load_start, "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "argv": sys.argv[1:] if argv is None else list(argv)}
    result = {"meta": meta, "machine": machine,
              "models": {a: {"class": ZOO[a].cls, "checkpoint": ZOO[a].checkpoint, "params": params(a, args.size)}
                         for a in archs},
              "summary": summarize(records, names) if records else None,
              "varbatch": summarize_varbatch(varbatch) if varbatch else None,
              "records": records + varbatch}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    table = write_table(out / "table.md", result)
    print()
    print(table)
    if result["summary"]:
        note = write_chart(out / "chart.png", result["summary"])
        print(note or f"wrote {out / 'chart.png'}")
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}; total {wall:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
