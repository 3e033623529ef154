"""Issue (user's surface) item 2: ``jitfreeze.precompile`` and ``jitfreeze precompile``."""

import io
import json
import logging
import sys
import tarfile
import textwrap

import pytest
import torch

import jitfreeze
from jitfreeze.cli import commands as cli
from jitfreeze.runtime.precompile import PrecompileResult, normalize_example, precompile

from .conftest import assert_same, run_script


def affine(x, w, scale=1.0):
    return torch.relu(x @ w) * scale


def nonzero_rows(x):
    return x.nonzero()


W = torch.randn(16, 8)


def examples():
    torch.manual_seed(0)
    return [
        (torch.randn(2, 16), W),                                 # positional
        {"x": torch.randn(3, 16), "w": W},                       # keyword
        ((torch.randn(4, 16), W), {"scale": 2.0}),               # (args, kwargs)
    ]


def eager_and_fast(fn, fast, exs):
    for ex in exs:
        args, kwargs = normalize_example(ex)
        with torch.no_grad():
            assert_same(fast(*args, **kwargs), fn(*args, **kwargs))


def test_outcomes_compiled_reused_loaded_and_answers(cache_dir):
    fast = jitfreeze.jitfreeze(affine, cache_dir=cache_dir, dynamic=False)
    report = precompile(fast, examples(), progress=False)
    assert [r.outcome for r in report] == ["compiled"] * 3
    assert [r.signature for r in report] == ["(2x16 float32, 16x8 float32)", "(x=3x16 float32, w=16x8 float32)",
                                             "(4x16 float32, 16x8 float32, scale=2.0)"]
    assert all(isinstance(r, PrecompileResult) and r.seconds > 0 and "compiled" in r.reason for r in report)
    assert report.ok and report.counts() == {"compiled": 3, "loaded": 0, "reused": 0, "fallback": 0}
    assert report.function is fast and fast.cache_info().compiles == 3
    eager_and_fast(affine, fast, examples())

    again = precompile(fast, examples(), progress=False)           # the same process: its table serves them
    assert [r.outcome for r in again] == ["reused"] * 3

    other = jitfreeze.jitfreeze(affine, cache_dir=cache_dir, dynamic=False)   # another function object: the disk
    loaded = precompile(other, examples(), progress=False)
    assert [r.outcome for r in loaded] == ["loaded"] * 3 and other.cache_info().compiles == 0
    eager_and_fast(affine, other, examples())


def test_plain_module_is_wrapped_and_decorated_forward_is_used(cache_dir, monkeypatch):
    monkeypatch.setenv("JITFREEZE_CACHE_DIR", str(cache_dir))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh()).eval()
    report = precompile(model, [torch.randn(2, 16)], progress=False)
    assert [r.outcome for r in report] == ["compiled"]
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert_same(report.function(x), model(x))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 4)

        @jitfreeze.jitfreeze(dynamic=False)
        def forward(self, x):
            return self.lin(x).softmax(-1)

    net = Net().eval()
    report = precompile(net, [(torch.randn(5, 16),)], progress=False)
    assert [r.outcome for r in report] == ["compiled"]
    assert net.forward.cache_info().compiles == 1            # the decorated forward did the work
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert_same(net(x), Net.forward.__wrapped__(net, x))


def test_runs_under_no_grad(cache_dir):
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).eval()                     # parameters require grad
    assert all(p.requires_grad for p in model.parameters())
    fast = jitfreeze.jitfreeze(model, cache_dir=cache_dir)
    report = precompile(fast, [(torch.randn(3, 16),)], progress=False)
    assert [r.outcome for r in report] == ["compiled"]        # with grad enabled it would fall back
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert_same(fast(x), model(x))


def test_fallback_is_reported_with_its_reason(cache_dir):
    fast = jitfreeze.jitfreeze(nonzero_rows, cache_dir=cache_dir)
    x = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    report = precompile(fast, [(x,)], progress=False)
    (r,) = report
    assert r.outcome == "fallback" and "data-dependent" in r.reason and not report.ok
    with torch.no_grad():
        assert torch.equal(fast(x), nonzero_rows(x))
    again = precompile(fast, [(x,)], progress=False)          # warned once already: still a fallback
    assert again[0].outcome == "fallback" and "earlier" in again[0].reason


def test_strict_mode_error_is_the_fallback_reason(cache_dir, monkeypatch):
    monkeypatch.setenv("JITFREEZE_STRICT", "1")
    fast = jitfreeze.jitfreeze(nonzero_rows, cache_dir=cache_dir)
    report = precompile(fast, [(torch.tensor([0.0, 3.0]),)], progress=False)
    assert report[0].outcome == "fallback" and "data-dependent" in report[0].reason


def test_disabled_is_a_fallback(cache_dir, monkeypatch):
    monkeypatch.setenv("JITFREEZE_DISABLE", "1")
    report = precompile(jitfreeze.jitfreeze(affine, cache_dir=cache_dir), [(torch.randn(2, 16), W)], progress=False)
    assert report[0].outcome == "fallback" and report[0].reason == "JITFREEZE_DISABLE=1"


@pytest.mark.parametrize("bad, error, text", [
    ((torch.randn(2),), TypeError, "list"),                     # a tuple is one example, not a list of them
    (torch.randn(2), TypeError, "list"),
    ([], ValueError, "empty"),
    ([[torch.randn(2)]], TypeError, "a list is not an example"),
    ([{1: torch.randn(2)}], TypeError, "strings"),
    ([(torch.randn(2),), "x"], TypeError, "example 1"),
])
def test_examples_are_validated_before_anything_runs(cache_dir, bad, error, text):
    fast = jitfreeze.jitfreeze(torch.sin, cache_dir=cache_dir)
    with pytest.raises(error, match=text):
        precompile(fast, bad, progress=False)
    assert fast.cache_info() == (0, 0, 0, 0, 0)


def test_function_errors_name_the_example(cache_dir):
    fast = jitfreeze.jitfreeze(affine, cache_dir=cache_dir)
    with pytest.raises(RuntimeError, match=r"example 1 \(2x3 float32, 16x8 float32\).*RuntimeError"):
        precompile(fast, [(torch.randn(2, 16), W), (torch.randn(2, 3), W)], progress=False)


def test_progress_lines_without_a_tty_and_tqdm_on_one(cache_dir, capsys, monkeypatch):
    fast = jitfreeze.jitfreeze(affine, cache_dir=cache_dir, dynamic=False)
    precompile(fast, examples()[:2], progress=True)
    err = capsys.readouterr().err.splitlines()
    assert err == [l for l in err if l.startswith("jitfreeze precompile [")] and len(err) == 2
    assert err[0].startswith("jitfreeze precompile [1/2] (2x16 float32, 16x8 float32): compiled in ")

    class Tty(io.StringIO):
        def isatty(self):
            return True
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    precompile(fast, examples()[:2], progress=True)
    assert "jitfreeze precompile" in tty.getvalue() and "2/2" in tty.getvalue() and "\r" in tty.getvalue()
    monkeypatch.undo()
    precompile(fast, examples()[:2], progress=False)
    assert capsys.readouterr().err == ""


def test_logger_level_and_handlers_are_left_as_they_were(cache_dir):
    logger = logging.getLogger("jitfreeze")
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        report = precompile(jitfreeze.jitfreeze(affine, cache_dir=cache_dir), examples()[:1], progress=False)
        assert "compiled" in report[0].reason                  # captured although the logger is at WARNING
        assert seen == [] and logger.level == logging.WARNING and not logger.filters
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_bundle_holds_this_function_only_and_a_layer_serves_a_new_process(tmp_path, capsys):
    cache = tmp_path / "cache"
    other = jitfreeze.jitfreeze(torch.cos, cache_dir=cache)
    with torch.no_grad():
        other(torch.randn(3))
    fast = jitfreeze.jitfreeze(affine, cache_dir=cache, dynamic=False)
    report = precompile(fast, examples(), bundle=tmp_path / "m.jfb", progress=False)
    assert report.bundle["entries"] >= 3 and report.bundle["skipped"] == []
    with tarfile.open(tmp_path / "m.jfb") as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    assert {e["qualname"] for e in manifest["entries"]} == {fast.name}
    assert sum(e["key"].startswith("a/") for e in manifest["entries"]) == 3

    assert cli.main(["import", str(tmp_path / "m.jfb"), "--into", str(tmp_path / "layer")]) == 0
    result, _ = run_script("""
        import json, sys, torch
        from jitfreeze import jitfreeze
        from jitfreeze.runtime.precompile import normalize_example
        from tests.test_precompile import affine, examples
        fast = jitfreeze(affine, dynamic=False)
        ok = True
        with torch.no_grad():
            for args, kwargs in map(normalize_example, examples()):
                ok &= torch.allclose(fast(*args, **kwargs), affine(*args, **kwargs), atol=1e-5)
        print(json.dumps({"info": fast.cache_info()._asdict(), "ok": bool(ok)}))
    """, env={"JITFREEZE_CACHE_PATH": f"{tmp_path / 'layer'}:{tmp_path / 'writable'}"})
    assert result["ok"] and result["info"]["loads"] == 3 and result["info"]["compiles"] == 0


ENTRY = textwrap.dedent("""
    import torch

    def build(shapes=(2, 4)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()).eval()
        return model, [(torch.randn(b, 16),) for b in shapes]

    def fixed():
        return build()

    def eager():
        return (lambda x: x.nonzero()), [(torch.tensor([0.0, 1.0]),)]

    def bad_examples():
        return build()[0], [[torch.randn(2, 16)]]

    def not_a_pair():
        return 3
""")


@pytest.fixture
def entry_module(tmp_path, monkeypatch, request):
    name = f"jf_entry_{request.node.name.replace('[', '_').replace(']', '_').replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(ENTRY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("JITFREEZE_CACHE_DIR", str(tmp_path / "cache"))   # restored after the command sets it
    yield name
    sys.modules.pop(name, None)


def run_cli(capsys, *argv):
    capsys.readouterr()
    rc = cli.main([*argv, "--json", "--no-progress"])
    captured = capsys.readouterr()
    return rc, (json.loads(captured.out) if captured.out.strip() else None), captured.err


def test_cli_precompile_shapes_bundle_and_json(entry_module, tmp_path, capsys):
    rc, data, _ = run_cli(capsys, "precompile", f"{entry_module}:build", "--shapes", "1,3",
                          "--cache-dir", str(tmp_path / "c2"), "--bundle", str(tmp_path / "b.jfb"))
    assert rc == 0 and data["counts"]["fallback"] == 0
    assert [r["signature"] for r in data["results"]] == ["(1x16 float32)", "(3x16 float32)"]
    assert data["bundle"]["entries"] >= 2 and (tmp_path / "b.jfb").is_file()
    assert (tmp_path / "c2").is_dir()                          # --cache-dir is where it compiled
    rc, data, _ = run_cli(capsys, "precompile", f"{entry_module}:fixed")
    assert rc == 0 and [r["signature"] for r in data["results"]] == ["(2x16 float32)", "(4x16 float32)"]
    capsys.readouterr()
    assert cli.main(["precompile", f"{entry_module}:fixed", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "SIGNATURE" in out and "OUTCOME" in out and "(4x16 float32)" in out


def test_cli_precompile_exit_codes(entry_module, capsys):
    assert run_cli(capsys, "precompile", f"{entry_module}:eager")[0] == 1          # a fallback
    for argv in ([f"{entry_module}:fixed", "--shapes", "2"],                     # takes no shapes
                 [entry_module], [f"{entry_module}:bad_examples"], [f"{entry_module}:not_a_pair"]):
        rc, _, err = run_cli(capsys, "precompile", *argv)
        assert rc == 2 and "jitfreeze: error:" in err, (argv, err)
    rc, _, err = run_cli(capsys, "precompile", "no_such_module_jf:build")
    assert rc == 3 and "No module named" in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["precompile", f"{entry_module}:build", "--shapes", "1,x"])
    assert exc.value.code == 2


def test_parse_shapes():
    assert cli.parse_shapes("1,8,32") == [1, 8, 32]
    assert cli.parse_shapes("1x128, 8X512") == [(1, 128), (8, 512)]


def test_public_names():
    from jitfreeze import jitfreeze as decorator

    assert decorator.precompile is jitfreeze.precompile is precompile      # the README's jitfreeze.precompile(...)
    assert {"precompile", "PrecompileResult", "PrecompileReport", "__version__"} <= set(jitfreeze.__all__)
    assert jitfreeze.__version__ == "0.1.0"
    assert (__import__("pathlib").Path(jitfreeze.__file__).parent / "py.typed").is_file()
