"""Smoke test of the benchmark harness: it runs end to end and writes its outputs.

Nothing about timings is asserted: this machine's numbers are not the point here.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_harness_smoke(tmp_path):
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITFREEZE_")}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = (out / "table.md").read_text()
    assert "Cold first call" in table and "Steady per-call latency" in table
    data = json.loads((out / "results.json").read_text())
    records = data["records"]
    assert records, "no measurements"
    failed = [r for r in records if not r.get("ok")]
    assert not failed, failed
    cases = {(r["case"], r["system"]) for r in records}
    for case_system in [("cold", "jitfreeze"), ("cold", "bare"), ("cold", "floor"), ("cold", "cachefloor"),
                        ("warm", "jitfreeze"), ("warm", "limit"),
                        ("warm", "jitfreeze-discard"), ("steady", "jitfreeze"), ("steady", "eager")]:
        assert case_system in cases
    for system in ("jitfreeze", "jitfreeze-discard"):
        warm = [r for r in records if r["case"] == "warm" and r["system"] == system]
        assert warm[0]["cache_info"]["loads"] == 1, warm   # the warm process really read the cache
    assert "discard_parameters=True" in table and "make_fx floor" in table and "bare / torch.compile" in table
    floor = [r for r in records if r["system"] == "cachefloor"]
    assert set(floor[0]["parts"]) == {"import filelock", "lock", "import diskcache", "create the database",
                                      "write a row"}
    assert "(bare + cache floor) / bare" in table and "Cache floor, part by part" in table
    assert not (out / "tmp").exists()
