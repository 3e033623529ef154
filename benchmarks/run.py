"""Run every benchmark case, each figure in a fresh subprocess; write results.json, table.md, chart.png.

    python -m benchmarks.run                  # everything, 5 repetitions
    python -m benchmarks.run --quick          # the small models (tiny, mlp), one run: a few minutes
    python -m benchmarks.run --smoke          # harness check: tiny model, 1 run, no torch.compile
    python -m benchmarks.run --models cnn bert --cases steady --repeat 7
    python -m benchmarks.run --update-readme  # also copy the table into benchmarks/README.md

Each repetition runs, per model, the cold case, then the warm case, then the steady case;
within a case the systems take turns (round robin, the order rotated every repetition).
Start-up figures (cold, warm) get a fresh process each; the steady figures of a model come
from one process in which the systems' blocks of calls take turns, so that they share
whatever load the machine has.
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import models as models_mod
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


CASES = {
    "cold": Case("cold", "Cold first call, empty caches", ("jitfreeze", "bare", "compile"), "first_s", fills=True),
    "warm": Case("warm", "Warm first call in a fresh process (caches filled by an earlier process)",
                 ("jitfreeze", "compile", "limit", "eager"), "first_s"),
    "steady": Case("steady", "Steady per-call latency", ("eager", "trace", "compile", "jitfreeze"), "per_call_s",
                   one_process=True),
}

# Which system fills which cache, when the cold case did not run it this repetition.
FILLERS = {"jitfreeze": "jitfreeze", "inductor": "compile"}

TARGETS = {
    "cold_bare": "cold: jitfreeze <= 1.15x the bare pipeline",
    "cold_compile": "cold: jitfreeze >= 10x faster than torch.compile (ratio <= 0.10x)",
    "steady": "steady: jitfreeze <= 1.05x the best of eager and jit.trace+freeze+ofi",
    "overhead": "wrapper overhead <= 5 us per call (median) over the compiled function, tiny function",
    "cnn_passes": "cnn: conv-BN folding and MKLDNN passes in effect after loading from the cache",
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
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_worker(case: str, system: str, model: str, cache_dir: Path, inductor_dir: Path,
               budget: float, timeout: float, log=None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.worker", "--case", case, "--system", system,
           "--model", model, "--cache-dir", str(cache_dir), "--budget", str(budget)]
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
        res = {"case": case, "system": system, "model": model, "ok": False,
               "error": f"no result line (exit {proc.returncode})"}
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
        for metric in ("first_s", "per_call_s", "overhead_s", "direct_s", "rss_mb"):
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
        r = _ratio(jf, _get(summary, "cold", m, "bare"))
        if r is not None:
            out["cold_bare"][m] = {"ratio": r, "pass": r <= 1.15}
        r = _ratio(jf, _get(summary, "cold", m, "compile"))
        if r is not None:
            out["cold_compile"][m] = {"ratio": r, "pass": r <= 0.10}
        best = [v for v in (_get(summary, "steady", m, "eager", "per_call_s"),
                            _get(summary, "steady", m, "trace", "per_call_s")) if v is not None]
        r = _ratio(_get(summary, "steady", m, "jitfreeze", "per_call_s"), min(best) if best else None)
        if r is not None:
            out["steady"][m] = {"ratio": r, "pass": r <= 1.05}
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


def _pf(t) -> str:
    return "n/a" if t is None else ("PASS" if t["pass"] else "**MISS**")


def _label(system):
    return SYSTEMS[system].label


def write_table(path: Path, summary, targets, notes, machine, meta, models) -> str:
    L = []
    L.append(f"Measured {meta['date']} on {machine['cpu']}, {machine['logical_cpus']} logical CPUs "
             f"(torch threads: {', '.join(map(str, machine['torch_threads'])) or '?'}), "
             f"{machine['memory_gib']} GiB, {machine['os']}; Python {machine['python']}, torch {machine['torch']}, "
             f"jitfreeze {machine['jitfreeze']}. {meta['repeat']} run(s) per figure, each start-up figure in a "
             f"fresh process; median (min–max). Ratios are jitfreeze / the other system (medians). "
             f"Whole run: {meta['wall_s'] / 60:.1f} min; load average (1, 5, 15 min) at start {meta['loadavg_start']}, "
             f"at end {meta['loadavg_end']}.")
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
        header(["model", "jitfreeze", _label("bare"), _label("compile"), "jf / bare", "≤ 1.15x",
                "jf / torch.compile", "≤ 0.10x"])
        for m in present("cold"):
            s = summary["cold"][m]
            st = {k: s.get(k, {}).get("first_s") for k in ("jitfreeze", "bare", "compile")}
            L.append(f"| {m} | {_cell(st['jitfreeze'])} | {_cell(st['bare'])} | {_cell(st['compile'])} | "
                     f"{_x(targets.get('cold_bare', {}).get(m, {}).get('ratio'))} | {_pf(targets.get('cold_bare', {}).get(m))} | "
                     f"{_x(targets.get('cold_compile', {}).get(m, {}).get('ratio'))} | {_pf(targets.get('cold_compile', {}).get(m))} |")
        L.append("")
    if present("warm"):
        L.append("### Warm first call in a fresh process (cache filled by an earlier process)\n")
        header(["model", "jitfreeze", "torch.compile (warm cache)", "jit.load limit", "eager (no compile)",
                "jf / torch.compile", "jf / limit"])
        for m in present("warm"):
            s = summary["warm"][m]
            st = {k: s.get(k, {}).get("first_s") for k in ("jitfreeze", "compile", "limit", "eager")}
            jf = st["jitfreeze"]["median"] if st["jitfreeze"] else None
            L.append(f"| {m} | {_cell(st['jitfreeze'])} | {_cell(st['compile'])} | {_cell(st['limit'])} | "
                     f"{_cell(st['eager'])} | {_x(_ratio(jf, _get(summary, 'warm', m, 'compile')))} | "
                     f"{_x(_ratio(jf, _get(summary, 'warm', m, 'limit')))} |")
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
    mem_models = [m for m in present("warm") if summary["warm"][m].get("jitfreeze", {}).get("rss_mb")
                  and summary["warm"][m].get("eager", {}).get("rss_mb")]
    if mem_models:
        L.append("### Peak memory (ru_maxrss) of a warm process, first call + 3 calls\n")
        header(["model", "eager", "jitfreeze (warm)", "jf / eager", "jf − eager"])
        mb = lambda v: f"{v:.0f} MB"  # noqa: E731
        for m in mem_models:
            e, j = summary["warm"][m]["eager"]["rss_mb"], summary["warm"][m]["jitfreeze"]["rss_mb"]
            L.append(f"| {m} | {_cell(e, mb)} | {_cell(j, mb)} | {_x(_ratio(j['median'], e['median']))} | "
                     f"{j['median'] - e['median']:+.0f} MB |")
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
        bars(axes[-1], mem, ["eager", "jitfreeze"], "rss_mb", "peak RSS of a warm process (MB)", log=False)
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


# -- main -------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small models (tiny, mlp), 1 run, short timing budgets")
    p.add_argument("--smoke", action="store_true",
                   help="check the harness: tiny model, 1 run, no torch.compile, minimal timing")
    p.add_argument("--models", nargs="+", choices=list(models_mod.MODELS), help="default: all (small ones with --quick)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--systems", nargs="+", choices=list(SYSTEMS), help="default: every system of each case")
    p.add_argument("--repeat", type=int, help="runs per figure (default 5; 1 with --quick or --smoke)")
    p.add_argument("--budget", type=float, help="seconds of timed calls per steady figure (default 2)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per worker process")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS / MKL_NUM_THREADS for every worker "
                   "(default: torch's own default; the table records what the workers ran with)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--update-readme", nargs="?", const=str(ROOT / "benchmarks" / "README.md"), metavar="README",
                   help="copy the table and chart between the <!-- benchmarks:start/end --> markers of "
                        "benchmarks/README.md (or of the file given)")
    args = p.parse_args(argv)

    if args.smoke:
        models = args.models or ["tiny"]
        repeat = args.repeat or 1
        budget = args.budget or 0.05
        systems = set(args.systems) if args.systems else {s for s in SYSTEMS if s != "compile"}
    else:
        models = args.models or models_mod.names(small_only=args.quick)
        repeat = args.repeat or (1 if args.quick else 5)   # --quick: one run, to fit ~3 minutes
        budget = args.budget or (0.3 if args.quick else 2.0)
        systems = set(args.systems) if args.systems else None
    global THREADS
    THREADS = args.threads
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
            "argv": sys.argv[1:] if argv is None else list(argv)}
    (out / "results.json").write_text(json.dumps(
        {"meta": meta, "machine": machine, "summary": summary, "targets": targets, "notes": notes,
         "records": records}, indent=1, default=str))
    table = write_table(out / "table.md", summary, targets, notes, machine, meta, models)
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
