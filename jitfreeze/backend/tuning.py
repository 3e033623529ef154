"""Which compiled form of a graph to keep, and whether to keep one at all: timed at compile time,
side by side with eager, on the call's own inputs.

A backend offers variants of one compiled graph (for TorchScript: as frozen, linear weights
pre-transposed, MKLDNN conversions, ``optimize_for_inference``); :func:`choose` times them and
eager in turns (the order alternating each round) and returns a :class:`Choice`:
the fastest variant, unless it beats the backend's default by less than :data:`MARGIN`,
and ``eager=True`` when eager beat even the fastest by more than the noise
(:data:`EAGER_MARGIN`, and in every round). The choice is stored with the artifact, so a
later process neither compiles nor times again.

Eager is the traced graph run as eager runs it, operator by operator in Python (the same
operators eager ran on this call, fused kernels included), not the user's function: calling
that again would repeat its side effects (a counter, a log line, a module's state).

Timing costs calls: each candidate runs one warm-up call and 3-5 rounds, within :data:`BUDGET_S`
(fewer rounds, then fewer variants: eager and the default go first); calls over
:data:`MAX_CALL_S` are not timed (the default variant, compiled). Fast calls are timed in
blocks of about half a millisecond.
``JITFREEZE_TUNE=0`` turns it off: the default variant, always compiled, no timing (the
choice is then also independent of the machine's load).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import torch

__all__ = ["Choice", "choose", "measure", "MARGIN", "EAGER_MARGIN", "MAX_CALL_S", "BUDGET_S"]

log = logging.getLogger("jitfreeze")

MARGIN = 0.95          # a variant replaces the default only when under this fraction of its time
EAGER_MARGIN = 1.05    # eager is kept only when the fastest variant takes over this multiple of its time
MAX_CALL_S = 1.0       # calls slower than this are not timed
BUDGET_S = 3.0         # the timing's own cost, at most (warm-up calls included)
_BLOCK_S = 5e-4        # fast calls are timed in blocks of about this long


@dataclasses.dataclass(frozen=True)
class Choice:
    variant: str                          # the variant to keep
    eager: bool = False                   # eager is faster than every variant: run it instead
    seconds: tuple = ()                   # ((name, median seconds per call), ...), eager included

    def record(self) -> dict:
        """What the artifact stores: ``{"variant", "eager", "ms": {name: ms per call}}``."""
        return {"variant": self.variant, "eager": self.eager,
                "ms": {name: round(s * 1e3, 4) for name, s in self.seconds}}


def measure(fns: dict, args: list):
    """Each of ``fns`` ({name: fn}, the first the reference) run once to warm up, then timed in
    turns (the order alternating each round), in blocks of about half a millisecond; within
    :data:`BUDGET_S` (fewer rounds, then the last names dropped). Returns {name: (median seconds
    per call, [seconds per round])}, or None when even two of them do not fit (or a call takes
    over :data:`MAX_CALL_S`)."""
    names = list(fns)
    clock = time.perf_counter
    t0 = clock()
    fns[names[0]](*args)                          # warms it up, and bounds one call's time
    once = clock() - t0
    plan = _plan(names, once)
    if plan is None:
        return None
    names, rounds = plan
    for name in names[1:]:
        if name != "eager":                       # eager's operators need no warming up
            fns[name](*args)
    n = max(1, int(_BLOCK_S / max(once, 1e-7)))
    samples: dict = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn = fns[name]
            t0 = clock()
            for _ in range(n):
                fn(*args)
            samples[name].append((clock() - t0) / n)
    return {name: (sorted(s)[len(s) // 2], s) for name, s in samples.items()}


def choose(default: str, variants: dict, eager: Callable | None, example: list, enabled: bool = True) -> Choice:
    """The variant of ``variants`` ({name: fn of the example's tensors}) to keep, or eager.

    ``default``: the variant kept when nothing is timed or nothing beats it by :data:`MARGIN`.
    ``eager``: the eager reference (flat tensors in), or None (not compared).
    ``example``: the call's tensors; the candidates run on copies, under no_grad, with the
    caller's random stream as it was and TorchScript's executor optimization off (its profiling
    runs would otherwise be timed)."""
    if not enabled or (len(variants) < 2 and eager is None) or any(t.device.type != "cpu" for t in example):
        return Choice(default)
    args = [t.clone() for t in example]
    order = [default] + (["eager"] if eager is not None else []) + [v for v in variants if v != default]
    fns = {**variants, **({"eager": eager} if eager is not None else {})}
    with torch.no_grad(), torch.random.fork_rng(devices=[]), torch.jit.optimized_execution(False):
        try:
            timed = measure({name: fns[name] for name in order}, args)
        except Exception as exc:  # noqa: BLE001 - a choice of speed: the default stands
            log.debug("jitfreeze: variants not timed (%s); keeping %s", exc, default)
            return Choice(default)
    if timed is None:
        return Choice(default)
    medians = {name: m for name, (m, _) in timed.items()}
    best = min((name for name in timed if name != "eager"), key=lambda name: medians[name])
    chosen = best if medians[best] < MARGIN * medians[default] else default
    slower = "eager" in timed and medians[chosen] > EAGER_MARGIN * medians["eager"] and all(
        c > e for c, e in zip(timed[chosen][1], timed["eager"][1]))
    seconds = tuple(sorted(medians.items()))
    log.debug("jitfreeze: per call %s: keeping %s", ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in seconds),
              "eager" if slower else chosen)
    return Choice(chosen, slower, seconds)


def _plan(order: list, once: float):
    """(names, rounds) that fit :data:`BUDGET_S` at ``once`` seconds per call, or None."""
    if once > MAX_CALL_S:
        return None
    for count in range(len(order), 1, -1):
        for rounds in (5, 3):
            if count * (rounds + 1) * once <= BUDGET_S:
                return order[:count], rounds
    return None
