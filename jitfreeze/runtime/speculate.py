"""A warm start's first call, run while the fingerprint is computed.

The fingerprint index's key needs the fingerprint: a walk of the function's code and state that
costs 60-190 ms on transformers models, before the artifact loads and its first call runs (the
load limit: 100 ms to 1 s on the model zoo). The walk holds the GIL; a loaded graph's call does
not (TorchScript and AOTInductor release it while they run). So a miss first reads the call's
hint (:meth:`jitfreeze.runtime.index.FingerprintIndex.hint`: the graph the last index write named
for this function and signature, keyed without the fingerprint), loads that graph, and starts its
first call on a thread; then it computes the fingerprint and reads the index as it always does.

The thread's outputs are an answer only when the index, read with this call's fingerprint, picks
that same graph (the same graph key): they are then exactly what the index path would have
computed. Otherwise they are dropped (after the thread ends, before anything else runs) and
nothing of them is seen. Hints name only static graphs that write to none of their inputs: a
dropped call must leave no trace. A wrong hint (the code or the weights changed since) costs one
load and one call, once per signature and process. The thread runs in the caller's grad and
inference mode; calls under autocast or with CUDA tensors (a thread has its own autocast state and
current stream) are not started ahead.
"""

from __future__ import annotations

import logging
import threading

import torch

__all__ = ["Speculation"]

log = logging.getLogger("jitfreeze")


class Speculation:
    """A loaded graph (``key``: its graph key; ``module``: what the backend loaded) whose first
    call on ``tensors`` runs on a thread. :meth:`take` waits for it and gives its outputs (or
    raises what the call raised); :meth:`drop` waits for it and forgets them."""

    def __init__(self, key: str, module, first_call, tensors: list):
        self.key = key
        self.module = module
        self._box: list = []                 # [(outs, fwd)] or [exception]
        # Grad and inference mode are the thread's own: the call runs in the caller's.
        modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        self._thread = threading.Thread(target=self._run, args=(first_call, module, list(tensors), modes),
                                        name="jitfreeze-first-call", daemon=True)
        self._thread.start()

    def _run(self, first_call, module, tensors, modes) -> None:
        grad, inference = modes
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                self._box.append(first_call(module, tensors))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by take(), or dropped
            self._box.append(exc)

    def take(self):
        """``(outputs, the function to call from now on)``, as the backend's ``first_call`` gives them."""
        self._thread.join()
        found = self._box[0]
        if isinstance(found, BaseException):
            raise found
        return found

    def drop(self) -> None:
        self._thread.join()
        if self._box and not isinstance(self._box[0], BaseException):
            log.debug("jitfreeze: the first call started on %s while the fingerprint was computed is "
                      "not this call's graph; dropped", self.key[:16])
        self._box.clear()
        self.module = None
