"""Python's cyclic garbage collector paused while a signature is resolved.

A miss (trace, script, freeze, save, load back, check) allocates tens of thousands of objects,
almost all freed by reference counting. Each 700 net allocations trigger a young-generation
collection, and a process that has just imported torch carries so many young survivors that
the tenth middle-generation collection after the import runs a *full* one: 80-110 ms on the
benchmark's conv net, landing inside whichever first call allocates enough (measured with
``gc.callbacks``: the cold jitfreeze call paid it, the bare pipeline beside it did not).

Paused, the miss triggers no collections; the first one after it (at the process's next
allocations) sweeps what the miss left. Nothing is skipped that reference counting did not
already free. As ``torch.distributed.checkpoint`` does around ``state_dict``: the previous state
is restored, a collector the application disabled stays disabled, and nested or concurrent
resolutions (threads) restore it once, when the last one leaves.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading

__all__ = ["paused", "paused_threads"]

_guard = threading.Lock()
_holders: dict = {}      # thread ident -> how deep that thread is inside paused()
_resume = False          # whether the first entrant found the collector enabled


@contextlib.contextmanager
def paused():
    global _resume
    me = threading.get_ident()
    with _guard:
        if not _holders:
            _resume = gc.isenabled()
            gc.disable()
        _holders[me] = _holders.get(me, 0) + 1
    try:
        yield
    finally:
        with _guard:
            if _holders[me] == 1:
                del _holders[me]
            else:
                _holders[me] -= 1
            if not _holders and _resume:
                gc.enable()


def paused_threads() -> int:
    """How many threads are inside :func:`paused` now (0: the collector is as the application left it)."""
    with _guard:
        return len(_holders)


def _after_fork_in_child() -> None:
    # Only the forking thread exists in the child: the others' pauses end with them.
    global _guard, _holders
    _guard = threading.Lock()
    me = threading.get_ident()
    paused_at_fork = bool(_holders)
    _holders = {me: _holders[me]} if me in _holders else {}
    if paused_at_fork and not _holders and _resume:
        gc.enable()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
