"""Issue (user's surface) item 4: the examples run, in quick mode, and answer as eager does."""

import importlib.util
import json
import os
import stat
import subprocess
import sys
import urllib.error

import pytest

from .conftest import ROOT

EXAMPLES = os.path.join(ROOT, "examples")


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def service(monkeypatch):
    """examples/service's run.py and app.py; the servers it starts import this checkout's jitfreeze."""
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("SERVICE_QUICK", "1")
    return load("service/run.py", "jf_service_run"), load("service/app.py", "jf_service_app")


def assert_answers_match_eager(app, requests, answers):
    model = app.build_model(quick=True)
    assert len(answers) == len(requests)
    for texts, answer in zip(requests, answers):
        eager = app.classify(model, texts, quick=True)
        assert answer["labels"] == eager["labels"]
        for got, want in zip(answer["scores"], eager["scores"]):
            assert got == pytest.approx(want, abs=1e-5)


def test_service_cold_then_warm_over_http(service, tmp_path, capsys):
    run, app = service
    result = run.main(["--quick", "--cache-dir", str(tmp_path / "cache")])
    cold, warm = result["cold"]["stats"], result["warm"]["stats"]
    assert cold["cache_info"]["compiles"] == 2 and cold["cache_info"]["loads"] == 0
    assert warm["cache_info"]["compiles"] == 0 and warm["cache_info"]["loads"] == 2
    assert cold["precompile"] == {"compiled": 2, "loaded": 0, "reused": 0, "fallback": 0}
    assert warm["cache_info"]["fallbacks"] == 0 and warm["cache_info"]["hits"] >= 2     # requests hit the graphs
    assert result["responses_equal"] is True
    assert_answers_match_eager(app, run.REQUESTS, result["cold"]["answers"])
    assert_answers_match_eager(app, run.REQUESTS, result["warm"]["answers"])
    out = capsys.readouterr().out
    assert "time to first response" in out and "responses equal across the restart: True" in out


def _snapshot(directory):
    return sorted((str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns, stat.S_IMODE(p.stat().st_mode))
                  for p in directory.rglob("*"))


def test_image_steps_without_docker(service, tmp_path):
    run, app = service
    dockerfile = open(os.path.join(EXAMPLES, "image", "Dockerfile")).read()
    assert "RUN sh /src/examples/image/build_layer.sh /opt/jf" in dockerfile        # the steps run below
    assert "ENV JITFREEZE_CACHE_PATH=/opt/jf:/var/cache/jf" in dockerfile

    layer = tmp_path / "opt-jf"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["sh", os.path.join(EXAMPLES, "image", "build_layer.sh"), str(layer)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "2 compiled" in proc.stdout and "imported 6 entries" in proc.stdout
    mode = stat.S_IMODE(layer.stat().st_mode)
    assert not mode & (stat.S_IWGRP | stat.S_IWOTH)
    before = _snapshot(layer)

    def bad_requests(port):
        for payload, status in (({"texts": []}, 400), ({"texts": ["a"] * 5}, 413), ({"text": "a"}, 422)):
            with pytest.raises(urllib.error.HTTPError) as exc:
                run.request(port, "/classify", payload)
            assert exc.value.code == status

    served = run.serve_once(None, True, str(tmp_path / "server.log"), probe=bad_requests,
                            env={"JITFREEZE_CACHE_PATH": f"{layer}{os.pathsep}{tmp_path / 'var-cache-jf'}"})
    info = served["stats"]["cache_info"]
    assert info["compiles"] == 0 and info["loads"] == 2 and info["fallbacks"] == 0
    assert served["stats"]["precompile"]["loaded"] == 2
    assert_answers_match_eager(app, run.REQUESTS, served["answers"])
    assert _snapshot(layer) == before                          # the read-only layer was never written


def run_example(path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITFREEZE_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, path), *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_vision_batch_with_workers_and_a_smaller_final_batch(tmp_path):
    r = run_example("vision_batch.py", "--quick", "--cache-dir", str(tmp_path / "cache"))
    assert r["batch_sizes"] == [16, 16, 8]
    assert r["info"]["compiles"] == 2 and r["info"]["fallbacks"] == 0 and r["info"]["hits"] == 1
    assert r["matches_eager"] and r["max_abs_diff"] < 1e-4


def test_transformers_encoder_padded_batches(tmp_path):
    r = run_example("transformers_encoder.py", "--quick", "--cache-dir", str(tmp_path / "cache"))
    assert [s[1] for s in r["shapes"]] == [16, 32, 16] and r["shapes"][-1][0] == 1     # lengths and batch vary
    assert r["info"]["fallbacks"] == 0 and r["info"]["compiles"] >= 1
    assert r["matches_eager"] and r["max_abs_diff"] < 1e-4 and r["padding_diff"] < 1e-4
