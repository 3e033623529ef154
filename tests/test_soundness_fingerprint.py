"""Soundness of the trace-free index (class 4): code and values the fingerprint used to miss.

Each gap case: process 1 calls a jitfreeze'd function and stores it (graph + index entry); the test
edits the code or value the function reaches; process 2 must give eager's answer for the edited
code (a trace: the index entry no longer matches), while unedited functions in the same process
still load from the index without a trace. All cases share two processes.
"""

import logging
import os
import sys

import pytest
import torch

from jitfreeze.trace import fingerprint as fp
from jitfreeze.trace import fingerprint_fixed as fixed
from jitfreeze import jitfreeze

from .children import GAPS_RUNNER, UNHASHABLE, run_child

# {k} is the value the test edits: 2 in process 1, 3 in process 2 (fixed: 5, never edited).
GAPS = '''
import functools
import numpy as np
import torch
import torch.nn as nn
import torchnets


class Cfg:
    def __init__(self, **fields):
        self.__dict__.update(fields)


# a functools.partial: its arguments decide the answer
def _scaled(x, k):
    return x * k


SCALED = functools.partial(_scaled, k={k})


def case_partial(x):
    return SCALED(x)


# a helper six calls deep
def _h6(x):
    return x * {k}


def _h5(x):
    return _h6(x) + 1


def _h4(x):
    return _h5(x) + 1


def _h3(x):
    return _h4(x) + 1


def _h2(x):
    return _h3(x) + 1


def _h1(x):
    return _h2(x) + 1


def case_deep(x):
    return _h1(x)


# a static method of a plain class
class Ops:
    @staticmethod
    def act(x):
        return x * {k}


def case_staticmethod(x):
    return Ops.act(x)


# an lru_cache-wrapped helper
@functools.lru_cache(maxsize=None)
def _factor():
    return {k}


def case_lru_cache(x):
    return x * _factor()


# class attributes holding a tuple and a dict
class Scaler(nn.Module):
    SCALES = ({k}, 1.0)
    OPTS = {{"shift": {k}}}

    def forward(self, x):
        return x * self.SCALES[0] + self.OPTS["shift"]


# a config nested five levels deep
class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.cfg = Cfg(a=Cfg(b=Cfg(c=Cfg(d=Cfg(e={k})))))

    def forward(self, x):
        return x * self.cfg.a.b.c.d.e


# a numpy array as a global
W = np.array([{k}, 1.0, 1.0, 1.0], dtype=np.float32)


def case_numpy(x):
    return x * torch.from_numpy(W)


# an object held in a closure
def _make_closure():
    cfg = Cfg(scale={k})

    def case_closure(x):
        return x * cfg.scale
    return case_closure


case_closure = _make_closure()


# never edited: must load from the index
def case_unedited(x):
    return x * 5


CASES = {{
    "torchnets": torchnets.Net().eval(),
    "partial": case_partial,
    "deep": case_deep,
    "staticmethod": case_staticmethod,
    "lru_cache": case_lru_cache,
    "class_attrs": Scaler().eval(),
    "nested_config": Deep().eval(),
    "numpy": case_numpy,
    "closure": case_closure,
    "unedited": case_unedited,
}}
'''

# A module whose name starts with "torch": user code all the same.
TORCHNETS = '''
import torch
import torch.nn as nn


class Net(nn.Module):
    def forward(self, x):
        return torch.relu(x) * {k}
'''


GAP_NAMES = ["torchnets", "partial", "deep", "staticmethod", "lru_cache", "class_attrs", "nested_config", "numpy",
             "closure"]


def write_gaps(path, k):
    path.mkdir(exist_ok=True)
    (path / "gaps.py").write_text(GAPS.format(k=k))
    (path / "torchnets.py").write_text(TORCHNETS.format(k=k))
    for pyc in path.rglob("__pycache__"):
        for f in pyc.iterdir():
            f.unlink()


def test_edits_the_fingerprint_used_to_miss_give_eagers_answer(tmp_path):
    code, cache_dir = tmp_path / "user", tmp_path / "jf"
    write_gaps(code, 2)
    first, _ = run_child(GAPS_RUNNER, code, cache_dir)
    for name in GAP_NAMES + ["unedited"]:
        assert first[name]["traces"] == 1 and first[name]["out"] == first[name]["ref"], (name, first[name])
    assert first["refused"] == [], first["refused"]        # every case is fingerprinted: none refused
    write_gaps(code, 3)
    second, _ = run_child(GAPS_RUNNER, code, cache_dir)
    # eager's answer for the edited code (listed together: each case fails on its own without its check)
    assert [name for name in GAP_NAMES if second[name]["out"] != second[name]["ref"]] == []
    for name in GAP_NAMES:
        case = second[name]
        assert case["out"] != first[name]["out"], (name, case)    # the edit changed the answer
        assert case["traces"] == 1, (name, case)    # the index missed: traced (the graph may be stored already)
    # What was not edited still loads from the index, without a trace.
    assert (second["unedited"]["traces"], second["unedited"]["loads"]) == (0, 1), second["unedited"]
    assert second["unedited"]["out"] == second["unedited"]["ref"]
    assert (second["mlp"]["traces"], second["mlp"]["loads"], second["mlp"]["ok"]) == (0, 1, True), second["mlp"]
    assert second["refused"] == []


def test_unhashable_value_makes_the_index_unusable_and_says_why(tmp_path):
    cache_dir = tmp_path / "jf"
    first, _ = run_child(UNHASHABLE, cache_dir, 2.0)
    second, _ = run_child(UNHASHABLE, cache_dir, 3.0)       # the held value changed
    third, _ = run_child(UNHASHABLE, cache_dir, 3.0)        # unchanged: the graph key finds the artifact
    assert first["outs"] == first["refs"] == [[2.0] * 3, [2.0] * 5]
    assert second["outs"] == second["refs"] == [[3.0] * 3, [3.0] * 5]
    for run in (first, second, third):
        assert len(run["refused"]) == 1, run["refused"]     # once per function, not per signature
        assert "array.array" in run["refused"][0] and "held" in run["refused"][0], run["refused"]
        assert run["traces"] == 2
    assert third["loads"] == 2 and third["outs"] == second["outs"]


# -- the walker itself (in process) ----------------------------------------------------------------

def _digest(fn):
    return fp.function_fingerprint(fn)[0]


def test_unknown_objects_raise_with_the_path_and_the_type():
    import random

    rng = random.Random(0)          # a Python class over a C type whose state (the generator's) is hidden

    def f(x):
        return x * rng.random()

    with pytest.raises(fp.Unfingerprintable, match=r"random\.Random") as exc:
        _digest(f)
    assert "rng" in str(exc.value)


def test_c_callables_outside_the_fixed_libraries_raise():
    xxhash = pytest.importorskip("xxhash")
    hasher = xxhash.xxh64_intdigest

    def f(x):
        return x * (hasher(b"a") % 3)

    with pytest.raises(fp.Unfingerprintable, match="xxh64_intdigest"):
        _digest(f)
    # torch's, the standard library's and numpy's C functions are fixed: no refusal
    import math

    import numpy as np

    def g(x):
        return torch.relu(x) * math.sqrt(2.0) * float(np.sqrt(2.0)) + len((1, 2))

    _digest(g)


def test_depth_and_size_limits_raise(monkeypatch):
    nested: list = []
    for _ in range(fp.MAX_DEPTH + 5):
        nested = [nested]

    def f(x):
        return x + len(nested)

    with pytest.raises(fp.Unfingerprintable, match="nested more than"):
        _digest(f)
    monkeypatch.setattr(fp, "MAX_OBJECTS", 50)
    many = [[i] for i in range(100)]

    def g(x):
        return x + len(many)

    with pytest.raises(fp.Unfingerprintable, match="more than 50 objects"):
        _digest(g)


def test_fixed_code_is_recognised_by_its_file_not_its_name(tmp_path, monkeypatch):
    assert fixed.lib_of_file(torch.nn.functional.__file__) == "torch"
    assert fixed.lib_of_file(os.__file__) == "stdlib"
    assert fixed.lib_of_file(str(tmp_path / "torchnets.py")) is None
    assert fixed.lib_of_file(str(tmp_path / "torch" / "nn.py")) is None
    site = [p for p in sys.path if p.endswith("site-packages")]
    if site:
        assert fixed.lib_of_file(os.path.join(site[0], "transformers", "x.py")) is None


def test_edits_change_the_digest_in_process(tmp_path, monkeypatch):
    # The same gaps, in one process: every edit changes the digest, and nothing else does.
    monkeypatch.syspath_prepend(str(tmp_path / "user"))
    digests = []
    for k in (2, 2, 3):
        write_gaps(tmp_path / "user", k)
        for mod in ("gaps", "torchnets"):
            sys.modules.pop(mod, None)
        import gaps

        digests.append({name: _digest(fn) for name, fn in gaps.CASES.items()})
    for mod in ("gaps", "torchnets"):
        sys.modules.pop(mod, None)
    assert digests[0] == digests[1]                       # deterministic
    for name in GAP_NAMES:
        assert digests[1][name] != digests[2][name], name
    assert digests[1]["unedited"] == digests[2]["unedited"]


def test_ordinary_objects_are_fingerprinted_not_refused(caplog):
    # What models hold: enums, dataclasses, namedtuples, typing hints, loggers, partials, methods.
    import collections
    import dataclasses
    import enum
    import functools

    class Mode(enum.Enum):
        A = 1

    @dataclasses.dataclass
    class Opts:
        mode: Mode = Mode.A
        sizes: tuple = (1, 2)

    Pair = collections.namedtuple("Pair", "a b")
    opts, pair, log = Opts(), Pair(1, 2.0), logging.getLogger("somewhere")
    scale = functools.partial(torch.mul, other=2.0)

    def f(x: "torch.Tensor | None") -> torch.Tensor:
        log.debug("calling")
        return scale(x) * pair.a * opts.sizes[1] + (opts.mode is Mode.A)

    _digest(f)
    with caplog.at_level(logging.INFO, logger="jitfreeze"):
        fast = jitfreeze(f, index=True)
        with torch.no_grad():
            assert torch.equal(fast(torch.ones(2)), f(torch.ones(2)))
    assert not [r for r in caplog.records if "not used" in r.getMessage()]


def test_user_functions_patched_onto_torch_are_walked(monkeypatch):
    # torch's classes and modules are fixed, but a user function set on one is user code.
    model = torch.nn.Sequential(torch.nn.Linear(2, 2)).eval()

    def g(x):
        return torch.nn.functional.gelu(x)

    before = _digest(model), _digest(g)
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: x * 2)
    monkeypatch.setattr(torch.nn.functional, "gelu", lambda x: x)
    after = _digest(model), _digest(g)
    assert before[0] != after[0] and before[1] != after[1]


def test_an_object_that_breaks_the_walk_is_refused_not_raised():
    class Odd:
        def __repr__(self):
            raise RuntimeError("no repr")

    odd = {Odd(), Odd()}          # a set is ordered by repr

    def f(x):
        return x + len(odd)

    with pytest.raises(fp.Unfingerprintable, match="no repr"):
        _digest(f)


def test_long_lists_of_numbers_are_hashed_by_value(monkeypatch):
    """Lists of one scalar type are hashed in one pass (LeViT keeps lists of 38,416 ints): the
    same bytes as item by item (keys unchanged), each value still counts, and the type too."""
    table = list(range(1000))
    floats = [0.5, 1.25, 2.0]

    def f(x):
        return x + table[3] + floats[0]

    before = _digest(f)
    with monkeypatch.context() as m:
        m.setattr(fp, "SCALAR_TYPES", frozenset())
        assert _digest(f) == before
    table[999] = -1
    changed = _digest(f)
    table[999] = 999.0            # the same number, another type
    as_float = _digest(f)
    table[999] = 999
    assert len({before, changed, as_float}) == 3 and _digest(f) == before
