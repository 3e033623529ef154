"""A fallback warning is given once per function and signature -- per function *object*, whatever
its memory address: a new function that reuses a dead one's address (CPython's ``id``) still warns.
(That reuse made a test depend on what ran before it: issue 25.)"""

import pytest
import torch

from jitfreeze import JitFreezeWarning, jitfreeze

from jitfreeze.runtime import function as core


def test_a_new_function_at_a_dead_ones_address_still_warns(cache_dir, monkeypatch):
    monkeypatch.setattr(core, "id", lambda obj: 4096, raising=False)      # every object at one address

    def data_dependent(x):
        return x * 2 if x.sum() > 0 else x * 3

    for _ in range(3):
        f = jitfreeze(data_dependent, cache_dir=cache_dir)
        with pytest.warns(JitFreezeWarning, match="data-dependent"):
            assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))
        with pytest.warns(JitFreezeWarning, match="data-dependent"):       # a second signature: warns too
            f(torch.ones(2))
