import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import jitfreeze
from jitfreeze.cache import persistent as jf_cache
from jitfreeze import errors as jf_errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Each test: no JITFREEZE_* from the outside, a fresh cache registry, warnings given anew."""
    for name in list(os.environ):
        if name.startswith("JITFREEZE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    jf_cache.forget_open_caches()
    jf_errors.reset_warnings_once()
    yield
    jf_cache.forget_open_caches()


def pytest_addoption(parser):
    parser.addoption(
        "--jf-layout", choices=["traced", "transposed", "timed"], default="traced",
        help="the linear layout small frozen graphs get at compile time: as traced, transposed, or "
             "chosen by timing as in production (default: traced, so no outcome depends on a timing)")


def force_linear_layout(monkeypatch, choice: str) -> None:
    """Make the compile-time timing of a graph's variants against each other and against eager
    (:mod:`jitfreeze.backend.tuning`) come out the same on every machine and load: ``traced``:
    the backend's default variant is kept; ``transposed``: linear layers are stored pre-transposed
    where that is a variant. Eager always times slowest, so every test compiles. No candidate
    is run (nothing is timed)."""
    from jitfreeze.backend import tuning
    favoured = {"traced": None, "transposed": "transposed"}[choice]

    def measure(fns, args):
        times = {name: 0.5 if name == favoured else 2.0 if name == "eager" else 1.0 for name in fns}
        return {name: (t, [t] * 3) for name, t in times.items()}
    monkeypatch.setattr(tuning, "measure", measure)


@pytest.fixture(autouse=True)
def _linear_layout(request, monkeypatch):
    """Which variant of a graph is stored (and whether eager is kept instead) is decided by timing,
    which differs between machines and runs; a test's outcome must not. ``pytest
    --jf-layout=transposed`` runs the suite with linear layers pre-transposed (``timed``: as in
    production)."""
    choice = request.config.getoption("--jf-layout")
    if choice != "timed":
        force_linear_layout(monkeypatch, choice)


@pytest.fixture
def cache_dir(tmp_path):
    return tmp_path / "jf"


def run_script(code: str, *args, env=None, timeout=300, check=True):
    """Run ``code`` in a fresh Python process; return its last stdout line parsed as JSON."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("JITFREEZE_")}
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    # No long-compile line (jitfreeze.progress) unless a test asks: what a test reads on stderr must not
    # depend on how loaded the machine is.
    full_env["JITFREEZE_PROGRESS_AFTER"] = "off"
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    result = json.loads(lines[-1]) if lines and check else None
    return result, proc


def assert_same(a, b, atol=1e-5, rtol=1e-4):
    """Structure, types and values equal (tensors allclose)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        assert torch.allclose(a, b, atol=atol, rtol=rtol), (a - b).abs().max()
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys())
        for k in a:
            assert_same(a[k], b[k], atol, rtol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y, atol, rtol)
    else:
        assert a == b


@pytest.fixture
def no_jf_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", jitfreeze.JitFreezeWarning)
        yield
