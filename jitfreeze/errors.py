"""Warnings, errors, and the one place that decides what cache trouble does.

Trouble with the cache (an unreadable directory, a corrupt entry, a lock that
times out, a full disk) is a miss plus one :class:`JitFreezeWarning`; with
``JITFREEZE_STRICT=1`` it raises instead. Failures to compile a function are an
eager fallback plus one warning per function and signature, decided by the same
function.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings

__all__ = [
    "JitFreezeWarning",
    "JitFreezeError",
    "CacheError",
    "FallbackReason",
    "ParametersDiscardedError",
    "trouble",
]

log = logging.getLogger("jitfreeze")

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


class JitFreezeWarning(UserWarning):
    """Category of every warning jitfreeze emits (filter it like any warning)."""


class JitFreezeError(RuntimeError):
    """Raised for jitfreeze failures under ``JITFREEZE_STRICT=1``."""

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key

    def __reduce__(self):
        return (_rebuild_error, (type(self), str(self), self.key))


def _rebuild_error(cls, message, key):
    return cls(message, key=key)


class CacheError(JitFreezeError):
    """Something is wrong with the persistent cache (read, write, lock, trust)."""


class FallbackReason(JitFreezeError):
    """The function cannot be compiled for this signature; it runs eagerly.

    Raised where that stops a stage (a signature, a trace, a compile); the stage that catches
    it returns an outcome (:class:`jitfreeze.runtime.fallback.Fallback`). Under
    ``JITFREEZE_STRICT=1`` it reaches the caller.
    """


class ParametersDiscardedError(RuntimeError):
    """The module's parameters were released (``discard_parameters=True``) and an eager call, a direct
    call of the module, ``state_dict()`` or ``load_state_dict()`` needs them."""


def _user_stacklevel() -> int:
    """Stack level of the first frame outside the jitfreeze package (and torch)."""
    frame = sys._getframe(1)
    level = 1
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_PKG_DIR) and "/torch/" not in filename:
            return level
        frame = frame.f_back
        level += 1
    return 1


_seen: set = set()
_seen_lock = threading.Lock()


def trouble(message: str, exc: BaseException | None = None, *, strict: bool, once: object = None,
            error: type[JitFreezeError] = CacheError, key: str | None = None) -> None:
    """The one place that decides what a failure does.

    strict: raise ``error`` (chained to ``exc``). Otherwise warn once per ``once``
    token (None: every time) and return, so the caller carries on with a miss,
    an uncached compile or an eager call.
    """
    if exc is not None and not isinstance(exc, JitFreezeError):
        message = f"{message}: {type(exc).__name__}: {exc}"
    elif exc is not None and str(exc) not in message:
        message = f"{message}: {exc}"
    if strict:
        raise error(message, key=key) from exc
    if once is not None:
        with _seen_lock:
            if once in _seen:
                log.debug("(repeated) %s", message)
                return
            _seen.add(once)
    log.info("%s", message)
    warnings.warn(message, JitFreezeWarning, stacklevel=_user_stacklevel() + 1)


def reset_warnings_once() -> None:
    """Forget which warnings were already given (used by tests)."""
    with _seen_lock:
        _seen.clear()
