"""Fingerprints pinned to hex values computed before the fingerprint walker was split into modules:
a refactoring that changes what the walker hashes (or in which order) changes these and fails here.

The digests cover bytecode, so they are pinned per Python minor version and torch version; the
objects are built from fixed source text in a fresh module namespace (no line numbers or paths of
this file go in), with weights set to fixed values.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from jitfreeze.trace.fingerprint import function_fingerprint

SOURCE = '''
import math
import torch

SCALE = 3.0


def helper(x):
    return x * SCALE + math.pi


def plain(x, y=2):
    return helper(x) - y


def make_closure(k):
    offsets = [1, 2, k]

    def inner(x):
        return torch.relu(x) * k + sum(offsets)
    return inner


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("shift", torch.zeros(2))
        self.act = "relu"

    def forward(self, x):
        return getattr(torch, self.act)(self.lin(x)) + self.shift
'''

# (python major.minor, torch version) -> {case: hex digest}, computed on main before the split.
PINNED = {
    ((3, 11), "2.13.0+cpu"): {
        "function": "9e3f6df6a3e64c395631d14975280e9cec95b9f421de65e0f1c420c6eaec3493",
        "closure": "dc86e01da9e44191fe1a401342d986bb9ea65fa8c53de79504d4b743dd95875f",
        "module": "2de732a469a739b8a5e03dcfac8c15740dbe0e273a649e54d120d266c89b0a0e",
    },
}


def _objects():
    mod = types.ModuleType("jf_fingerprint_pins")
    exec(compile(SOURCE, "<jf_fingerprint_pins>", "exec"), mod.__dict__)
    small = mod.Small().eval()
    with torch.no_grad():
        for i, t in enumerate(list(small.parameters()) + list(small.buffers())):
            t.copy_(torch.arange(t.numel(), dtype=t.dtype).reshape(t.shape) / (i + 2))
    return {"function": mod.plain, "closure": mod.make_closure(5), "module": small}


def digests() -> dict:
    return {name: function_fingerprint(obj)[0] for name, obj in _objects().items()}


@pytest.mark.parametrize("case", ["function", "closure", "module"])
def test_fingerprint_is_pinned(case):
    pinned = PINNED.get((sys.version_info[:2], torch.__version__))
    if pinned is None:
        pytest.skip("fingerprints are pinned for another Python / torch version")
    assert digests()[case] == pinned[case]


def test_fingerprints_see_a_change():
    objs = _objects()
    before = {name: function_fingerprint(obj)[0] for name, obj in objs.items()}
    with torch.no_grad():
        objs["module"].shift.add_(1)
    objs["function"].__globals__["SCALE"] = 4.0       # the closure reads no SCALE
    after = {name: function_fingerprint(obj)[0] for name, obj in objs.items()}
    assert after["module"] != before["module"] and after["function"] != before["function"]
    assert after["closure"] == before["closure"]


if __name__ == "__main__":
    print(digests())
