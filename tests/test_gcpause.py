"""The cyclic garbage collector is paused while a signature resolves, and always restored."""

import gc
import os
import threading

import pytest
import torch

from jitfreeze import jitfreeze

from jitfreeze.runtime import gcpause


@pytest.fixture(autouse=True)
def collector_enabled():
    gc.enable()
    yield
    assert gcpause.paused_threads() == 0
    gc.enable()


def test_paused_while_a_miss_traces_and_restored_after(cache_dir):
    seen = []

    def f(x):
        seen.append(gc.isenabled())
        return x * 2 + 1

    g = jitfreeze(f, cache_dir=cache_dir)
    x = torch.randn(4)
    torch.testing.assert_close(g(x), x * 2 + 1)
    assert seen == [False]                    # the trace ran the function with the collector paused
    assert gc.isenabled()
    g(x)
    assert seen == [False]                    # a hit does not trace
    g(torch.randn(2, 3))                      # a new signature pauses again
    assert seen == [False, False] and gc.isenabled()


def test_a_collector_the_application_disabled_stays_disabled(cache_dir):
    g = jitfreeze(lambda x: x + 1, cache_dir=cache_dir)
    gc.disable()
    g(torch.randn(3))
    assert not gc.isenabled()


def test_restored_when_the_call_falls_back_or_raises(cache_dir):
    def data_dependent(x):
        return x * 2 if x.sum() > 0 else x * 3

    with pytest.warns(Warning):
        out = jitfreeze(data_dependent, cache_dir=cache_dir)(torch.ones(3))
    torch.testing.assert_close(out, torch.full((3,), 2.0))
    assert gc.isenabled()

    def broken(x):
        raise ValueError("the function's own error")

    with pytest.raises(ValueError, match="own error"), pytest.warns(Warning, match="tracing failed"):
        jitfreeze(broken, cache_dir=cache_dir)(torch.ones(3))
    assert gc.isenabled()


def test_nested_and_concurrent_pauses_restore_once_when_the_last_leaves():
    with gcpause.paused():
        with gcpause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()

    entered, leave_first = threading.Barrier(2), threading.Event()
    states = {}

    def first():
        with gcpause.paused():
            entered.wait()
        states["after first left"] = gc.isenabled()
        leave_first.set()

    def second():
        with gcpause.paused():
            entered.wait()
            leave_first.wait()
            states["second still inside"] = gc.isenabled()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert states == {"after first left": False, "second still inside": False}
    assert gc.isenabled()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("forker_inside", [False, True])
def test_a_child_forked_during_a_pause_gets_its_collector_back(forker_inside):
    """Another thread's pause ends with that thread in the child; the forking thread's own pause
    lasts until it leaves it there too."""
    inside, done = threading.Event(), threading.Event()

    def other():
        with gcpause.paused():
            inside.set()
            done.wait()

    t = threading.Thread(target=other)
    t.start()
    inside.wait()
    try:
        r, w = os.pipe()
        if forker_inside:
            with gcpause.paused():
                pid = os.fork()
                if pid == 0:
                    states = [gc.isenabled()]
        else:
            pid = os.fork()
            if pid == 0:
                states = []
        if pid == 0:                                  # the child
            states.append(gc.isenabled())
            os.write(w, repr(states).encode())
            os._exit(0)
        os.close(w)
        child = os.read(r, 100).decode()
        os.waitpid(pid, 0)
        os.close(r)
    finally:
        done.set()
        t.join()
    assert child == ("[False, True]" if forker_inside else "[True]")
    assert gc.isenabled()
