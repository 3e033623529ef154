"""Bundles: a cache's entries in one file, to pre-seed a container image at build time.

A bundle is an uncompressed tar file::

    entries/000000.jfe, entries/000001.jfe, ...   the entry envelopes, as stored
    manifest.json                                 {"format": "jitfreeze-bundle", "version": 1,
                                                   "cache_format", "jitfreeze", "torch", "created",
                                                   "signed", "entries": [{key, member, size, sha256,
                                                   qualname, signature, device, torch, created}]}

Export writes only entries that verify (checksum, key, and signature when
``JITFREEZE_CACHE_KEY`` is set). Import reads only the members the manifest
names (nothing is extracted to disk), and checks each one's size, sha256 and
envelope before storing it; anything else is rejected and reported. An
uncompressed bundle can also be used as it is, as a read-only layer in
``JITFREEZE_CACHE_PATH``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import time
from pathlib import Path

from ..key import FORMAT_VERSION
from . import envelope
from .layers import BUNDLE_FORMAT, BUNDLE_MANIFEST, read_manifest, scan
from .trust import create_private_file

__all__ = ["export_bundle", "import_bundle", "finalize_layer", "BUNDLE_VERSION"]

BUNDLE_VERSION = 1
_KEY_RE = re.compile(r"^[a-z]/[0-9A-Za-z_.:+-]{1,256}$")


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def export_bundle(path, stores, hmac_key: bytes | None, *, select=None) -> dict:
    """Write the verified entries of ``stores`` (first store wins for a key) to ``path``.

    ``select(meta) -> bool`` filters entries. Returns {"entries", "bytes", "skipped": [{key, layer, error}]}.
    """
    import torch

    from ..version import __version__

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    seen, entries, skipped, total = set(), [], [], 0
    now = time.time()
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()                   # left by a killed export with this pid (a symlink: the link goes)
    fd = create_private_file(tmp)      # owner-only while written, whatever the umask
    try:
        with os.fdopen(fd, "wb") as out, tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for store in stores:
                for row in scan(store, with_meta=False):
                    if row.key in seen:
                        continue
                    try:
                        data = store.get(row.key)
                        if data is None:
                            continue
                        meta, _ = envelope.unpack(data, row.key, hmac_key)
                    except Exception as exc:  # noqa: BLE001 - reported, not exported
                        skipped.append({"key": row.key, "layer": row.layer, "error": f"{type(exc).__name__}: {exc}"})
                        continue
                    if select is not None and not select(meta):
                        continue
                    seen.add(row.key)
                    member = f"entries/{len(entries):06d}.jfe"
                    _add(tar, member, data, now)
                    total += len(data)
                    entries.append({"key": row.key, "member": member, "size": len(data),
                                    "sha256": hashlib.sha256(data).hexdigest(), "qualname": meta.get("qualname"),
                                    "signature": meta.get("signature"), "device": meta.get("device"),
                                    "torch": meta.get("torch"), "created": meta.get("created")})
            manifest = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "cache_format": FORMAT_VERSION,
                        "jitfreeze": __version__, "torch": torch.__version__, "created": now,
                        "signed": bool(hmac_key), "entries": entries}
            _add(tar, BUNDLE_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode(), now)
        os.chmod(tmp, 0o644)           # a bundle is for shipping: readable by all, writable by you only
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"entries": len(entries), "bytes": total, "skipped": skipped}


def import_bundle(path, target, hmac_key: bytes | None, *, dry_run: bool = False) -> dict:
    """Verify every entry of the bundle at ``path`` and store the good ones in ``target`` (a Store).

    Returns {"imported", "present", "bytes", "rejected": [{key, error}], "manifest": {...}}.
    Raises ValueError when ``path`` is not a bundle.
    """
    imported, present, total, rejected = 0, 0, 0, []
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"cannot read the bundle {path}: {exc}") from None
    with tar:
        manifest, members = read_manifest(tar)
        if manifest.get("version") != BUNDLE_VERSION:
            raise ValueError(f"bundle version {manifest.get('version')!r} is not supported "
                             f"(this jitfreeze reads version {BUNDLE_VERSION})")
        existing = set(target.keys()) if not dry_run else set()
        for e in manifest["entries"]:
            key = e.get("key") if isinstance(e, dict) else None
            try:
                if not isinstance(key, str) or not _KEY_RE.match(key):
                    raise ValueError(f"bad key {key!r}")
                info = members.get(e.get("member"))
                if info is None or not info.isreg():
                    raise ValueError(f"member {e.get('member')!r} is missing or not a regular file")
                if info.size != e.get("size"):
                    raise ValueError(f"size {info.size} differs from the manifest's {e.get('size')}")
                data = tar.extractfile(info).read()
                if hashlib.sha256(data).hexdigest() != e.get("sha256"):
                    raise ValueError("sha256 differs from the manifest's")
                envelope.unpack(data, key, hmac_key)          # checksum, key, signature
            except Exception as exc:  # noqa: BLE001 - reported
                rejected.append({"key": key, "error": f"{type(exc).__name__}: {exc}"
                                 if not isinstance(exc, ValueError) else str(exc)})
                continue
            if key in existing:
                present += 1
                continue
            if not dry_run:
                target.put(key, data)
            imported += 1
            total += len(data)
    summary = {k: manifest.get(k) for k in ("version", "cache_format", "jitfreeze", "torch", "created", "signed")}
    return {"imported": imported, "present": present, "bytes": total, "rejected": rejected, "manifest": summary}


def finalize_layer(directory) -> None:
    """Make a cache directory a read-only layer: no WAL left, readable by all, writable by its owner only."""
    from .sqlindex import DB_NAME, make_snapshot

    directory = Path(directory)
    make_snapshot(directory / DB_NAME)
    for name in (DB_NAME + "-wal", DB_NAME + "-shm"):
        if (directory / name).exists() and (directory / name).stat().st_size == 0:
            (directory / name).unlink()
    for root, dirs, files in os.walk(directory):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
