"""Smoke test of the model zoo harness (benchmarks/zoo.py) at its tiny size: it runs end to end
and writes its table and JSON with the expected fields. Nothing about timings is asserted."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_zoo_harness_smoke(tmp_path):
    out = tmp_path / "zoo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITFREEZE_")}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benchmarks.zoo", "--size", "tiny", "--models", "bert", "resnet", "--batches", "1",
           "--systems", "eager,jitfreeze", "--repeat", "1", "--budget", "0.05", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "results.json").read_text())
    assert not [r for r in data["records"] if not r.get("ok")]
    cases = {(r["case"], r["system"]) for r in data["records"]}
    assert {("cold", "jitfreeze"), ("warm", "jitfreeze"), ("warm", "limit"), ("warm", "eager"),
            ("steady", "eager"), ("steady", "jitfreeze")} <= cases
    assert ("cold", "compile") not in cases and ("steady", "trace") not in cases
    rows = data["summary"]["models"]
    assert set(rows) == {"zoo:bert:tiny:1", "zoo:resnet:tiny:1"}
    for row in rows.values():
        assert row["compiled"] and row["loaded_warm"], row
        assert row["max_abs_diff"] is not None and row["max_rel_diff"] is not None
        for key in ("eager", "jitfreeze_cold", "jitfreeze_warm", "limit"):
            assert row["first"][key] is not None, (key, row)
        assert row["steady"]["eager"] and row["steady"]["jitfreeze"] and row["rss_mb"]
        assert row["ratios"]["steady_jf_eager"] and row["ratios"]["warm_jf_limit"]
    assert set(data["summary"]["geomean"]) >= {"steady_jf_eager", "steady_jf_compile", "warm_jf_limit",
                                                "warm_jf_compile", "cold_jf_compile"}
    assert data["models"]["bert"]["params"] > 0 and data["meta"]["size"] == "tiny"
    table = (out / "table.md").read_text()
    for text in ("## Start-up", "## Steady state and memory", "Geometric means", "| bert | 1 |", "| resnet | 1 |",
                 "warm jf / limit"):
        assert text in table, text
    assert not (out / "tmp").exists()
