"""A warm start's first call runs while the fingerprint is computed (jitfreeze.runtime.speculate):
its outputs are the answer only when the index, read with the call's fingerprint, picks the same
graph; a hinted graph that is not the call's is dropped and leaves no trace."""

import logging

import torch

from jitfreeze import jitfreeze

from .children import run_child

STARTED = "first call while the fingerprint is computed"
TAKEN = "first call run while the fingerprint was computed"


class Scale(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        with torch.no_grad():
            self.fc.weight.fill_(value)
            self.fc.bias.zero_()
        self.eval()

    def forward(self, x):
        return torch.relu(self.fc(x))


class WritesInput(Scale):
    def forward(self, x):
        x.add_(1.0)
        return self.fc(x)


def _messages(caplog):
    return [r.getMessage() for r in caplog.records]


def test_the_hinted_graph_runs_while_the_fingerprint_is_computed(cache_dir, caplog):
    x = torch.randn(3, 4)
    with torch.no_grad():
        jitfreeze(Scale(0.5), cache_dir=cache_dir)(x)          # compiles: index entry and hint
        model = Scale(0.5)
        warm = jitfreeze(model, cache_dir=cache_dir)
        with caplog.at_level(logging.DEBUG, logger="jitfreeze"):
            out = warm(x)
        ref = model(x)
    assert torch.equal(out, ref)
    assert warm.cache_info().loads == 1 and warm.traces == 0
    assert any(STARTED in m for m in _messages(caplog)) and any(TAKEN in m for m in _messages(caplog))


def test_a_hint_for_another_graph_is_dropped(cache_dir, caplog):
    """The hint names the last graph written for the signature (weights 2.0); the call's own
    fingerprint leads to another (weights 1.0): that one answers, never the hinted one."""
    x = torch.randn(3, 4).abs()
    with torch.no_grad():
        jitfreeze(Scale(1.0), cache_dir=cache_dir)(x)
        jitfreeze(Scale(2.0), cache_dir=cache_dir)(x)           # the hint now names this graph
        model = Scale(1.0)
        warm = jitfreeze(model, cache_dir=cache_dir)
        with caplog.at_level(logging.DEBUG, logger="jitfreeze"):
            out = warm(x)
        ref = model(x)
    assert any(STARTED in m for m in _messages(caplog))      # the 2.0 graph was started...
    assert not any(TAKEN in m for m in _messages(caplog))    # ...and dropped
    assert torch.equal(out, ref)
    assert warm.cache_info().loads == 1 and warm.traces == 0


def test_graphs_that_write_their_inputs_are_never_started_ahead(cache_dir, caplog):
    """A dropped call must leave nothing behind: a graph that writes to its input would have
    written to the caller's tensor once more."""
    x0 = torch.randn(3, 4)
    with torch.no_grad():
        jitfreeze(WritesInput(1.0), cache_dir=cache_dir)(x0.clone())
        jitfreeze(WritesInput(2.0), cache_dir=cache_dir)(x0.clone())
        model = WritesInput(1.0)
        x, x_ref = x0.clone(), x0.clone()
        with caplog.at_level(logging.DEBUG, logger="jitfreeze"):
            out = jitfreeze(model, cache_dir=cache_dir)(x)
        ref = model(x_ref)
    assert not any(STARTED in m for m in _messages(caplog))
    assert torch.equal(out, ref) and torch.equal(x, x_ref)


WARM_CHILD = """
import json, logging, sys
import torch
from jitfreeze import jitfreeze
from tests.test_speculate import Scale
records = []
handler = logging.Handler(); handler.emit = lambda r: records.append(r.getMessage())
logging.getLogger("jitfreeze").addHandler(handler); logging.getLogger("jitfreeze").setLevel(logging.DEBUG)
torch.manual_seed(0)
model = Scale(float(sys.argv[2]))
x = torch.randn(3, 4)
with torch.no_grad():
    fast = jitfreeze(model, cache_dir=sys.argv[1])
    out = fast(x)
    ref = model(x)
print(json.dumps({"equal": bool(torch.equal(out, ref)), "info": fast.cache_info()._asdict(),
                  "taken": any("run while the fingerprint was computed" in m for m in records)}))
"""


def test_a_fresh_process_takes_its_hinted_graph_and_drops_a_stale_one(cache_dir):
    cold, _ = run_child(WARM_CHILD, cache_dir, 0.5)
    assert cold["equal"] and cold["info"]["compiles"] == 1 and not cold["taken"]
    warm, _ = run_child(WARM_CHILD, cache_dir, 0.5)
    assert warm["equal"] and warm["info"]["loads"] == 1 and warm["info"]["compiles"] == 0 and warm["taken"]
    changed, _ = run_child(WARM_CHILD, cache_dir, 0.25)      # other weights: the hinted graph is stale
    assert changed["equal"] and changed["info"]["compiles"] == 1 and not changed["taken"]


def test_the_thread_runs_in_the_callers_grad_and_inference_mode(cache_dir):
    """Grad and inference mode are per thread: outputs of the graph started ahead must be what a
    call in the caller's thread gives (no autograd history under no_grad, inference tensors under
    inference_mode)."""
    x = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        jitfreeze(Scale(0.5), cache_dir=cache_dir)(x)
        out = jitfreeze(Scale(0.5), cache_dir=cache_dir)(x)
    assert not out.requires_grad
    y = torch.randn(2, 4)
    first, model = Scale(0.5), Scale(0.5)        # made outside: inference tensors can't be watched
    with torch.inference_mode():
        jitfreeze(first, cache_dir=cache_dir)(y)
        out, ref = jitfreeze(model, cache_dir=cache_dir)(y), model(y)
    assert out.is_inference() and ref.is_inference() and torch.equal(out, ref)
