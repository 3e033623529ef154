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

PREFIX = "@@result "


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


def _system_info(name, target, ctx) -> dict:
    from . import systems

    info = dict(ctx.info)
    real = systems.unwrap(target)
    if name == "jitfreeze" and hasattr(real, "cache_info"):
        info["cache_info"] = real.cache_info()._asdict()
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
    if args.case != "steady":
        raise SystemExit(f"unknown case {args.case!r}")
    named, infos, graphs, pairs = {}, {}, {}, {}
    for name in names:
        ctx = systems.Context(model=args.model, cache_dir=args.cache_dir)
        target = systems.SYSTEMS[name].make(fn, inputs, ctx)
        target(*inputs)                              # the first call (compile / load), untimed
        infos[name] = _system_info(name, target, ctx)
        target = systems.unwrap(target)
        named[name] = target
        graphs[name] = systems.graph_summary(target)
        table = getattr(target, "_table", None) if name == "jitfreeze" else None
        if table and args.overhead:                  # the entry's compiled function (ScriptMethod)
            named["jitfreeze.direct"] = next(iter(table.values())).fwd
            pairs[name] = (name, "jitfreeze.direct")
    measured = measure_steady(named, inputs, args.budget, pairs=pairs)
    results = []
    for name in names:
        r = dict(base, system=name, **measured[name], **infos[name])
        if graphs[name] is not None:
            r["graph"] = graphs[name]
        results.append(r)
    return dict(base, system=args.system, results=results, rss_mb=_rss_mb())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", required=True, choices=["cold", "warm", "fill", "steady"])
    p.add_argument("--system", required=True, help="a system; for steady, a comma-separated list")
    p.add_argument("--model", required=True)
    p.add_argument("--cache-dir", help="jitfreeze cache directory (empty for cold, filled for warm)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per system (steady)")
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
