"""Compile every signature a function will be called with, ahead of time (``jitfreeze.precompile``
and ``jitfreeze precompile``), and optionally write a bundle of the results.

An *example* is one call's inputs:

* a ``tuple``: positional arguments, ``(x,)`` or ``(x, mask)``;
* a ``dict`` with ``str`` keys: keyword arguments, ``{"input_ids": ids, "attention_mask": mask}``;
* a 2-tuple ``(tuple, dict)``: positional and keyword arguments, ``((x,), {"scale": 2.0})``
  (to pass a tuple and a dict positionally, write ``((t, d), {})``);
* a bare ``torch.Tensor``: one positional argument.

``examples`` is a list (or any iterable other than a tuple, dict or tensor) of examples; it is read
in full, and every example checked, before anything is compiled.

Each call's outcome comes from the function's ``cache_info()`` before and after it: ``compiles`` went
up: *compiled*; ``loads``: *loaded* (from the persistent cache or a read-only layer); ``hits``:
*reused* (a graph already in this process serves it); none of them: *fallback* (it ran eagerly).
The reason is what jitfreeze said during the call: its ``JitFreezeWarning`` messages and the
``jitfreeze`` logger's INFO lines (captured whatever the logger's level; shown to its handlers only
at the level they had). The long-compile line (:mod:`jitfreeze.runtime.progress`) is off meanwhile: the
progress display says which signature is compiling.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import warnings
from typing import Any, Callable, Iterable

from ..errors import JitFreezeError, JitFreezeWarning
from .progress import quiet as progress_quiet

__all__ = ["precompile", "PrecompileResult", "PrecompileReport", "normalize_example", "describe_example"]

OUTCOMES = ("compiled", "loaded", "reused", "fallback")


@dataclasses.dataclass
class PrecompileResult:
    """One example's outcome."""

    signature: str      # e.g. "(8x3x64x64 float32)" or "(input_ids=2x16 int64, attention_mask=2x16 int64)"
    outcome: str        # compiled | loaded | reused | fallback
    reason: str         # what jitfreeze said during the call (or why nothing was said)
    seconds: float      # the call's wall time


class PrecompileReport(list):
    """A list of :class:`PrecompileResult`, one per example, in order; plus ``function`` (the
    jitfreeze function that was called) and ``bundle`` (the export report when a bundle was
    written: ``{"path", "entries", "bytes", "skipped"}``, else None)."""

    function: Any = None
    bundle: dict | None = None

    def counts(self) -> dict[str, int]:
        return {o: sum(r.outcome == o for r in self) for o in OUTCOMES}

    @property
    def ok(self) -> bool:
        """True when no example fell back to eager and the bundle (if any) skipped no entry."""
        return not any(r.outcome == "fallback" for r in self) and not (self.bundle or {}).get("skipped")


# -- examples --------------------------------------------------------------------------------------


def normalize_example(example: Any, index: int = 0) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for one example (see the module docstring); TypeError if it is none of them."""
    import torch

    if isinstance(example, torch.Tensor):
        return (example,), {}
    if isinstance(example, dict):
        _check_kwargs(example, index)
        return (), dict(example)
    if isinstance(example, tuple):
        if len(example) == 2 and isinstance(example[0], tuple) and isinstance(example[1], dict):
            _check_kwargs(example[1], index)
            return example[0], dict(example[1])
        return example, {}
    raise TypeError(f"example {index}: expected a tuple of positional arguments, a dict of keyword arguments, "
                    f"an (args tuple, kwargs dict) pair or a tensor, not {type(example).__name__}"
                    + (" (a list is not an example: use a tuple)" if isinstance(example, list) else ""))


def _check_kwargs(kwargs: dict, index: int) -> None:
    bad = [k for k in kwargs if not isinstance(k, str)]
    if bad:
        raise TypeError(f"example {index}: keyword argument names must be strings, not {bad[0]!r}")


def _examples_list(examples: Iterable) -> list[tuple[tuple, dict]]:
    import torch

    if isinstance(examples, (tuple, dict, torch.Tensor, str, bytes)) or not hasattr(examples, "__iter__"):
        raise TypeError(f"examples must be a list (or another iterable) of examples, not a {type(examples).__name__}"
                        " (one example: pass [example])")
    out = [normalize_example(e, i) for i, e in enumerate(examples)]
    if not out:
        raise ValueError("examples is empty: nothing to precompile")
    return out


def _value_text(v: Any, depth: int = 0) -> str:
    import torch

    if isinstance(v, torch.Tensor):
        dims = "x".join(map(str, v.shape)) or "scalar"
        dev = "" if v.device.type == "cpu" else f" {v.device}"
        return f"{dims} {str(v.dtype).replace('torch.', '')}{dev}"
    if isinstance(v, (bool, int, float, type(None))):
        return repr(v)
    if isinstance(v, str):
        return repr(v if len(v) <= 20 else v[:17] + "...")
    if isinstance(v, (list, tuple)) and depth < 2:
        inner = ", ".join(_value_text(x, depth + 1) for x in v[:4]) + (", ..." if len(v) > 4 else "")
        return f"[{inner}]" if isinstance(v, list) else f"({inner})"
    if isinstance(v, dict) and depth < 2:
        return "{" + ", ".join(f"{k}: {_value_text(x, depth + 1)}" for k, x in list(v.items())[:4]) + "}"
    return type(v).__name__


def describe_example(args: tuple, kwargs: dict) -> str:
    """``(8x16 float32, scale=2.0)``: an example's signature as text."""
    return "(" + ", ".join([_value_text(a) for a in args] + [f"{k}={_value_text(v)}" for k, v in kwargs.items()]) + ")"


# -- the function ----------------------------------------------------------------------------------


def _as_jitfreeze(fn: Any):
    """The jitfreeze function to call: ``fn`` itself, a module's decorated ``forward``, or a new wrapper."""
    import torch

    from .decorator import jitfreeze
    from .function import JitFreezeFunction
    from .module import JitFreezeModule

    if isinstance(fn, (JitFreezeFunction, JitFreezeModule)):
        return fn
    if isinstance(fn, torch.nn.Module):
        if isinstance(getattr(type(fn), "forward", None), JitFreezeFunction):
            return fn.forward                       # @jitfreeze on the class's forward: bound to fn
        return jitfreeze(fn)
    if callable(fn):
        return jitfreeze(fn)
    raise TypeError(f"precompile expects a jitfreeze function, a torch.nn.Module or a function, "
                    f"not {type(fn).__name__}")


class _LogCapture(logging.Filter):
    """Captures the ``jitfreeze`` logger's INFO+ records; lets through only what its level let through."""

    def __init__(self, passes: int):
        super().__init__()
        self.passes = passes
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.INFO:
            self.messages.append(record.getMessage())
        return record.levelno >= self.passes


def _short(message: str, name: str) -> str:
    message = message.removeprefix("jitfreeze: ")
    for prefix in (f"{name} runs eagerly for this signature: ", f"{name} runs eagerly: ", f"{name}: "):
        message = message.removeprefix(prefix)
    return message


def _outcome(before, after, said: list[str], disabled: bool) -> tuple[str, str]:
    if after.compiles > before.compiles:
        outcome, default = "compiled", "not in the cache"
    elif after.loads > before.loads:
        outcome, default = "loaded", "found in the cache"
    elif after.hits > before.hits:
        outcome, default = "reused", "a graph already in this process serves it"
    else:
        outcome = "fallback"
        default = ("JITFREEZE_DISABLE=1" if disabled else
                   "ran eagerly (the reason was given earlier in this process)")
    return outcome, "; ".join(said) or default


class _Progress:
    """tqdm on a terminal; one plain line per signature otherwise."""

    def __init__(self, total: int, enabled: bool, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.done = total, 0
        self.bar = None
        self.enabled = enabled
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm
            self.bar = tqdm(total=total, file=self.stream, unit="sig", desc="jitfreeze precompile", leave=True)

    def start(self, signature: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(signature, refresh=True)

    def finish(self, r: PrecompileResult) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            why = f" ({r.reason})" if r.outcome == "fallback" else ""
            print(f"jitfreeze precompile [{self.done}/{self.total}] {r.signature}: {r.outcome} in {r.seconds:.2f}s{why}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def precompile(fn: Callable, examples: Iterable, *, bundle: str | None = None,
               progress: bool = True) -> PrecompileReport:
    """Call ``fn`` once per example under ``torch.no_grad()``, so every signature is compiled (or
    loaded) into the persistent cache now rather than on a first request.

    ``fn``: a jitfreeze function (``@jitfreeze``, ``jitfreeze(model)``), a module whose ``forward``
    is decorated, or a plain module or function (wrapped with ``jitfreeze(...)`` defaults; the
    wrapper is ``report.function``). ``examples``: see :mod:`jitfreeze.runtime.precompile`.
    ``bundle``: a path: afterwards, write this function's entries (every verified entry of its cache
    and read-only layers whose function name is this one's: compiled functions, index entries,
    dynamic-shape decisions) to a bundle file, as ``jitfreeze export`` does, ready for
    ``jitfreeze import BUNDLE --into DIR``. ``progress``: a tqdm bar on stderr when it is a terminal,
    else one line per signature.

    Errors the function raises propagate (as RuntimeError naming the example). Under
    ``JITFREEZE_STRICT=1`` a ``JitFreezeError`` is reported as that example's fallback.
    """
    import torch

    from ..config import Config

    calls = _examples_list(examples)
    target = _as_jitfreeze(fn)
    function = getattr(target, "jitfreeze_function", target)    # a JitFreezeModule: its function
    name = getattr(function, "name", "?")
    disabled = Config.from_env().disable
    report = PrecompileReport()
    report.function = target
    logger = logging.getLogger("jitfreeze")
    bar = _Progress(len(calls), progress)
    try:
        for i, (args, kwargs) in enumerate(calls):
            signature = describe_example(args, kwargs)
            bar.start(signature)
            capture = _LogCapture(logger.getEffectiveLevel())
            level = logger.level
            logger.setLevel(min(logging.INFO, capture.passes))
            logger.addFilter(capture)
            before = target.cache_info()
            error = None
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings(record=True) as caught, torch.no_grad(), progress_quiet():
                    warnings.simplefilter("always", JitFreezeWarning)
                    try:
                        target(*args, **kwargs)
                    except JitFreezeError as exc:         # JITFREEZE_STRICT=1
                        error = str(exc)
                    except Exception as exc:
                        raise RuntimeError(f"precompile: example {i} {signature}: {name} raised "
                                           f"{type(exc).__name__}: {exc}") from exc
            finally:
                seconds = time.perf_counter() - t0
                logger.removeFilter(capture)
                if logger.level == min(logging.INFO, capture.passes):   # unless the call configured it
                    logger.setLevel(level)
            said = []
            for text in ([str(w.message) for w in caught if issubclass(w.category, JitFreezeWarning)]
                         + capture.messages + ([error] if error else [])):
                text = _short(text, name)
                if text not in said:
                    said.append(text)
            for w in caught:
                if not issubclass(w.category, JitFreezeWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            outcome, reason = _outcome(before, target.cache_info(), said, disabled)
            if error is not None:
                outcome = "fallback"
            result = PrecompileResult(signature, outcome, reason, seconds)
            report.append(result)
            bar.finish(result)
    finally:
        bar.close()
    if bundle is not None:
        report.bundle = write_bundle(function, bundle)
    return report


def write_bundle(target, path) -> dict:
    """Export ``target``'s entries from its cache and read-only layers to a bundle at ``path``
    (:func:`jitfreeze.cache.bundle.export_bundle`, what ``jitfreeze export`` runs)."""
    from ..cache.bundle import export_bundle
    from ..cache.persistent import open_cache
    from ..config import Config

    config = Config.from_env()
    cache = open_cache(target.cache_dir, config)
    stores = ([cache.store] if cache.store is not None else []) + list(cache.layers)
    if not stores:
        raise RuntimeError(f"precompile: no usable cache for {target.name} to write a bundle from")
    out = export_bundle(path, stores, config.hmac_key, select=lambda meta: meta.get("qualname") == target.name)
    out["path"] = str(path)
    return out
