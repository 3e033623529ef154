"""One measurement in this (fresh) process; prints one JSON line prefixed with ``@@result ``.

    python -m benchmarks.worker --case warm --system jitfreeze --model cnn --cache-dir D
    python -m benchmarks.worker --case steady --system eager,trace,jitfreeze --model cnn --cache-dir D

Cases:

* ``cold``, ``warm``, ``fill``: build the model (untimed), time the first call alone
  (``time.perf_counter`` around it), then run a few more calls and report ``ru_maxrss``.
  They differ only in the caches the runner hands over (empty or filled by an earlier
  process); ``fill`` is the untimed run that fills them.
* ``steady`` (``--system eager,trace,compile,jitfreeze``): every system built in this one
  process, first call and warm-up untimed, then blocks of calls taking turns round robin;
  the median per-call time of each. Steady figures are not start-up figures: one process
  for all systems lets them share whatever load the machine has, so the ratios are
  robust. For jitfreeze also the wrapper overhead: its compiled function (``_Entry.fwd``)
  called directly takes a turn too, and the overhead is the median difference between
  adjacent blocks.
* ``varbatch`` (one system per process, empty caches): the variable-batch model called with
  batch sizes 1..``--max-batch`` in turn; the wall time of the loop (the system's calls
  only: each call is followed by an untimed eager call on the same inputs, whose outputs it
  must match), the number of compiles, the stored artifacts and the cache directory's disk
  usage afterwards (``TORCHINDUCTOR_CACHE_DIR`` for torch.compile).

Everything runs under ``torch.no_grad()``. Threads: torch's defaults (recorded).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
import traceback
import warnings

PREFIX = "@@result "
PROGRESS = "@@progress "     # varbatch: one line per batch size, so a killed worker (OOM) still tells how far it got


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux


def _time_blocks(fn, inputs, n: int, blocks: int):
    out = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(blocks):
            t0 = time.perf_counter()
            for _ in range(n):
                fn(*inputs)
            out.append((time.perf_counter() - t0) / n)
    finally:
        if gc_was:
            gc.enable()
    return out


def _calibrate(fn, inputs, warmup_s: float, block_s: float) -> int:
    """Warm up for ``warmup_s`` (at least 5 calls); return calls per block of about ``block_s``."""
    deadline = time.perf_counter() + warmup_s
    calls = 0
    while calls < 5 or time.perf_counter() < deadline:
        fn(*inputs)
        calls += 1
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn(*inputs)
        dt = time.perf_counter() - t0
        if dt >= block_s / 4 or n >= 1 << 20:
            break
        n *= 2
    return max(1, int(n * block_s / max(dt, 1e-9)))


def measure_first(fn, inputs, extra_calls: int = 3) -> dict:
    gc.collect()
    t0 = time.perf_counter()
    fn(*inputs)
    first = time.perf_counter() - t0
    for _ in range(extra_calls):
        fn(*inputs)
    return {"first_s": first, "rss_mb": _rss_mb()}


def measure_steady(named: dict, inputs, budget_s: float, min_rounds: int = 5, pairs=None) -> dict:
    """Median per-call time of each callable in ``named`` (each has had its first call).

    The callables take turns, one block of calls each per round (the order rotated every
    round), so that whatever else the machine is doing hits them alike: the ratios hold
    up on a shared machine even when the absolute times do not. ``pairs`` maps a name to
    (wrapped, direct): the median over rounds of wrapped minus direct (adjacent blocks) is
    reported as that entry's ``overhead_s``.
    """
    block_s = min(0.05, budget_s / 20)
    names = list(named)
    calls = {}
    for name in names:
        calls[name] = _calibrate(named[name], inputs, warmup_s=max(0.2, min(1.0, budget_s / 4)), block_s=block_s)
    for wrapped, direct in list((pairs or {}).values()):
        if calls[wrapped] < 10:       # over ~5 ms per call, a few us of overhead drown in the noise
            names.remove(direct)
            pairs = {k: v for k, v in pairs.items() if v != (wrapped, direct)}
    times: dict = {name: [] for name in names}
    deadline = time.perf_counter() + budget_s * len(names)
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() < deadline and rounds < 10000):
        k = rounds % len(names)
        for name in names[k:] + names[:k]:
            times[name] += _time_blocks(named[name], inputs, calls[name], 1)
        rounds += 1
    out = {}
    for name in names:
        t = times[name]
        out[name] = {"per_call_s": statistics.median(t), "per_call_min_s": min(t), "blocks": len(t),
                     "calls_per_block": calls[name]}
    for name, (wrapped, direct) in (pairs or {}).items():
        diffs = [a - b for a, b in zip(times[wrapped], times[direct])]
        out[name]["direct_s"] = out[direct]["per_call_s"]
        out[name]["overhead_s"] = statistics.median(diffs)
    return out


def output_diff(out, ref) -> dict:
    """Max abs difference of ``out`` from ``ref`` over their tensors, and that over the largest
    magnitude of ``ref`` (max rel diff); None for both when their structures differ."""
    from torch.utils import _pytree as pytree

    la, lb = pytree.tree_leaves(out), pytree.tree_leaves(ref)
    pairs = [(a, b) for a, b in zip(la, lb) if hasattr(a, "shape")]
    if len(la) != len(lb) or any(a.shape != b.shape for a, b in pairs):
        return {"max_abs_diff": None, "max_rel_diff": None}
    pairs = [(a.double(), b.double()) for a, b in pairs if a.numel()]
    abs_diff = max((float((a - b).abs().max()) for a, b in pairs), default=0.0)
    rel = max((float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) for a, b in pairs), default=0.0)
    return {"max_abs_diff": abs_diff, "max_rel_diff": rel}


def _system_info(name, target, ctx) -> dict:
    from . import systems

    info = dict(ctx.info)
    real = systems.unwrap(target)
    if name.startswith("jitfreeze") and hasattr(real, "cache_info"):
        info["cache_info"] = real.cache_info()._asdict()
        info["fallback_reasons"] = [s.reason for s in real.signatures() if s.source == "eager"]
    if name == "compile":
        from torch._dynamo.utils import counters
        info["inductor"] = {k: v for k, v in counters["inductor"].items() if "cache" in k}
    return info


def run(args) -> dict:
    t_start = time.perf_counter()
    import torch

    from . import models, systems

    t_import = time.perf_counter() - t_start
    torch.set_grad_enabled(False)                    # everything under no_grad
    if args.case == "varbatch":
        fn, inputs = None, None
    else:
        fn, inputs = models.build(args.model)
    names = args.system.split(",")
    base = {"case": args.case, "model": args.model, "pid": os.getpid(), "threads": torch.get_num_threads(),
            "import_s": t_import}
    if args.case in ("cold", "warm", "fill"):
        if len(names) != 1:
            raise SystemExit("start-up cases take one system per process")
        ctx = systems.Context(model=args.model, cache_dir=args.cache_dir)
        target = systems.SYSTEMS[names[0]].make(fn, inputs, ctx)
        res = dict(base, system=names[0], **measure_first(target, inputs))
        res.update(_system_info(names[0], target, ctx))
        return res
    if args.case == "varbatch":
        if len(names) != 1:
            raise SystemExit("the varbatch case takes one system per process")
        return dict(base, **measure_varbatch(names[0], args))
    if args.case != "steady":
        raise SystemExit(f"unknown case {args.case!r}")
    named, infos, graphs, pairs = {}, {}, {}, {}
    reference = fn(*inputs)                          # eager outputs, for each system's diff
    for name in names:
        ctx = systems.Context(model=args.model, cache_dir=args.cache_dir)
        target = systems.SYSTEMS[name].make(fn, inputs, ctx)
        out = target(*inputs)                        # the first call (compile / load), untimed
        infos[name] = dict(_system_info(name, target, ctx), **output_diff(out, reference))
        del out
        target = systems.unwrap(target)
        named[name] = target
        graphs[name] = systems.graph_summary(target)
        compiled = [s.compiled for s in target.signatures() if s.compiled is not None] \
            if name == "jitfreeze" else []
        if compiled and args.overhead:               # the entry's compiled function (ScriptMethod)
            named["jitfreeze.direct"] = compiled[0]
            pairs[name] = (name, "jitfreeze.direct")
    del reference
    measured = measure_steady(named, inputs, args.budget, pairs=pairs)
    results = []
    for name in names:
        r = dict(base, system=name, **measured[name], **infos[name])
        if graphs[name] is not None:
            r["graph"] = graphs[name]
        results.append(r)
    return dict(base, system=args.system, results=results, rss_mb=_rss_mb())


def disk_usage(path) -> tuple[int, int]:
    """(bytes on disk as du counts them, number of files) under ``path``."""
    total = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += st.st_blocks * 512
            files += 1
    return total, files


def jitfreeze_artifacts(cache_dir) -> int:
    """How many compiled artifacts a jitfreeze cache directory holds (index/decision records excluded)."""
    from jitfreeze.cache.persistent import ARTIFACT
    from jitfreeze.config import Config
    from jitfreeze.cache.disk import DiskStore

    store = DiskStore(cache_dir, Config.from_env().size_limit, readonly=True)
    try:
        return sum(1 for k in store.keys() if k.startswith(ARTIFACT))
    finally:
        store.close()


VARBATCH_RTOL = VARBATCH_ATOL = 1e-4


def measure_varbatch(name: str, args) -> dict:
    """Serve batch sizes 1..args.max_batch with one system in this (fresh) process, empty caches."""
    import torch
    from torch.utils import _pytree as pytree

    from . import models, systems

    fn, make_inputs = models.build_varbatch(args.model)
    ctx = systems.Context(model=args.model, cache_dir=args.cache_dir)
    target = systems.SYSTEMS[name].make(fn, make_inputs(1), ctx)
    sizes = list(range(1, args.max_batch + 1))
    per_call, eager, mismatched, max_diff = [], [], [], 0.0
    gc.collect()
    with warnings.catch_warnings(record=True) as recorded:   # every warning, to report jitfreeze's
        warnings.simplefilter("always")
        for b in sizes:
            inputs = make_inputs(b)
            t0 = time.perf_counter()
            out = target(*inputs)
            per_call.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ref = fn(*inputs)                           # eager reference, outside the loop's time
            eager.append(time.perf_counter() - t0)
            pairs = list(zip(pytree.tree_leaves(out), pytree.tree_leaves(ref)))
            diff = max((float((a - b_).abs().max()) for a, b_ in pairs), default=0.0)
            max_diff = max(max_diff, diff)
            if len(pytree.tree_leaves(out)) != len(pytree.tree_leaves(ref)) or not all(
                    a.shape == b_.shape and torch.allclose(a, b_, rtol=VARBATCH_RTOL, atol=VARBATCH_ATOL)
                    for a, b_ in pairs):
                mismatched.append(b)
            real = systems.unwrap(target)
            compiles = real.cache_info().compiles if name.startswith("jitfreeze") else None
            print(PROGRESS + json.dumps({"batch": b, "loop_s": sum(per_call), "eager_loop_s": sum(eager),
                                         "compiles": compiles, "mismatched_sizes": mismatched,
                                         "rss_mb": _rss_mb()}), flush=True)
    res = {"system": name, "sizes": [sizes[0], sizes[-1]], "loop_s": sum(per_call), "eager_loop_s": sum(eager),
           "first_s": per_call[0], "per_call_s_list": [round(t, 6) for t in per_call],
           "all_close": not mismatched, "mismatched_sizes": mismatched, "max_diff": max_diff,
           "rtol": VARBATCH_RTOL, "atol": VARBATCH_ATOL, "rss_mb": _rss_mb()}
    real = systems.unwrap(target)
    if name.startswith("jitfreeze"):
        ci = real.cache_info()
        res["cache_info"] = ci._asdict()
        res["compiles"] = ci.compiles
        res["fallbacks"] = ci.fallbacks
        res["traces"] = getattr(real, "traces", None)
        res["signatures"] = getattr(real, "_signatures", None)      # signatures counted against max_signatures
        from jitfreeze import JitFreezeWarning
        res["warnings"] = sorted({str(w.message) for w in recorded if issubclass(w.category, JitFreezeWarning)})
        res["artifacts"] = jitfreeze_artifacts(args.cache_dir)
        used, files = disk_usage(args.cache_dir)
    else:
        from torch._dynamo.utils import counters
        res["compiles"] = counters["stats"]["unique_graphs"]       # graphs dynamo compiled (recompiles too)
        res["frames"] = dict(counters["frames"])
        res["graph_breaks"] = sum(counters["graph_break"].values())
        res["inductor"] = {k: v for k, v in counters["inductor"].items() if "cache" in k}
        inductor_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        used, files = disk_usage(inductor_dir) if inductor_dir else (0, 0)
        fx = os.path.join(inductor_dir, "fxgraph") if inductor_dir else None
        res["artifacts"] = disk_usage(fx)[1] if fx and os.path.isdir(fx) else None   # FX graph cache entries
    res["cache_mb"] = used / 1e6
    res["cache_files"] = files
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", required=True, choices=["cold", "warm", "fill", "steady", "varbatch"])
    p.add_argument("--system", required=True, help="a system; for steady, a comma-separated list")
    p.add_argument("--model", required=True)
    p.add_argument("--cache-dir", help="jitfreeze cache directory (empty for cold, filled for warm)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per system (steady)")
    p.add_argument("--max-batch", type=int, default=64, help="varbatch: batch sizes 1..N")
    p.add_argument("--no-overhead", dest="overhead", action="store_false",
                   help="steady: don't time jitfreeze's compiled function directly")
    args = p.parse_args(argv)
    try:
        res = run(args)
        res["ok"] = True
        code = 0
    except BaseException as exc:  # noqa: BLE001 - report any failure as a result line
        traceback.print_exc()
        res = {"case": args.case, "system": args.system, "model": args.model, "ok": False,
               "error": f"{type(exc).__name__}: {exc}"[:2000]}
        code = 1
    sys.stdout.flush()
    print(PREFIX + json.dumps(res, default=str), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
