"""Signature text: the lines that describe a call in the persistent key, written and read here.

One line per pytree leaf of the call: ``Tensor(shape=(8, 128), dtype=torch.float32, device=cpu,
stride=(128, 1), layout=torch.strided)`` for a tensor (a dynamic one: ``shape=('s', 128)``, and
``contiguous=True`` for its strides), ``int:3``/``float:2.0``/``str:'x'`` for a constant, the
member's full name for an enum; ``aliases: 0~1 view, ...`` after them when tensor leaves share
storage. :meth:`jitfreeze.trace.signature.CallSpec.signature_text` puts the argument structure
first. Log lines, the CLI and ``jitfreeze explain`` read this text only through the parser below.
Imports no torch (the CLI reads entries without it).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any

__all__ = ["tensor_text", "dynamic_tensor_text", "alias_text", "SignatureText", "parse_signature",
           "tensor_fields", "dims_of", "constant", "aliases", "short_text", "short_signature"]


# -- writing ---------------------------------------------------------------------------------------

def _float_key(x: float):
    # repr tells -0.0 from 0.0 and makes nan equal to itself.
    return repr(x)


def tensor_text(t) -> str:
    return (f"Tensor(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device}, "
            f"stride={tuple(t.stride())}, layout={t.layout})")


def dynamic_tensor_text(t, shape: tuple) -> str:
    """A tensor traced with dynamic dims: ``shape`` with ``'s'`` for them, strides as contiguity."""
    return (f"Tensor(shape={shape}, dtype={t.dtype}, device={t.device}, "
            f"contiguous={t.is_contiguous()}, layout={t.layout})")


def _const_text(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return f"{type(value).__module__}.{type(value).__qualname__}.{value.name}"
    if isinstance(value, float):
        return f"float:{_float_key(value)}"
    return f"{type(value).__name__}:{value!r}"


def alias_text(pattern: tuple) -> str:
    """The pattern (:func:`jitfreeze.trace.signature.alias_pattern`) as a line of the persistent key
    ('' when nothing aliases)."""
    return "aliases: " + ", ".join(f"{i}~{j} {kind}" for i, j, kind in pattern) if pattern else ""


# -- reading ---------------------------------------------------------------------------------------

_TENSOR_TEXT = re.compile(r"^Tensor\((.*)\)$")
_FIELD = re.compile(r"(\w+)=(\([^()]*\)|[^,()]+)")
_ALIAS = re.compile(r"(\d+)~(\d+) (\w+)")


@dataclasses.dataclass(frozen=True)
class SignatureText:
    """A parsed :meth:`CallSpec.signature_text`: the argument structure, one line per leaf (a dict
    of fields for a tensor, see :func:`tensor_fields`; the line itself for a constant), and the
    alias pattern (``((i, j, kind), ...)``, ``()`` when nothing aliases)."""

    spec: str
    leaves: tuple
    aliases: tuple = ()


def tensor_fields(text) -> dict | None:
    """``{"shape": "(8, 128)", "dtype": "torch.float32", "device": "cpu", ...}``: the fields of a
    tensor's signature line as written, or None for a line that describes no tensor."""
    m = _TENSOR_TEXT.match(str(text or ""))
    if not m:
        return None
    return {k: v.strip() for k, v in _FIELD.findall(m.group(1))}


def dims_of(field: str) -> tuple:
    """A shape or stride field as numbers: ``"(8, 's')"`` -> ``(8, 's')`` (``'s'``: a dynamic dim)."""
    return tuple(d if d == "s" else int(d) for d in (p.strip().strip("'") for p in field.strip("()").split(",")) if d)


def constant(text: str) -> tuple[str, str]:
    """A constant's signature line as (type, value text): ``"int:3"`` -> ``("int", "3")``; an enum
    member (``"mod.Color.RED"``) -> ``("enum", "mod.Color.RED")``."""
    kind, sep, value = text.partition(":")
    return (kind, value) if sep else ("enum", text)


def aliases(line: str) -> tuple:
    """An ``aliases: 0~1 view, ...`` line as :func:`alias_pattern` gives it: ``((0, 1, "view"), ...)``."""
    return tuple((int(i), int(j), kind) for i, j, kind in _ALIAS.findall(line.removeprefix("aliases: ")))


def parse_signature(text: str) -> SignatureText:
    """:meth:`CallSpec.signature_text` read back."""
    spec, *lines = text.split("\n")
    found = ()
    if lines and lines[-1].startswith("aliases: "):
        found = aliases(lines.pop())
    return SignatureText(spec, tuple(tensor_fields(line) or line for line in lines), found)


def short_text(text) -> str:
    """``8x128 float32`` for a tensor's line (``scalar`` for a 0-dim one); any other line as it is."""
    fields = tensor_fields(text)
    if fields is None or "shape" not in fields or "dtype" not in fields:
        return str(text)
    shape = "x".join(d.strip() for d in fields["shape"].strip("()").split(",") if d.strip()) or "scalar"
    return f"{shape} {fields['dtype'].replace('torch.', '')}"


def short_signature(texts) -> str:
    """``(4x8 float32, 8x16 float32, int:3)``: signature lines in short, for log lines and listings."""
    return "(" + ", ".join(short_text(t) for t in texts) + ")"

