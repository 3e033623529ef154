"""Hugging Face transformers rows (issue 8): the architectures of tests/test_hf_models.py, timed.

    python -m benchmarks.hf                    # benchmark configs (hidden 256, 4 layers, 64 tokens), 3 runs
    python -m benchmarks.hf --quick            # the test suite's tiny configs, 1 run, short budgets
    python -m benchmarks.hf --archs bert gpt2 --repeat 5
    python -m benchmarks.run --hf              # the same (--hf-quick for --quick)

Per architecture, each start-up figure in a fresh process (``python -m benchmarks.hf --worker
...``, one JSON line), models built in code from configs (seeded; no downloads,
``HF_HUB_OFFLINE=1``), everything under ``torch.no_grad()``:

* ``cold``: jitfreeze with an empty cache; the first call is timed (wrapping and ``import
  jitfreeze`` included), with every warning recorded: whether it compiled or fell back, and
  the ``JitFreezeWarning`` text when it fell back;
* ``warm``: jitfreeze in a fresh process reading the cache the cold process filled;
* ``limit``: ``torch.jit.load`` of the same stored artifact bytes (read before the timer; bound
  and frozen, for artifacts that bind the module's weights) + ``optimize_for_inference`` + the
  first call: the target's definition;
* ``floor``: ``torch.jit.load`` of the same artifact from a file + the post-load passes jitfreeze
  runs + the first call as jitfreeze makes it: jitfreeze's backend alone;
* ``steady``: eager, jitfreeze (warm cache) and torch.compile in one process, first calls
  untimed, then blocks of calls taking turns (``benchmarks.worker.measure_steady``). Its
  ratios hold up on a busy machine and torch.compile's compile makes it the longest figure:
  it runs in the first ``--steady-runs`` repetitions only (default 1).

Writes ``benchmarks/results/hf_table.md`` and ``hf_results.json`` (``--out`` to change).
Target: warm first call <= 1.3x the limit.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "@@result "

# The architectures of tests/test_hf_models.py (its ARCHS), plus FalconMamba with the
# associative scan, which the tests allow to fall back (it vmaps under is_compiling()).
ARCHS = ["bert", "roberta", "distilbert", "albert", "electra", "gpt2", "llama", "opt", "gpt_neo",
         "falcon_mamba", "t5_encoder", "bart_encoder", "vit", "falcon_mamba_scan"]

# "tiny": the test suite's configs (hidden 32, 2 layers, 2x8 tokens). "bench": larger, for timing.
SIZES = {
    "tiny": dict(vocab=100, hidden=32, layers=2, heads=2, ff=64, emb=16, positions=64, batch=2, seq=8,
                 image=32, patch=8, state=4, window=4),
    "bench": dict(vocab=1000, hidden=256, layers=4, heads=4, ff=1024, emb=128, positions=128, batch=1, seq=64,
                  image=64, patch=8, state=16, window=16),
}

TARGET_WARM_LIMIT = 1.3


def configs(T, z: dict) -> dict:
    """name -> (model factory, input kind); mirrors tests/test_hf_models._configs, sized by ``z``."""
    h, n, heads, ff, v, pos = z["hidden"], z["layers"], z["heads"], z["ff"], z["vocab"], z["positions"]
    small = dict(vocab_size=v, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                 intermediate_size=ff, max_position_embeddings=pos)
    mamba = dict(vocab_size=v, hidden_size=h, state_size=z["state"], num_hidden_layers=n, expand=2, conv_kernel=4,
                 time_step_rank=max(4, h // 16))
    return {
        "bert": (lambda: T.BertModel(T.BertConfig(**small)), "text"),
        "roberta": (lambda: T.RobertaModel(T.RobertaConfig(**small, pad_token_id=1)), "text"),
        "distilbert": (lambda: T.DistilBertModel(T.DistilBertConfig(
            vocab_size=v, dim=h, n_layers=n, n_heads=heads, hidden_dim=ff, max_position_embeddings=pos)), "text"),
        "albert": (lambda: T.AlbertModel(T.AlbertConfig(**small, embedding_size=z["emb"])), "text"),
        "electra": (lambda: T.ElectraForSequenceClassification(T.ElectraConfig(**small, embedding_size=z["emb"])),
                    "text"),
        "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=v, n_embd=h, n_layer=n, n_head=heads, n_positions=pos, bos_token_id=0, eos_token_id=0)),
            "decoder"),
        "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**small, num_key_value_heads=max(1, heads // 2))),
                  "decoder"),
        "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(
            vocab_size=v, hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, ffn_dim=ff,
            max_position_embeddings=pos, word_embed_proj_dim=h)), "decoder"),
        "gpt_neo": (lambda: T.GPTNeoForCausalLM(T.GPTNeoConfig(
            vocab_size=v, hidden_size=h, num_layers=n, num_heads=heads,
            attention_types=[[["global", "local"], n // 2]], window_size=z["window"], max_position_embeddings=pos,
            bos_token_id=0, eos_token_id=0)), "decoder"),
        "falcon_mamba": (lambda: T.FalconMambaForCausalLM(T.FalconMambaConfig(**mamba, use_associative_scan=False)),
                         "decoder"),
        "falcon_mamba_scan": (lambda: T.FalconMambaForCausalLM(T.FalconMambaConfig(
            **mamba, use_associative_scan=True)), "decoder"),
        "t5_encoder": (lambda: T.T5EncoderModel(T.T5Config(
            vocab_size=v, d_model=h, d_kv=h // heads, d_ff=ff, num_layers=n, num_heads=heads)), "text"),
        "bart_encoder": (lambda: T.BartModel(T.BartConfig(
            vocab_size=v, d_model=h, encoder_layers=n, decoder_layers=n, encoder_attention_heads=heads,
            decoder_attention_heads=heads, encoder_ffn_dim=ff, decoder_ffn_dim=ff,
            max_position_embeddings=pos)).get_encoder(), "text"),
        "vit": (lambda: T.ViTModel(T.ViTConfig(
            image_size=z["image"], patch_size=z["patch"], num_channels=3, hidden_size=h, num_hidden_layers=n,
            num_attention_heads=heads, intermediate_size=ff)), "image"),
    }


def build(name: str, size: str):
    """(seeded eval-mode model, keyword arguments of one call)."""
    import torch
    import transformers as T

    z = SIZES[size]
    factory, kind = configs(T, z)[name]
    torch.manual_seed(0)
    model = factory().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    if kind == "image":
        return model, {"pixel_values": torch.randn(z["batch"], 3, z["image"], z["image"], generator=g)}
    kw = {"input_ids": torch.randint(3, z["vocab"], (z["batch"], z["seq"]), generator=g),
          "attention_mask": torch.ones(z["batch"], z["seq"], dtype=torch.long)}
    if kind == "decoder":
        kw["use_cache"] = False
    return model, kw


def max_diff(a, b) -> float | None:
    from .worker import output_diff

    return output_diff(a, b)["max_abs_diff"]


# -- the worker (one figure, this fresh process) ----------------------------------------------

def _rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(args) -> dict:
    t_start = time.perf_counter()
    import torch

    t_import = time.perf_counter() - t_start
    torch.set_grad_enabled(False)
    model, kw = build(args.arch, args.size)
    base = {"case": args.case, "arch": args.arch, "size": args.size, "threads": torch.get_num_threads(),
            "import_s": t_import, "pid": os.getpid()}
    if args.case in ("cold", "warm"):
        gc.collect()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            from jitfreeze import jitfreeze
            fast = jitfreeze(model, cache_dir=args.cache_dir)
            out = fast(**kw)
            first = time.perf_counter() - t0
            for _ in range(3):
                fast(**kw)
        rss = _rss_mb()
        from jitfreeze import JitFreezeWarning
        ref = model(**kw)
        info = fast.cache_info()
        return dict(base, first_s=first, rss_mb=rss, cache_info=info._asdict(), traces=fast.traces,
                    same_class=type(out) is type(ref), diff=max_diff(out, ref),
                    jf_warnings=[str(w.message) for w in caught if issubclass(w.category, JitFreezeWarning)],
                    fallback_reasons=[s.reason for s in fast.signatures() if s.source == "eager"])
    if args.case in ("limit", "floor"):
        from torch.utils import _pytree as pytree

        from jitfreeze.trace import signature

        from jitfreeze.backend.torchscript import TorchScriptBackend

        from jitfreeze.backend import module_weights

        from .systems import InPlaceFile, artifact_file

        info: dict = {}
        path, payload = artifact_file(args.cache_dir, info)   # verified, in a file and in memory before the timer
        weights = module_weights(model)
        call = signature.describe((), kw, signature.call_mode(model))
        leaves = pytree.tree_leaves(((), kw))
        tensors = [leaves[i] for i in call.tensor_idx]
        backend = TorchScriptBackend()
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            if args.case == "limit":     # issue 8's definition: jit.load + optimize_for_inference + call
                run = torch.jit.optimize_for_inference(backend.load_frozen(payload, None, weights))
                run(*tensors)
            else:                        # the same passes as jitfreeze's, its first call
                _, run = backend.first_call(backend.load(InPlaceFile(path), None, weights), tensors)
            first = time.perf_counter() - t0
            for _ in range(3):
                run(*tensors)
        return dict(base, first_s=first, rss_mb=_rss_mb(), **info)
    if args.case == "steady":
        from jitfreeze import jitfreeze

        from .worker import measure_steady

        named, infos = {}, {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name in args.systems.split(","):
                if name == "eager":
                    named[name] = lambda: model(**kw)
                elif name == "jitfreeze":
                    fast = jitfreeze(model, cache_dir=args.cache_dir)
                    fast(**kw)                                   # first call (a load): untimed
                    infos[name] = {"cache_info": fast.cache_info()._asdict()}
                    named[name] = lambda: fast(**kw)
                elif name == "compile":
                    compiled = torch.compile(model)
                    t0 = time.perf_counter()
                    compiled(**kw)                               # compiles: untimed
                    infos[name] = {"compile_first_s": time.perf_counter() - t0}
                    named[name] = lambda: compiled(**kw)
                else:
                    raise SystemExit(f"unknown system {name!r}")
            measured = measure_steady(named, (), args.budget)
        return dict(base, results={n: dict(measured[n], **infos.get(n, {})) for n in named}, rss_mb=_rss_mb())
    raise SystemExit(f"unknown case {args.case!r}")


# -- the driver -------------------------------------------------------------------------------

def _env(threads, inductor_dir: Path, steady: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JITFREEZE_", "TORCHINDUCTOR_"))}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_dir)
    if steady:
        # No compile-worker pool lingering beside the timed calls (see benchmarks.run._env).
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_worker(case, arch, size, cache_dir, inductor_dir, budget, timeout, threads, systems=None, log=None):
    cmd = [sys.executable, "-m", "benchmarks.hf", "--worker", "--case", case, "--archs", arch, "--size", size,
           "--cache-dir", str(cache_dir), "--budget", str(budget)]
    if systems:
        cmd += ["--systems", systems]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(threads, inductor_dir, case == "steady"), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "arch": arch, "ok": False, "error": f"timed out after {timeout:.0f}s",
                "wall_s": time.perf_counter() - t0}
    res = None
    for line in proc.stdout.splitlines():
        if line.startswith(PREFIX):
            res = json.loads(line[len(PREFIX):])
    if res is None:
        res = {"case": case, "arch": arch, "ok": False, "error": f"no result line (exit {proc.returncode})"}
    if not res.get("ok"):
        res["stderr_tail"] = proc.stderr[-3000:]
        if log is not None:
            log.write(f"--- {case} {arch} failed (exit {proc.returncode})\n{proc.stderr}\n")
    res["wall_s"] = time.perf_counter() - t0
    return res


def _line(rep, repeat, r) -> str:
    from .run import fmt_time

    if not r.get("ok"):
        what = "FAILED: " + r.get("error", "?")
    elif r["case"] == "steady":
        what = ", ".join(f"{n} {fmt_time(v['per_call_s'])}" for n, v in r["results"].items()) + " per call"
    else:
        what = f"first call {fmt_time(r['first_s'])}"
        if "cache_info" in r:
            ci = r["cache_info"]
            what += f" (compiles {ci['compiles']}, loads {ci['loads']}, fallbacks {ci['fallbacks']})"
    return f"[{rep + 1}/{repeat}] {r['arch']:<18} {r['case']:<6} {what}  (process {r.get('wall_s', 0):.1f}s)"


def run_all(archs, size, repeat, budget, timeout, threads, systems, tmp_root, log=None, progress=print,
            steady_runs=1):
    records = []
    for rep in range(repeat):
        for arch in archs:
            d = Path(tempfile.mkdtemp(prefix=f"hf-{arch}-r{rep}-", dir=tmp_root))
            try:
                def go(case, **kw):
                    r = run_worker(case, arch, size, d / "jf", d / "inductor", budget, timeout, threads,
                                   log=log, **kw)
                    r["rep"] = rep
                    records.append(r)
                    progress(_line(rep, repeat, r))
                    return r

                cold = go("cold")
                stored = cold.get("ok") and cold["cache_info"]["compiles"] >= 1
                starts = ["warm", "limit", "floor"] if stored else ["warm"]
                for case in (starts if rep % 2 == 0 else starts[::-1]):   # alternate which goes first
                    go(case)
                if rep < steady_runs:
                    go("steady", systems=",".join(systems))
            finally:
                shutil.rmtree(d, ignore_errors=True)
    return records


def _median(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(records, archs) -> dict:
    out = {}
    for arch in archs:
        rs = [r for r in records if r.get("arch") == arch and r.get("ok")]
        s: dict = {}
        for case in ("cold", "warm", "limit", "floor"):
            s[case] = _median([r["first_s"] for r in rs if r["case"] == case])
        s["warm_rss_mb"] = _median([r["rss_mb"] for r in rs if r["case"] == "warm"])
        for name in ("eager", "jitfreeze", "compile"):
            s["steady_" + name] = _median([r["results"][name]["per_call_s"] for r in rs
                                           if r["case"] == "steady" and name in r.get("results", {})])
        colds = [r for r in rs if r["case"] == "cold"]
        warms = [r for r in rs if r["case"] == "warm"]
        # The JitFreezeWarning texts; a recorded fallback reason only when no warning carries it
        # (some fallbacks are logged, not warned).
        warns, reasons = [], []
        for r in colds:
            for text in r.get("jf_warnings", []):
                if text not in warns:
                    warns.append(text)
        for r in colds:
            for text in r.get("fallback_reasons", []):
                if text not in reasons and not any(text in w for w in warns):
                    reasons.append(text)
        compiled = bool(colds) and all(r["cache_info"]["compiles"] >= 1 and not r["cache_info"]["fallbacks"]
                                       for r in colds)
        loaded = bool(warms) and all(r["cache_info"]["loads"] >= 1 and not r["cache_info"]["compiles"]
                                     for r in warms)
        s.update(compiled=compiled, loaded=loaded, reasons=reasons, warnings=warns,
                 diff=max((r["diff"] for r in colds + warms if r.get("diff") is not None), default=None),
                 errors=[f"{r['case']} (run {r['rep'] + 1}): {r.get('error')}" for r in records
                         if r.get("arch") == arch and not r.get("ok")])
        jf, lim = (s["warm"] or {}).get("median"), (s["limit"] or {}).get("median")
        s["warm_limit"] = jf / lim if jf is not None and lim else None
        floor = (s["floor"] or {}).get("median")
        s["warm_floor"] = jf / floor if jf is not None and floor else None
        e, j, c = (s[f"steady_{n}"] and s[f"steady_{n}"]["median"] for n in ("eager", "jitfreeze", "compile"))
        s["jf_eager"] = j / e if j and e else None
        s["jf_compile"] = j / c if j and c else None
        out[arch] = s
    return out


def _md(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def write_table(path: Path, summary, meta, machine) -> str:
    from .run import fmt_time

    def cell(st):
        if not st:
            return "n/a"
        if st["n"] == 1:
            return fmt_time(st["median"])
        return f"{fmt_time(st['median'])} ({fmt_time(st['min'])}–{fmt_time(st['max'])})"

    x = lambda r: "n/a" if r is None else f"{r:.2f}x"  # noqa: E731
    z = SIZES[meta["size"]]
    L = [f"Measured {meta['date']} on {machine['cpu']}, {machine['logical_cpus']} logical CPUs "
         f"(torch threads: {', '.join(map(str, machine['torch_threads'])) or '?'}); Python {machine['python']}, "
         f"torch {machine['torch']}, transformers {machine.get('transformers')}, jitfreeze {machine['jitfreeze']}. "
         f"{meta['repeat']} run(s) per start-up figure, each in a fresh process, {meta['steady_runs']} per steady "
         "figure; median (min–max). "
         f"Whole run: {meta['wall_s'] / 60:.1f} min; load average at start {meta['loadavg_start']}, at end "
         f"{meta['loadavg_end']}.",
         "",
         f"Configs ({meta['size']}): hidden {z['hidden']}, {z['layers']} layers, {z['heads']} heads, FFN {z['ff']}, "
         f"vocabulary {z['vocab']}, inputs {z['batch']}x{z['seq']} tokens (attention mask of ones; decoders "
         f"`use_cache=False`), images {z['batch']}x3x{z['image']}x{z['image']}; seeded, built from configs. "
         "Cold: jitfreeze with an empty cache; warm: a fresh process reading the cache the cold one filled; "
         "limit: `torch.jit.load` of the same artifact bytes + `optimize_for_inference` + the first call (the "
         "target's definition); floor: `torch.jit.load` of the same artifact from a file + the post-load passes "
         "jitfreeze runs + the first call as jitfreeze makes it: what is left over it is jitfreeze's "
         "own import, fingerprint, lookup and verification. "
         "Steady: eager, jitfreeze and torch.compile taking turns in one process.",
         "",
         "| architecture | compiled or fallback (reason) | steady jf/eager | steady jf/torch.compile | "
         "cold first call | warm first call | warm / limit | warm / floor |",
         "|---|---|---|---|---|---|---|---|"]
    passes = misses = 0
    for arch, s in summary.items():
        if s["compiled"]:
            what = "compiled" + ("" if s["loaded"] else " (**not loaded warm**)")
            if s["warnings"]:
                what += " (warned: " + _md("; ".join(s["warnings"])) + ")"
        elif s["reasons"] or s["warnings"]:
            what = "fallback (" + _md("; ".join(s["reasons"] + s["warnings"])) + ")"
        elif s["errors"]:
            what = "failed (" + _md("; ".join(s["errors"]))[:300] + ")"
        else:
            what = "fallback (no reason recorded)"
        wl = s["warm_limit"]
        if wl is not None:
            ok = wl <= TARGET_WARM_LIMIT
            passes, misses = passes + ok, misses + (not ok)
            wl_text = f"{wl:.2f}x {'PASS' if ok else '**MISS**'}"
        else:
            wl_text = "n/a"
        L.append(f"| {arch} | {what} | {x(s['jf_eager'])} | {x(s['jf_compile'])} | {cell(s['cold'])} | "
                 f"{cell(s['warm'])} | {wl_text} | {x(s['warm_floor'])} |")
    L += ["", f"Target: warm first call <= {TARGET_WARM_LIMIT}x the limit: {passes} PASS, {misses} MISS "
          f"(of {passes + misses} architectures with a stored artifact).", "",
          "### Absolute figures\n",
          "| architecture | eager per call | jitfreeze per call | torch.compile per call | limit first call | "
          "floor first call | warm peak RSS | max abs diff vs eager |",
          "|---|---|---|---|---|---|---|---|"]
    for arch, s in summary.items():
        rss = f"{s['warm_rss_mb']['median']:.0f} MB" if s["warm_rss_mb"] else "n/a"
        diff = "n/a" if s["diff"] is None else f"{s['diff']:.2g}"
        L.append(f"| {arch} | {cell(s['steady_eager'])} | {cell(s['steady_jitfreeze'])} | "
                 f"{cell(s['steady_compile'])} | {cell(s['limit'])} | {cell(s['floor'])} | {rss} | {diff} |")
    errors = [f"{arch}: {e}" for arch, s in summary.items() for e in s["errors"]]
    if errors:
        L += ["", "### Failures\n"] + [f"- {_md(e)}" for e in errors]
    L.append("")
    text = "\n".join(L)
    path.write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the test suite's tiny configs, 1 run, short budgets")
    p.add_argument("--archs", nargs="+", choices=ARCHS, help="default: all")
    p.add_argument("--size", choices=list(SIZES), help="configs (default: bench; tiny with --quick)")
    p.add_argument("--systems", help="steady systems, comma-separated (default eager,jitfreeze,compile)")
    p.add_argument("--repeat", type=int, help="runs per figure (default 3; 1 with --quick)")
    p.add_argument("--steady-runs", type=int, default=1,
                   help="repetitions that include the steady figures (default 1: the first)")
    p.add_argument("--budget", type=float, help="seconds of timed calls per steady figure (default 1; 0.2 quick)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per worker process")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS / MKL_NUM_THREADS for every worker")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    # worker mode (used by the driver)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", choices=["cold", "warm", "limit", "floor", "steady"], help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    size = args.size or ("tiny" if args.quick else "bench")
    budget = args.budget or (0.2 if args.quick else 1.0)
    if args.worker:
        args.arch, args.size, args.budget = args.archs[0], size, budget
        args.systems = args.systems or "eager,jitfreeze,compile"
        try:
            res = worker(args)
            res["ok"] = True
            code = 0
        except BaseException as exc:  # noqa: BLE001 - report any failure as a result line
            traceback.print_exc()
            res = {"case": args.case, "arch": args.arch, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            code = 1
        sys.stdout.flush()
        print(PREFIX + json.dumps(res, default=str), flush=True)
        return code

    from .run import machine_info, precompile

    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed (pip install -e .[hf]): no HF rows")
        return 1
    precompile()
    archs = args.archs or ARCHS
    repeat = args.repeat or (1 if args.quick else 3)
    systems = (args.systems or "eager,jitfreeze,compile").split(",")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tmp_root = out / "tmp-hf"
    tmp_root.mkdir(exist_ok=True)
    log_path = out / "hf_failures.log"
    started = datetime.datetime.now().astimezone()
    load_start = [round(v, 2) for v in os.getloadavg()]
    print(f"hf benchmarks: {archs}, configs {size}, {repeat} run(s), steady budget {budget}s, "
          f"systems {systems}, out {out}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        records = run_all(archs, size, repeat, budget, args.timeout, args.threads, systems, tmp_root, log=log,
                          progress=lambda s: print(s, flush=True), steady_runs=args.steady_runs)
    wall = time.perf_counter() - t0
    shutil.rmtree(tmp_root, ignore_errors=True)
    if log_path.stat().st_size == 0:
        log_path.unlink()
    summary = summarize(records, archs)
    machine = machine_info(records)
    import importlib.metadata as md
    machine["transformers"] = md.version("transformers")
    meta = {"date": started.strftime("%Y-%m-%d %H:%M %Z"), "repeat": repeat, "budget_s": budget, "size": size,
            "steady_runs": min(repeat, args.steady_runs),
            "archs": archs, "systems": systems, "wall_s": wall, "loadavg_start": load_start,
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "argv": sys.argv[1:] if argv is None else list(argv)}
    (out / "hf_results.json").write_text(json.dumps(
        {"meta": meta, "machine": machine, "summary": summary, "records": records}, indent=1, default=str))
    table = write_table(out / "hf_table.md", summary, meta, machine)
    print()
    print(table)
    print(f"wrote {out / 'hf_results.json'}, {out / 'hf_table.md'}")
    print(f"total {wall:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
