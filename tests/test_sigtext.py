"""Signature text read back: describe -> signature_text -> parse_signature gives the call's leaves,
and the short forms the log lines and ``jitfreeze ls`` print."""

from __future__ import annotations

import enum

import torch

from jitfreeze.trace import sigtext
from jitfreeze.trace.dynamic import dynamic_texts
from jitfreeze.trace.signature import alias_pattern, call_mode, describe


class Color(enum.Enum):
    RED = 1


def _parsed(args, kwargs=None):
    call = describe(args, kwargs or {}, call_mode(None))
    return call, sigtext.parse_signature(call.signature_text())


def test_tensors_round_trip():
    x, s = torch.randn(4, 8, dtype=torch.float64).t(), torch.tensor(2.0)
    call, parsed = _parsed((x, s))
    assert parsed.spec == call.spec_text() and parsed.aliases == ()
    for fields, t in zip(parsed.leaves, (x, s)):
        assert sigtext.dims_of(fields["shape"]) == tuple(t.shape)
        assert sigtext.dims_of(fields["stride"]) == t.stride()
        assert fields["dtype"] == str(t.dtype) and fields["device"] == str(t.device)
        assert fields["layout"] == str(t.layout)
    assert sigtext.short_signature(call.texts) == "(8x4 float64, scalar float32)"


def test_scalars_and_nested_containers_round_trip():
    t = torch.zeros(3)
    args = (t, {"scale": 2.5, "n": 3, "name": "a:b", "flag": None}, [Color.RED, (True, -0.0)])
    call, parsed = _parsed(args, {"eps": 1e-5})
    assert len(parsed.leaves) == call.n_leaves == 9
    values = [sigtext.constant(line) for line in parsed.leaves[1:]]
    assert values == [("float", "2.5"), ("int", "3"), ("str", "'a:b'"), ("NoneType", "None"),
                      ("enum", f"{__name__}.Color.RED"), ("bool", "True"), ("float", "-0.0"),
                      ("float", "1e-05")]
    assert sigtext.dims_of(parsed.leaves[0]["shape"]) == (3,)
    assert sigtext.short_text(call.texts[0]) == "3 float32"
    assert "dict" in parsed.spec and "list" in parsed.spec


def test_aliases_round_trip():
    base = torch.randn(6)
    a, b, c = base[:4], base[2:], base[:4]
    call, parsed = _parsed((a, b, c, a))
    assert call.alias == alias_pattern([a, b, c, a]) != ()
    assert parsed.aliases == call.alias
    assert len(parsed.leaves) == 4 and all(isinstance(f, dict) for f in parsed.leaves)
    assert sigtext.aliases(sigtext.alias_text(call.alias)) == call.alias


def test_dynamic_dims_round_trip():
    x = torch.randn(5, 7)
    call = describe((x,), {}, call_mode(None))
    texts = dynamic_texts(call, [x], {0: frozenset({0})})
    fields = sigtext.tensor_fields(texts[0])
    assert sigtext.dims_of(fields["shape"]) == ("s", 7) and fields["contiguous"] == "True"
    assert sigtext.short_text(texts[0]) == "'s'x7 float32"


def test_lines_that_describe_no_tensor():
    assert sigtext.tensor_fields("int:3") is None and sigtext.tensor_fields(None) is None
    assert sigtext.short_text("int:3") == "int:3"
    assert sigtext.short_signature([]) == "()"
