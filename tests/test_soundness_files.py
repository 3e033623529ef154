"""Soundness class 6: cache files writable by others.

Everything jitfreeze creates in a cache is owner-only whatever the umask (directories 0700, files
0600); on read, a value file or a directory holding one that is not owned by you or root, or that
group or others can write, is refused: a miss plus one JitFreezeWarning (STRICT raises), then a
correct recompile. One trust rule (``jitfreeze.cache.trust.untrusted``) for the directory, value files
and read-only layers.
"""

import os
import stat

import pytest
import torch

from jitfreeze import JitFreezeWarning, jitfreeze

from jitfreeze.cache import trust
from jitfreeze.errors import CacheError
from jitfreeze.cache import persistent as jf_cache
from jitfreeze import errors as jf_errors
from jitfreeze.cache.layers import ReadOnlyDirStore
from jitfreeze.cache.disk import DiskStore
from jitfreeze.cache.files import UnsafeEntry, create_value_file

from .children import FILL_CACHE, run_child
from .conftest import assert_same
from .models import make

OTHER_UID = 65534
as_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                             reason="chown to another uid needs root")


@pytest.mark.parametrize("umask", ["000", "002"])
def test_everything_created_is_owner_only_whatever_the_umask(tmp_path, umask):
    """A process with a permissive umask fills a cache (index, WAL, journal, locks, value files and
    their directories, a cache directory with missing parents): every directory is 0700 and every
    file 0600. A bundle and an imported layer are for sharing: readable by all, writable by the
    owner only (0644/0755)."""
    found, _ = run_child(FILL_CACHE, tmp_path, umask)
    modes = {p: stat.S_IMODE(m) for p, m in found.items()}
    private = {p: m for p, m in modes.items() if p.startswith(str(tmp_path / "nested"))}
    names = {os.path.basename(p) for p in private}
    assert {"nested", "jf", "cache.db", "cache.db-wal", "cache.db-shm", "stats.db", "locks"} <= names
    assert any(p.endswith(".lock") for p in private)
    assert sum(p.endswith(".val") for p in private) >= 2          # torch.jit.save's and Disk.store's
    wrong = {p: oct(m) for p, m in private.items()
             if m != (trust.PRIVATE_DIR if stat.S_ISDIR(found[p]) else trust.PRIVATE_FILE)}
    assert not wrong, wrong
    shared = {p: m for p, m in modes.items() if p not in private}
    assert str(tmp_path / "b.jfb") in shared and any(p.endswith(".val") for p in shared)
    open_to_others = {p: oct(m) for p, m in shared.items() if m & (stat.S_IWGRP | stat.S_IWOTH)}
    assert not open_to_others, open_to_others


def _fill(cache_dir):
    """A cache holding the 'projected' model's artifact in a value file; returns (model, x, ref, file)."""
    model, (x,) = make("projected")
    fast = jitfreeze(model, cache_dir=cache_dir)
    with torch.no_grad():
        ref = model(x)
        fast(x)
    files = sorted(cache_dir.rglob("*.val"))
    assert len(files) == 1
    return model, x, ref, files[0]


def _again(model, x, cache_dir):
    """A new process's view: a fresh jitfreeze function and cache registry; (fast, out, warnings)."""
    jf_cache.forget_open_caches()
    jf_errors.reset_warnings_once()
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", JitFreezeWarning)
        fast = jitfreeze(model, cache_dir=cache_dir)
        with torch.no_grad():
            out = fast(x)
    return fast, out, [str(w.message) for w in caught if issubclass(w.category, JitFreezeWarning)]


@pytest.mark.parametrize("what", ["file", "directory"])
def test_value_file_others_can_write_is_refused_then_recompiled(cache_dir, monkeypatch, what):
    """A value file (or the directory holding it) that group or others can write: not loaded (with
    JITFREEZE_ALLOW_UNSAFE_CACHE_DIR=1 it is), one warning, a correct recompile; the next process
    loads the new entry without a word."""
    model, x, ref, value = _fill(cache_dir)
    os.chmod(value if what == "file" else value.parent, 0o666 if what == "file" else 0o777)
    monkeypatch.setenv("JITFREEZE_ALLOW_UNSAFE_CACHE_DIR", "1")
    fast, out, warned = _again(model, x, cache_dir)
    assert warned == [] and fast.cache_info().loads == 1           # opted in: trusted
    monkeypatch.delenv("JITFREEZE_ALLOW_UNSAFE_CACHE_DIR")
    fast, out, warned = _again(model, x, cache_dir)
    assert len(warned) == 1 and "refused an unsafe cache entry" in warned[0], warned
    assert "writable by group or others" in warned[0]
    assert fast.cache_info().loads == 0 and fast.cache_info().compiles == 1
    assert_same(out, ref)
    assert not value.exists()                                        # the refused file is gone
    fast, out, warned = _again(model, x, cache_dir)
    assert warned == [] and fast.cache_info().loads == 1
    assert_same(out, ref)


def test_strict_raises_on_a_value_file_others_can_write(cache_dir, monkeypatch):
    model, x, _, value = _fill(cache_dir)
    os.chmod(value, 0o646)
    monkeypatch.setenv("JITFREEZE_STRICT", "1")
    jf_cache.forget_open_caches()
    with pytest.raises(CacheError, match="writable by group or others"), torch.no_grad():
        jitfreeze(model, cache_dir=cache_dir)(x)


@as_root
@pytest.mark.parametrize("what", ["file", "directory"])
def test_value_file_owned_by_another_user_is_refused(cache_dir, what):
    model, x, ref, value = _fill(cache_dir)
    os.chown(value if what == "file" else value.parent.parent, OTHER_UID, OTHER_UID)
    fast, out, warned = _again(model, x, cache_dir)
    assert len(warned) == 1 and f"owned by uid {OTHER_UID}" in warned[0], warned
    assert fast.cache_info().compiles == 1
    assert_same(out, ref)


def test_the_trust_rule():
    """One rule: owned by you or root, writable by neither group nor others."""
    me = os.geteuid()

    def st(uid, mode):
        return os.stat_result((stat.S_IFREG | mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))

    assert trust.untrusted(st(me, 0o644), me) is None
    assert trust.untrusted(st(0, 0o755), 1000) is None                  # root: trusted
    assert "owned by uid 1234" in trust.untrusted(st(1234, 0o600), 1000)
    assert "writable by group" in trust.untrusted(st(me, 0o620), me)
    assert "writable by group" in trust.untrusted(st(me, 0o602), me)


def _layer_with_value_file(tmp_path):
    layer = tmp_path / "layer"
    trust.make_private_dirs(layer)
    store = DiskStore(layer, 2**30)
    store.put("a/k", os.urandom(40000))
    store.close()
    (value,) = layer.rglob("*.val")
    return layer, value


@pytest.mark.parametrize("what", ["file", "directory"])
def test_layer_value_file_others_can_write_is_refused(tmp_path, what):
    """Read-only layers apply the same rule to their value files (unless trusted: signed or opted in)."""
    layer, value = _layer_with_value_file(tmp_path)
    data = value.read_bytes()
    os.chmod(value if what == "file" else value.parent, 0o666 if what == "file" else 0o777)
    with pytest.raises(UnsafeEntry, match="writable by group or others"):
        ReadOnlyDirStore(layer, check_trust=True).get("a/k")
    with pytest.raises(UnsafeEntry, match="writable by group or others"):
        ReadOnlyDirStore(layer, check_trust=True).get_file("a/k")
    assert ReadOnlyDirStore(layer, check_trust=False).get("a/k") == data


def test_own_value_directory_others_can_write_is_repaired_on_write(tmp_path):
    """A value directory of ours left group/world-writable (an older version, umask 000) is made
    0700 before a new value file goes in; one owned by someone else is refused."""
    trust.make_private_dirs(tmp_path / "c")
    os.makedirs(tmp_path / "c" / "ab" / "cd")
    for d in ("ab", "ab/cd"):
        os.chmod(tmp_path / "c" / d, 0o777)
    os.close(create_value_file(str(tmp_path / "c"), "ab/cd/0123456789abcdef.val"))
    for d in ("ab", "ab/cd"):
        assert stat.S_IMODE(os.stat(tmp_path / "c" / d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "c" / "ab/cd/0123456789abcdef.val").st_mode) == 0o600
    if os.geteuid() == 0:
        os.chown(tmp_path / "c" / "ab" / "cd", OTHER_UID, OTHER_UID)
        os.chmod(tmp_path / "c" / "ab" / "cd", 0o777)
        with pytest.raises(UnsafeEntry, match=f"owned by uid {OTHER_UID}"):
            create_value_file(str(tmp_path / "c"), "ab/cd/fedcba9876543210.val")


def test_maintain_removes_value_files_others_can_write(cache_dir):
    """``jitfreeze cache verify`` / ``maintain``: an entry whose value file others could have written
    is removed (counted as unsafe); the others stay."""
    from jitfreeze.cache.persistent import maintain

    model, x, ref, value = _fill(cache_dir)
    entries = len(list(DiskStore(cache_dir, 2**30).keys()))
    os.chmod(value, 0o666)
    jf_cache.forget_open_caches()
    counts = maintain(cache_dir)
    assert counts["unsafe_rows"] == 1 and counts["entries"] == entries - 1 and counts["problems"] == 0
    assert not value.exists()
