import os
import warnings

import pytest
import torch

import jitfreeze
from jitfreeze.cache import persistent as jf_cache
from jitfreeze import errors as jf_errors

from . import children

# Child processes live in tests/children.py; run_script is its run_child, as the other tests call it.
ROOT = children.ROOT
run_script = children.run_child


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


def persistent_cache(fast):
    """The persistent cache (:class:`jitfreeze.cache.persistent.PersistentCache`) that ``fast``
    (a jitfreeze function or module, called at least once) uses: the one open in this process for
    its ``cache_location``."""
    from jitfreeze.cache.persistent import open_cache
    from jitfreeze.config import Config

    assert fast.cache_location is not None, f"{fast!r} runs uncached"
    return open_cache(fast.cache_location, Config.from_env())


def stored_payload(fast, signature=None):
    """The stored artifact's payload (bytes, or a file-backed payload) for ``signature`` (default:
    ``fast``'s first one), as the cache hands it to the backend."""
    signature = signature if signature is not None else fast.signatures()[0]
    return persistent_cache(fast).get(signature.key)[1]


def close_caches(fast):
    """What a process exit does to ``fast``'s cache: close its connections, forget the open caches."""
    cache = persistent_cache(fast)
    cache.store.close()
    if cache.journal is not None:
        cache.journal.close()
    jf_cache.forget_open_caches()


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
