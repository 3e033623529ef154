"""Issue 2: across processes — warm start, cold stampede, corrupted entries."""

import time

import pytest

from .children import RUN_ONE, run_child, run_children


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_warm_start_in_second_process(name, cache_dir):
    first, _ = run_child(RUN_ONE, cache_dir, name)
    assert first["info"]["compiles"] == 1 and first["info"]["loads"] == 0 and first["ok"]
    second, _ = run_child(RUN_ONE, cache_dir, name)
    assert second["info"]["loads"] == 1 and second["info"]["compiles"] == 0 and second["ok"]
    assert first["warnings"] == second["warnings"] == []


def test_cold_stampede_compiles_once(cache_dir):
    n = 4
    start = time.time() + 8.0          # all processes import torch first, then start together
    results = run_children(RUN_ONE, [(cache_dir, "cnn", start)] * n)
    assert sum(r["info"]["compiles"] for r in results) == 1
    assert sum(r["info"]["loads"] for r in results) == n - 1
    assert all(r["ok"] and r["warnings"] == [] for r in results)


def _artifact_files(cache_dir):
    return sorted(p for p in cache_dir.rglob("*.val"))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupted_file_entry_is_recovered(cache_dir, how):
    first, _ = run_child(RUN_ONE, cache_dir, "projected")       # > 32 KiB: stored in a .val file
    (path,) = _artifact_files(cache_dir)
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    second, _ = run_child(RUN_ONE, cache_dir, "projected")
    assert second["ok"] and second["info"]["compiles"] == 1 and second["info"]["loads"] == 0
    assert len(second["warnings"]) == 1 and "bad jitfreeze cache entry" in second["warnings"][0]
    third, _ = run_child(RUN_ONE, cache_dir, "projected")        # the recompiled entry was stored
    assert third["info"]["loads"] == 1 and third["warnings"] == []


def test_corrupted_inline_entry_is_recovered(cache_dir):
    import sqlite3
    run_child(RUN_ONE, cache_dir, "mlp")                            # small: stored inline in cache.db
    assert _artifact_files(cache_dir) == []
    con = sqlite3.connect(cache_dir / "cache.db")
    (rowid, value), = con.execute("SELECT rowid, value FROM Cache WHERE key LIKE 'a/%'").fetchall()
    value = bytearray(value)
    value[len(value) // 3] ^= 0x01
    con.execute("UPDATE Cache SET value = ? WHERE rowid = ?", (bytes(value), rowid))
    con.commit()
    con.close()
    second, _ = run_child(RUN_ONE, cache_dir, "mlp")
    assert second["ok"] and second["info"]["compiles"] == 1
    assert len(second["warnings"]) == 1 and "checksum" in second["warnings"][0]
