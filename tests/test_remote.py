"""Issue 7: the remote tier (a shared Redis behind the local cache), against a real redis-server.

Each test run starts its own redis-server on a free loopback port (no persistence) and stops it
at the end; the tests are skipped when redis-server or the redis package is missing.
"""

import json
import shutil
import socket
import subprocess
import threading
import time
import warnings

import pytest
import torch

import jitfreeze
from jitfreeze.cache import envelope as artifact
from jitfreeze.cache.persistent import open_cache
from jitfreeze.config import Config
from jitfreeze.cache.store import MemoryStore

from .children import RUN_ONE, run_child, run_children
from .models import make

redis = pytest.importorskip("redis")
pytestmark = [pytest.mark.redis,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")]

KEY = "fleet-secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis():
    port = _free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
    deadline = time.time() + 15
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.skip("redis-server did not start")
            time.sleep(0.05)
    return proc, port, client


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def redis_server():
    proc, port, client = _start_redis()
    yield f"redis://127.0.0.1:{port}/0", client
    client.close()
    _stop(proc)


@pytest.fixture
def remote(redis_server, monkeypatch):
    url, client = redis_server
    client.flushall()
    monkeypatch.setenv("JITFREEZE_REMOTE_CACHE", url)
    monkeypatch.setenv("JITFREEZE_CACHE_KEY", KEY)
    return url, client


def _env(url):
    return {"JITFREEZE_REMOTE_CACHE": url, "JITFREEZE_CACHE_KEY": KEY, "JITFREEZE_LOG": "info"}


def _counters(cache_dir):
    from jitfreeze.cache.stats import SqliteJournal
    return SqliteJournal(cache_dir / "stats.db", readonly=True).counters()


def test_second_machine_loads_from_redis_and_compiles_nothing(remote, tmp_path, capsys):
    url, client = remote
    first, _ = run_child(RUN_ONE, tmp_path / "m1", "mlp", env=_env(url))
    assert first["info"]["compiles"] == 1 and first["ok"] and first["warnings"] == []
    names = {k.decode() for k in client.keys("jitfreeze:*")}
    assert any(":a/" in n for n in names) and any(":i/" in n for n in names)
    assert not any(":lock/" in n for n in names)                 # released after the compile
    second, proc = run_child(RUN_ONE, tmp_path / "m2", "mlp", env=_env(url))
    assert second["info"]["compiles"] == 0 and second["info"]["loads"] == 1 and second["ok"]
    assert second["traces"] == 0                                # the index came from Redis too
    assert second["warnings"] == []
    assert _counters(tmp_path / "m2").get("loads_remote") == 1
    from jitfreeze.cli import commands as cli
    capsys.readouterr()
    assert cli.main(["cache", "info", "--json", "--cache-dir", str(tmp_path / "m2")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["remote"]["reachable"] and info["remote"]["entries"] >= 2 and info["counters"]["loads_remote"] == 1
    # stored locally: a third run on machine 2 needs no Redis at all
    third, _ = run_child(RUN_ONE, tmp_path / "m2", "mlp", env={"JITFREEZE_CACHE_KEY": KEY})
    assert third["info"]["loads"] == 1 and third["info"]["compiles"] == 0 and third["traces"] == 0


def test_cold_fleet_compiles_once(remote, tmp_path):
    url, client = remote
    n = 4
    start = time.time() + 8.0              # every process imports torch first, then all start together
    results = run_children(RUN_ONE, [(tmp_path / f"m{i}", "mlp", start) for i in range(n)], env=_env(url))
    assert sum(r["info"]["compiles"] for r in results) == 1, results
    assert sum(r["info"]["loads"] for r in results) == n - 1
    assert all(r["ok"] and r["warnings"] == [] for r in results)


def test_redis_killed_mid_run_calls_stay_correct(monkeypatch, tmp_path):
    proc, port, client = _start_redis()
    try:
        monkeypatch.setenv("JITFREEZE_REMOTE_CACHE", f"redis://127.0.0.1:{port}/0")
        monkeypatch.setenv("JITFREEZE_CACHE_KEY", KEY)
        monkeypatch.setenv("JITFREEZE_REMOTE_TIMEOUT", "0.5")
        model, (x,) = make("mlp")
        fast = jitfreeze.jitfreeze(model, cache_dir=tmp_path / "jf", dynamic=False)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x))
            assert client.keys("jitfreeze:*")                    # published
            client.close()
            _stop(proc)
            with pytest.warns(jitfreeze.JitFreezeWarning, match="remote cache .* failed") as caught:
                for batch in (8, 3):                              # new signatures: Redis is asked, and down
                    y = torch.randn(batch, 16)
                    torch.testing.assert_close(fast(y), model(y))
            assert len([w for w in caught if issubclass(w.category, jitfreeze.JitFreezeWarning)]) == 1
            torch.testing.assert_close(fast(x), model(x))
        assert fast.cache_info().compiles == 3
    finally:
        _stop(proc)


def _cache(url, hmac=KEY, timeout=1.0, store=None):
    config = Config(hmac_key=hmac.encode() if hmac else None, remote_url=url, remote_timeout=timeout,
                    lock_timeout=10.0)
    return open_cache(store if store is not None else MemoryStore(), config)


def test_slow_redis_is_bounded_and_warns_once():
    # A server that accepts connections and never answers.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        cache = _cache(f"redis://127.0.0.1:{srv.getsockname()[1]}/0", timeout=0.3)
        t0 = time.monotonic()
        with pytest.warns(jitfreeze.JitFreezeWarning, match="remote cache"):
            assert cache.get("0" * 64) is None
        assert time.monotonic() - t0 < 2.0
        t0 = time.monotonic()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cache.get("1" * 64) is None                   # local only for a while: no wait, no warning
            with cache.lock("1" * 64) as held:
                assert held
            assert cache.put("1" * 64, {"qualname": "f"}, b"x")   # stored locally
        assert time.monotonic() - t0 < 0.2
        assert cache.get("1" * 64) is not None
    finally:
        stop.set()
        t.join()
        for c in conns:
            c.close()
        srv.close()


def test_remote_entries_are_verified(remote):
    url, client = remote
    key = "ab" * 32
    # signed with another key: refused (one warning), nothing stored locally
    client.set("jitfreeze:1:a/" + key, artifact.pack("a/" + key, {"qualname": "f"}, b"payload", b"other-key"))
    store = MemoryStore()
    cache = _cache(url, store=store)
    with pytest.warns(jitfreeze.JitFreezeWarning, match="refused a bad jitfreeze entry"):
        assert cache.get(key) is None
    assert list(store.keys()) == []
    # stored under another key: refused too
    client.set("jitfreeze:1:a/" + "cd" * 32, artifact.pack("a/" + key, {"qualname": "f"}, b"p", KEY.encode()))
    with pytest.warns(jitfreeze.JitFreezeWarning):
        assert cache.get("cd" * 32) is None
    # a good one: verified, stored locally as the same bytes, and the source is named
    good = artifact.pack("a/" + "ef" * 32, {"qualname": "f"}, b"payload", KEY.encode())
    client.set("jitfreeze:1:a/" + "ef" * 32, good)
    meta, payload = cache.get("ef" * 32)
    assert payload == b"payload" and store.get("a/" + "ef" * 32) == good
    assert cache.where() == url


def test_remote_needs_a_key_or_an_explicit_opt_in(redis_server):
    url, _ = redis_server
    with pytest.warns(jitfreeze.JitFreezeWarning, match="not using the jitfreeze remote cache"):
        cache = _cache(url, hmac=None)
    assert cache.remote is None
    assert open_cache(MemoryStore(), Config(remote_url=url, allow_unsafe_dir=True)).remote is not None


def test_remote_lock_is_exclusive_token_safe_and_expires(remote):
    url, client = remote
    from jitfreeze.cache.remote import RemoteTier
    tier = RemoteTier(url, timeout=1.0, lock_ttl=1.0)
    key = "12" * 32
    holder = tier.lock(key)
    assert holder.acquire(1.0, "a/" + key) == "acquired"
    waiter = tier.lock(key)
    t0 = time.monotonic()
    assert waiter.acquire(0.3, "a/" + key) == "timeout"          # bounded wait
    assert 0.25 < time.monotonic() - t0 < 1.5
    time.sleep(1.2)                                                # renewed past its TTL while held
    assert client.get(holder.name) == holder.token.encode()
    waiter.release()                                               # not the holder: releases nothing
    assert client.get(holder.name) == holder.token.encode()
    # the artifact appears while waiting: the waiter stops waiting
    threading.Timer(0.3, lambda: client.set("jitfreeze:1:a/" + key, b"x")).start()
    assert tier.lock(key).acquire(5.0, "a/" + key) == "published"
    holder.release()
    assert client.get(holder.name) is None
    # a holder that dies (no renewal, no release): the lock expires, another takes it
    dead = tier.lock("34" * 32)
    assert client.set(dead.name, "someone-dead", nx=True, px=500)
    assert tier.lock("34" * 32).acquire(5.0, "a/" + "34" * 32) == "acquired"
