"""``discard_parameters=True``: once frozen graphs hold a module's weights, release its own.

What is left of the module then refuses, with :class:`~jitfreeze.errors.ParametersDiscardedError`,
what would silently go wrong: saving (an empty checkpoint), loading (weights the frozen graphs
would never see) and calling it eagerly (empty weights).
"""

from __future__ import annotations

import torch

from ..errors import ParametersDiscardedError

__all__ = ["discard_parameters"]


def discard_parameters(module: torch.nn.Module, served: type) -> bool:
    """Release ``module``'s parameter and buffer storage (False: it was already released).
    ``served``: the type of a forward that jitfreeze serves (its hooks are not installed there)."""
    if getattr(module, "_jitfreeze_discarded", False):
        return False
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
    object.__setattr__(module, "_jitfreeze_discarded", True)
    # What is left would save as an empty checkpoint, and compute with empty weights: refused
    # with ParametersDiscardedError instead, on the module and each of its submodules. Not a
    # forward served by jitfreeze (a decorated forward method): its compiled path never calls it.
    for sub in module.modules():
        sub.register_state_dict_pre_hook(_discarded_state_dict)
        sub.register_load_state_dict_pre_hook(_discarded_load_state_dict)
        if not isinstance(getattr(sub, "forward", None), served):
            sub.register_forward_pre_hook(_discarded_forward)
    return True


_DISCARDED = ("its parameters and buffers were released by jitfreeze (discard_parameters=True); only the "
              "frozen graphs hold the weights")


def _discarded_state_dict(module, prefix, keep_vars):
    raise ParametersDiscardedError(
        f"{type(module).__name__}{' ' + prefix.rstrip('.') if prefix else ''}.state_dict(): {_DISCARDED}, so "
        "the checkpoint would be empty. Save the state dict before the first call, or create the "
        "module without discard_parameters=True")


def _discarded_load_state_dict(module, state_dict, prefix, *_):
    # Loading weights back would make the eager module and the frozen graphs (which keep the old
    # weights, no longer watched) disagree without a word.
    raise ParametersDiscardedError(
        f"{type(module).__name__}{' ' + prefix.rstrip('.') if prefix else ''}.load_state_dict(): {_DISCARDED}, "
        "and they would go on serving the old ones. Load the weights into a fresh module and jitfreeze that")


def _discarded_forward(module, args):
    raise ParametersDiscardedError(
        f"calling {type(module).__name__} directly: {_DISCARDED}. Call it through its jitfreeze function, "
        "with signatures compiled before the parameters were discarded")
