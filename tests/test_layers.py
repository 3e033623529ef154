"""Issue 7: layered caches (JITFREEZE_CACHE_PATH=ro1:ro2:writable).

Hits come from any layer, writes go to the writable one only, and a read-only layer is never
modified: not by loads, compiles, eviction, clear, prune or verify (checked file by file).
"""

import hashlib
import os
import sqlite3

import pytest
import torch

import jitfreeze
from jitfreeze.cache import persistent as jf_cache
from jitfreeze.cli import commands as cli
from jitfreeze.cache.layers import ReadOnlyDirStore

from .conftest import close_caches
from .models import make


def snapshot(path):
    """Every file under ``path``: (size, mtime_ns, mode, sha256)."""
    out = {}
    for root, dirs, files in os.walk(path):
        out[root] = ("dir", os.stat(root).st_mode)
        for f in files:
            full = os.path.join(root, f)
            st = os.stat(full)
            with open(full, "rb") as fh:
                out[full] = (st.st_size, st.st_mtime_ns, st.st_mode, hashlib.sha256(fh.read()).hexdigest())
    return out


def run(model, x, **kw):
    fast = jitfreeze.jitfreeze(model, dynamic=False, **kw)
    with torch.no_grad():
        out = fast(x)
        torch.testing.assert_close(out, model(x))
    return fast


@pytest.fixture
def layer(tmp_path):
    """A cache directory with one compiled MLP (batch 4), made by an earlier 'process'."""
    path = tmp_path / "layer"
    model, (x,) = make("mlp")
    fast = run(model, x, cache_dir=path)
    assert fast.cache_info().compiles == 1
    close_caches(fast)                          # that process has exited
    os.chmod(path, 0o755)                       # as baked into an image: readable, not writable by others
    return path


def test_hits_from_layer_writes_to_writable_layer_never_modified(layer, tmp_path, monkeypatch, capsys):
    writable = tmp_path / "rw"
    monkeypatch.setenv("JITFREEZE_CACHE_PATH", f"{layer}:{writable}")
    monkeypatch.setenv("JITFREEZE_CACHE_SIZE_LIMIT", "1KB")      # eviction would empty any layer it touched
    before = snapshot(layer)
    model, (x,) = make("mlp")
    fast = run(model, x)
    assert fast.cache_info().loads == 1 and fast.cache_info().compiles == 0 and fast.traces == 0
    y = torch.randn(8, 16)                                       # a new signature compiles into the writable layer
    with torch.no_grad():
        torch.testing.assert_close(fast(y), model(y))
    assert fast.cache_info().compiles == 1
    cache = jf_cache.open_cache(None, jitfreeze.config.Config.from_env())
    assert cache.location == str(writable) and [l.location for l in cache.layers] == [str(layer)]
    assert cache.journal.counters()["loads_layer"] == 1
    # the CLI's writers leave the layer alone too
    assert cli.main(["cache", "prune", "--max-size", "0"]) == 0
    assert cli.main(["cache", "verify"]) == 0
    assert cli.main(["cache", "clear"]) == 0
    assert "read-only layers left as they are" in capsys.readouterr().out
    assert snapshot(layer) == before
    jf_cache.forget_open_caches()
    assert run(model, x).cache_info().loads == 1                 # still served by the layer
    assert snapshot(layer) == before


def test_layer_entries_listed_with_their_layer(layer, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JITFREEZE_CACHE_PATH", f"{layer}:{tmp_path / 'rw'}")
    assert cli.main(["cache", "list", "--json"]) == 0
    import json
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and rows[0]["layer"] == str(layer) and not rows[0]["writable"]
    assert rows[0]["qualname"] == "tests.models.MLP"


def test_bundle_file_is_a_layer(layer, tmp_path, monkeypatch):
    bundle = tmp_path / "model.jfb"
    assert cli.main(["export", str(bundle), "--cache-dir", str(layer)]) == 0
    monkeypatch.setenv("JITFREEZE_CACHE_PATH", f"{bundle}:{tmp_path / 'rw'}")
    jf_cache.forget_open_caches()
    model, (x,) = make("mlp")
    before = bundle.read_bytes()
    fast = run(model, x)
    assert fast.cache_info().loads == 1 and fast.cache_info().compiles == 0
    assert bundle.read_bytes() == before


def test_bad_entry_in_layer_is_skipped_not_removed(layer, tmp_path, monkeypatch):
    con = sqlite3.connect(layer / "cache.db")
    (n,) = con.execute("SELECT COUNT(*) FROM Cache WHERE key LIKE 'a/%'").fetchone()
    rows = con.execute("SELECT rowid, filename, value FROM Cache WHERE key LIKE 'a/%'").fetchall()
    for rowid, filename, value in rows:          # flip a byte of every artifact
        if filename:
            p = layer / filename
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 1
            p.write_bytes(bytes(data))
        else:
            data = bytearray(value)
            data[len(data) // 2] ^= 1
            con.execute("UPDATE Cache SET value = ? WHERE rowid = ?", (bytes(data), rowid))
    con.commit()
    con.close()
    before = snapshot(layer)
    monkeypatch.setenv("JITFREEZE_CACHE_PATH", f"{layer}:{tmp_path / 'rw'}")
    model, (x,) = make("mlp")
    with pytest.warns(jitfreeze.JitFreezeWarning, match="bad jitfreeze cache entry"):
        fast = run(model, x)
    assert fast.cache_info().compiles == 1
    assert cli.main(["cache", "verify"]) == 1                    # reported, left in place
    assert snapshot(layer) == before
    jf_cache.forget_open_caches()
    assert run(model, x).cache_info().loads == 1                 # the writable layer's good copy wins


def test_untrusted_layer_refused_unless_signed(layer, tmp_path, monkeypatch):
    os.chmod(layer, 0o777)
    monkeypatch.setenv("JITFREEZE_CACHE_PATH", f"{layer}:{tmp_path / 'rw'}")
    model, (x,) = make("mlp")
    with pytest.warns(jitfreeze.JitFreezeWarning, match="refusing the read-only jitfreeze cache layer"):
        assert run(model, x).cache_info().compiles == 1
    # with JITFREEZE_CACHE_KEY every entry is authenticated: a layer anyone could write is usable
    monkeypatch.setenv("JITFREEZE_CACHE_KEY", "k")
    monkeypatch.delenv("JITFREEZE_CACHE_PATH")
    signed = tmp_path / "signed"
    jf_cache.forget_open_caches()
    fast = run(model, x, cache_dir=signed)
    close_caches(fast)
    os.chmod(signed, 0o777)
    monkeypatch.setenv("JITFREEZE_CACHE_PATH", f"{signed}:{tmp_path / 'rw2'}")
    assert run(model, x).cache_info().loads == 1


def test_missing_layer_warns_once_and_carries_on(tmp_path, monkeypatch):
    monkeypatch.setenv("JITFREEZE_CACHE_PATH", f"{tmp_path / 'nope'}:{tmp_path / 'rw'}")
    model, (x,) = make("mlp")
    with pytest.warns(jitfreeze.JitFreezeWarning, match="cannot read the read-only jitfreeze cache layer"):
        assert run(model, x).cache_info().compiles == 1


def test_readonly_store_opens_without_writing(layer):
    before = snapshot(layer)
    store = ReadOnlyDirStore(layer)
    keys = list(store.keys())
    assert keys and all(store.get(k) for k in keys)
    with pytest.raises(PermissionError):
        store.put(keys[0], b"x")
    with pytest.raises(PermissionError):
        store.clear()
    store.close()
    assert snapshot(layer) == before


def test_file_backed_entry_loads_in_place_from_layer(tmp_path, monkeypatch):
    path = tmp_path / "layer"
    model, (x,) = make("projected")                     # ~48 KB: a value file, loaded in place
    fast = run(model, x, cache_dir=path)
    close_caches(fast)
    store = ReadOnlyDirStore(path)
    assert any(store.get_file(k) for k in store.keys() if k.startswith("a/"))
    store.close()
    before = snapshot(path)
    monkeypatch.setenv("JITFREEZE_CACHE_PATH", f"{path}:{tmp_path / 'rw'}")
    fast = run(model, x)
    assert fast.cache_info().loads == 1 and fast.cache_info().compiles == 0
    assert snapshot(path) == before


@pytest.mark.parametrize("loose", [".", "locks", "cache.db", "cache.db-shm"])
def test_a_layer_directory_the_trust_rule_refuses_is_refused_as_a_layer(tmp_path, loose):
    """One trust rule (jitfreeze.cache.trust.check_directory) for cache directories and layers: what
    it refuses (here: a directory, index or lock folder others can write), open_layer refuses too."""
    from jitfreeze.cache import trust
    from jitfreeze.cache.bundle import finalize_layer
    from jitfreeze.cache.disk import DiskStore
    from jitfreeze.cache.layers import UnsafeLayer, open_layer

    path = tmp_path / "layer"
    store = DiskStore(path, 2**30)
    store.put("a/k", b"x" * 100)
    store.close()
    finalize_layer(path)
    (path / "locks").mkdir(exist_ok=True)
    (path / "cache.db-shm").touch()
    open_layer(path, trusted=False).close()                 # as made: trusted by both
    trust.check_directory(path)
    target = path / loose
    target.chmod(target.stat().st_mode | 0o020)              # group-writable
    with pytest.raises(trust.UnsafeDirectory, match="writable by group"):
        trust.check_directory(path)
    with pytest.raises(UnsafeLayer, match="writable by group"):
        open_layer(path, trusted=False)
    layer = open_layer(path, trusted=True)                  # JITFREEZE_CACHE_KEY set: entries are signed
    assert layer.get("a/k") == b"x" * 100
    layer.close()


def test_each_store_implements_the_protocols_it_is_used_through(tmp_path):
    """The cache asks stores what they can do with isinstance on these protocols (no hasattr)."""
    from jitfreeze.cache import envelope
    from jitfreeze.cache.bundle import export_bundle
    from jitfreeze.cache.disk import DiskStore
    from jitfreeze.cache.layers import BundleStore, scan
    from jitfreeze.cache.store import FileBacked, InPlaceWritable, Listable, MemoryStore, Store

    disk = DiskStore(tmp_path / "c", 2**30)
    memory = MemoryStore()
    for store in (disk, memory):
        store.put("a/k", envelope.pack("a/k", {"qualname": "f"}, b"x" * 100))
    export_bundle(tmp_path / "b.jfb", [disk], None)
    disk.close()                            # the last connection: the index holds every row (a layer is a snapshot)
    stores = {"disk": DiskStore(tmp_path / "c", 2**30), "memory": memory, "dir": ReadOnlyDirStore(tmp_path / "c"),
              "bundle": BundleStore(tmp_path / "b.jfb")}
    expected = {"disk": {Store, FileBacked, InPlaceWritable, Listable}, "memory": {Store, Listable},
                "dir": {Store, FileBacked, Listable}, "bundle": {Store, Listable}}
    for name, store in stores.items():
        assert {p for p in (Store, FileBacked, InPlaceWritable, Listable) if isinstance(store, p)} == expected[name], name
        rows = list(scan(store))
        assert [(r.key, r.meta["qualname"], r.writable) for r in rows] == [("a/k", "f", not store.readonly)], name
        store.close()
