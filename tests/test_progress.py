"""Issue (user's surface) item 3: a long first call says so on stderr without logging turned on
(``JITFREEZE_PROGRESS_AFTER``, the ``jitfreeze.progress`` logger)."""

import logging
import time

import pytest

from jitfreeze.runtime import progress
from jitfreeze.config import Config

from .conftest import run_script

SLOW = """
import json, logging, sys, time, torch
from jitfreeze import jitfreeze
{setup}

def slow(x):
    time.sleep(float(sys.argv[2]))          # runs while the first call is traced
    return x * 2 + 1

fast = jitfreeze(slow, cache_dir=sys.argv[1])
with torch.no_grad():
    out = fast(torch.ones(3))
assert out.tolist() == [3.0, 3.0, 3.0]
print(json.dumps(fast.cache_info()._asdict()))
"""


def slow_run(cache_dir, sleep, after, setup="", **env):
    if after is not None:
        env["JITFREEZE_PROGRESS_AFTER"] = after
    info, proc = run_script(SLOW.format(setup=setup), cache_dir, sleep, env=env)
    assert info["compiles"] == 1
    lines = [l for l in proc.stderr.splitlines() if "__main__.slow" in l]      # not warnings naming jitfreeze files
    return [l for l in lines if "so far" in l], [l for l in lines if "so far" not in l]


def test_slow_miss_prints_one_line_and_the_total(cache_dir):
    so_far, rest = slow_run(cache_dir, 0.5, "0.05")
    assert len(so_far) == 1, so_far
    line = so_far[0]
    assert line.startswith("jitfreeze: compiling __main__.slow for (3 float32): ")
    assert line.endswith(f"later processes will load it from {cache_dir}")
    assert len(rest) == 1 and "__main__.slow for (3 float32): compiled and stored in " in rest[0], rest


def test_fast_miss_prints_nothing(cache_dir):
    assert slow_run(cache_dir, 0, "60") == ([], [])


def test_off_prints_nothing(cache_dir):
    assert slow_run(cache_dir, 0.5, "off") == ([], [])
    assert slow_run(cache_dir / "zero", 0.5, "0") == ([], [])


def test_user_silences_the_logger(cache_dir):
    setup = 'logging.getLogger("jitfreeze.progress").setLevel(logging.WARNING)'
    assert slow_run(cache_dir, 0.5, "0.05", setup) == ([], [])


def test_printed_once_with_jitfreeze_log_or_user_logging(cache_dir):
    so_far, rest = slow_run(cache_dir, 0.5, "0.05", JITFREEZE_LOG="info")
    assert len(so_far) == 1 and so_far[0].startswith("jitfreeze INFO compiling __main__.slow"), so_far
    # The compile's own INFO line is the closing line.
    assert len(rest) == 1 and rest[0].startswith("jitfreeze INFO __main__.slow: compiled (3 float32) in "), rest
    so_far, _ = slow_run(cache_dir / "basic", 0.5, "0.05", "logging.basicConfig(level=logging.INFO)")
    assert len(so_far) == 1 and so_far[0].startswith("INFO:jitfreeze.progress:compiling"), so_far


def test_precompile_shows_its_own_progress_not_this_line(cache_dir):
    code = """
import json, sys, time, torch
import jitfreeze

def slow(x):
    time.sleep(0.5)
    return x + 1

report = jitfreeze.precompile(jitfreeze.jitfreeze(slow, cache_dir=sys.argv[1]), [(torch.ones(2),)])
print(json.dumps([r.outcome for r in report]))
"""
    outcomes, proc = run_script(code, cache_dir, env={"JITFREEZE_PROGRESS_AFTER": "0.05"})
    assert outcomes == ["compiled"]
    assert "so far" not in proc.stderr
    assert "jitfreeze precompile [1/1] (2 float32): compiled" in proc.stderr


def test_config_parsing():
    assert Config.from_env({}).progress_after == 5.0
    assert Config.from_env({"JITFREEZE_PROGRESS_AFTER": "2.5"}).progress_after == 2.5
    for off in ("0", "off", "OFF", " 0.0 "):
        assert Config.from_env({"JITFREEZE_PROGRESS_AFTER": off}).progress_after is None
    for bad in ("-1", "soon", "nan", "inf"):
        with pytest.raises(ValueError, match="JITFREEZE_PROGRESS_AFTER"):
            Config.from_env({"JITFREEZE_PROGRESS_AFTER": bad})


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def records():
    handler = _Records()
    progress.log.addHandler(handler)
    yield handler.messages
    progress.log.removeHandler(handler)


def test_watch_phases_and_endings(records):
    with progress.Progress("f", "(2 float32)", "/c", 0.01) as w:
        w.phase = "loading"
        time.sleep(0.3)
        w.done = "loaded"
    assert records[0].startswith("loading f for (2 float32) from /c: 0.") and records[0].endswith(" s so far")
    assert records[1].startswith("f for (2 float32): loaded in 0.") and len(records) == 2, records
    records.clear()
    with progress.Progress("f", "(2 float32)", None, 0.01) as w:
        time.sleep(0.3)
        w.eager = True
    assert records[0].endswith("(no usable cache: later processes compile it again)")
    assert records[1].startswith("f for (2 float32) runs eagerly after 0.") and len(records) == 2, records
    records.clear()
    with pytest.raises(KeyboardInterrupt):
        with progress.Progress("f", "()", "/c", 0.01):
            time.sleep(0.3)
            raise KeyboardInterrupt
    assert records[1].startswith("f for () stopped after 0.") and records[1].endswith("(KeyboardInterrupt)"), records
    records.clear()
    with progress.Progress("f", "()", "/c", 60), progress.quiet(), progress.Progress("g", "()", "/c", 0.01):
        time.sleep(0.1)
    assert records == []                               # ended first / quiet


def test_default_handler_defers_to_other_handlers():
    default = [h for h in progress.log.handlers if isinstance(h, progress.DefaultHandler)]
    assert len(default) == 1 and progress.log.level == logging.INFO
    loggers = [progress.log, logging.getLogger("jitfreeze"), logging.getLogger()]
    saved = [list(lg.handlers) for lg in loggers]
    try:
        for lg in loggers:
            lg.handlers = [h for h in lg.handlers if h is default[0]]
        assert not progress.handled_elsewhere(logging.INFO, default[0])     # it writes
        loggers[1].handlers = [logging.NullHandler(logging.WARNING)]
        assert not progress.handled_elsewhere(logging.INFO, default[0])     # that one would not show INFO
        loggers[2].handlers = [logging.NullHandler()]
        assert progress.handled_elsewhere(logging.INFO, default[0])         # the root's would: it stays quiet
    finally:
        for lg, hs in zip(loggers, saved):
            lg.handlers = hs


def test_watch_cost_on_a_fast_miss():
    """Watching a miss that ends first: a deadline handed to the shared watchdog, microseconds."""
    for _ in range(20):
        with progress.Progress("f", "()", "/c", 60):
            pass
    n = 500
    t0 = time.perf_counter()
    for _ in range(n):
        with progress.Progress("f", "()", "/c", 60):
            pass
    per = (time.perf_counter() - t0) / n
    assert per < 2e-4, per                 # a Timer thread per miss: 0.3-0.6 ms
