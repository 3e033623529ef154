"""One measurement in this (fresh) process; prints one JSON line prefixed with ``@@result ``.

    python -m benchmarks.worker --case warm --system jitfreeze --model cnn --cache-dir D

Cases:

* ``cold``, ``warm``, ``fill``: build the model (untimed), time the first call alone
  (``time.perf_counter`` around it), then run a few more calls and report ``ru_maxrss``.
  They differ only in the caches the runner hands over (empty or filled by an earlier
  process); ``fill`` is the untimed run that fills them.
* ``steady``: first call and warm-up untimed, then the median per-call time over blocks
  of calls. For jitfreeze also the wrapper overhead (when calls are short enough to
  resolve it): blocks of calls through the wrapper alternating with blocks calling its
  compiled function directly.

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


def measure_steady(fn, inputs, budget_s: float, min_blocks: int = 5, direct=None) -> dict:
    """``fn`` has had its first call (compile / load); it is the system's own callable."""
    block_s = min(0.05, budget_s / 20)
    n = _calibrate(fn, inputs, warmup_s=max(0.2, min(1.0, budget_s / 2)), block_s=block_s)
    res = {"calls_per_block": n}
    if n < 10:
        direct = None       # over a few ms per call, a few us of overhead drown in the noise
    if direct is None:
        deadline = time.perf_counter() + budget_s
        times = []
        while len(times) < min_blocks or (time.perf_counter() < deadline and len(times) < 10000):
            times += _time_blocks(fn, inputs, n, 1)
        res.update(per_call_s=statistics.median(times), per_call_min_s=min(times), blocks=len(times))
    else:
        # Wrapper overhead: alternate blocks through the wrapper and straight to the compiled
        # function, so that drift on a shared machine hits both alike; median of the pairs.
        _calibrate(direct, inputs, warmup_s=0.1, block_s=block_s)
        deadline = time.perf_counter() + budget_s
        wrapped, straight = [], []
        while len(wrapped) < min_blocks or (time.perf_counter() < deadline and len(wrapped) < 10000):
            wrapped += _time_blocks(fn, inputs, n, 1)
            straight += _time_blocks(direct, inputs, n, 1)
        diffs = [a - b for a, b in zip(wrapped, straight)]
        res.update(per_call_s=statistics.median(wrapped), per_call_min_s=min(wrapped), blocks=len(wrapped),
                   direct_s=statistics.median(straight), overhead_s=statistics.median(diffs))
    res["rss_mb"] = _rss_mb()
    return res


def run(args) -> dict:
    t_start = time.perf_counter()
    import torch

    from . import models, systems

    t_import = time.perf_counter() - t_start
    torch.set_grad_enabled(False)                    # everything under no_grad
    fn, inputs = models.build(args.model)
    spec = systems.SYSTEMS[args.system]
    ctx = systems.Context(model=args.model, cache_dir=args.cache_dir)
    target = spec.make(fn, inputs, ctx)
    res = {"case": args.case, "system": args.system, "model": args.model, "pid": os.getpid(),
           "threads": torch.get_num_threads(), "import_s": t_import}
    if args.case in ("cold", "warm", "fill"):
        res.update(measure_first(target, inputs))
    elif args.case == "steady":
        target(*inputs)                              # the first call (compile / load), untimed
        target = systems.unwrap(target)
        direct = None
        if args.system == "jitfreeze":
            table = getattr(target, "_table", {})
            if table:                                # the entry's compiled function (ScriptMethod)
                direct = next(iter(table.values())).fwd
        res.update(measure_steady(target, inputs, args.budget, direct=direct))
        graph = systems.graph_summary(target)
        if graph is not None:
            res["graph"] = graph
    else:
        raise SystemExit(f"unknown case {args.case!r}")
    real = systems.unwrap(target)
    if args.system == "jitfreeze" and hasattr(real, "cache_info"):
        res["cache_info"] = real.cache_info()._asdict()
    if args.system == "compile":
        from torch._dynamo.utils import counters
        res["inductor"] = {k: v for k, v in counters["inductor"].items() if "cache" in k}
    res.update(ctx.info)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", required=True, choices=["cold", "warm", "fill", "steady"])
    p.add_argument("--system", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--cache-dir", help="jitfreeze cache directory (empty for cold, filled for warm)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls (steady)")
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
