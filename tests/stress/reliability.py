"""Multi-process stress for jitfreeze's persistent cache; prints figures.

    python tests/stress/reliability.py stampede --processes 8
    python tests/stress/reliability.py soak --processes 8 --threads 3 --keys 20 --seconds 60

stampede: N fresh processes, released together on one cold key (after each imported torch and built the
    model): exactly one should compile, the others load; every output is checked against eager.
soak: N processes x T threads call a mix of functions (a module, plain functions, kwargs and structured
    outputs) over K distinct keys for a bounded time; now and then a fresh wrapper forces a read from the
    persistent cache. Reported: calls, compiles (per key across all processes), loads, errors (exceptions
    reaching a caller), wrong answers, warnings, entries lost (stored by a compile but gone at the end).

Both end with the directory's consistency check (diskcache's, minus the lock files jitfreeze keeps on
purpose). ``--json`` prints the figures as one JSON line last (the stress tests read it).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = r"""
import collections, json, os, random, sys, threading, time, warnings
import torch
torch.set_num_threads(1)
import jitfreeze
from tests.models import make

mode, cache_dir, threads, keys, seconds, model_name = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
lock = threading.Lock()
caught = []
def _show(message, category, *a, **k):
    with lock:
        caught.append(f"{category.__name__}: {message}")
warnings.showwarning = _show
warnings.simplefilter("always", jitfreeze.JitFreezeWarning)

wrappers = []          # every wrapper made here, for the per-key compile count
def wrap(fn):
    w = jitfreeze.jitfreeze(fn, cache_dir=cache_dir)
    with lock:
        wrappers.append(w)
    return w

def report(extra):
    per_key = collections.Counter()
    loads = compiles = 0
    for w in wrappers:
        for e in {id(e): e for e in w._table.values()}.values():
            if e.source in ("compiled", "unstored"):
                per_key[e.key] += 1
        info = w.cache_info()
        loads += info.loads
        compiles += info.compiles
    print(json.dumps(dict(extra, compiled_keys=per_key, loads=loads, compiles=compiles, warnings=caught)), flush=True)

def go():
    print("ready", flush=True)
    sys.stdin.readline()

if mode == "stampede":
    model, inputs = make(model_name)
    fast = wrap(model)
    with torch.no_grad():
        ref = model(*inputs)
    go()
    t0 = time.perf_counter()
    errors = wrong = 0
    try:
        with torch.no_grad():
            out = fast(*inputs)
        wrong = int(not torch.allclose(out, ref, atol=1e-4, rtol=1e-3))
    except Exception as exc:
        errors = 1
        caught.append(f"EXCEPTION {exc!r}")
    report({"calls": 1, "errors": errors, "wrong": wrong, "first_call_s": time.perf_counter() - t0})
    sys.exit(0)

# -- soak ---------------------------------------------------------------------------------------
model, _ = make("mlp")
w = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))

def f_plain(x, w):
    return torch.nn.functional.gelu(x @ w)

def f_kwargs(x, w, scale=1.0):
    y = x @ w
    return {"y": y * scale, "norm": y.norm(dim=-1)}

def f_tuple(x, w):
    y = torch.tanh(x @ w)
    return y, y.sum(dim=0)

FUNCS = [("module", lambda f, x: f(x), model, lambda x: model(x)),
         ("plain", lambda f, x: f(x, w), f_plain, lambda x: f_plain(x, w)),
         ("kwargs", lambda f, x: f(x, w, scale=2.0), f_kwargs, lambda x: f_kwargs(x, w, scale=2.0)),
         ("tuple", lambda f, x: f(x, w), f_tuple, lambda x: f_tuple(x, w))]
shapes = max(1, keys // len(FUNCS))
fast = [wrap(fn) for _, _, fn, _ in FUNCS]

def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-3)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b

counts = collections.Counter()
exceptions = []
def loop(seed):
    rng = random.Random(seed)
    end = time.time() + seconds
    while time.time() < end:
        j = rng.randrange(len(FUNCS))
        batch = 1 + rng.randrange(shapes)
        _, call, fn, ref_fn = FUNCS[j]
        x = torch.randn(batch, 16)
        target = fast[j]
        if rng.random() < 0.03:
            target = wrap(fn)                 # a fresh wrapper: goes to the persistent cache
        try:
            with torch.no_grad():
                out = call(target, x)
                ref = ref_fn(x)
            ok = same(out, ref)
            with lock:
                counts["calls"] += 1
                counts["wrong"] += int(not ok)
        except Exception as exc:
            with lock:
                counts["calls"] += 1
                counts["errors"] += 1
                caught.append(f"EXCEPTION {exc!r}")
                import traceback
                exceptions.append(traceback.format_exc())

go()
t0 = time.perf_counter()
ts = [threading.Thread(target=loop, args=(os.getpid() * 100 + i,)) for i in range(threads)]
for t in ts:
    t.start()
for t in ts:
    t.join()
report({"calls": counts["calls"], "errors": counts["errors"], "wrong": counts["wrong"],
        "duration_s": time.perf_counter() - t0, "exceptions": exceptions[:3]})
"""


def run(mode: str, processes: int, threads: int, keys: int, seconds: float, directory: str, model: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITFREEZE_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JITFREEZE_MAX_SIGNATURES"] = str(max(8, keys))
    t_spawn = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, mode, directory, str(threads), str(keys), str(seconds),
                               model], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=ROOT)
             for _ in range(processes)]
    startup_errors = 0
    for p in procs:                                   # everyone has imported torch and built its model
        line = p.stdout.readline().strip()
        if line != "ready":
            startup_errors += 1
    t_ready = time.perf_counter()
    for p in procs:                                   # ... then all go at once
        try:
            p.stdin.write("go\n")
            p.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
    results, crashed = [], 0
    limit = seconds + 600
    for p in procs:
        try:
            out, err = p.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        lines = [l for l in out.splitlines() if l.startswith("{")]
        if p.returncode != 0 or not lines:
            crashed += 1
            sys.stderr.write(f"worker {p.pid} failed ({p.returncode}):\n{err[-2000:]}\n")
            continue
        results.append(json.loads(lines[-1]))
    t_done = time.perf_counter()

    per_key = collections.Counter()
    for r in results:
        per_key.update(r["compiled_keys"])
    sys.path.insert(0, ROOT)
    from jitfreeze.cache.disk import DiskStore
    from jitfreeze.cache.repair import check

    store = DiskStore(directory, 4 * 2**30)
    present = {k[2:] for k in store.keys() if k.startswith("a/")}
    problems = check(store)
    stats = store.stats()
    store.close()
    warns = [w for r in results for w in r["warnings"]]
    fig = {
        "mode": mode,
        "processes": processes,
        "threads": threads if mode == "soak" else 1,
        "keys": keys if mode == "soak" else 1,
        "calls": sum(r["calls"] for r in results),
        "compiles": sum(r["compiles"] for r in results),
        "loads": sum(r["loads"] for r in results),
        "keys_compiled": len(per_key),
        "max_compiles_per_key": max(per_key.values(), default=0),
        "errors": sum(r["errors"] for r in results) + crashed + startup_errors,
        "wrong": sum(r["wrong"] for r in results),
        "warnings": len(warns),
        "entries_lost": len(set(per_key) - present),
        "entries": stats["entries"],
        "check_problems": len(problems),
        "startup_s": round(t_ready - t_spawn, 2),
        "run_s": round(t_done - t_ready, 2),
    }
    if mode == "stampede":
        lat = sorted(r["first_call_s"] for r in results)
        fig["first_call_s_median"] = round(lat[len(lat) // 2], 3) if lat else None
        fig["first_call_s_max"] = round(lat[-1], 3) if lat else None
    else:
        fig["seconds"] = seconds
        fig["calls_per_s"] = round(fig["calls"] / max(seconds, 1e-9), 1)
    for w in warns[:5]:
        sys.stderr.write(f"warning: {w}\n")
    for r in results:
        for tb in r.get("exceptions", [])[:1]:
            sys.stderr.write(f"exception in a caller:\n{tb}\n")
    for p in problems[:5]:
        sys.stderr.write(f"check: {p}\n")
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["stampede", "soak"])
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--threads", type=int, default=3)
    ap.add_argument("--keys", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--model", default="cnn", help="stampede: mlp, cnn or transformer (tests/models.py)")
    ap.add_argument("--dir", help="cache directory (default: a fresh temporary one)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line last")
    args = ap.parse_args(argv)
    tmp = None
    directory = args.dir
    if directory is None:
        tmp = tempfile.mkdtemp(prefix="jitfreeze-stress-")
        directory = os.path.join(tmp, "jf")
    try:
        fig = run(args.mode, args.processes, args.threads, args.keys, args.seconds, directory, args.model)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    width = max(map(len, fig))
    for name, value in fig.items():
        print(f"{name:<{width}}  {value}")
    if args.json:
        print(json.dumps(fig))
    ok = fig["errors"] == 0 and fig["wrong"] == 0 and fig["max_compiles_per_key"] <= 1 and fig["check_problems"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
