"""Issue 7: the ``jitfreeze`` command: cache info/list/clear/prune/verify, explain, export/import."""

import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import time

import pytest
import torch

import jitfreeze
from jitfreeze.cache import persistent as jf_cache
from jitfreeze.cli import commands as cli
from jitfreeze.cli.explain import differences

from .children import COMPILE_MLP, run_child, run_cli
from .conftest import close_caches
from .models import make


def jf(capsys, *argv):
    """Run the CLI in-process: (exit status, parsed JSON output)."""
    capsys.readouterr()
    rc = cli.main([*argv, "--json"])
    out = capsys.readouterr().out
    return rc, (json.loads(out) if out.strip() else None)


def compile_mlp(cache_dir, batches=(4,), seed=0):
    model, _ = make("mlp", seed=seed)
    fast = jitfreeze.jitfreeze(model, cache_dir=cache_dir, dynamic=False)
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, 16)
            torch.testing.assert_close(fast(x), model(x))
    return fast


def close(fast):
    """What a process exit does: close its connections, forget its open caches."""
    close_caches(fast)


def test_help_usage_errors_and_exit_codes(tmp_path):
    def run(*argv):
        return run_cli(*argv, env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    p = run("--help")
    assert p.returncode == 0 and "cache" in p.stdout and "explain" in p.stdout and "Exit status" in p.stdout
    assert run().returncode == 2
    for argv in (["cache", "frobnicate"], ["cache", "prune", "--older-than", "banana"], ["export"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
    p = run("import", str(tmp_path / "missing.jfb"))
    assert p.returncode == 3 and "jitfreeze: error:" in p.stderr
    p = run("cache", "info", "--json")                  # a cache that does not exist: reported, not created
    assert p.returncode == 0 and json.loads(p.stdout)["exists"] is False
    assert not (tmp_path / "xdg" / "jitfreeze").exists()
    script = os.path.join(os.path.dirname(sys.executable), "jitfreeze")
    if os.path.exists(script):                           # the console script from pyproject
        assert subprocess.run([script, "cache", "--help"], capture_output=True).returncode == 0


def test_info_counters_are_kept_across_processes(cache_dir, capsys):
    run_child(COMPILE_MLP, cache_dir)
    run_child(COMPILE_MLP, cache_dir)
    rc, info = jf(capsys, "cache", "info", "--cache-dir", str(cache_dir))
    assert rc == 0 and info["exists"] and info["location"] == str(cache_dir)
    assert info["artifacts"] == 1 and info["entries"] >= 2 and info["bytes"] > 0
    assert info["size_limit"] == 4 * 2**30
    assert info["counters"]["compiles"] == 1 and info["counters"]["loads"] == 1
    assert info["counters"]["loads_local"] == 1 and info["counters"]["index_hits"] == 1
    assert cli.main(["cache", "info", "--cache-dir", str(cache_dir)]) == 0
    text = capsys.readouterr().out
    assert "compiles     1" in text and "size limit   4.0 GiB" in text


def test_corrupt_stats_file_is_started_afresh(cache_dir, capsys):
    # stats.db is written without fsync (counters are best effort): a file an OS crash left
    # corrupt must not stop loads or counting for good.
    run_child(COMPILE_MLP, cache_dir)
    (cache_dir / "stats.db").write_bytes(b"this is not a database" * 100)
    run_child(COMPILE_MLP, cache_dir)         # loads; its first count finds the file corrupt, removes it
    run_child(COMPILE_MLP, cache_dir)
    rc, info = jf(capsys, "cache", "info", "--cache-dir", str(cache_dir))
    assert rc == 0 and info["artifacts"] == 1
    counters = info["counters"]
    # each warm child counts a load and an index hit; the second child's first count is lost
    assert counters.get("compiles", 0) == 0 and counters["loads"] + counters["index_hits"] == 3
    assert counters["loads"] >= 1 and counters["index_hits"] >= 1


def test_list_rows(cache_dir, capsys):
    close(compile_mlp(cache_dir, batches=(4, 8)))
    close(compile_mlp(cache_dir, batches=(4,)))            # loaded: one hit
    rc, rows = jf(capsys, "cache", "list", "--cache-dir", str(cache_dir))
    assert rc == 0 and len(rows) == 2
    by_sig = {tuple(r["signature"][0].split(",")[0:2]): r for r in rows}
    r4 = by_sig[("Tensor(shape=(4", " 16)")]
    assert r4["qualname"] == "tests.models.MLP" and r4["device"] == ["cpu"] and r4["torch"] == torch.__version__
    assert r4["hits"] == 1 and r4["size"] > 1000 and r4["created"] <= r4["last_used"] <= time.time()
    assert by_sig[("Tensor(shape=(8", " 16)")]["hits"] == 0
    assert cli.main(["cache", "list", "--cache-dir", str(cache_dir)]) == 0
    text = capsys.readouterr().out
    assert "(4x16 float32)" in text and "(8x16 float32)" in text and "tests.models.MLP" in text
    rc, rows = jf(capsys, "cache", "list", "--all", "--cache-dir", str(cache_dir))
    assert any(r["key"].startswith("i/") for r in rows)


def test_clear_and_prune(cache_dir, capsys):
    close(compile_mlp(cache_dir, batches=(4,)))
    time.sleep(0.05)
    close(compile_mlp(cache_dir, batches=(8,), seed=1))
    rc, rows = jf(capsys, "cache", "list", "--cache-dir", str(cache_dir))
    newest = max(rows, key=lambda r: r["created"])
    rc, out = jf(capsys, "cache", "prune", "--older-than", "7d", "--cache-dir", str(cache_dir))
    assert rc == 0 and out["removed"] == []
    rc, out = jf(capsys, "cache", "prune", "--max-size", str(newest["size"] + 1000), "--dry-run",
                 "--cache-dir", str(cache_dir))
    assert out["dry_run"] and any(r["key"].startswith("a/") for r in out["removed"])
    assert len(jf(capsys, "cache", "list", "--cache-dir", str(cache_dir))[1]) == 2      # dry run: nothing removed
    rc, out = jf(capsys, "cache", "prune", "--max-size", str(newest["size"] + 1000), "--cache-dir", str(cache_dir))
    rc, rows = jf(capsys, "cache", "list", "--cache-dir", str(cache_dir))
    assert [r["key"] for r in rows] == [newest["key"]]           # the least recently used went first
    rc, rows = jf(capsys, "cache", "list", "--all", "--cache-dir", str(cache_dir))
    assert len([r for r in rows if r["key"].startswith("i/")]) == 1   # its index entry went with it
    rc, out = jf(capsys, "cache", "clear", "--cache-dir", str(cache_dir))
    assert rc == 0 and out["removed"] >= 2
    assert jf(capsys, "cache", "list", "--cache-dir", str(cache_dir))[1] == []


def _flip_entry(cache_dir, key):
    con = sqlite3.connect(cache_dir / "cache.db")
    filename, value = con.execute("SELECT filename, value FROM Cache WHERE key = ?", (key,)).fetchone()
    if filename:
        p = cache_dir / filename
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 1
        p.write_bytes(bytes(data))
    else:
        data = bytearray(value)
        data[len(data) // 2] ^= 1
        con.execute("UPDATE Cache SET value = ? WHERE key = ?", (bytes(data), key))
        con.commit()
    con.close()


def test_verify_removes_and_reports_bad_entries(cache_dir, capsys, monkeypatch):
    close(compile_mlp(cache_dir, batches=(4, 8)))
    rc, rows = jf(capsys, "cache", "list", "--cache-dir", str(cache_dir))
    bad = rows[0]["key"]
    _flip_entry(cache_dir, bad)
    rc, out = jf(capsys, "cache", "verify", "--cache-dir", str(cache_dir))
    assert rc == 1 and [b["key"] for b in out["bad"]] == [bad] and out["bad"][0]["removed"]
    assert "checksum" in out["bad"][0]["error"]
    rc, out = jf(capsys, "cache", "verify", "--cache-dir", str(cache_dir))
    assert rc == 0 and out["bad"] == [] and out["checked"] >= 3
    # with a key set, the signature is checked too: these entries are unsigned
    monkeypatch.setenv("JITFREEZE_CACHE_KEY", "k")
    jf_cache.forget_open_caches()
    rc, out = jf(capsys, "cache", "verify", "--cache-dir", str(cache_dir))
    assert rc == 1 and out["signed_check"] and all("not signed" in b["error"] for b in out["bad"])


def test_explain_names_the_key_part_that_changed(cache_dir, capsys):
    close(compile_mlp(cache_dir, batches=(4,)))
    close(compile_mlp(cache_dir, batches=(8,)))            # new shape
    close(compile_mlp(cache_dir, batches=(8,), seed=1))    # new weights
    rc, items = jf(capsys, "explain", "--cache-dir", str(cache_dir))
    assert rc == 0 and len(items) == 3
    assert items[0]["nearest"] is None
    assert items[1]["reasons"] == ["input 0 shape (8, 16) vs (4, 16)"]
    assert items[2]["reasons"] == ["weights digest changed"]
    assert cli.main(["explain", "-n", "1", "--cache-dir", str(cache_dir)]) == 0
    text = capsys.readouterr().out
    assert "weights digest changed" in text and "shape" not in text


def test_explain_differences_of_environment_parts():
    base = {"qualname": "f", "parts": {"torch": "2.13.0", "device": "cpu"},
            "part_digests": {"torch": "t1", "device": "d1", "signature": "s1"},
            "signature": ["Tensor(shape=(8, 128), dtype=torch.float32, device=cpu, stride=(128, 1), "
                          "layout=torch.strided)", "int:3"]}
    other = {"qualname": "f", "parts": {"torch": "2.12.0", "device": "cpu"},
             "part_digests": {"torch": "t0", "device": "d1", "signature": "s0"},
             "signature": ["Tensor(shape=(8, 128), dtype=torch.float16, device=cpu, stride=(128, 1), "
                           "layout=torch.strided)", "int:4"]}
    assert differences(base, other) == ["torch version changed: 2.13.0 vs 2.12.0",
                                        "input 0 dtype torch.float32 vs torch.float16",
                                        "input 1 int:3 vs int:4"]


def test_export_import_roundtrip_tamper_and_layer(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    close(compile_mlp(src, batches=(4, 8)))
    bundle = tmp_path / "model.jfb"
    rc, out = jf(capsys, "export", str(bundle), "--cache-dir", str(src))
    assert rc == 0 and out["entries"] >= 4 and out["skipped"] == []
    with tarfile.open(bundle) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    assert manifest["format"] == "jitfreeze-bundle" and manifest["torch"] == torch.__version__
    assert all(len(e["sha256"]) == 64 and e["key"][:2] in ("a/", "i/", "h/", "d/") for e in manifest["entries"])
    # import into a fresh cache: every entry verified; the function then compiles nothing
    dst = tmp_path / "dst"
    rc, out = jf(capsys, "import", str(bundle), "--cache-dir", str(dst))
    assert rc == 0 and out["imported"] == len(manifest["entries"]) and out["rejected"] == []
    rc, out = jf(capsys, "import", str(bundle), "--cache-dir", str(dst))
    assert out["imported"] == 0 and out["present"] == len(manifest["entries"])
    jf_cache.forget_open_caches()
    fast = compile_mlp(dst, batches=(4, 8))
    assert fast.cache_info().compiles == 0 and fast.cache_info().loads == 2
    # a tampered entry is rejected and reported; the others still import
    victim = next(e for e in manifest["entries"] if e["key"].startswith("a/"))
    with tarfile.open(bundle) as tar:
        offset = tar.getmember(victim["member"]).offset_data
    data = bytearray(bundle.read_bytes())
    data[offset + victim["size"] // 2] ^= 1
    bundle.write_bytes(bytes(data))
    rc, out = jf(capsys, "import", str(bundle), "--cache-dir", str(tmp_path / "dst2"))
    assert rc == 1 and [r["key"] for r in out["rejected"]] == [victim["key"]]
    assert out["imported"] == len(manifest["entries"]) - 1
    # --into builds a read-only layer for JITFREEZE_CACHE_PATH
    layer = tmp_path / "image" / "jf"
    rc, out = jf(capsys, "import", str(bundle), "--into", str(layer))
    assert rc == 1 and out["imported"] == len(manifest["entries"]) - 1
    assert not (layer / "cache.db-wal").exists() and oct(layer.stat().st_mode & 0o777) == "0o755"
    monkeypatch.setenv("JITFREEZE_CACHE_PATH", f"{layer}:{tmp_path / 'rw'}")
    jf_cache.forget_open_caches()
    model, _ = make("mlp")
    fast = jitfreeze.jitfreeze(model, dynamic=False)
    with torch.no_grad():
        fast(torch.randn(4, 16)), fast(torch.randn(8, 16))
    assert fast.cache_info().loads + fast.cache_info().compiles == 2 and fast.cache_info().loads >= 1


def test_export_skips_bad_entries_and_filters_by_function(cache_dir, tmp_path, capsys):
    close(compile_mlp(cache_dir, batches=(4, 8)))
    rc, rows = jf(capsys, "cache", "list", "--cache-dir", str(cache_dir))
    _flip_entry(cache_dir, rows[0]["key"])
    rc, out = jf(capsys, "export", str(tmp_path / "b.jfb"), "--cache-dir", str(cache_dir))
    assert rc == 1 and [s["key"] for s in out["skipped"]] == [rows[0]["key"]]
    rc, out = jf(capsys, "export", str(tmp_path / "none.jfb"), "--function", "nothing-matches",
                 "--cache-dir", str(cache_dir))
    assert out["entries"] == 0
