"""Run every benchmark case, each figure in a fresh subprocess; write results.json, table.md, chart.png.

    python -m benchmarks.run                  # everything, 5 repetitions
    python -m benchmarks.run --quick          # the small models (tiny, mlp), one run: a few minutes
    python -m benchmarks.run --smoke          # harness check: tiny model, 1 run, no torch.compile
    python -m benchmarks.run --models cnn bert --cases steady --repeat 7
    python -m benchmarks.run --update-readme  # also copy the table into docs/performance.md
    python -m benchmarks.run --models cnn --cases varbatch --varbatch-max 4   # a tiny variable-batch run
    python -m benchmarks.run --hf             # the Hugging Face rows instead (benchmarks/hf.py)

Each repetition runs, per model, the cold case, then the warm case, then the steady case;
within a case the systems take turns (round robin, the order rotated every repetition).
Start-up figures (cold, warm) get a fresh process each; the steady figures of a model come
from one process in which the systems' blocks of calls take turns, so that they share
whatever load the machine has.
The variable-batch case (``varbatch``) runs once (in the first repetition), for the models
with a variable-batch builder (cnn, bert), one fresh process per system with fresh, empty
caches of its own.
The cold runs of a repetition fill its caches (a fresh jitfreeze cache directory and a
fresh TORCHINDUCTOR_CACHE_DIR); that repetition's warm and steady runs use them, so every
warm figure is a fresh process reading a cache that an earlier process filled.

Add a case to ``CASES``, a system to ``benchmarks.systems``, a model to ``benchmarks.models``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import models as models_mod
from . import worker as worker_mod
from .systems import SYSTEMS

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "@@result "


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    title: str
    systems: tuple
    metric: str                  # the worker's result field the case reports
    fills: bool = False          # its runs fill the repetition's caches (the cold case)
    one_process: bool = False    # all systems in one worker process, taking turns (steady figures)
    fresh: bool = False          # every system's process gets fresh, empty caches of its own
    only_first: bool = False     # runs in the first repetition only
    models: tuple | None = None  # the models it applies to (None: all)


CASES = {
    "cold": Case("cold", "Cold first call, empty caches", ("jitfreeze", "jitfreeze-aoti", "bare", "compile", "floor",
                                                          "cachefloor"),
                 "first_s", fills=True),
    "warm": Case("warm", "Warm first call in a fresh process (caches filled by an earlier process)",
                 ("jitfreeze", "jitfreeze-aoti", "jitfreeze-discard", "compile", "limit", "eager"), "first_s"),
    "steady": Case("steady", "Steady per-call latency", ("eager", "trace", "compile", "jitfreeze", "jitfreeze-aoti"),
                   "per_call_s",
                   one_process=True),
    # Issue 6: batch sizes 1..64 served by one fresh process per system. Long loops whose
    # figures are mostly counts (compiles, artifacts): once, not every repetition.
    "varbatch": Case("varbatch", "Variable batch sizes in one fresh process per system",
                     ("jitfreeze", "jitfreeze-static", "compile"), "loop_s", fresh=True, only_first=True,
                     models=tuple(models_mod.VARBATCH)),
}

VARBATCH_MAX = 64              # --varbatch-max: batch sizes 1..N in the varbatch case
WARM_TARGET_MODELS = ("cnn", "bert")   # issue 5's warm first-call targets are stated for these

# Systems that run only when named (--systems): AOTInductor compiles take tens of seconds per model.
OPT_IN = ("jitfreeze-aoti",)

# Which system fills which cache, when the cold case did not run it this repetition.
FILLERS = {"jitfreeze": "jitfreeze", "jitfreeze-aoti": "jitfreeze-aoti", "inductor": "compile"}

TARGETS = {
    "cold_bare": "cold: jitfreeze <= 1.15x the bare pipeline",
    "cold_compile": "cold: jitfreeze >= 10x faster than torch.compile (ratio <= 0.10x)",
    "steady": "steady: jitfreeze <= 1.05x the best of eager and jit.trace+freeze+ofi",
    "overhead": "wrapper overhead <= 5 us per call (median) over the compiled function, tiny function",
    "cnn_passes": "cnn: conv-BN folding and MKLDNN passes in effect after loading from the cache",
    "warm_limit": "warm: jitfreeze first call <= 1.3x the limit (jit.load of the same artifact + post-load passes "
                  "+ first call), cnn and bert",
    "warm_compile": "warm: jitfreeze first call >= 10x faster than torch.compile with a warm cache "
                    "(ratio <= 0.10x), cnn and bert",
    "rss_discard": "warm: peak RSS with discard_parameters=True <= 1.15x eager",
    "varbatch": "variable batch 1..64: jitfreeze (default, automatic dynamic) <= 3 compiles and <= 3 stored "
                "artifacts, outputs allclose to eager at every size",
}


# -- running workers --------------------------------------------------------------------------

THREADS: int | None = None     # --threads: OMP/MKL threads for every worker alike (default: torch's)


def _env(case: str, inductor_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JITFREEZE_", "TORCHINDUCTOR_"))}
    if THREADS:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(THREADS)
    env["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_dir)
    env["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    if case == "steady":
        # No compile-worker pool: with a warm cache it compiles nothing, and on a small machine
        # its start-up (workers importing torch) competes with the timed calls.
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if case == "varbatch":
        # Exact shapes store one artifact per batch size (64 BERT-base artifacts: ~28 GB): the
        # default 4 GiB limit would cull them and hide the cost this case is there to show.
        env["JITFREEZE_CACHE_SIZE_LIMIT"] = "64GiB"
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_worker(case: str, system: str, model: str, cache_dir: Path, inductor_dir: Path,
               budget: float, timeout: float, log=None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.worker", "--case", case, "--system", system,
           "--model", model, "--cache-dir", str(cache_dir), "--budget", str(budget)]
    if case == "varbatch":
        cmd += ["--max-batch", str(VARBATCH_MAX)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(case, inductor_dir), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "system": system, "model": model, "ok": False,
                "error": f"timed out after {timeout:.0f}s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    res = None
    for line in proc.stdout.splitlines():
        if line.startswith(PREFIX):
            res = json.loads(line[len(PREFIX):])
    if res is None:
        why = f"no result line (exit {proc.returncode})"
        if proc.returncode == -signal.SIGKILL:
            why = "killed by SIGKILL (the kernel's OOM killer, unless a person did it)"
        res = {"case": case, "system": system, "model": model, "ok": False, "error": why}
        progress = [line for line in proc.stdout.splitlines() if line.startswith(worker_mod.PROGRESS)]
        if progress:
            # How far a varbatch worker got, and what it left on disk.
            res["partial"] = json.loads(progress[-1][len(worker_mod.PROGRESS):])
            res["partial"]["cache_mb"] = worker_mod.disk_usage(
                inductor_dir if system == "compile" else cache_dir)[0] / 1e6
    if not res.get("ok"):
        res["stderr_tail"] = proc.stderr[-3000:]
        if log is not None:
            log.write(f"--- {case} {system} {model} failed (exit {proc.returncode})\n{proc.stderr}\n")
    res["wall_s"] = wall
    return res


def _rotate(seq, k):
    seq = list(seq)
    if not seq:
        return seq
    k %= len(seq)
    return seq[k:] + seq[:k]


def run_all(models: list[str], cases: list[str], systems: set | None, repeat: int, budget: float,
            timeout: float, tmp_root: Path, log=None, progress=print) -> list[dict]:
    records = []
    for rep in range(repeat):
        for model in models:
            rep_dir = Path(tempfile.mkdtemp(prefix=f"{model}-r{rep}-", dir=tmp_root))
            dirs = {"jitfreeze": rep_dir / "jf", "inductor": rep_dir / "inductor"}
            filled: set = set()
            try:
                for case_name in cases:
                    case = CASES[case_name]
                    chosen = [s for s in case.systems if systems is None or s in systems]
                    if (case.only_first and rep > 0) or (case.models is not None and model not in case.models):
                        continue
                    if case.fresh:
                        for s in _rotate(chosen, rep):
                            own = rep_dir / f"{case_name}-{s}"
                            r = run_worker(case_name, s, model, own / "jf", own / "inductor", budget, timeout, log)
                            r["rep"] = rep
                            records.append(r)
                            progress(_line(rep, repeat, r))
                            shutil.rmtree(own, ignore_errors=True)
                        continue
                    if not case.fills:
                        for s in chosen:                  # make sure the caches it reads are filled
                            for need in SYSTEMS[s].needs:
                                if need not in filled:
                                    filler = FILLERS[need]
                                    r = run_worker("fill", filler, model, dirs["jitfreeze"], dirs["inductor"],
                                                   budget, timeout, log)
                                    r["rep"] = rep
                                    records.append(r)
                                    progress(_line(rep, repeat, r))
                                    filled.update(SYSTEMS[filler].needs)
                    if case.one_process and chosen:
                        # All systems in one process, taking turns (see worker.measure_steady).
                        r = run_worker(case_name, ",".join(_rotate(chosen, rep)), model, dirs["jitfreeze"],
                                       dirs["inductor"], budget, timeout, log)
                        for sub in r.get("results") or [r]:
                            sub = dict(sub, rep=rep, wall_s=r["wall_s"], ok=r.get("ok", False))
                            records.append(sub)
                            progress(_line(rep, repeat, sub))
                        continue
                    for s in _rotate(chosen, rep):
                        r = run_worker(case_name, s, model, dirs["jitfreeze"], dirs["inductor"], budget,
                                       timeout, log)
                        r["rep"] = rep
                        records.append(r)
                        progress(_line(rep, repeat, r))
                        if case.fills and r.get("ok"):
                            filled.update(SYSTEMS[s].needs)
            finally:
                shutil.rmtree(rep_dir, ignore_errors=True)
    return records


def _line(rep, repeat, r) -> str:
    if not r.get("ok"):
        what = "FAILED: " + r.get("error", "?")
    elif "loop_s" in r:
        what = (f"batch {r['sizes'][0]}..{r['sizes'][1]} in {fmt_time(r['loop_s'])}, {r['compiles']} compiles, "
                f"{r.get('artifacts')} artifacts, {r['cache_mb']:.1f} MB, allclose {r['all_close']}")
    elif "per_call_s" in r:
        what = fmt_time(r["per_call_s"]) + " per call"
        if "overhead_s" in r:
            what += f", wrapper overhead {fmt_time(r['overhead_s'])}"
    else:
        what = f"first call {fmt_time(r['first_s'])}, peak RSS {r['rss_mb']:.0f} MB"
    return f"[{rep + 1}/{repeat}] {r['model']:<12} {r['case']:<6} {r['system']:<10} {what}  (process {r.get('wall_s', 0):.1f}s)"


# -- aggregating ------------------------------------------------------------------------------

def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def aggregate(records: list[dict]) -> dict:
    """summary[case][model][system][metric] = {median, min, max, n}."""
    grouped: dict = {}
    for r in records:
        if not r.get("ok") or r["case"] == "fill":
            continue
        slot = grouped.setdefault(r["case"], {}).setdefault(r["model"], {}).setdefault(r["system"], {})
        for metric in ("first_s", "per_call_s", "overhead_s", "direct_s", "rss_mb", "loop_s", "eager_loop_s",
                       "compiles", "artifacts", "cache_mb", "max_diff"):
            if metric in r:
                slot.setdefault(metric, []).append(r[metric])
    return {c: {m: {s: {k: stats(v) for k, v in met.items()} for s, met in sy.items()}
                for m, sy in mo.items()} for c, mo in grouped.items()}


def _get(summary, case, model, system, metric="first_s"):
    st = summary.get(case, {}).get(model, {}).get(system, {}).get(metric)
    return st["median"] if st else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def evaluate(summary: dict, records: list[dict], models: list[str]) -> dict:
    """targets[name][model] = {"ratio"/"value", "pass"}."""
    out: dict = {k: {} for k in TARGETS}
    for m in models:
        jf = _get(summary, "cold", m, "jitfreeze")
        bare = _get(summary, "cold", m, "bare")
        r = _ratio(jf, bare)
        if r is not None:
            out["cold_bare"][m] = {"ratio": r, "pass": r <= 1.15}
            cache_floor = _get(summary, "cold", m, "cachefloor")
            if cache_floor is not None:     # the best jf / bare a cache on filelock + diskcache can reach
                out["cold_bare"][m]["best"] = (bare + cache_floor) / bare
        compile_s = _get(summary, "cold", m, "compile")
        r = _ratio(jf, compile_s)
        if r is not None:
            out["cold_compile"][m] = {"ratio": r, "pass": r <= 0.10}
            for system in ("floor", "bare"):      # make_fx alone, the bare pipeline: against torch.compile
                other = _ratio(_get(summary, "cold", m, system), compile_s)
                if other is not None:
                    out["cold_compile"][m][system] = other
        best = [v for v in (_get(summary, "steady", m, "eager", "per_call_s"),
                            _get(summary, "steady", m, "trace", "per_call_s")) if v is not None]
        r = _ratio(_get(summary, "steady", m, "jitfreeze", "per_call_s"), min(best) if best else None)
        if r is not None:
            out["steady"][m] = {"ratio": r, "pass": r <= 1.05}
    for m in models:
        jf = _get(summary, "warm", m, "jitfreeze")
        if m in WARM_TARGET_MODELS:
            r = _ratio(jf, _get(summary, "warm", m, "limit"))
            if r is not None:
                out["warm_limit"][m] = {"ratio": r, "pass": r <= 1.3}
            r = _ratio(jf, _get(summary, "warm", m, "compile"))
            if r is not None:
                out["warm_compile"][m] = {"ratio": r, "pass": r <= 0.10}
        r = _ratio(_get(summary, "warm", m, "jitfreeze-discard", "rss_mb"),
                   _get(summary, "warm", m, "eager", "rss_mb"))
        if r is not None:
            out["rss_discard"][m] = {"ratio": r, "pass": r <= 1.15}
        vb = [r for r in records if r.get("ok") and r["case"] == "varbatch" and r["model"] == m
              and r["system"] == "jitfreeze"]
        if vb:
            v = vb[-1]
            out["varbatch"][m] = {"compiles": v["compiles"], "artifacts": v["artifacts"], "all_close": v["all_close"],
                                  "sizes": v["sizes"],
                                  "pass": v["compiles"] <= 3 and v["artifacts"] <= 3 and v["all_close"]}
    ov = _get(summary, "steady", "tiny", "jitfreeze", "overhead_s")
    if ov is not None:
        out["overhead"]["tiny"] = {"value": ov, "pass": ov <= 5e-6}
    graphs = [r["graph"] for r in records if r.get("ok") and r["case"] == "steady" and r["model"] == "cnn"
              and r["system"] == "jitfreeze" and "graph" in r]
    if graphs:
        g = graphs[-1]
        out["cnn_passes"]["cnn"] = {"batch_norm": g["batch_norm"], "mkldnn": g["mkldnn"],
                                    "pass": g["batch_norm"] == 0 and g["mkldnn"] > 0}
    return {k: v for k, v in out.items() if v}


def sanity(records: list[dict]) -> list[str]:
    """Things that make a figure mean something else than it says."""
    notes = []
    for r in records:
        tag = f"{r['model']} {r['case']} {r['system']} (run {r.get('rep', 0) + 1})"
        if not r.get("ok"):
            notes.append(f"{tag} failed: {r.get('error')}")
            continue
        ci = r.get("cache_info")
        if r["case"] == "varbatch":
            if not r.get("all_close"):
                notes.append(f"{tag}: outputs differ from eager at batch sizes {r.get('mismatched_sizes')} "
                             f"(max abs diff {r.get('max_diff'):.3g}, rtol {r.get('rtol')}, atol {r.get('atol')})")
            if r.get("fallbacks"):
                notes.append(f"{tag}: {r['fallbacks']} signature(s) ran eagerly ({r.get('cache_info')})")
            continue
        if ci and r["case"] in ("warm", "steady") and (ci["loads"] != 1 or ci["compiles"] != 0):
            notes.append(f"{tag}: jitfreeze did not load from the cache ({ci})")
        if ci and r["case"] == "cold" and ci["compiles"] != 1:
            notes.append(f"{tag}: jitfreeze did not compile ({ci})")
        if ci and ci.get("fallbacks"):
            notes.append(f"{tag}: jitfreeze fell back to eager ({ci})")
        ind = r.get("inductor")
        if ind is not None and r["case"] in ("warm", "steady") and ind.get("fxgraph_cache_miss"):
            notes.append(f"{tag}: torch.compile missed the warm FX graph cache ({ind})")
    return notes


# -- machine ----------------------------------------------------------------------------------

def machine_info(records: list[dict]) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    threads = sorted({r["threads"] for r in records if r.get("ok") and "threads" in r})
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "memory_gib": mem, "torch_threads": threads,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "torch": version("torch"), "jitfreeze": version("jitfreeze"),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


# -- writing ----------------------------------------------------------------------------------

def fmt_time(s) -> str:
    if s is None:
        return "n/a"
    a = abs(s)
    if a >= 1:
        return f"{s:.2f} s"
    if a >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _cell(st, fmt=fmt_time) -> str:
    if not st:
        return "n/a"
    if st["n"] == 1:
        return fmt(st["median"])
    return f"{fmt(st['median'])} ({fmt(st['min'])}–{fmt(st['max'])})"


def _x(r) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def _floor_parts(records) -> dict:
    """{part: median seconds} over the cache floor's runs (systems.cachefloor reports its parts)."""
    runs = [r["parts"] for r in records if r.get("ok") and r.get("system") == "cachefloor" and r.get("parts")]
    return {name: statistics.median(p[name] for p in runs if name in p) for name in (runs[0] if runs else {})}


def _pf(t) -> str:
    if t is None:
        return "n/a"
    if t["pass"]:
        return "PASS"
    if t.get("floor", 0) > 0.10:                      # a cold target make_fx alone already misses
        return f"**MISS** (bound: make_fx alone {t['floor']:.2f}x)"
    if t.get("best", 0) > 1.15:                       # ... or the cache floor alone does
        return f"**MISS** (bound: bare + cache floor {t['best']:.2f}x)"
    return "**MISS**"


def _label(system):
    return SYSTEMS[system].label


def write_table(path: Path, summary, targets, notes, machine, meta, models, records=()) -> str:
    records_for_table = records
    L = []
    L.append(f"Measured {meta['date']} on {machine['cpu']}, {machine['logical_cpus']} logical CPUs "
             f"(torch threads: {', '.join(map(str, machine['torch_threads'])) or '?'}), "
             f"{machine['memory_gib']} GiB, {machine['os']}; Python {machine['python']}, torch {machine['torch']}, "
             f"jitfreeze {machine['jitfreeze']}. {meta['repeat']} run(s) per figure, each start-up figure in a "
             f"fresh process; median (min–max). Ratios are jitfreeze / the other system (medians). "
             f"Whole run: {meta['wall_s'] / 60:.1f} min; load average (1, 5, 15 min) at start {meta['loadavg_start']}, "
             f"at end {meta['loadavg_end']}.")
    for m in meta.get("merged") or ():
        L.append(f"Merged in: the {', '.join(m['cases'])} records of a separate run of {m['date']} "
                 f"({', '.join(m['models'])}; {m['wall_s'] / 60:.1f} min).")
    busy = [x for x in (meta.get("loadavg_start") or [])[:1] + (meta.get("loadavg_end") or [])[:1]
            if x > (machine.get("logical_cpus") or 1)]
    if busy:
        L.append("")
        L.append(f"**The machine was busy** (load average above its {machine['logical_cpus']} CPUs): other work "
                 "competed for the cores, so absolute times and small ratios are noisy; multi-threaded ops "
                 "suffer most from it (eager more than TorchScript), whatever the system.")
    L.append("")

    def header(cols):
        L.append("| " + " | ".join(cols) + " |")
        L.append("|" + "|".join("---" for _ in cols) + "|")

    def present(case):
        return [m for m in models if m in summary.get(case, {})]

    if present("cold"):
        L.append("### Cold first call (empty caches)\n")
        header(["model", "jitfreeze", _label("bare"), _label("compile"), _label("floor"), _label("cachefloor"),
                "jf / bare", "≤ 1.15x", "(bare + cache floor) / bare", "jf / torch.compile", "≤ 0.10x",
                "floor / torch.compile", "bare / torch.compile"])
        for m in present("cold"):
            s = summary["cold"][m]
            st = {k: s.get(k, {}).get("first_s") for k in ("jitfreeze", "bare", "compile", "floor", "cachefloor")}
            L.append(f"| {m} | {_cell(st['jitfreeze'])} | {_cell(st['bare'])} | {_cell(st['compile'])} | "
                     f"{_cell(st['floor'])} | {_cell(st['cachefloor'])} | "
                     f"{_x(targets.get('cold_bare', {}).get(m, {}).get('ratio'))} | {_pf(targets.get('cold_bare', {}).get(m))} | "
                     f"{_x(targets.get('cold_bare', {}).get(m, {}).get('best'))} | "
                     f"{_x(targets.get('cold_compile', {}).get(m, {}).get('ratio'))} | {_pf(targets.get('cold_compile', {}).get(m))} | "
                     f"{_x(targets.get('cold_compile', {}).get(m, {}).get('floor'))} | "
                     f"{_x(targets.get('cold_compile', {}).get(m, {}).get('bare'))} |")
        L.append("")
        parts = _floor_parts(records_for_table)
        if parts:
            L.append("Cache floor, part by part (median over all its runs): "
                     + ", ".join(f"{name} {fmt_time(v)}" for name, v in parts.items()) + ".\n")
    if present("warm"):
        L.append("### Warm first call in a fresh process (cache filled by an earlier process)\n")
        header(["model", "jitfreeze", "jitfreeze (discard_parameters=True)", "torch.compile (warm cache)",
                "jit.load limit", "eager (no compile)", "jf / torch.compile", "≤ 0.10x (cnn, bert)", "jf / limit",
                "≤ 1.3x (cnn, bert)"])
        for m in present("warm"):
            s = summary["warm"][m]
            st = {k: s.get(k, {}).get("first_s") for k in ("jitfreeze", "jitfreeze-discard", "compile", "limit",
                                                            "eager")}
            jf = st["jitfreeze"]["median"] if st["jitfreeze"] else None
            t_c, t_l = targets.get("warm_compile", {}).get(m), targets.get("warm_limit", {}).get(m)
            target_cell = (lambda t: _pf(t)) if m in WARM_TARGET_MODELS else (lambda t: "–")
            L.append(f"| {m} | {_cell(st['jitfreeze'])} | {_cell(st['jitfreeze-discard'])} | {_cell(st['compile'])} | "
                     f"{_cell(st['limit'])} | {_cell(st['eager'])} | "
                     f"{_x(_ratio(jf, _get(summary, 'warm', m, 'compile')))} | {target_cell(t_c)} | "
                     f"{_x(_ratio(jf, _get(summary, 'warm', m, 'limit')))} | {target_cell(t_l)} |")
        L.append("")
    if present("steady"):
        L.append("### Steady per-call latency\n")
        header(["model", "eager", _label("trace"), "torch.compile", "jitfreeze", "jf / eager", "jf / trace",
                "jf / torch.compile", "jf / best(eager, trace)", "≤ 1.05x"])
        for m in present("steady"):
            s = summary["steady"][m]
            st = {k: s.get(k, {}).get("per_call_s") for k in ("eager", "trace", "compile", "jitfreeze")}
            jf = st["jitfreeze"]["median"] if st["jitfreeze"] else None
            t = targets.get("steady", {}).get(m)
            L.append(f"| {m} | {_cell(st['eager'])} | {_cell(st['trace'])} | {_cell(st['compile'])} | "
                     f"{_cell(st['jitfreeze'])} | {_x(_ratio(jf, _get(summary, 'steady', m, 'eager', 'per_call_s')))} | "
                     f"{_x(_ratio(jf, _get(summary, 'steady', m, 'trace', 'per_call_s')))} | "
                     f"{_x(_ratio(jf, _get(summary, 'steady', m, 'compile', 'per_call_s')))} | "
                     f"{_x(t['ratio'] if t else None)} | {_pf(t)} |")
        L.append("")
        ov_models = [m for m in present("steady") if summary["steady"][m].get("jitfreeze", {}).get("overhead_s")]
        if ov_models:
            L.append("### jitfreeze wrapper overhead over calling its compiled function directly\n")
            header(["model", "through jitfreeze", "compiled function directly", "overhead per call", "≤ 5 us (tiny)"])
            for m in ov_models:
                s = summary["steady"][m]["jitfreeze"]
                t = targets.get("overhead", {}).get(m)
                L.append(f"| {m} | {_cell(s['per_call_s'])} | {_cell(s.get('direct_s'))} | {_cell(s['overhead_s'])} | "
                         f"{_pf(t) if m == 'tiny' else '–'} |")
            L.append("")
    mem_models = [m for m in present("warm") if summary["warm"][m].get("eager", {}).get("rss_mb")
                  and (summary["warm"][m].get("jitfreeze", {}).get("rss_mb")
                       or summary["warm"][m].get("jitfreeze-discard", {}).get("rss_mb"))]
    if mem_models:
        L.append("### Peak memory (ru_maxrss) of a warm process, first call + 3 calls\n")
        header(["model", "eager", "jitfreeze (warm)", "jf / eager", "jf − eager",
                "jitfreeze discard_parameters=True (warm)", "discard / eager", "≤ 1.15x", "discard − eager"])
        mb = lambda v: f"{v:.0f} MB"  # noqa: E731
        for m in mem_models:
            e = summary["warm"][m]["eager"]["rss_mb"]
            j = summary["warm"][m].get("jitfreeze", {}).get("rss_mb")
            d = summary["warm"][m].get("jitfreeze-discard", {}).get("rss_mb")
            diff = lambda x: f"{x['median'] - e['median']:+.0f} MB" if x else "n/a"  # noqa: E731
            L.append(f"| {m} | {_cell(e, mb)} | {_cell(j, mb)} | "
                     f"{_x(_ratio(j['median'], e['median']) if j else None)} | "
                     f"{diff(j)} | {_cell(d, mb)} | {_x(_ratio(d['median'], e['median']) if d else None)} | "
                     f"{_pf(targets.get('rss_discard', {}).get(m))} | {diff(d)} |")
        L.append("")
    vb_records = {(r["model"], r["system"]): r for r in records_for_table
                  if r["case"] == "varbatch" and (r.get("ok") or r.get("partial"))}
    vb_models = [m for m in models if any(k[0] == m for k in vb_records)]
    if vb_models:
        sizes = next((r["sizes"] for r in vb_records.values() if r.get("ok")), [1, VARBATCH_MAX])
        L.append(f"### Variable batch sizes {sizes[0]}..{sizes[1]}, one fresh process per system, empty caches "
                 "(one run)\n")
        L.append("The loop calls the system once per batch size, in increasing order; its wall time counts "
                 "those calls only (each is followed by an untimed eager call on the same inputs, whose "
                 "outputs it must match: `torch.allclose`, rtol = atol = 1e-4). Compiles: jitfreeze's "
                 "`cache_info().compiles`, torch.compile's graphs compiled (dynamo `unique_graphs`). "
                 "Beyond eager: the loop's time minus the same loop run eagerly, i.e. what compiling (and "
                 "loading) cost on top of the calls themselves. Stored artifacts: jitfreeze's cache entries, torch.compile's FX graph cache entries; disk: "
                 "the whole cache directory (`TORCHINDUCTOR_CACHE_DIR` for torch.compile). "
                 "jitfreeze (dynamic=False) is given max_signatures=64 (default 8, after which new shapes "
                 "run eagerly) so that it compiles every size.\n")
        header(["model", "system", "loop wall time", "same loop eagerly", "beyond eager (compiling, loading)",
                "compiles", "stored artifacts",
                "cache on disk", "allclose to eager (every size)", "max abs diff", "≤ 3 compiles, ≤ 3 artifacts"])
        for m in vb_models:
            label = models_mod.VARBATCH[m].label
            for sname in CASES["varbatch"].systems:
                r = vb_records.get((m, sname))
                if r is None:
                    continue
                if not r.get("ok"):
                    p = r["partial"]
                    L.append(f"| {m}: {label} | {_label(sname)} | **did not finish**: {r['error']} after batch "
                             f"{p['batch']} of {sizes[1]}; the loop had taken {fmt_time(p['loop_s'])}, peak RSS "
                             f"{p['rss_mb'] / 1024:.1f} GiB | {fmt_time(p['eager_loop_s'])} (to batch {p['batch']}) | "
                             f"{fmt_time(p['loop_s'] - p['eager_loop_s'])} (to batch {p['batch']}) | "
                             f"{p['compiles'] if p['compiles'] is not None else 'n/a'} (to batch {p['batch']}) | – | "
                             f"{p['cache_mb']:.1f} MB | {'yes' if not p['mismatched_sizes'] else 'no'} "
                             f"(to batch {p['batch']}) | – | – |")
                    continue
                t = targets.get("varbatch", {}).get(m) if sname == "jitfreeze" else None
                extra = f" ({r['fallbacks']} ran eagerly)" if r.get("fallbacks") else ""
                own = "" if r["sizes"] == sizes else f" (sizes {r['sizes'][0]}..{r['sizes'][1]})"
                L.append(f"| {m}: {label} | {_label(sname)}{own} | {fmt_time(r['loop_s'])} | "
                         f"{fmt_time(r['eager_loop_s'])} | {fmt_time(r['loop_s'] - r['eager_loop_s'])} | "
                         f"{r['compiles']}{extra} | {r.get('artifacts', 'n/a')} | {r['cache_mb']:.1f} MB | "
                         f"{'yes' if r['all_close'] else '**no** (sizes ' + str(r['mismatched_sizes']) + ')'} | "
                         f"{r['max_diff']:.2g} | {_pf(t) if t else '–'} |")
        L.append("")
    t = targets.get("cnn_passes", {}).get("cnn")
    if t:
        L.append(f"cnn after loading from the cache: {t['batch_norm']} `aten::batch_norm` nodes left, "
                 f"{t['mkldnn']} MKLDNN nodes: conv-BN folding and MKLDNN passes {_pf(t)}.\n")
    L.append("### Targets\n")
    header(["target", "result"])
    for name, text in TARGETS.items():
        per = targets.get(name)
        if not per:
            L.append(f"| {text} | not measured |")
            continue
        parts = []
        for m, t in per.items():
            val = _x(t["ratio"]) if "ratio" in t else fmt_time(t["value"]) if "value" in t else ""
            if name == "varbatch":
                val = (f"{t['compiles']} compiles, {t['artifacts']} artifacts "
                       f"(sizes {t['sizes'][0]}..{t['sizes'][1]}), allclose {'yes' if t['all_close'] else 'no'}")
            parts.append(f"{m} {val} {_pf(t)}".replace("  ", " "))
        L.append(f"| {text} | {'; '.join(parts)} |")
    L.append("")
    if notes:
        L.append("### Notes\n")
        L.extend(f"- {n}" for n in notes)
        L.append("")
    text = "\n".join(L)
    path.write_text(text)
    return text


def write_chart(path: Path, summary: dict, models: list[str]) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or .[bench]): no chart"
    panels = [(c, m, t) for c, m, t in (("cold", "first_s", "cold first call (s)"),
                                        ("warm", "first_s", "warm first call, fresh process (s)"),
                                        ("steady", "per_call_s", "steady per call (s)")) if summary.get(c)]
    # (the varbatch case is a table only: its figures are counts and one loop time per system)
    mem = {m: summary["warm"][m] for m in models if m in summary.get("warm", {})}
    n = len(panels) + (1 if mem else 0)
    if n == 0:
        return "nothing to chart"
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.2), squeeze=False)
    axes = axes[0]

    def bars(ax, data, systems, metric, title, log=True):
        ms = [m for m in models if m in data]
        width = 0.8 / max(1, len(systems))
        for i, s in enumerate(systems):
            xs, ys, lo, hi = [], [], [], []
            for j, m in enumerate(ms):
                st = data[m].get(s, {}).get(metric)
                if st:
                    xs.append(j + (i - (len(systems) - 1) / 2) * width)
                    ys.append(st["median"])
                    lo.append(st["median"] - st["min"])
                    hi.append(st["max"] - st["median"])
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=SYSTEMS[s].label)
        ax.set_xticks(range(len(ms)))
        ax.set_xticklabels(ms)
        if log:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)

    for ax, (case, metric, title) in zip(axes, panels):
        bars(ax, summary[case], [s for s in CASES[case].systems if any(s in summary[case][m] for m in summary[case])],
             metric, title)
    if mem:
        bars(axes[-1], mem, ["eager", "jitfreeze", "jitfreeze-discard"], "rss_mb", "peak RSS of a warm process (MB)",
             log=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


README_START = "<!-- benchmarks:start -->"
README_END = "<!-- benchmarks:end -->"


def update_readme(readme: Path, table: str, chart_rel: str | None) -> str:
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return f"{readme} has no {README_START} ... {README_END} markers: not updated"
    body = "\n" + table.strip() + "\n" + (f"\n![benchmark chart]({chart_rel})\n" if chart_rel else "") + "\n"
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + README_START + body + README_END + tail)
    return f"updated {readme}"


def precompile() -> None:
    """Write jitfreeze's (and the harness's) bytecode before any worker starts.

    Under PYTHONDONTWRITEBYTECODE=1 with an editable install nothing writes ``__pycache__``,
    so every worker would compile jitfreeze's ~20 modules from source (~0.1 s) inside its
    timed first call, which an installed package (pip compiles it) never does. Workers read
    bytecode whatever that variable says.
    """
    import compileall
    for package in ("jitfreeze", "benchmarks"):
        if (ROOT / package).is_dir():
            compileall.compile_dir(str(ROOT / package), quiet=1)


# -- main -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small models (tiny, mlp), 1 run, short timing budgets")
    p.add_argument("--smoke", action="store_true",
                   help="check the harness: tiny model, 1 run, no torch.compile, minimal timing")
    p.add_argument("--models", nargs="+", choices=list(models_mod.MODELS), help="default: all (small ones with --quick)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--systems", nargs="+", choices=list(SYSTEMS),
                   help="default: every system of each case but " + ", ".join(OPT_IN))
    p.add_argument("--repeat", type=int, help="runs per figure (default 5; 1 with --quick or --smoke)")
    p.add_argument("--budget", type=float, help="seconds of timed calls per steady figure (default 2)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per worker process")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS / MKL_NUM_THREADS for every worker "
                   "(default: torch's own default; the table records what the workers ran with)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--update-readme", nargs="?", const=str(ROOT / "docs" / "performance.md"), metavar="FILE",
                   help="copy the table and chart between the <!-- benchmarks:start/end --> markers of "
                        "docs/performance.md (or of the file given)")
    p.add_argument("--varbatch-max", type=int, default=64, metavar="N",
                   help="varbatch case: batch sizes 1..N (default 64; e.g. 4 for a quick check)")
    p.add_argument("--merge", nargs="+", type=Path, default=[], metavar="RESULTS_JSON",
                   help="add the records of earlier runs (their results.json) to this run's table, e.g. a "
                        "long varbatch run made separately; the table says which runs were merged")
    p.add_argument("--hf", action="store_true",
                   help="run the Hugging Face transformers rows instead (python -m benchmarks.hf; "
                        "--repeat, --budget, --timeout, --threads and --out are passed on)")
    p.add_argument("--hf-quick", action="store_true", help="--hf with the test suite's tiny configs, 1 run")
    args = p.parse_args(argv)

    if args.hf or args.hf_quick:
        from . import hf
        hf_args = ["--quick"] if args.hf_quick else []
        for flag, value in (("--repeat", args.repeat), ("--budget", args.budget), ("--threads", args.threads)):
            if value is not None:
                hf_args += [flag, str(value)]
        hf_args += ["--timeout", str(args.timeout), "--out", str(args.out)]
        return hf.main(hf_args)

    if args.smoke:
        models = args.models or ["tiny"]
        repeat = args.repeat or 1
        budget = args.budget or 0.05
        systems = set(args.systems) if args.systems else {s for s in SYSTEMS if s != "compile" and s not in OPT_IN}
    else:
        models = args.models or models_mod.names(small_only=args.quick)
        repeat = args.repeat or (1 if args.quick else 5)   # --quick: one run, to fit ~3 minutes
        budget = args.budget or (0.3 if args.quick else 2.0)
        systems = set(args.systems) if args.systems else set(SYSTEMS) - set(OPT_IN)
    global THREADS, VARBATCH_MAX
    THREADS = args.threads
    VARBATCH_MAX = args.varbatch_max
    precompile()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    tmp_root = out / "tmp"
    tmp_root.mkdir(exist_ok=True)
    log_path = out / "failures.log"
    started = datetime.datetime.now().astimezone()
    load_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    print(f"benchmarks: models {models}, cases {args.cases}, {repeat} run(s), steady budget {budget}s, "
          f"out {out}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        records = run_all(models, args.cases, systems, repeat, budget, args.timeout, tmp_root, log=log,
                          progress=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    merged = []
    for path in args.merge:
        earlier = json.loads(path.read_text())
        records += [dict(r, merged_from=earlier["meta"]["date"]) for r in earlier["records"]]
        merged.append({"file": str(path), "date": earlier["meta"]["date"], "cases": earlier["meta"]["cases"],
                       "models": earlier["meta"]["models"], "wall_s": earlier["meta"]["wall_s"]})
        models = models + [m for m in earlier["meta"]["models"] if m not in models]
    shutil.rmtree(tmp_root, ignore_errors=True)
    if log_path.stat().st_size == 0:
        log_path.unlink()

    summary = aggregate(records)
    targets = evaluate(summary, records, models)
    notes = sanity(records)
    machine = machine_info(records)
    meta = {"date": started.strftime("%Y-%m-%d %H:%M %Z"), "repeat": repeat, "budget_s": budget,
            "models": models, "cases": args.cases, "wall_s": wall, "loadavg_start": load_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "argv": sys.argv[1:] if argv is None else list(argv), "merged": merged}
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "machine": machine, "summary": summary, "targets": targets, "notes": notes,
         "records": records}, indent=1, default=str))
    table = write_table(out / "table.md", summary, targets, notes, machine, meta, models, records)
    why = write_chart(out / "chart.png", summary, models)
    print()
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}" + ("" if why else f", {out / 'chart.png'}"))
    if why:
        print(f"chart skipped: {why}")
    if args.update_readme:
        readme = Path(args.update_readme)
        chart_rel = None if why else os.path.relpath(out / "chart.png", readme.parent)
        print(update_readme(readme, table, chart_rel))
    print(f"total {wall:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
