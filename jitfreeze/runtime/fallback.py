"""The eager-fallback policy: when a call runs eagerly, and what it says when it does.

A signature that can't be compiled runs the function itself (eager), is remembered (later calls
with it go straight to eager), and warns once per function and signature. Three reasons warn once
per function instead: grad mode (with the fix: ``torch.no_grad()``), ``max_signatures`` reached,
and a backend that can't compile on this machine (:class:`~jitfreeze.backend.base.NoCompiler`).
Where eager was timed faster than the compiled graph (a stored decision,
:class:`~jitfreeze.backend.EagerIsFaster`) nothing warns: one INFO line per function. Under
``JITFREEZE_STRICT=1`` each warning raises :class:`~jitfreeze.errors.FallbackReason`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ..backend.base import EagerIsFaster, NoCompiler
from ..errors import FallbackReason, ParametersDiscardedError, trouble
from ..trace.pipeline import NO_RESULT

__all__ = ["Fallback", "Fallbacks", "before_trace", "grad_weights", "cap", "run_eagerly", "from_reason",
           "SIGNATURE", "GRAD", "CAP", "MACHINE", "FASTER"]

log = logging.getLogger("jitfreeze")
_INFORMED: set = set()     # (function serial, topic) already said at INFO

SIGNATURE, GRAD, CAP = "signature", "grad", "cap"      # what a fallback warns once per
MACHINE = "machine"        # the backend can't compile here (no C++ compiler): once per function
FASTER = "faster"          # eager was timed faster when the graph was compiled: one INFO line per function


@dataclasses.dataclass
class Fallback:
    """This call runs eagerly: why (``reason``), which warning says so (``kind``), and the function's
    result when a stage already ran it on this call's inputs (else ``NO_RESULT``: run it)."""

    reason: str
    kind: str = SIGNATURE
    result: Any = NO_RESULT


def from_reason(reason: FallbackReason, result: Any = NO_RESULT) -> Fallback:
    """The fallback a stage's :class:`FallbackReason` means (``result``: the function's, if it ran)."""
    kind = FASTER if isinstance(reason, EagerIsFaster) else MACHINE if isinstance(reason, NoCompiler) else SIGNATURE
    return Fallback(str(reason), kind, result)


def before_trace(call, mode, module) -> Fallback | None:
    """Why this call must run eagerly before anything is traced (training, autocast, grad), or None."""
    grad, autocast, training = mode
    if training:
        return Fallback(f"the module is in training mode; jitfreeze compiles eval-mode inference "
                        f"(call .eval() on {type(module).__name__})")
    if autocast:
        return Fallback("autocast is enabled; jitfreeze compiles calls outside autocast")
    if grad:
        if call.requires_grad:
            return Fallback("an input requires grad and frozen graphs are inference-only", GRAD)
        if module is not None and any(p.requires_grad for p in module.parameters()):
            return Fallback("the module's parameters require grad and frozen graphs are inference-only", GRAD)
    return None


def grad_weights(call, weights) -> Fallback | None:
    """Grad mode with weights that require grad: the result must carry autograd history."""
    if call.mode[0] and any(t.requires_grad for t in weights):
        return Fallback("weights the function uses require grad and frozen graphs are inference-only", GRAD)
    return None


def cap(name: str, signatures: int, max_signatures: int) -> Fallback | None:
    """``max_signatures`` reached: new signatures run eagerly."""
    if signatures >= max_signatures:
        return Fallback(f"{name} already has {signatures} signatures (max_signatures={max_signatures}, "
                        "JITFREEZE_MAX_SIGNATURES); new signatures run eagerly", CAP)
    return None


def run_eagerly(fn, module, name: str, args, kwargs):
    """Call the function itself; its module must still have its parameters."""
    if module is not None and getattr(module, "_jitfreeze_discarded", False):
        raise ParametersDiscardedError(
            f"{name}: this call needs the eager module (a new signature, a fallback or grad mode), "
            "but its parameters were discarded (discard_parameters=True); keep the parameters or call "
            "it only with signatures compiled before they were discarded")
    return fn(*args, **kwargs)


class Fallbacks:
    """The signatures of one function (``name``; ``serial`` names it in once-per-function warnings)
    that run eagerly, {signature key: reason}."""

    def __init__(self, name: str, serial: int):
        self.name = name
        self.serial = serial
        self.reasons: dict = {}

    def __contains__(self, key) -> bool:
        return key in self.reasons

    def __len__(self) -> int:
        return len(self.reasons)

    def clear(self) -> None:
        self.reasons.clear()

    def unsupported(self, reason: FallbackReason, strict: bool) -> None:
        """A call whose arguments can't be described (no signature to remember): warn once per reason."""
        trouble(f"jitfreeze: {self.name} runs eagerly: {reason}", None, strict=strict,
                once=(self.serial, str(reason)), error=FallbackReason)

    def add(self, key, fallback: Fallback, strict: bool) -> None:
        """Remember that signature ``key`` runs eagerly, and warn as ``fallback.kind`` says."""
        self.reasons[key] = fallback.reason
        if fallback.kind == FASTER:
            if (self.serial, FASTER) not in _INFORMED:
                _INFORMED.add((self.serial, FASTER))
                log.info("jitfreeze: %s runs eagerly for this signature: %s", self.name, fallback.reason)
        elif fallback.kind == MACHINE:
            trouble(f"jitfreeze: {self.name} runs eagerly: {fallback.reason}", None, strict=strict,
                    once=(self.serial, MACHINE), error=FallbackReason)
        elif fallback.kind == CAP:
            trouble(f"jitfreeze: {self.name}: {fallback.reason}", None, strict=strict,
                    once=(self.serial, "cap"), error=FallbackReason)
        elif fallback.kind == GRAD:
            trouble(f"jitfreeze: {self.name} runs eagerly (no compiled graph) while grad is enabled: "
                    f"{fallback.reason}. Call it under torch.no_grad() or torch.inference_mode() to use the "
                    "frozen graph (or filter this warning if the gradients are wanted)", None,
                    strict=strict, once=(self.serial, "grad"), error=FallbackReason)
        else:
            trouble(f"jitfreeze: {self.name} runs eagerly for this signature: {fallback.reason}", None,
                    strict=strict, once=(self.serial, key), error=FallbackReason)
