"""Every environment variable jitfreeze reads, parsed in one place.

A :class:`Config` is a snapshot: the decorator takes one at its first call, so
setting a variable after a function has run does not change that function.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

__all__ = ["Config", "parse_size", "default_cache_dir", "backend_name", "ENV_VARS"]

#: name -> one-line description; the README's table is generated from this (scripts/env_table.py --write;
#: tests/test_docs.py checks that the README matches).
ENV_VARS = {
    "JITFREEZE_DISABLE": "`1`: plain eager, nothing traced, nothing read or written.",
    "JITFREEZE_CACHE_DIR": "Persistent cache directory (default `$XDG_CACHE_HOME/jitfreeze`, else `~/.cache/jitfreeze`).",
    "JITFREEZE_CLEAR_CACHE": "`1`: clear the persistent cache once per process, before its first lookup.",
    "JITFREEZE_STRICT": "`1`: failures raise (`JitFreezeError`) instead of falling back to eager or running uncached.",
    "JITFREEZE_LOG": "`debug` or `info` (also `warning`, `error`): turn on the `jitfreeze` logger's output (to stderr) at that level. `info`: one line per compile or load; `debug`: every key part.",
    "JITFREEZE_CACHE_SIZE_LIMIT": "Size limit of the cache, e.g. `500MB`, `4GiB` (default `4GiB`); least recently used entries go first.",
    "JITFREEZE_LOCK_TIMEOUT": "Seconds to wait for another process compiling the same key (default `600`); past it, compile without writing.",
    "JITFREEZE_CACHE_KEY": "HMAC key that signs entries; unsigned or wrongly signed entries are refused. Keep it outside the cache directory.",
    "JITFREEZE_ALLOW_UNSAFE_CACHE_DIR": "`1`: use a cache directory not owned by you or writable by others (you trust everyone who can write it); also lets untrusted read-only layers and the remote tier be used without `JITFREEZE_CACHE_KEY`.",
    "JITFREEZE_MAX_SIGNATURES": "Most signatures compiled or loaded per function (default `8`); past it, calls with new signatures run eagerly, with one warning.",
    "JITFREEZE_VERIFY": "`1`: re-trace on fingerprint-index hits and compare graph keys (catches changes the fingerprint cannot see).",
    "JITFREEZE_CACHE_PATH": "Layered cache: `ro1:ro2:...:writable`. Read-only layers (cache directories or bundle files) first, the writable directory last; overrides `JITFREEZE_CACHE_DIR`. Read-only layers are never modified.",
    "JITFREEZE_REMOTE_CACHE": "`redis://host:port/db` (or `rediss://`, `unix://`): a shared Redis behind the local cache (needs `redis`); entries are verified, and published after each compile. Needs `JITFREEZE_CACHE_KEY` (or `JITFREEZE_ALLOW_UNSAFE_CACHE_DIR=1`).",
    "JITFREEZE_REMOTE_TIMEOUT": "Seconds one Redis operation may take (default `1`); past it, one warning and the process carries on locally (retrying Redis 30 s later).",
    "JITFREEZE_REMOTE_LOCK_TTL": "Expiry in seconds of the fleet-wide compile lock in Redis (default `60`; renewed while the compile runs).",
    "JITFREEZE_PROGRESS_AFTER": "Seconds a first call (trace and compile, or load) may run before one line on stderr says what is compiling (default `5`); `0` or `off`: never. The line goes to the `jitfreeze.progress` logger (see docs/operations.md).",
    "JITFREEZE_BACKEND": "`torchscript` (default) or `aoti` (torch.export + AOTInductor; needs a C++ compiler to compile): the backend of functions decorated without `backend=`, read when they are decorated.",
    "JITFREEZE_TUNE": "`0`: no timing on a first call: the default compiled form is kept (graphs with convolutions: `optimize_for_inference`), never eager. Default `1`: the graph's variants and eager are timed side by side on the call's inputs (within 3 s), the fastest is stored; where eager is faster, later calls and processes run eagerly (one INFO line).",
    "JITFREEZE_TRACER": "`make_fx`: trace every miss with `make_fx` (imports Dynamo, 2–3 s, on the first miss); default `auto`: jitfreeze's pre-dispatch recorder where it applies (the same graph, no Dynamo), `make_fx` elsewhere.",
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "tib": 2**40,
}


def parse_size(text: str | int) -> int:
    """``"500MB"`` -> 500_000_000, ``"4GiB"`` -> 4 * 2**30, ``1024`` -> 1024."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must be >= 0, got {text}")
        return text
    m = _SIZE_RE.match(str(text))
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot parse size {text!r}: use e.g. 500MB, 4GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def _flag(env, name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={env.get(name)!r}: expected 1/0, true/false, yes/no or on/off")


def default_cache_dir(env=None) -> Path:
    env = os.environ if env is None else env
    xdg = env.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "jitfreeze"


@dataclasses.dataclass(frozen=True)
class Config:
    disable: bool = False
    cache_dir: Path | None = None
    clear_cache: bool = False
    strict: bool = False
    log: str = ""
    size_limit: int = 4 * 2**30
    lock_timeout: float = 600.0
    hmac_key: bytes | None = None
    allow_unsafe_dir: bool = False
    verify: bool = False
    max_signatures: int = 8
    cache_layers: tuple = ()            # read-only layers (JITFREEZE_CACHE_PATH, all but the last)
    remote_url: str | None = None
    remote_timeout: float = 1.0
    remote_lock_ttl: float = 60.0
    tracer: str = "auto"                # JITFREEZE_TRACER: auto (the recorder where it applies) or make_fx
    progress_after: float | None = 5.0  # JITFREEZE_PROGRESS_AFTER: seconds before a slow miss says so (None: never)
    backend: str = "torchscript"        # JITFREEZE_BACKEND: the default backend (read when a function is decorated)
    tune: bool = True                   # JITFREEZE_TUNE: time variants and eager at compile time

    @classmethod
    def from_env(cls, env=None) -> "Config":
        env = os.environ if env is None else env
        log = env.get("JITFREEZE_LOG", "").strip().lower()
        if log not in ("", "debug", "info", "warning", "error"):
            raise ValueError(f"JITFREEZE_LOG={log!r}: expected debug or info")
        timeout = env.get("JITFREEZE_LOCK_TIMEOUT", "").strip()
        key = env.get("JITFREEZE_CACHE_KEY")
        cache_dir = env.get("JITFREEZE_CACHE_DIR")
        layers, writable = _cache_path(env.get("JITFREEZE_CACHE_PATH", ""))
        if writable is not None:
            cache_dir = writable
        remote = env.get("JITFREEZE_REMOTE_CACHE", "").strip() or None
        tracer = env.get("JITFREEZE_TRACER", "").strip().lower() or "auto"
        if tracer not in ("auto", "make_fx"):
            raise ValueError(f"JITFREEZE_TRACER={tracer!r}: expected auto or make_fx")
        if remote is not None and not remote.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"JITFREEZE_REMOTE_CACHE={remote!r}: expected redis://host:port/db")
        return cls(
            disable=_flag(env, "JITFREEZE_DISABLE"),
            cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(env),
            clear_cache=_flag(env, "JITFREEZE_CLEAR_CACHE"),
            strict=_flag(env, "JITFREEZE_STRICT"),
            log=log,
            size_limit=parse_size(env.get("JITFREEZE_CACHE_SIZE_LIMIT") or "4GiB"),
            lock_timeout=float(timeout) if timeout else 600.0,
            hmac_key=key.encode() if key else None,
            allow_unsafe_dir=_flag(env, "JITFREEZE_ALLOW_UNSAFE_CACHE_DIR"),
            verify=_flag(env, "JITFREEZE_VERIFY"),
            max_signatures=int(env.get("JITFREEZE_MAX_SIGNATURES") or 8),
            cache_layers=layers,
            remote_url=remote,
            remote_timeout=_seconds(env, "JITFREEZE_REMOTE_TIMEOUT", 1.0),
            remote_lock_ttl=_seconds(env, "JITFREEZE_REMOTE_LOCK_TTL", 60.0),
            tracer=tracer,
            progress_after=_progress_after(env),
            backend=backend_name(env),
            tune=env.get("JITFREEZE_TUNE", "").strip().lower() not in _FALSE - {""},
        )


#: The backends (jitfreeze.backend.get_backend builds them); named here so that reading the
#: environment never imports torch.
BACKENDS = ("torchscript", "aoti")


def backend_name(env=None) -> str:
    """``JITFREEZE_BACKEND`` (default ``torchscript``), checked against the known backends."""
    env = os.environ if env is None else env
    name = env.get("JITFREEZE_BACKEND", "").strip().lower() or "torchscript"
    if name not in BACKENDS:
        raise ValueError(f"JITFREEZE_BACKEND={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def _cache_path(text: str) -> tuple[tuple, str | None]:
    """``ro1:ro2:writable`` -> ((Path(ro1), Path(ro2)), "writable"); empty -> ((), None)."""
    text = text.strip()
    if not text:
        return (), None
    parts = text.split(os.pathsep)
    if not parts[-1].strip():
        raise ValueError(f"JITFREEZE_CACHE_PATH={text!r}: the last entry must be the writable cache directory")
    layers = tuple(Path(p.strip()).expanduser() for p in parts[:-1] if p.strip())
    return layers, parts[-1].strip()


def _progress_after(env) -> float | None:
    text = env.get("JITFREEZE_PROGRESS_AFTER", "").strip().lower()
    if not text:
        return 5.0
    if text == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"JITFREEZE_PROGRESS_AFTER={text!r}: expected a number of seconds, or 0 or off")
    return value or None


def _seconds(env, name: str, default: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    value = float(text)
    if not value > 0:
        raise ValueError(f"{name}={text!r}: expected a positive number of seconds")
    return value
