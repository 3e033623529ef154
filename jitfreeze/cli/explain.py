"""Why did a call compile? Compare a miss's key parts with the nearest stored entry.

Each compile records its key parts (:mod:`jitfreeze.cache.stats`). For a miss,
the nearest stored entry is the entry of the same function, written before the
miss, that shares the most key parts; the parts that differ become readable
reasons: ``torch version changed: 2.13.0 vs 2.12.0``, ``weights digest
changed``, ``input 0 shape (8, 128) vs (4, 128)`` (this call first, the stored
entry second).
"""

from __future__ import annotations

from ..trace.sigtext import tensor_fields

__all__ = ["nearest", "differences", "explain_misses"]


_PART_WORDS = {
    "format": "cache format",
    "jitfreeze": "jitfreeze version",
    "torch": "torch version",
    "python": "Python version",
    "backend": "backend",
    "device": "device",
}


def _short(text, limit: int = 80) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _signature(record: dict):
    """(spec, per-input texts) as the key saw them (dynamic dims as 's'), else the concrete call's."""
    text = (record.get("parts") or {}).get("signature")
    if isinstance(text, str) and not text.startswith("sha256:") and "\n" in text:
        spec, *texts = text.split("\n")
        return spec, texts
    return record.get("spec"), record.get("signature")


def _signature_differences(new_sig, old_sig, new_spec, old_spec) -> list[str]:
    out = []
    if new_spec is not None and old_spec is not None and new_spec != old_spec:
        out.append(f"argument structure changed: {_short(new_spec)} vs {_short(old_spec)}")
    if not isinstance(new_sig, list) or not isinstance(old_sig, list):
        return out
    if len(new_sig) != len(old_sig):
        out.append(f"number of inputs {len(new_sig)} vs {len(old_sig)}")
    for i, (a, b) in enumerate(zip(new_sig, old_sig)):
        if a == b:
            continue
        ta, tb = tensor_fields(a), tensor_fields(b)
        if ta is None or tb is None:
            out.append(f"input {i} {_short(a, 60)} vs {_short(b, 60)}")
            continue
        for field in list(ta) + [f for f in tb if f not in ta]:
            if field in ("stride", "contiguous") and ta.get("shape") != tb.get("shape"):
                continue                # a new shape has new strides: say it once
            if ta.get(field) != tb.get(field):
                out.append(f"input {i} {field} {ta.get(field, '-')} vs {tb.get(field, '-')}")
    return out


def differences(miss: dict, entry: dict) -> list[str]:
    """Readable reasons why ``miss``'s key differs from ``entry``'s (both hold parts and part_digests)."""
    new_d = miss.get("part_digests") or {}
    old_d = entry.get("part_digests") or {}
    new_p = miss.get("parts") or {}
    old_p = entry.get("parts") or {}
    out = []
    for name in list(new_d) + [n for n in old_d if n not in new_d]:
        if new_d.get(name) == old_d.get(name):
            continue
        if name == "guards":
            out.append("compiled with dynamic shapes (the stored entry is static)" if name not in old_d else
                       "compiled static (the stored entry has dynamic shapes)" if name not in new_d else
                       "dynamic-shape guards changed")
        elif name not in new_d or name not in old_d:
            out.append(f"key part {name!r} {'added' if name in new_d else 'removed'}")
        elif name == "signature":
            # the concrete calls first ("input 0 shape (8, 128) vs (4, 128)"), else the key's own
            # texts (where dynamic dims read 's')
            found = _signature_differences(miss.get("signature"), entry.get("signature"),
                                           miss.get("spec"), entry.get("spec"))
            if not found:
                (new_spec, new_sig), (old_spec, old_sig) = _signature(miss), _signature(entry)
                found = _signature_differences(new_sig, old_sig, new_spec, old_spec)
            out.extend(found or ["input signature changed"])
        elif name == "weights":
            out.append("weights digest changed")
        elif name == "graph":
            out.append("traced graph changed (the function's code, or the module's structure or constants)")
        elif name in _PART_WORDS:
            out.append(f"{_PART_WORDS[name]} changed: {_short(new_p.get(name, '?'), 60)} vs "
                       f"{_short(old_p.get(name, '?'), 60)}")
        else:
            out.append(f"{name} changed")
    return out


def nearest(miss: dict, entries: list[dict]) -> dict | None:
    """The stored entry of the same function, older than the miss, sharing the most key parts."""
    when = miss.get("time") or float("inf")
    digests = miss.get("part_digests") or {}
    best, best_score = None, None
    for e in entries:
        if e.get("qualname") != miss.get("qualname") or e.get("key") == miss.get("key"):
            continue
        created = e.get("created")
        if isinstance(created, (int, float)) and created > when:
            continue
        other = e.get("part_digests") or {}
        score = (sum(1 for n, d in digests.items() if other.get(n) == d),
                 created if isinstance(created, (int, float)) else 0.0)
        if best_score is None or score > best_score:
            best, best_score = e, score
    return best


def explain_misses(misses: list[dict], entries: list[dict]) -> list[dict]:
    """For each miss: the nearest stored entry (key, created, layer) and the reasons."""
    out = []
    for m in misses:
        near = nearest(m, entries)
        item = {"time": m.get("time"), "qualname": m.get("qualname"), "key": m.get("key"),
                "signature": m.get("signature"), "nearest": None, "reasons": []}
        if near is None:
            item["reasons"] = ["no stored entry of this function to compare with (its first compile, "
                               "or the older entries were removed)"]
        else:
            item["nearest"] = {"key": near.get("key"), "created": near.get("created"), "layer": near.get("layer")}
            item["reasons"] = differences(m, near) or [
                "an entry with the same key parts exists now (the miss found none: it was written later, "
                "removed, or evicted)"]
        out.append(item)
    return out
