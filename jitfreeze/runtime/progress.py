"""One line on stderr when a first call (trace and compile, or load) is slow (``JITFREEZE_PROGRESS_AFTER``).

A miss that is still running after the threshold logs, from a watchdog thread, one INFO line to the
``jitfreeze.progress`` logger::

    jitfreeze: compiling demo.Net.forward for (1x3x224x224 float32): 5.0 s so far; later processes will load it from /root/.cache/jitfreeze

and, when it ends, one more with the total (``...: compiled and stored in 23.4 s``; left out when the
``jitfreeze`` logger's own INFO lines are on). A miss that ends first logs nothing. The watchdog only reads what :class:`Progress` captured at the start (strings and
numbers) and the current phase (a string the miss replaces as it goes). One watchdog thread serves
every miss (:class:`_Watchdog`).

The logger: ``jitfreeze.progress``, set to INFO and given :class:`DefaultHandler` (stderr) at
import unless the user configured it first. That handler writes only when no other handler would
show the record (the ``jitfreeze`` logger's, which ``JITFREEZE_LOG`` installs, or the root's): the
line is printed once however logging is set up. Silence it with
``logging.getLogger("jitfreeze.progress").setLevel(logging.WARNING)`` or ``JITFREEZE_PROGRESS_AFTER=off``.
``jitfreeze.precompile`` reports each signature itself and turns these lines off while it runs (:func:`quiet`).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import sys
import threading
import time


__all__ = ["Progress", "quiet", "LOGGER_NAME"]

LOGGER_NAME = "jitfreeze.progress"
log = logging.getLogger(LOGGER_NAME)


class DefaultHandler(logging.Handler):
    """stderr (looked up at each line, as ``logging.lastResort`` does), only when no other handler
    on the way up from the ``jitfreeze.progress`` logger would take the record."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("jitfreeze: %(message)s"))

    def handle(self, record):
        if handled_elsewhere(record.levelno, self):
            return False
        return super().handle(record)

    def emit(self, record):
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - a closed stderr must not break a compile
            self.handleError(record)


def handled_elsewhere(level: int, mine: logging.Handler) -> bool:
    logger = log
    while logger is not None:
        if any(h is not mine and level >= h.level for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


def _install() -> None:
    if log.level == logging.NOTSET and not log.handlers:       # unless the user configured it first
        log.setLevel(logging.INFO)
        log.addHandler(DefaultHandler())


_install()

_local = threading.local()


@contextlib.contextmanager
def quiet():
    """No progress lines for the misses this thread starts meanwhile (precompile shows its own)."""
    depth = getattr(_local, "quiet", 0)
    _local.quiet = depth + 1
    try:
        yield
    finally:
        _local.quiet = depth


class Progress:
    """The progress of one miss: ``with Progress(name, signature, where, after) as w:``; ``w.phase``
    ("compiling", "loading", "waiting") as it goes; ``w.done = "compiled"`` etc. for the closing
    line, or ``w.eager = True`` when the call runs eagerly after all. ``where``: the cache directory (None: uncached). ``after``: seconds (None: never)."""

    def __init__(self, name: str, signature: str, where: str | None, after: float | None):
        self.name, self.signature, self.where = name, signature, where
        self.phase = "compiling"
        self.done = ""
        self.eager = False
        self._fired = False
        self._over = False
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._watched = after is not None and not getattr(_local, "quiet", 0) and log.isEnabledFor(logging.INFO)
        if self._watched:
            _watchdog.add(self._t0 + after, self)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._watched:
            return
        with self._lock:
            self._over = True
            fired = self._fired
        if fired:
            seconds = time.monotonic() - self._t0
            if self.eager:
                log.info("%s for %s runs eagerly after %.1f s (see the warning)", self.name, self.signature, seconds)
            elif exc_type is not None:
                log.info("%s for %s stopped after %.1f s (%s)", self.name, self.signature, seconds,
                         exc_type.__name__)
            elif not log.parent.isEnabledFor(logging.INFO):     # else its own INFO line says so already
                log.info("%s for %s: %s in %.1f s", self.name, self.signature, self.done or "done", seconds)

    def _fire(self) -> None:
        with self._lock:
            if self._over:
                return
            self._fired = True
            seconds = time.monotonic() - self._t0
            phase, where = self.phase, self.where
            if phase == "loading":
                log.info("loading %s for %s from %s: %s s so far", self.name, self.signature, where, _secs(seconds))
            elif phase == "waiting":
                log.info("waiting for another process compiling %s for %s: %s s so far; it will be loaded "
                         "from %s", self.name, self.signature, _secs(seconds), where)
            elif where is None:
                log.info("compiling %s for %s: %s s so far (no usable cache: later processes compile it "
                         "again)", self.name, self.signature, _secs(seconds))
            else:
                log.info("compiling %s for %s: %s s so far; later processes will load it from %s",
                         self.name, self.signature, _secs(seconds), where)


class _Watchdog:
    """One daemon thread for every miss being watched (started at the first): a thread per miss
    (``threading.Timer``) costs 0.3-0.6 ms to start; adding a deadline here, a few microseconds.
    A miss that ends first stays queued until its deadline and is skipped then."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list = []            # (deadline, serial, watch)
        self._serial = itertools.count()
        self._thread = None

    def add(self, deadline: float, watch: Progress) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._serial), watch))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="jitfreeze-progress", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is watch:
                self._cond.notify()          # the new deadline comes first

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2]._over:
                        heapq.heappop(self._heap)
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        watch = heapq.heappop(self._heap)[2]
                        break
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
            watch._fire()


_watchdog = _Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_watchdog._reset)      # the thread does not survive a fork


def _secs(seconds: float) -> str:
    return f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.1f}"
