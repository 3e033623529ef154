"""The ``jitfreeze`` command (also ``python -m jitfreeze``).

    jitfreeze cache info | list | clear | prune | verify
    jitfreeze explain
    jitfreeze export BUNDLE
    jitfreeze import BUNDLE [--into DIR]
    jitfreeze precompile package.module:function [--shapes 1,8,32] [--bundle OUT]

Every command takes ``--json`` (one JSON document on stdout) and ``--cache-dir``
(default: ``JITFREEZE_CACHE_PATH``'s last entry, else ``JITFREEZE_CACHE_DIR``,
else the default directory). Read-only layers come from ``JITFREEZE_CACHE_PATH``.

Exit status: 0 success; 1 problems found (bad entries removed or rejected);
2 usage error; 3 the command could not run (unreadable bundle, unusable cache,
unreachable Redis).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

from ..trace import sigtext

__all__ = ["main"]

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class CommandError(Exception):
    """The command cannot run (exit status 3)."""


def parse_duration(text: str) -> float:
    """``"7d"`` -> 604800.0; units s, m, h, d, w (seconds without a unit)."""
    m = _DURATION_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot parse duration {text!r}: use e.g. 30m, 12h, 7d, 2w")
    return float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "").lower()]


def _size_arg(text: str) -> int:
    from ..config import parse_size
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- helpers ---------------------------------------------------------------------------------------


def _human(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _when(t) -> str:
    if not isinstance(t, (int, float)) or t <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def short_signature(texts) -> str:
    """``(4x16 float32, int:3)`` from an entry's signature lines."""
    if not isinstance(texts, list):
        return "?"
    return sigtext.short_signature(texts)


def _device(meta) -> str:
    dev = meta.get("device")
    if isinstance(dev, list):
        return ",".join(map(str, dev)) or "-"
    return str(dev) if dev else "-"


def _function_name(function) -> str:
    """The jitfreeze name of what precompile called (a ``jitfreeze(model)`` wrapper: its function's)."""
    return getattr(function, "jitfreeze_function", function).name


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for r in rows:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _emit(args, data, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif text:
        print(text)


class _Env:
    """The configuration and the caches a command works on."""

    def __init__(self, args, *, create: bool = False):
        from ..cache.persistent import PersistentCache, _attach_tiers, open_cache
        from ..config import Config

        try:
            self.config = Config.from_env()
        except ValueError as exc:
            raise CommandError(f"bad environment: {exc}") from None
        self.path = Path(args.cache_dir).expanduser() if args.cache_dir else Path(self.config.cache_dir).expanduser()
        self.exists = self.path.is_dir()
        if self.exists or create:
            self.cache = open_cache(self.path, self.config)
        else:
            self.cache = PersistentCache(None, self.config, None)
            self.cache.location = str(self.path)
            _attach_tiers(self.cache, self.config,
                          layers=[p for p in self.config.cache_layers if Path(p).expanduser() != self.path])
        self.store = self.cache.store
        if (self.exists or create) and self.store is None:
            raise CommandError(f"cannot use the cache directory {self.path} (see the warning above)")

    @property
    def stores(self) -> list:
        return ([self.store] if self.store is not None else []) + list(self.cache.layers)

    def rows(self, *, namespaces=("a/",)):
        from ..cache.layers import scan

        stats = self.cache.journal.entry_stats() if self.cache.journal is not None else {}
        out, seen = [], set()
        for store in self.stores:
            for row in scan(store):
                if namespaces and row.ns not in namespaces:
                    continue
                shadowed = row.key in seen
                seen.add(row.key)
                s = stats.get(row.key, {})
                last = max([t for t in (row.accessed if row.writable else None, s.get("last_used"))
                            if isinstance(t, (int, float))], default=None)
                out.append((row, s.get("hits", 0), last, shadowed))
        return out


# -- cache info ------------------------------------------------------------------------------------


def cmd_info(args) -> int:
    env = _Env(args)
    data = {"location": str(env.path), "exists": env.exists, "size_limit": env.config.size_limit,
            "entries": 0, "artifacts": 0, "index_entries": 0, "bytes": 0, "layers": [], "remote": None,
            "counters": {}}
    if env.store is not None:
        st = env.store.stats()
        keys = list(env.store.keys())
        data.update(entries=st.get("entries", len(keys)), bytes=st.get("bytes", 0),
                    artifacts=sum(k.startswith("a/") for k in keys), index_entries=sum(k.startswith("i/") for k in keys))
    for layer in env.cache.layers:
        st = layer.stats()
        data["layers"].append({"location": layer.location, "kind": type(layer).__name__,
                               "entries": st.get("entries"), "bytes": st.get("bytes")})
    if env.config.remote_url:
        from ..cache.remote import redact
        remote = {"url": redact(env.config.remote_url), "used": env.cache.remote is not None,
                  "reachable": None, "entries": None, "error": None}
        if env.cache.remote is not None:
            try:
                env.cache.remote.ping()
                remote["reachable"] = True
                remote["entries"] = sum(1 for k in env.cache.remote.keys() if ":lock/" not in k)
            except Exception as exc:  # noqa: BLE001
                remote["reachable"] = False
                remote["error"] = f"{type(exc).__name__}: {exc}"
        data["remote"] = remote
    if env.cache.journal is not None:
        data["counters"] = env.cache.journal.counters()
    c = data["counters"]
    other = data["entries"] - data["artifacts"] - data["index_entries"]
    lines = [f"location     {data['location']}{'' if env.exists else ' (does not exist yet)'}",
             f"entries      {data['entries']} ({data['artifacts']} compiled functions, "
             f"{data['index_entries']} index entries{f', {other} other' if other > 0 else ''})",
             f"bytes used   {_human(data['bytes'])}",
             f"size limit   {_human(data['size_limit'])}"]
    for layer in data["layers"]:
        lines.append(f"layer        {layer['location']} (read-only): {layer['entries']} entries, "
                     f"{_human(layer['bytes'])}")
    if env.config.cache_layers and not data["layers"]:
        lines.append("layers       none usable (see the warnings above)")
    r = data["remote"]
    if r is not None:
        state = ("not used (see the warning above)" if not r["used"] else
                 f"reachable, {r['entries']} entries" if r["reachable"] else f"unreachable: {r['error']}")
        lines.append(f"remote       {r['url']} ({state})")
    lines.append(f"loads        {c.get('loads', 0)} (local {c.get('loads_local', 0)}, layers "
                 f"{c.get('loads_layer', 0)}, remote {c.get('loads_remote', 0)}): persistent-cache hits")
    lines.append(f"compiles     {c.get('compiles', 0)}")
    lines.append(f"index hits   {c.get('index_hits', 0)} (warm starts without a trace)")
    if c.get("evictions") or c.get("remote_errors"):
        lines.append(f"evictions    {c.get('evictions', 0)}   remote errors {c.get('remote_errors', 0)}")
    _emit(args, data, "\n".join(lines))
    return EXIT_OK


# -- cache list ------------------------------------------------------------------------------------


def cmd_list(args) -> int:
    env = _Env(args)
    namespaces = None if args.all else ("a/",)
    items = []
    for row, hits, last, shadowed in env.rows(namespaces=namespaces):
        meta = row.meta or {}
        if args.function and args.function not in str(meta.get("qualname", "")):
            continue
        items.append({"key": row.key, "qualname": meta.get("qualname"), "signature": meta.get("signature"),
                      "device": meta.get("device"), "torch": meta.get("torch"), "size": row.size,
                      "created": meta.get("created", row.stored), "last_used": last, "hits": hits,
                      "layer": row.layer, "writable": row.writable, "shadowed": shadowed, "error": row.error})
    rows = [[it["key"][:18], it["qualname"] or "?", short_signature(it["signature"]), _device(it),
             it["torch"] or "-", _human(it["size"]), _when(it["created"]), _when(it["last_used"]), str(it["hits"]),
             "" if it["writable"] else "ro"]
            for it in items]
    text = _table(rows, ["KEY", "FUNCTION", "SIGNATURE", "DEVICE", "TORCH", "SIZE", "CREATED", "LAST USED",
                         "HITS", "LAYER"])
    if not items:
        text = f"no entries in {env.path}" + (" or its read-only layers" if env.cache.layers else "")
    _emit(args, items, text)
    return EXIT_OK


# -- cache clear -----------------------------------------------------------------------------------


def cmd_clear(args) -> int:
    env = _Env(args)
    data = {"location": str(env.path), "removed": 0, "remote_removed": None,
            "layers_untouched": [l.location for l in env.cache.layers]}
    if env.store is not None:
        data["removed"] = env.cache.clear()
    lines = [f"removed {data['removed']} entries from {env.path}"]
    if data["layers_untouched"]:
        lines.append("read-only layers left as they are: " + ", ".join(data["layers_untouched"]))
    if args.remote:
        if env.cache.remote is None:
            raise CommandError("--remote: no usable remote cache (JITFREEZE_REMOTE_CACHE)")
        try:
            data["remote_removed"] = env.cache.remote.clear()
        except Exception as exc:  # noqa: BLE001
            raise CommandError(f"cannot clear {env.cache.remote.location}: {type(exc).__name__}: {exc}") from None
        lines.append(f"removed {data['remote_removed']} entries from {env.cache.remote.location}")
    _emit(args, data, "\n".join(lines))
    return EXIT_OK


# -- cache prune -----------------------------------------------------------------------------------


def cmd_prune(args) -> int:
    env = _Env(args)
    data = {"location": str(env.path), "removed": [], "removed_bytes": 0, "kept": 0, "kept_bytes": 0,
            "dry_run": args.dry_run}
    if env.store is None:
        _emit(args, data, f"nothing to prune: {env.path} does not exist")
        return EXIT_OK
    now = time.time()
    rows = [(row, last if last is not None else (row.stored or 0.0))
            for row, _hits, last, _sh in env.rows(namespaces=None) if row.writable]
    remove: dict[str, tuple] = {}
    if args.older_than is not None:
        for row, last in rows:
            if last < now - args.older_than:
                remove[row.key] = (row, "older")
    if args.max_size is not None:
        keep = sorted(((row, last) for row, last in rows if row.key not in remove), key=lambda x: x[1])
        total = sum(row.size for row, _ in keep)
        for row, _last in keep:
            if total <= args.max_size:
                break
            remove[row.key] = (row, "size")
            total -= row.size
    # index entries and hints whose compiled function is gone (from every layer) lead nowhere
    artifacts = {row.key for row, _ in rows if row.key.startswith("a/") and row.key not in remove}
    for layer in env.cache.layers:
        artifacts.update(k for k in layer.keys() if k.startswith("a/"))
    for row, _ in rows:
        if row.key.startswith(("i/", "h/")) and row.key not in remove:
            targets = _index_targets(row.meta or {})
            if targets and not any("a/" + t in artifacts for t in targets):
                remove[row.key] = (row, "orphan")
    for key, (row, why) in remove.items():
        if not args.dry_run:
            env.store.delete(key)
        data["removed"].append({"key": key, "size": row.size, "reason": why,
                                "qualname": (row.meta or {}).get("qualname")})
        data["removed_bytes"] += row.size
    if not args.dry_run and env.cache.journal is not None:
        env.cache.journal.forget(list(remove))
    kept = [row for row, _ in rows if row.key not in remove]
    data["kept"], data["kept_bytes"] = len(kept), sum(r.size for r in kept)
    verb = "would remove" if args.dry_run else "removed"
    _emit(args, data, f"{verb} {len(remove)} entries ({_human(data['removed_bytes'])}) from {env.path}; "
                      f"{data['kept']} entries ({_human(data['kept_bytes'])}) kept")
    return EXIT_OK


def _index_targets(meta: dict) -> list[str]:
    """The graph keys an index entry leads to."""
    out = [c.get("graph_key") for c in meta.get("candidates", []) if isinstance(c, dict)] \
        if isinstance(meta.get("candidates"), list) else []
    if "graph_key" in meta:
        out.append(meta["graph_key"])
    return [t for t in out if isinstance(t, str)]


# -- cache verify ----------------------------------------------------------------------------------


def cmd_verify(args) -> int:
    from ..cache import envelope
    from ..cache.disk import DiskStore
    from ..cache.repair import maintain_store

    env = _Env(args)
    key = env.config.hmac_key
    data = {"checked": 0, "bad": [], "signed_check": bool(key), "repairs": {}}
    for store in env.stores:
        writable = not store.readonly
        if writable and isinstance(store, DiskStore):
            # the cache directory: structural repairs too (planted rows, missing or truncated value
            # files, orphan files), with every entry's checksum/signature checked on the way
            def validate(full, value, store=store):
                data["checked"] += 1
                try:
                    envelope.unpack(value, full, key)
                except Exception as exc:
                    data["bad"].append({"key": full, "layer": store.location, "removed": True,
                                        "error": f"{type(exc).__name__}: {exc}"})
                    raise
            try:
                counts = maintain_store(store, validate=validate)
            except Exception as exc:  # noqa: BLE001 - e.g. a corrupt index
                raise CommandError(f"cannot check {store.location}: {type(exc).__name__}: {exc}") from None
            data["repairs"] = {k: v for k, v in counts.items()
                               if k in ("unsafe_rows", "missing_files", "wrong_size", "orphan_files") and v}
            continue
        for full in list(store.keys()):
            data["checked"] += 1
            try:
                value = store.get(full)
                if value is None:
                    continue
                envelope.unpack(value, full, key)
            except Exception as exc:  # noqa: BLE001
                removed = False
                if writable:
                    try:
                        removed = bool(store.delete(full)) or True
                    except Exception:  # noqa: BLE001
                        removed = False
                data["bad"].append({"key": full, "layer": store.location, "removed": removed,
                                    "error": f"{type(exc).__name__}: {exc}"})
    if env.cache.journal is not None and data["bad"]:
        env.cache.journal.forget([b["key"] for b in data["bad"] if b["removed"]])
    lines = [f"checked {data['checked']} entries ({'checksums and signatures' if key else 'checksums'})"]
    for what, n in data["repairs"].items():
        lines.append(f"repaired: removed {n} {what.replace('_', ' ')}")
    for b in data["bad"]:
        lines.append(f"BAD {b['key'][:18]} in {b['layer']}: {b['error']} "
                     f"({'removed' if b['removed'] else 'read-only layer: left in place, never loaded'})")
    if not data["bad"]:
        lines.append("all entries are good")
    _emit(args, data, "\n".join(lines))
    return EXIT_PROBLEMS if data["bad"] or data["repairs"] else EXIT_OK


# -- explain ---------------------------------------------------------------------------------------


def cmd_explain(args) -> int:
    from .explain import explain_misses

    env = _Env(args)
    misses = env.cache.journal.misses() if env.cache.journal is not None else []
    if args.function:
        misses = [m for m in misses if args.function in str(m.get("qualname", ""))]
    misses = misses[-args.last:] if args.last else misses
    entries = []
    for row, _hits, _last, _sh in env.rows(namespaces=("a/",)):
        if row.meta:
            entries.append(dict(row.meta, key=row.key, layer=row.layer))
    items = explain_misses(misses, entries)
    if not items:
        _emit(args, items, f"no misses recorded in {env.path} (misses are recorded when a compile is stored)")
        return EXIT_OK
    lines = []
    for it in items:
        lines.append(f"{_when(it['time'])}  {it['qualname']} {short_signature(it['signature'])}  "
                     f"compiled as {str(it['key'])[2:18]}")
        near = it["nearest"]
        if near is not None:
            lines.append(f"  nearest stored entry {str(near['key'])[2:18]} (created {_when(near['created'])}); "
                         "this call vs that entry:")
        for reason in it["reasons"]:
            lines.append(f"    - {reason}")
    _emit(args, items, "\n".join(lines))
    return EXIT_OK


# -- export / import -------------------------------------------------------------------------------


def cmd_export(args) -> int:
    from ..cache.bundle import export_bundle

    env = _Env(args)
    select = None
    if args.function:
        select = lambda meta: args.function in str(meta.get("qualname", ""))  # noqa: E731
    try:
        report = export_bundle(args.bundle, env.stores, env.config.hmac_key, select=select)
    except OSError as exc:
        raise CommandError(f"cannot write {args.bundle}: {exc}") from None
    report["bundle"] = str(args.bundle)
    lines = [f"exported {report['entries']} entries ({_human(report['bytes'])}) to {args.bundle}"]
    for s in report["skipped"]:
        lines.append(f"skipped bad entry {s['key'][:18]} in {s['layer']}: {s['error']}")
    _emit(args, report, "\n".join(lines))
    return EXIT_PROBLEMS if report["skipped"] else EXIT_OK


def cmd_import(args) -> int:
    from ..cache.bundle import finalize_layer, import_bundle
    from ..cache.disk import DiskStore
    from ..cache.trust import make_private_dirs
    from ..config import Config

    if not Path(args.bundle).is_file():
        raise CommandError(f"no bundle at {args.bundle}")
    if args.into:
        try:
            config = Config.from_env()
        except ValueError as exc:
            raise CommandError(f"bad environment: {exc}") from None
        into = Path(args.into).expanduser()
        make_private_dirs(into)        # 0700 while filled; finalize_layer opens it for reading (0755)
        target = DiskStore(into, 2**62)
        where = str(into)
    else:
        env = _Env(args, create=True)
        config, target, where = env.config, env.store, str(env.path)
    try:
        report = import_bundle(args.bundle, target, config.hmac_key, dry_run=args.dry_run)
    except (ValueError, OSError) as exc:
        raise CommandError(str(exc)) from None
    finally:
        if args.into:
            target.close()
    if args.into and not args.dry_run:
        finalize_layer(args.into)
    report["into"] = where
    verb = "would import" if args.dry_run else "imported"
    lines = [f"{verb} {report['imported']} entries ({_human(report['bytes'])}) into {where}"
             + (f"; {report['present']} already there" if report["present"] else "")]
    for r in report["rejected"]:
        lines.append(f"REJECTED {str(r['key'])[:18]}: {r['error']}")
    _emit(args, report, "\n".join(lines))
    return EXIT_PROBLEMS if report["rejected"] else EXIT_OK


# -- precompile ------------------------------------------------------------------------------------


def parse_shapes(text: str) -> list:
    """``"1,8,32"`` -> [1, 8, 32]; ``"1x128,8x512"`` -> [(1, 128), (8, 512)]."""
    out = []
    for item in text.split(","):
        dims = item.strip().lower().split("x")
        if not all(d.strip().isdigit() for d in dims):
            raise argparse.ArgumentTypeError(f"cannot parse shapes {text!r}: use e.g. 1,8,32 or 1x128,8x512")
        out.append(int(dims[0]) if len(dims) == 1 else tuple(int(d) for d in dims))
    return out


def load_entry(text: str, shapes=None):
    """Import ``package.module:function`` and call it (with ``shapes=`` when given): ``(fn, examples)``."""
    import importlib
    import inspect

    module_name, _, attr = text.partition(":")
    if not module_name or not attr:
        raise _UsageError(f"ENTRY must be package.module:function, not {text!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())           # like python -m: modules in the current directory
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # noqa: BLE001 - the user's module: any import error
        raise CommandError(f"cannot load {text}: {type(exc).__name__}: {exc}") from None
    if not callable(obj):
        raise _UsageError(f"{text} is not callable")
    kwargs = {}
    if shapes is not None:
        try:
            inspect.signature(obj).bind(shapes=shapes)
        except TypeError:
            raise _UsageError(f"--shapes given, but {text} takes no shapes= argument") from None
        except ValueError:
            pass                                    # no signature to check (a builtin): just call it
        kwargs["shapes"] = shapes
    try:
        made = obj(**kwargs)
    except Exception as exc:  # noqa: BLE001
        raise CommandError(f"{text} raised {type(exc).__name__}: {exc}") from None
    if not (isinstance(made, tuple) and len(made) == 2):
        raise _UsageError(f"{text} must return (model or function, examples), not {type(made).__name__}")
    return made


class _UsageError(Exception):
    """The command was given something unusable (exit status 2)."""


def cmd_precompile(args) -> int:
    from ..runtime.precompile import precompile

    if args.cache_dir:
        # the entry's functions take their cache from the environment (unless they name one)
        os.environ["JITFREEZE_CACHE_DIR"] = str(args.cache_dir)
        path = os.environ.get("JITFREEZE_CACHE_PATH", "")
        if path.strip():
            os.environ["JITFREEZE_CACHE_PATH"] = os.pathsep.join(path.split(os.pathsep)[:-1] + [str(args.cache_dir)])
    try:
        fn, examples = load_entry(args.entry, args.shapes)
        report = precompile(fn, examples, bundle=args.bundle, progress=not args.no_progress)
    except _UsageError as exc:
        print(f"jitfreeze: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (TypeError, ValueError) as exc:          # the examples the entry returned
        print(f"jitfreeze: error: {args.entry}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:                     # the function raised on an example
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"cannot write {args.bundle}: {exc}") from None
    data = {"entry": args.entry, "function": _function_name(report.function), "counts": report.counts(),
            "results": [dataclasses.asdict(r) for r in report], "bundle": report.bundle}
    rows = [[r.signature, r.outcome, f"{r.seconds:.2f}s", r.reason] for r in report]
    counts = ", ".join(f"{n} {o}" for o, n in data["counts"].items())
    lines = [f"{_function_name(report.function)}: {counts}", _table(rows, ["SIGNATURE", "OUTCOME", "TIME", "REASON"])]
    if report.bundle is not None:
        b = report.bundle
        lines.append(f"wrote {b['entries']} entries ({_human(b['bytes'])}) to {b['path']}"
                     f" (next: jitfreeze import {b['path']} --into DIR)")
        for s in b["skipped"]:
            lines.append(f"skipped bad entry {s['key'][:18]} in {s['layer']}: {s['error']}")
    _emit(args, data, "\n".join(lines))
    return EXIT_OK if report.ok else EXIT_PROBLEMS


# -- the parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON document (for scripts)")
    common.add_argument("--cache-dir", metavar="DIR", default=argparse.SUPPRESS,
                        help="the writable cache directory (default: from JITFREEZE_CACHE_PATH / JITFREEZE_CACHE_DIR)")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log what jitfreeze does (INFO) to stderr")

    parser = argparse.ArgumentParser(
        prog="jitfreeze", parents=[common],
        description="Inspect and manage the jitfreeze persistent cache, and precompile models into it.",
        epilog="Exit status: 0 ok, 1 problems found (bad entries removed or rejected), 2 usage error, "
               "3 the command could not run.")
    parser.set_defaults(json=False, cache_dir=None, verbose=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    cache = sub.add_parser("cache", help="inspect, clean and check the cache", parents=[common],
                           description="Inspect, clean and check the cache.")
    csub = cache.add_subparsers(dest="cache_command", metavar="SUBCOMMAND", required=True)
    p = csub.add_parser("info", parents=[common], help="location, entries, bytes, size limit, counters",
                        description="Location, entries, bytes used, size limit, read-only layers, the remote "
                                    "tier, and the load/compile counters kept across processes.")
    p.set_defaults(func=cmd_info)
    p = csub.add_parser("list", parents=[common], help="one row per compiled function entry",
                        description="One row per entry: function, signature, device, torch version, size, "
                                    "created, last used, hits, layer.")
    p.add_argument("--all", action="store_true", help="include fingerprint index entries")
    p.add_argument("--function", metavar="TEXT", help="only entries whose function name contains TEXT")
    p.set_defaults(func=cmd_list)
    p = csub.add_parser("clear", parents=[common], help="remove every entry of the writable layer",
                        description="Remove every entry of the writable layer (read-only layers are never "
                                    "modified).")
    p.add_argument("--remote", action="store_true", help="also remove this format's keys from the remote Redis")
    p.set_defaults(func=cmd_clear)
    p = csub.add_parser("prune", parents=[common], help="remove old entries, or the least recently used past a size",
                        description="Remove entries of the writable layer not used for a while and/or the least "
                                    "recently used ones until the cache fits a size; index entries whose compiled "
                                    "function is gone are removed too.")
    p.add_argument("--older-than", type=parse_duration, metavar="AGE", help="e.g. 12h, 7d, 2w")
    p.add_argument("--max-size", type=_size_arg, metavar="SIZE", help="e.g. 500MB, 2GiB")
    p.add_argument("--dry-run", action="store_true", help="report, remove nothing")
    p.set_defaults(func=cmd_prune)
    p = csub.add_parser("verify", parents=[common], help="re-check every checksum (and signature); remove bad entries",
                        description="Re-check every entry's checksum (and HMAC signature when JITFREEZE_CACHE_KEY "
                                    "is set); remove bad ones from the writable layer and report them. Exit status 1 "
                                    "when any was bad.")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("explain", parents=[common], help="why the latest calls compiled (which key part changed)",
                       description="For the latest recorded misses, show which key part differed from the nearest "
                                   "stored entry of the same function.")
    p.add_argument("-n", "--last", type=int, default=10, metavar="N", help="the last N misses (default 10; 0: all)")
    p.add_argument("--function", metavar="TEXT", help="only functions whose name contains TEXT")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("export", parents=[common], help="write the cache's verified entries to a bundle file",
                       description="Write every verified entry (all layers) to a single-file bundle (an uncompressed "
                                   "tar with a manifest of keys, versions and checksums).")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--function", metavar="TEXT", help="only functions whose name contains TEXT")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", parents=[common], help="verify a bundle's entries and store them",
                       description="Verify every entry of a bundle (size, sha256, checksum, key, and signature when "
                                   "JITFREEZE_CACHE_KEY is set) and store the good ones in the writable cache, or in "
                                   "a new read-only layer directory with --into.")
    p.add_argument("bundle", metavar="BUNDLE")
    p.add_argument("--into", metavar="DIR", help="build a read-only layer directory (for JITFREEZE_CACHE_PATH)")
    p.add_argument("--dry-run", action="store_true", help="verify only")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("precompile", parents=[common], help="compile every signature of a model ahead of time",
                       description="Import ENTRY (package.module:function), call it -- with shapes=[...] when "
                                   "--shapes is given -- to get (model or function, examples), call the model "
                                   "once per example under torch.no_grad(), report what was compiled, loaded, "
                                   "reused or fell back and why, and optionally write a bundle. Exit status 1 "
                                   "when any example fell back to eager.")
    p.add_argument("entry", metavar="ENTRY", help="package.module:function returning (model or function, examples)")
    p.add_argument("--shapes", type=parse_shapes, metavar="LIST",
                   help="passed to ENTRY as shapes=[...]: 1,8,32 -> [1, 8, 32]; 1x128,8x512 -> [(1, 128), (8, 512)]")
    p.add_argument("--bundle", metavar="OUT", help="then write the function's entries to this bundle file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-signature lines on stderr")
    p.set_defaults(func=cmd_precompile)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"jitfreeze: warning: {message}", file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("jitfreeze %(levelname)s %(message)s"))
        logging.getLogger("jitfreeze").addHandler(handler)
        logging.getLogger("jitfreeze").setLevel(logging.INFO)
    shown = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except CommandError as exc:
        print(f"jitfreeze: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
