"""The trace-free fingerprint index: a warm start finds its graph without tracing.

Its key (:func:`jitfreeze.key.index_key`) covers the function's code and weights (a fingerprint,
:mod:`jitfreeze.trace.fingerprint`) and the call's signature, not the graph. Its entry, in the cache's
``INDEX`` namespace, lists up to 8 candidates, each the graph key of a stored artifact, how to
rebuild its output, and the dynamic guards under which it serves (none: a static signature)::

    {"candidates": [{"graph_key", "out", "out_tensor_idx", "out_consts", "guards"}, ...],
     "qualname", "created"}
"""

from __future__ import annotations

import logging
import time
import typing

from ..cache.persistent import HINT, INDEX
from ..key import hint_key, index_key
from ..trace import treespec
from ..trace.dynamic import Guards

__all__ = ["FingerprintIndex", "Fingerprint", "Candidate"]

log = logging.getLogger("jitfreeze")

_KEEP = 8        # candidates kept per index entry


class Fingerprint(typing.NamedTuple):
    key: str            # the index key
    tensors: list       # the tensors the function reaches (its weights)
    modules: list       # the modules it reaches


class Candidate(typing.NamedTuple):
    graph_key: str
    out_spec: object
    out_tensor_idx: tuple
    out_consts: tuple
    guards: Guards | None


class FingerprintIndex:
    """The index entries of one function (``fn``, named ``name``, compiled by backend ``backend``).
    ``parent``: the index of the function this one is bound from (a method), which logs why the
    index can't be used once for all its bindings."""

    def __init__(self, name: str, backend: str, fn, parent: "FingerprintIndex | None" = None):
        self.name = name
        self.backend = backend
        self.fn = fn
        self._parent = parent
        self._refusal_logged = False     # why the index can't be used: logged once

    def fingerprint(self, call, texts) -> Fingerprint | None:
        """The index key, tensors and modules for this call without tracing, or None."""
        from ..trace.fingerprint import Unfingerprintable, function_fingerprint
        try:
            digest, tensors, modules = function_fingerprint(self.fn)
        except Unfingerprintable as exc:
            # Not the index, then: trace, and find the artifact by the graph's key.
            root = self._parent or self
            if not root._refusal_logged:
                root._refusal_logged = True
                log.info("%s: the fingerprint index is not used: %s; tracing (the graph key finds stored "
                         "artifacts)", self.name, exc)
            return None
        return Fingerprint(index_key(self.name, self.backend, call, texts, digest, tensors), tensors, modules)

    def candidates(self, cache, key: str, tensors):
        """The entry's candidates whose guards these tensors pass, in order (read lazily: an entry
        that does not parse is evicted when reached, and ends them)."""
        found = cache.get(key, ns=INDEX)
        if found is None:
            return
        for candidate in found[0].get("candidates", []):
            try:
                guards = Guards(candidate["guards"]) if candidate["guards"] else None
                if guards is not None and guards.failing(tensors) is not None:
                    continue
                parsed = Candidate(candidate["graph_key"], treespec.loads(candidate["out"]),
                                   tuple(candidate["out_tensor_idx"]),
                                   tuple((i, v) for i, v in candidate["out_consts"]), guards)
            except Exception as exc:  # noqa: BLE001 - e.g. an output class that no longer imports
                cache.evict(key, "unusable index entry", exc, ns=INDEX)
                return
            yield parsed

    def hint(self, cache, call, texts) -> str | None:
        """The graph key the last index write named for this signature (a static one, whose graph
        writes to none of its inputs), or None: a guess to start loading while the fingerprint is
        computed (:mod:`jitfreeze.runtime.speculate`), never an answer."""
        found = cache.get(hint_key(self.name, self.backend, call, texts), ns=HINT)
        graph_key = found[0].get("graph_key") if found is not None else None
        return graph_key if isinstance(graph_key, str) else None

    def write(self, cache, key: str, entry, traced, call, texts) -> None:
        """Add ``entry`` (a stored artifact traced as ``traced`` for ``call``) to the index entry
        ``key``, and name it in the signature's hint."""
        if entry.source == "unstored":
            return      # the artifact was not written (lock timeout, write failure): neither is its index
        out = treespec.dumps(traced.out_spec)
        consts = [[i, v] for i, v in traced.out_consts]
        if out is None or not all(isinstance(v, (type(None), bool, int, float, str)) for _, v in consts):
            log.debug("%s: output structure can't be stored; no index entry", self.name)
            return        # nor a hint: no index entry could ever take its graph
        hint = entry.key if not traced.guards and not traced.writes_inputs else None
        cache.put(hint_key(self.name, self.backend, call, texts), {"graph_key": hint, "qualname": self.name},
                  b"", ns=HINT)
        candidate = {"graph_key": entry.key, "out": out, "out_tensor_idx": list(entry.out_tensor_idx),
                     "out_consts": consts, "guards": list(traced.guards)}
        with cache.lock("index-" + key) as held:
            found = cache.get(key, ns=INDEX)
            candidates = [c for c in (found[0].get("candidates", []) if found else [])
                          if isinstance(c, dict) and c.get("graph_key") != entry.key]
            if not traced.guards:
                candidates = []          # a static signature has one graph: replace (e.g. stale entries)
            candidates.append(candidate)
            if held:
                cache.put(key, {"candidates": candidates[-_KEEP:], "qualname": self.name, "created": time.time()},
                          b"", ns=INDEX)
