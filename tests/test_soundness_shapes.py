"""Soundness issue, classes 1 and 5: shapes a trace would bake into a graph.

Class 1: a size used as a Python number (``float(x.shape[0])``, ``range(n)``, ``torch.tensor(n)``...)
in a symbolic trace; and sizes 0/1, which the trace never makes symbolic. The stored entry must
carry a guard for it (in this process and in the persistent index), and automatic dynamic shapes
trace such dims statically from then on.

Class 5: ops whose output shape depends on values (``nonzero``, boolean masks, ``unique``...): every
tracer refuses the graph; the call runs eagerly with one warning naming the op.

Every check compares jitfreeze with eager on the same inputs.
"""

import logging
import math
import warnings

import pytest
import torch

import jitfreeze
from jitfreeze import jitfreeze as jf

from .children import SHAPES_SECOND, run_child

torch.manual_seed(0)
_W = torch.randn(4, 3)


# -- class 1: sizes used as Python numbers --------------------------------------------------------

def scale_float(x):
    return x * float(x.shape[0])


def scale_int(x):
    return x + int(x.shape[0])


def scale_sqrt(x):
    return x / math.sqrt(x.shape[0] + 1)


def weighted_rows(x):
    out = x.new_zeros(x.shape[1:])
    for i in range(x.shape[0]):
        out = out + x[i] * (i + 1)
    return out


def plus_tensor_of_size(x):
    return x + torch.tensor(x.shape[0])


def plus_new_tensor(x):
    return x * x.new_tensor([x.shape[0], 2.0]).sum()


def branch_on_equal_size(x):
    return x * 2 if x.shape[0] == 3 else x - 1     # true at 3: the trace replaces the size by 3


def plus_weight(x):
    return x + _W                 # eager broadcasts a batch of 1 against the (4, 3) weight


def rows_flattened(x):
    return x.reshape(x.shape[0], -1) * 2      # symbolic at sizes >= 2; a size-1 graph says (1, -1)


SIZE_AS_NUMBER = [scale_float, scale_int, scale_sqrt, weighted_rows, plus_tensor_of_size, plus_new_tensor,
                  branch_on_equal_size]
SIZES = (3, 5, 1, 7, 0, 2, 5, 4, 9)


def sample(b, fn):
    return torch.randn(b, 3, 2) if fn is rows_flattened else torch.randn(b, 3)


def _same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("fn", SIZE_AS_NUMBER + [plus_weight], ids=lambda f: f.__name__)
def test_size_as_number_follows_eager_at_every_size_automatic(fn, cache_dir, no_jf_warnings):
    fast = jf(fn, cache_dir=cache_dir)
    torch.manual_seed(1)
    for b in SIZES:
        if fn is plus_weight and b not in (1, 4):
            continue          # eager can't broadcast (b, 3) against (4, 3) either
        x = sample(b, fn)
        _same(fast(x), fn(x))
    assert fast.cache_info().fallbacks == 0


@pytest.mark.parametrize("fn", SIZE_AS_NUMBER + [rows_flattened], ids=lambda f: f.__name__)
def test_size_as_number_follows_eager_dynamic_true(fn, cache_dir, no_jf_warnings):
    """Every dim symbolic: each size the function specializes (or 0/1) gets its own guarded graph."""
    fast = jf(fn, cache_dir=cache_dir, dynamic=True)
    torch.manual_seed(2)
    for b in (1, 3, 5, 0, 3, 6):
        if b == 0 and fn is rows_flattened:
            continue          # eager can't reshape 0 elements to (0, -1) either
        x = sample(b, fn)
        _same(fast(x), fn(x))


def test_broadcast_weight_traced_at_4_is_not_served_at_1(cache_dir, no_jf_warnings):
    fast = jf(plus_weight, cache_dir=cache_dir, dynamic=True)
    for b in (4, 1, 4, 1):
        x = torch.randn(b, 3)
        _same(fast(x), plus_weight(x))


def stride_as_number(x):
    return x * float(x.stride(1))


def offset_as_number(x):
    return x + float(x.storage_offset())


def test_strides_and_offsets_used_as_numbers_are_guarded(cache_dir, no_jf_warnings):
    strided = jf(stride_as_number, cache_dir=cache_dir, dynamic=True)
    for rows, step in ((4, 2), (5, 3), (4, 2), (6, 1)):
        x = torch.randn(rows, 13)[:, :4 * step:step]          # 4 columns, strides (13, step)
        _same(strided(x), stride_as_number(x))
    offset = jf(offset_as_number, cache_dir=cache_dir, dynamic=True)
    base = torch.randn(12, 3)
    for start in (2, 5, 2, 7):
        x = base[start:]
        _same(offset(x), offset_as_number(x))


def test_specialized_dims_are_traced_statically_from_then_on(cache_dir, no_jf_warnings, caplog):
    caplog.set_level(logging.INFO, logger="jitfreeze")
    fast = jf(scale_float, cache_dir=cache_dir)
    for b in (3, 5, 7, 9):
        x = torch.randn(b, 3)
        _same(fast(x), scale_float(x))
    # Size 5 made dim 0 dynamic; its symbolic trace specialized it: one guarded graph, then static ones.
    assert len({s.key for s in fast.signatures() if s.dynamic}) == 1
    assert "tracing it statically from now on" in caplog.text
    assert fast.cache_info().compiles == 4


def test_functions_that_keep_sizes_symbolic_stay_one_graph(cache_dir, no_jf_warnings):
    def mean_rows(x):
        return x.sum(0) / x.shape[0] + x.reshape(x.shape[0], -1).shape[1]

    fast = jf(mean_rows, cache_dir=cache_dir)
    for b in (3, 5, 7, 9, 12):
        x = torch.randn(b, 3)
        _same(fast(x), mean_rows(x))
    assert fast.cache_info().compiles <= 2 and fast.traces == 2


def test_index_entries_written_without_size_guards_are_not_served(cache_dir, monkeypatch, no_jf_warnings):
    """A cache written by a version whose symbolic traces dropped the specialization: its index entry
    (``guards: []``) must not serve another size."""
    from jitfreeze import key
    from jitfreeze.trace import dynamic

    with monkeypatch.context() as old:
        old.setattr(key, "INDEX_VERSION", "3")
        old.setattr(dynamic, "specializations", lambda placeholders, dims: ([], {}))
        jf(scale_float, cache_dir=cache_dir, dynamic=True)(torch.randn(3, 3))
    x = torch.randn(5, 3)
    _same(jf(scale_float, cache_dir=cache_dir, dynamic=True)(x), scale_float(x))


SECOND_CASES = [("scale_float", "auto"), ("weighted_rows", "auto"), ("plus_tensor_of_size", "true"),
                ("scale_sqrt", "true"), ("rows_flattened", "true")]


def test_second_process_gets_eager_answers_at_other_sizes(cache_dir):
    """A first process compiles at some sizes (automatic: 3 then 5, which specializes; dynamic=True:
    1, 3, 5); a second one loads its cache and is fed other sizes and the same ones."""
    first, _ = run_child(SHAPES_SECOND, cache_dir, "3,5", "1,3,5")
    assert all(r["bad"] == [] for r in first.values()), first
    second, _ = run_child(SHAPES_SECOND, cache_dir, "7,4,1,5,2,3", "7,4,1,5,2,3")
    assert all(r["bad"] == [] for r in second.values()), second
    for name, dynamic in SECOND_CASES:
        if dynamic == "auto":
            # the stored decision keeps dim 0 static: no symbolic trace in the second process
            assert second[name]["dyn"] == 0 and second[name]["info"]["fallbacks"] == 0, second[name]
        else:
            assert second[name]["info"]["loads"] >= 2, second[name]     # sizes 1, 3, 5 come from the cache


# -- class 5: data-dependent shapes -----------------------------------------------------------------

def positive_positions(x):
    return torch.nonzero(x > 0)


def positive_values(x):
    return x[x > 0] * 2


def selected(x):
    return torch.masked_select(x, x > 0.5) + 1


def distinct(x):
    return torch.unique((x * 2).round())


def where_rows(x):
    return torch.where(x > 0)[0].float()


def nonzero_tuple(x):
    return torch.nonzero(x > 0, as_tuple=True)[1] * 3


def argwhere(x):
    return torch.argwhere(x < 0)


def repeated(x):
    return torch.repeat_interleave((x.abs() * 2).long().flatten())


def one_hot_auto(x):
    return torch.nn.functional.one_hot((x.abs() * 2).long().flatten())


def detection(x):
    """A detection head's post-processing: keep boxes over a score, count them, pad a fixed tensor."""
    boxes, scores = x[:, :4], x[:, 4].sigmoid()
    keep = scores > 0.5
    kept = boxes[keep]
    order = scores[keep].argsort(descending=True)
    out = torch.zeros(kept.shape[0], 5)
    out[:, :4] = kept[order]
    out[:, 4] = torch.arange(kept.shape[0], dtype=torch.float32)
    return out


DATA_DEPENDENT = [
    (positive_positions, "aten.nonzero"), (positive_values, "aten.index"), (selected, "aten.masked_select"),
    (distinct, "aten._unique2"), (where_rows, "aten.where"), (nonzero_tuple, "aten.nonzero_numpy"),
    (argwhere, "aten.argwhere"), (repeated, "aten.repeat_interleave"), (one_hot_auto, "aten.one_hot"),
    (detection, "aten.index"),
]


def _data_dependent_calls(fast, fn, op):
    torch.manual_seed(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", jitfreeze.JitFreezeWarning)
        for rows in (6, 6, 6, 9, 1, 0, 6):          # same shape, other values: other output shapes
            if rows == 0 and fn is one_hot_auto:
                continue          # eager can't infer a number of classes from no values either
            x = torch.randn(rows, 5)
            _same(fast(x), fn(x))
    messages = [str(w.message) for w in caught if issubclass(w.category, jitfreeze.JitFreezeWarning)]
    # The first call's trace names the op; a later symbolic trace may instead stop on a data-dependent
    # guard inside it (one_hot's own max().item()): eager all the same.
    assert messages and op in messages[0] and all("data-dependent" in m for m in messages), messages
    assert fast.cache_info().compiles == 0


@pytest.mark.parametrize("fn,op", DATA_DEPENDENT, ids=lambda v: getattr(v, "__name__", None))
def test_data_dependent_shapes_run_eagerly_recorder(fn, op, cache_dir):
    _data_dependent_calls(jf(fn, cache_dir=cache_dir), fn, op)


@pytest.mark.parametrize("fn,op", DATA_DEPENDENT[:5] + DATA_DEPENDENT[-1:], ids=lambda v: getattr(v, "__name__", None))
def test_data_dependent_shapes_run_eagerly_make_fx(fn, op, cache_dir, monkeypatch):
    monkeypatch.setenv("JITFREEZE_TRACER", "make_fx")
    _data_dependent_calls(jf(fn, cache_dir=cache_dir), fn, op)


@pytest.mark.parametrize("fn,op", DATA_DEPENDENT[:5] + DATA_DEPENDENT[-1:], ids=lambda v: getattr(v, "__name__", None))
def test_data_dependent_shapes_run_eagerly_symbolic(fn, op, cache_dir):
    _data_dependent_calls(jf(fn, cache_dir=cache_dir, dynamic=True), fn, op)


def scaled_by_sum(x):
    return x * x.sum().item()


def test_value_read_as_number_in_symbolic_trace_runs_eagerly(cache_dir):
    """A symbolic trace records ``.item()`` as an op (the recorder refuses it): refused there too."""
    _data_dependent_calls(jf(scaled_by_sum, cache_dir=cache_dir, dynamic=True), scaled_by_sum, "aten.item")


def random_rows(x):
    keep = torch.nonzero(torch.rand(8) > 0.5).squeeze(1)
    return torch.zeros(keep.shape[0]) + x.sum()


def test_data_dependent_shape_of_random_values_runs_eagerly(cache_dir):
    fast = jf(random_rows, cache_dir=cache_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", jitfreeze.JitFreezeWarning)
        for seed in range(5):
            x = torch.randn(3)
            torch.manual_seed(seed)
            got = fast(x)
            torch.manual_seed(seed)
            _same(got, random_rows(x))
    assert [str(w.message) for w in caught] and all("aten.nonzero" in str(w.message) for w in caught)
    assert fast.cache_info().compiles == 0


_MASK = torch.tensor([True, False, True, True, False])


def constant_mask(x):
    return x[:, torch.nonzero(_MASK).squeeze(1)] * 2          # the function's own constant: same shape every call


def constant_bool_mask(x):
    return x[:, _MASK] + 1          # a boolean mask, but the function's own: same shape every call


def integer_index(x):
    return x[torch.tensor([2, 0, 1])] + x[:, torch.arange(x.shape[1] - 1)].sum()


def one_hot_given(x):
    return torch.nn.functional.one_hot((x.abs() * 2).long().clamp(max=3).flatten(), 4) * 2


@pytest.mark.parametrize("fn", [constant_mask, constant_bool_mask, integer_index, one_hot_given],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("tracer", ["auto", "make_fx"])
def test_shapes_that_follow_input_shapes_still_compile(fn, tracer, cache_dir, monkeypatch, no_jf_warnings):
    monkeypatch.setenv("JITFREEZE_TRACER", tracer)
    fast = jf(fn, cache_dir=cache_dir)
    torch.manual_seed(5)
    for _ in range(3):
        x = torch.randn(6, 5)
        _same(fast(x), fn(x))
    assert fast.cache_info().compiles == 1
