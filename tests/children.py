"""Child processes for the tests where processes matter: how they are started, and their scripts.

:func:`run_child` runs one script in a fresh interpreter and returns its last stdout line parsed
as JSON; :func:`run_children` starts several at once (a stampede, a fleet, concurrent readers);
:func:`start_child` hands back the running process; :func:`run_cli` runs ``python -m jitfreeze``.
Every child gets :func:`child_env`: no ``JITFREEZE_*`` from the outside, this checkout first on
``PYTHONPATH``, and no long-compile line on stderr unless a test asks for it.

A script reads its arguments from ``sys.argv[1:]`` and prints one JSON line last.
"""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(extra=None) -> dict:
    """The environment of a child: this one without ``JITFREEZE_*``, ``PYTHONPATH`` starting at this
    checkout, ``JITFREEZE_PROGRESS_AFTER=off``, ``JITFREEZE_TUNE=0``, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JITFREEZE_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # No long-compile line (jitfreeze.runtime.progress) unless a test asks: what a test reads on
    # stderr must not depend on how loaded the machine is.
    env["JITFREEZE_PROGRESS_AFTER"] = "off"
    # Nor which compiled form a child keeps, or whether it keeps eager (tests/test_tuning.py times
    # for real, in process): the default variant, always compiled.
    env["JITFREEZE_TUNE"] = "0"
    env.update(extra or {})
    return env


def _argv(code: str, args) -> list:
    return [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]


def _last_json(stdout: str):
    lines = [line for line in stdout.splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def run_child(code: str, *args, env=None, timeout=300, check=True):
    """Run ``code`` with ``args`` in a fresh Python process; return (its last stdout line parsed as
    JSON, the completed process). ``check``: a non-zero exit fails the test (else nothing is parsed)."""
    proc = subprocess.run(_argv(code, args), capture_output=True, text=True, env=child_env(env), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return (_last_json(proc.stdout) if check else None), proc


def start_child(code: str, *args, env=None) -> subprocess.Popen:
    """Start ``code`` with ``args`` in a fresh Python process and return it running (pipes for
    stdout and stderr, text mode)."""
    return subprocess.Popen(_argv(code, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(env))


def run_children(code: str, argvs, env=None, timeout=300) -> list:
    """Start one process of ``code`` per argument list in ``argvs``, all at once; wait for every
    one (each must exit 0) and return their last stdout lines parsed as JSON, in order."""
    procs = [start_child(code, *args, env=env) for args in argvs]
    try:
        results = []
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err
            results.append(_last_json(out))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def run_cli(*argv, env=None, timeout=120) -> subprocess.CompletedProcess:
    """``python -m jitfreeze ARGV...`` in a child (stdout and stderr captured, text)."""
    return subprocess.run([sys.executable, "-m", "jitfreeze", *map(str, argv)], capture_output=True, text=True,
                          env=child_env(env), timeout=timeout)


# -- one model through jitfreeze, reported (test_process, test_remote, test_reliability) -------------

# A child process: one model through jitfreeze (argv: cache dir, model name[, start time]), reported.
RUN_ONE = """
import sys, time
from jitfreeze import jitfreeze
from tests.children import report
from tests.models import make
model, inputs = make(sys.argv[2])
fast = jitfreeze(model, cache_dir=sys.argv[1])
if len(sys.argv) > 3:                       # wait for the start signal (a stampede, a cold fleet)
    while time.time() < float(sys.argv[3]):
        time.sleep(0.001)
report(fast, model, inputs)
"""


def report(fast, model, inputs):
    """In a child process: call ``fast`` once (warnings recorded) and the model eagerly, and print
    the one JSON line the parent test parses: cache info, traces, whether the outputs match, where
    the entries came from, and the jitfreeze warnings."""
    import json
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = fast(*inputs)
            ref = model(*inputs)
    entries = [s for s in fast.signatures() if s.source != "eager"]
    print(json.dumps({"info": fast.cache_info()._asdict(), "traces": fast.traces,
                      "ok": bool(torch.allclose(out, ref, atol=1e-4, rtol=1e-3)),
                      "sources": sorted(e.source for e in entries),
                      "warnings": [str(w.message) for w in caught if "jitfreeze" in str(w.category)]}))


# A child that runs one model through jitfreeze; ``setup`` (Python source) injects the fault first.
MODEL_CHILD = """
import json, os, signal, sys, time
import torch
import jitfreeze
from tests.children import report
from tests.models import make
args = json.loads(sys.argv[1])
model, inputs = make(args.get("model", "mlp"), seed=args.get("seed", 0))
exec(args.get("setup", ""))
fast = jitfreeze.jitfreeze(model, cache_dir=args["cache_dir"])
report(fast, model, inputs)
"""


def model_child(cache_dir, setup="", check=True, env=None, **kw):
    """:data:`MODEL_CHILD` on ``cache_dir`` (``kw``: ``model``, ``seed``); see :func:`run_child`."""
    return run_child(MODEL_CHILD, json.dumps(dict(kw, cache_dir=str(cache_dir), setup=textwrap.dedent(setup))),
                     check=check, env=env)


# -- test_reliability: faults --------------------------------------------------------------------------

# Children that only need the cache (no torch): import the package's modules without its __init__.
NO_TORCH = f"""
import sys, types
_pkg = types.ModuleType("jitfreeze"); _pkg.__path__ = [{os.path.join(ROOT, "jitfreeze")!r}]
sys.modules["jitfreeze"] = _pkg
"""


OPEN_CHILD = NO_TORCH + """
import json, time, warnings
from jitfreeze.cache.persistent import open_cache
from jitfreeze.config import Config
start = float(sys.argv[2])
while time.time() < start:
    pass
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    cache = open_cache(sys.argv[1], Config.from_env())
    stored = cache.store is not None and cache.put("k" + sys.argv[3], {}, b"x" * 100)
    found = cache.get("k" + sys.argv[3])
print(json.dumps({"stored": bool(stored), "found": found is not None and found[1] == b"x" * 100,
                  "warnings": [str(w.message) for w in caught]}))
"""


HANG_IN_COMPILE = """
from jitfreeze.backend import torchscript as _p
def _hang(self, traced, *args):
    print("compiling", flush=True)
    time.sleep(600)
_p.TorchScriptBackend.compile = _hang
"""


EVICT_CHILD = NO_TORCH + """
import json, os, random, time
from jitfreeze.cache import envelope as artifact
from jitfreeze.cache.disk import DiskStore
directory, role, seconds, limit, n_keys = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
store = DiskStore(directory, limit)
rng = random.Random(os.getpid())
counts = {"complete": 0, "miss": 0, "bad": 0, "errors": 0, "puts": 0, "max_volume": 0}
end = time.time() + seconds
while time.time() < end:
    i = rng.randrange(n_keys)
    key = f"a/{i:04d}"
    try:
        if role == "writer":
            size = 40_000 if i % 2 else 8_000            # file-backed and inline entries
            store.put(key, artifact.pack(key, {"i": i}, bytes([i % 251]) * size))
            counts["puts"] += 1
            counts["max_volume"] = max(counts["max_volume"], store.stats()["bytes"])
        else:
            data = store.get(key)
            if data is None:
                counts["miss"] += 1
            else:
                meta, payload = artifact.unpack(data, key)
                ok = meta["i"] == i and payload == bytes([i % 251]) * len(payload)
                counts["complete" if ok else "bad"] += 1
    except artifact.BadEntry:
        counts["bad"] += 1
    except Exception as exc:
        counts["errors"] += 1
        counts["last_error"] = repr(exc)
print(json.dumps(counts))
"""


BROKEN_TS = """
import json, os, sys, warnings
import torch
import jitfreeze
from tests.models import make
model, (x,) = make("mlp")
def f(x, w):
    return torch.nn.functional.gelu(x @ w)
w = torch.randn(16, 8)
results = {}
for which in ("none", "script", "freeze", "load"):
    real = getattr(torch.jit, which, None)
    if which != "none":
        def broken(*a, **k):
            raise RuntimeError("TorchScript is not available in this build")
        setattr(torch.jit, which, broken)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", jitfreeze.JitFreezeWarning)
            fast_m = jitfreeze.jitfreeze(model, cache_dir=os.path.join(sys.argv[1], which))
            fast_f = jitfreeze.jitfreeze(f, cache_dir=os.path.join(sys.argv[1], which))
            ok = True
            with torch.no_grad():
                for _ in range(3):
                    ok = ok and torch.allclose(fast_m(x), model(x), atol=1e-5) \\
                        and torch.allclose(fast_f(x, w), f(x, w), atol=1e-5)
    finally:
        if which != "none":
            setattr(torch.jit, which, real)
    results[which] = {"ok": bool(ok), "compiles": fast_m.cache_info().compiles + fast_f.cache_info().compiles,
                      "fallbacks": fast_m.cache_info().fallbacks + fast_f.cache_info().fallbacks,
                      "warnings": [str(m.message) for m in caught
                                   if issubclass(m.category, jitfreeze.JitFreezeWarning)]}
print(json.dumps(results))
"""


# -- test_cli ------------------------------------------------------------------------------------------

# Compile (or load) the seeded MLP once (argv: cache dir).
COMPILE_MLP = """
import sys, torch
from jitfreeze import jitfreeze
from tests.models import make
model, (x,) = make("mlp")
with torch.no_grad():
    jitfreeze(model, cache_dir=sys.argv[1], dynamic=False)(x)
print("{}")
"""


# -- test_soundness_files ------------------------------------------------------------------------------

# A permissive umask fills a cache, a bundle and a layer (argv: directory, umask); prints every mode.
FILL_CACHE = """
import json, os, sys
os.umask(int(sys.argv[2], 8))
import torch
from jitfreeze import jitfreeze
from jitfreeze.cache.bundle import export_bundle
from jitfreeze.cli.commands import main
from jitfreeze.cache.disk import DiskStore
from tests.models import make
cache_dir = sys.argv[1] + "/nested/jf"              # its missing parents are created too
for name in ("mlp", "projected"):                   # inline in cache.db; a value file (torch.jit.save)
    model, (x,) = make(name)
    with torch.no_grad():
        jitfreeze(model, cache_dir=cache_dir)(x)
store = DiskStore(cache_dir, 2**30)
store.put("x/big", os.urandom(40000))               # a value file through diskcache's Disk.store
store.close()
export_bundle(sys.argv[1] + "/b.jfb", [DiskStore(cache_dir, 2**30)], None)
assert main(["import", sys.argv[1] + "/b.jfb", "--into", sys.argv[1] + "/made/layer"]) == 0
modes = {}                                          # while the cache is open: its -wal and -shm too
for base, dirs, files in os.walk(sys.argv[1]):
    for name in dirs + files:
        path = os.path.join(base, name)
        modes[path] = os.lstat(path).st_mode
print(json.dumps(modes))
"""


# -- test_soundness_fingerprint ------------------------------------------------------------------------

# For the child processes: the jitfreeze logger's messages (INFO and up) collected in ``messages``.
COLLECT_LOG = """
messages = []
class Collect(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
logging.getLogger("jitfreeze").addHandler(Collect())
logging.getLogger("jitfreeze").setLevel(logging.INFO)
"""

# Each case of the user's gaps.py, and the MLP (argv: the user's code directory, cache dir).
GAPS_RUNNER = """
import json, logging, sys
sys.path.insert(0, sys.argv[1])
import torch
from jitfreeze import jitfreeze
import gaps
from tests.models import make
""" + COLLECT_LOG + """
x = torch.arange(4.0) + 1
result = {}
for name, fn in gaps.CASES.items():
    fast = jitfreeze(fn, cache_dir=sys.argv[2])
    with torch.no_grad():
        out, ref = fast(x), fn(x)
    info = fast.cache_info()
    result[name] = {"traces": fast.traces, "loads": info.loads, "out": out.tolist(), "ref": ref.tolist()}
model, (mx,) = make("mlp")
fast = jitfreeze(model, cache_dir=sys.argv[2])
with torch.no_grad():
    ok = bool(torch.allclose(fast(mx), model(mx), atol=1e-5))
result["mlp"] = {"traces": fast.traces, "loads": fast.cache_info().loads, "ok": ok}
result["refused"] = [m for m in messages if "fingerprint index is not used" in m]
print(json.dumps(result))
"""


# A function reading a C object the fingerprint can't read (argv: cache dir, its value).
UNHASHABLE = """
import array, json, logging, sys
import torch
from jitfreeze import jitfreeze
""" + COLLECT_LOG + """
k = float(sys.argv[2])
held = array.array("f", [k])         # a C object whose state the fingerprint can't read

def scaled(x):
    return x * held[0]

fast = jitfreeze(scaled, cache_dir=sys.argv[1], dynamic=False)
with torch.no_grad():
    outs = [fast(torch.ones(3)).tolist(), fast(torch.ones(5)).tolist()]   # two signatures
refs = [scaled(torch.ones(3)).tolist(), scaled(torch.ones(5)).tolist()]
print(json.dumps({"outs": outs, "refs": refs, "traces": fast.traces, "loads": fast.cache_info().loads,
                  "refused": [m for m in messages if "fingerprint index is not used" in m]}))
"""


# -- test_soundness_shapes -----------------------------------------------------------------------------

# test_soundness_shapes.SECOND_CASES at some sizes (argv: cache dir, automatic sizes, dynamic=True sizes).
SHAPES_SECOND = """
import json, sys, torch
from jitfreeze import jitfreeze
from tests import test_soundness_shapes as m
report = {}
for name, dynamic in m.SECOND_CASES:
    fn = getattr(m, name)
    fast = jitfreeze(fn, cache_dir=sys.argv[1], dynamic={"auto": None, "true": True}[dynamic])
    sizes = sys.argv[2] if dynamic == "auto" else sys.argv[3]
    bad = []
    torch.manual_seed(3)
    for b in map(int, sizes.split(",")):
        x = m.sample(b, fn)
        got, want = fast(x), fn(x)
        if got.shape != want.shape or not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
            bad.append(b)
    report[name] = {"bad": bad, "dyn": len({s.key for s in fast.signatures() if s.dynamic}), "info": fast.cache_info()._asdict()}
print(json.dumps(report))
"""


# -- test_soundness_state ------------------------------------------------------------------------------

# f(x, x) and f(x, y) in the order given (argv: cache dir, order: same,distinct...).
ALIAS = """
import json, sys, torch
from jitfreeze import jitfreeze

def twice_plus(a, b):
    return a * 2 + b

cache_dir, order = sys.argv[1], sys.argv[2].split(",")
f = jitfreeze(twice_plus, cache_dir=cache_dir)
torch.manual_seed(0)
x, y = torch.randn(4, 4), torch.randn(4, 4)
calls = {"same": (x, x), "distinct": (x, y)}
ok = []
with torch.no_grad():
    for name in order:
        ok.append([name, f.cache_info().loads, bool(torch.allclose(f(*calls[name]), twice_plus(*calls[name])))])
        f(*calls[name])
print(json.dumps({"ok": ok, "info": list(f.cache_info())}))
"""

