"""Issue 2: every environment variable, and bad cache conditions (one warning, right answer)."""

import pytest
import torch

from jitfreeze import JitFreezeError, JitFreezeWarning, clear_cache, jitfreeze
from jitfreeze.config import Config, default_cache_dir, parse_size

from .conftest import assert_same, run_script
from .models import make


def run(model, x, cache_dir=None):
    fast = jitfreeze(model, cache_dir=cache_dir)
    with torch.no_grad():
        out = fast(x)
    return fast, out


def test_disable_runs_plain_eager(cache_dir, monkeypatch):
    monkeypatch.setenv("JITFREEZE_DISABLE", "1")
    from jitfreeze.trace import pipeline
    monkeypatch.setattr(pipeline, "trace", lambda *a, **k: pytest.fail("traced while disabled"))
    model, (x,) = make("mlp")
    fast, out = run(model, x, cache_dir)
    assert_same(out, model(x).detach())
    assert fast.cache_info() == (0, 0, 0, 0, 0)
    assert not cache_dir.exists()


def test_cache_dir_env_and_default(tmp_path, monkeypatch):
    model, (x,) = make("mlp")
    monkeypatch.setenv("JITFREEZE_CACHE_DIR", str(tmp_path / "from-env"))
    run(model, x)
    assert (tmp_path / "from-env" / "cache.db").exists()
    monkeypatch.delenv("JITFREEZE_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "jitfreeze"       # XDG_CACHE_HOME set by conftest
    run(model, x)
    assert (tmp_path / "xdg" / "jitfreeze" / "cache.db").exists()
    assert oct((tmp_path / "xdg" / "jitfreeze").stat().st_mode & 0o777) == oct(0o700)
    assert str(default_cache_dir({})).endswith(".cache/jitfreeze")


def test_clear_cache_env_clears_once_per_process(cache_dir):
    code = """
import json, sys, torch
from jitfreeze import jitfreeze
from tests.models import make
model, (x,) = make("mlp")
infos = []
for _ in range(2):
    fast = jitfreeze(model, cache_dir=sys.argv[1])
    with torch.no_grad():
        fast(x)
    infos.append(fast.cache_info()._asdict())
print(json.dumps(infos))
"""
    run_script(code, cache_dir)
    infos, _ = run_script(code, cache_dir, env={"JITFREEZE_CLEAR_CACHE": "1"})
    # cleared before the first lookup (compile), not again for the second function (load)
    assert infos[0]["compiles"] == 1 and infos[1]["loads"] == 1


def test_clear_cache_function(cache_dir):
    model, (x,) = make("mlp")
    run(model, x, cache_dir)
    assert clear_cache(cache_dir) == 3          # the artifact, its index entry and its hint
    fast, _ = run(model, x, cache_dir)
    assert fast.cache_info().compiles == 1
    assert jitfreeze.clear_cache is clear_cache


def test_strict_raises_instead_of_falling_back(cache_dir, monkeypatch):
    monkeypatch.setenv("JITFREEZE_STRICT", "1")

    def f(x):
        return x + 1 if x.sum() > 0 else x - 1

    with pytest.raises(JitFreezeError, match="data-dependent"):
        jitfreeze(f, cache_dir=cache_dir)(torch.ones(2))


def test_strict_raises_on_cache_trouble(tmp_path, monkeypatch):
    monkeypatch.setenv("JITFREEZE_STRICT", "1")
    bad = tmp_path / "file"
    bad.write_text("not a directory")
    model, (x,) = make("mlp")
    with pytest.raises(JitFreezeError):
        run(model, x, bad)


def test_log_env_turns_on_logging(cache_dir):
    code = """
import sys, torch
from jitfreeze import jitfreeze
from tests.models import make
model, (x,) = make("mlp")
with torch.no_grad():
    jitfreeze(model, cache_dir=sys.argv[1])(x)
print("{}")
"""
    _, proc = run_script(code, cache_dir, env={"JITFREEZE_LOG": "debug"})
    assert "compiled" in proc.stderr and "key part weights" in proc.stderr
    compile_lines = [l for l in proc.stderr.splitlines() if "compiled" in l]
    assert len(compile_lines) == 1                      # one line per compile, not a flood
    _, quiet = run_script(code, cache_dir)
    assert "jitfreeze" not in quiet.stderr


def _matmul_by(w):
    def matmul(x):
        return x @ w
    return matmul


def test_size_limit_parsing_and_eviction(cache_dir, monkeypatch):
    assert parse_size("500MB") == 500_000_000
    assert parse_size("4GiB") == 4 * 2**30
    assert parse_size("1.5 kib") == 1536
    assert parse_size(1024) == 1024
    with pytest.raises(ValueError):
        parse_size("lots")
    monkeypatch.setenv("JITFREEZE_CACHE_SIZE_LIMIT", "150KB")
    assert Config.from_env().size_limit == 150_000
    # entries of ~43 KB each (a function's own 100x100 weight, stored in its artifact: a module's
    # weights are bound at load, not stored): the least recently used go past the limit
    x = torch.randn(4, 100)
    for seed in range(5):
        run(_matmul_by(torch.randn(100, 100, generator=torch.Generator().manual_seed(seed))), x, cache_dir)
    from jitfreeze.cache.persistent import open_cache
    store = open_cache(cache_dir, Config.from_env()).store
    stats = store.stats()
    artifacts = [k for k in store.keys() if k.startswith("a/")]
    assert 1 <= len(artifacts) < 5
    assert stats["bytes"] < 150_000 + 50_000
    fast, _ = run(_matmul_by(torch.randn(100, 100, generator=torch.Generator().manual_seed(4))), x,
                  cache_dir)                                # the newest entry survived
    assert fast.cache_info().loads == 1


def test_bad_env_values_are_clear_errors(monkeypatch):
    monkeypatch.setenv("JITFREEZE_DISABLE", "maybe")
    with pytest.raises(ValueError, match="JITFREEZE_DISABLE"):
        Config.from_env()


def test_uncreatable_cache_dir_warns_once_and_is_right(tmp_path):
    bad = tmp_path / "file"
    bad.write_text("x")
    model, (x,) = make("mlp")
    with pytest.warns(JitFreezeWarning, match="running uncached") as rec:
        fast, out = run(model, x, bad / "sub")
        fast2, out2 = run(model, x, bad / "sub")
    assert len([w for w in rec if issubclass(w.category, JitFreezeWarning)]) == 1
    assert_same(out, model(x).detach(), atol=1e-5)
    assert fast.cache_info().compiles == 1


def test_lock_timeout_compiles_without_writing(cache_dir, monkeypatch):
    """Another process holds the key's lock past JITFREEZE_LOCK_TIMEOUT: compile, don't write, warn once."""
    import subprocess
    import sys
    import time

    model, (x,) = make("mlp")
    monkeypatch.setenv("JITFREEZE_LOCK_TIMEOUT", "0.5")
    # learn the key with a memory store, then hold its lock from another process
    from jitfreeze.cache.store import MemoryStore
    probe = jitfreeze(model, cache_dir=MemoryStore())
    with torch.no_grad():
        probe(x)
    key = probe.signatures()[0].key
    (cache_dir / "locks").mkdir(parents=True)
    cache_dir.chmod(0o700)
    (cache_dir / "locks").chmod(0o700)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import filelock, sys, time\n"
         "l = filelock.FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(60)",
         str(cache_dir / "locks" / f"{key}.lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t = time.monotonic()
        with pytest.warns(JitFreezeWarning, match="JITFREEZE_LOCK_TIMEOUT"):
            fast, out = run(model, x, cache_dir)
        assert time.monotonic() - t < 20
        assert_same(out, model(x).detach(), atol=1e-5)
        assert fast.cache_info().compiles == 1
    finally:
        holder.kill()
        holder.wait()
    from jitfreeze.cache.persistent import open_cache
    assert open_cache(cache_dir, Config.from_env()).store.stats()["entries"] == 0   # nothing written


def test_max_signatures_caps_compiles(cache_dir, monkeypatch):
    monkeypatch.setenv("JITFREEZE_MAX_SIGNATURES", "2")
    fast = jitfreeze(lambda x: x * 2, cache_dir=cache_dir, dynamic=False)    # exact shapes
    with pytest.warns(JitFreezeWarning, match="max_signatures=2") as caught:
        for n in range(1, 7):
            assert torch.equal(fast(torch.ones(n)), torch.full((n,), 2.0))
    info = fast.cache_info()
    assert info.compiles == 2 and info.fallbacks == 4
    assert len([w for w in caught if "max_signatures" in str(w.message)]) == 1     # once per function


def test_hmac_key_signs_and_refuses_unsigned(cache_dir):
    code = """
import json, sys, warnings, torch
from jitfreeze import jitfreeze
from tests.models import make
model, (x,) = make("mlp")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with torch.no_grad():
        fast = jitfreeze(model, cache_dir=sys.argv[1]); fast(x)
print(json.dumps({"info": fast.cache_info()._asdict(), "warnings": [str(w.message) for w in caught]}))
"""
    unsigned, _ = run_script(code, cache_dir)                                   # stored unsigned
    signed, _ = run_script(code, cache_dir, env={"JITFREEZE_CACHE_KEY": "k1"})
    assert signed["info"]["compiles"] == 1 and "not signed" in signed["warnings"][0]
    again, _ = run_script(code, cache_dir, env={"JITFREEZE_CACHE_KEY": "k1"})
    assert again["info"]["loads"] == 1 and again["warnings"] == []
    wrong, _ = run_script(code, cache_dir, env={"JITFREEZE_CACHE_KEY": "k2"})
    assert wrong["info"]["compiles"] == 1 and "signature does not match" in wrong["warnings"][0]
