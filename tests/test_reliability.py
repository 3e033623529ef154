"""Issue 4: the faults a persistent cache of executable artifacts must survive.

Each fault of the issue is a test here (most with real processes), or names the test that already
covers it. The long ones (8-process stampede, soak) are marked ``stress`` and run
``tests/stress/reliability.py``, which prints the figures quoted in docs/reliability.md.

Root and mounts: these tests run as root on CI, where file permissions don't stop writes. Read-only
and full file systems are therefore real tmpfs mounts (skipped, with the reason, where ``mount`` is
not allowed); "another owner" is uid 65534.
"""

import contextlib
import errno
import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

from jitfreeze.cache import repair, sqlindex
from jitfreeze.cache import files as jf_files
from jitfreeze import JitFreezeWarning, jitfreeze
from jitfreeze.cache.persistent import maintain
from jitfreeze.cache.rawdisk import RawOnlyDisk
from jitfreeze.cache.disk import DiskStore
from jitfreeze.cache.store import MemoryStore

from .children import (BROKEN_TS, EVICT_CHILD, HANG_IN_COMPILE, MODEL_CHILD, OPEN_CHILD, child_env, model_child,
                       run_child, run_children, start_child)
from .conftest import ROOT, assert_same
from .models import make

OTHER_UID = 65534


# -- helpers ---------------------------------------------------------------------------------------

def run(model, x, cache_dir):
    fast = jitfreeze(model, cache_dir=cache_dir)
    with torch.no_grad():
        out = fast(x)
    return fast, out


def eager(model, x):
    with torch.no_grad():
        return model(x)


@contextlib.contextmanager
def recorded():
    """Record every JitFreezeWarning (the suite turns them into errors otherwise)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", JitFreezeWarning)
        yield caught


def messages(caught):
    return [str(w.message) for w in caught if issubclass(w.category, JitFreezeWarning)]


def value_files(cache_dir):
    return sorted(p for p in cache_dir.rglob("*.val"))


def key_of(model, x):
    """The artifact key a call would use (learned with an in-memory store)."""
    probe = jitfreeze(model, cache_dir=MemoryStore())
    with torch.no_grad():
        probe(x)
    return probe.signatures()[0].key


def fresh_process_state():
    from jitfreeze.cache import persistent as jf_cache
    from jitfreeze import errors as jf_errors
    jf_cache.forget_open_caches()
    jf_errors.reset_warnings_once()


def _can_mount():
    return hasattr(os, "geteuid") and os.geteuid() == 0 and sys.platform.startswith("linux")


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size="1m") -> a fresh tmpfs (mode 0700) at tmp_path/mnt; remount(ro=True) flips it read-only."""
    point = tmp_path / "mnt"
    point.mkdir()
    mounted = []

    class Tmpfs:
        path = point

        def mount(self, size="1m"):
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(point)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
            mounted.append(point)
            return point

        def remount(self, ro=True):
            proc = subprocess.run(["mount", "-o", f"remount,{'ro' if ro else 'rw'}", str(point)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                pytest.skip(f"cannot remount the tmpfs read-only here ({proc.stderr.strip()})")

    if not _can_mount():
        pytest.skip("needs root on Linux to mount a tmpfs")
    yield Tmpfs()
    fresh_process_state()       # drop our SQLite connections before unmounting
    for p in mounted:
        subprocess.run(["umount", str(p)], capture_output=True)
        if os.path.ismount(p):
            subprocess.run(["umount", "-l", str(p)], capture_output=True)


# -- 1, 2: cold stampede and soak (long: tests/stress/reliability.py) ------------------------------

def _stress(*args, timeout=900):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "stress", "reliability.py"), *args, "--json"],
                          capture_output=True, text=True, env=child_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.stress
def test_cold_stampede_8_processes(tmp_path):
    """Fault 1: 8 processes released at once on one key: one compile, all correct, check() clean."""
    fig = _stress("stampede", "--processes", "8", "--dir", str(tmp_path / "jf"))
    assert fig["processes"] == 8 and fig["errors"] == 0 and fig["wrong"] == 0 and fig["warnings"] == 0
    assert fig["compiles"] == 1 and fig["loads"] == 7
    assert fig["check_problems"] == 0


@pytest.mark.stress
def test_soak_processes_threads_keys(tmp_path):
    """Fault 2: 8 processes x 3 threads, 20 keys, mixed calls: no error reaches a caller, <= 1 compile per key."""
    fig = _stress("soak", "--processes", "8", "--threads", "3", "--keys", "20", "--seconds", "30",
                  "--dir", str(tmp_path / "jf"))
    assert fig["errors"] == 0 and fig["wrong"] == 0 and fig["warnings"] == 0
    assert fig["max_compiles_per_key"] <= 1 and fig["keys_compiled"] >= 1   # (dynamic dims may merge keys)
    assert fig["entries_lost"] == 0 and fig["check_problems"] == 0
    assert fig["calls"] > 1000


def test_concurrent_first_calls_in_threads(cache_dir):
    """Fault 2 in one process: threads making first calls of different functions at the same time must
    each get a correct graph (make_fx is not thread-safe: two traces at once mix their graphs)."""
    def make_fn(i):
        def f(x, w):
            return torch.tanh(x @ w) * (i + 1) + i
        f.__qualname__ = f"f{i}"
        return f

    w = torch.randn(8, 3)
    bad, errors, fallbacks = [], [], []

    def worker(i):
        fn = make_fn(i)
        end = time.monotonic() + 5
        try:
            with torch.no_grad():
                while time.monotonic() < end:
                    fast = jitfreeze(fn, cache_dir=MemoryStore())       # a fresh wrapper: traces again
                    x = torch.randn(1 + i, 8)
                    if not torch.allclose(fast(x, w), fn(x, w), atol=1e-5):
                        bad.append(i)
                    if fast.cache_info().fallbacks:
                        fallbacks.append(i)
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)            # faster traces: more of them overlap
    try:
        with recorded():
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
    finally:
        torch.set_num_threads(n_threads)
    assert errors == [] and bad == [] and fallbacks == []


# -- 3: 32 processes open an empty directory at once -----------------------------------------------


def test_32_processes_open_an_empty_directory_at_once(cache_dir):
    """Fault 3: concurrent first opens (diskcache's 'database is locked' at creation) all succeed."""
    n = 32
    start = time.time() + 2.0
    results = run_children(OPEN_CHILD, [(cache_dir, start, i) for i in range(n)], timeout=120)
    assert all(r["stored"] and r["found"] and r["warnings"] == [] for r in results), results
    store = DiskStore(cache_dir, 2**30)
    assert store.stats()["entries"] == n and repair.check(store) == []
    assert oct(cache_dir.stat().st_mode & 0o777) == oct(0o700)


# -- 4: SIGKILL while holding a key's lock -----------------------------------------------------------


def test_sigkill_while_holding_the_key_lock(cache_dir):
    """Fault 4: the kernel releases the killed holder's flock: the next process proceeds at once, compiles once."""
    import filelock

    holder = start_child(MODEL_CHILD, json.dumps({"cache_dir": str(cache_dir), "setup": HANG_IN_COMPILE}))
    try:
        assert holder.stdout.readline().strip() == "compiling", holder.stderr.read()
        (lock_file,) = (cache_dir / "locks").glob("*.lock")
        with pytest.raises(filelock.Timeout):                 # it really holds the key's lock
            filelock.FileLock(str(lock_file), timeout=0.05, is_singleton=False).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert holder.returncode == -signal.SIGKILL
    model, (x,) = make("mlp")
    t = time.monotonic()
    fast, out = run(model, x, cache_dir)                      # default lock timeout (600 s): must not wait
    assert time.monotonic() - t < 30
    assert_same(out, eager(model, x))
    assert fast.cache_info().compiles == 1
    assert lock_file.exists()                                 # lock files are never deleted
    fresh_process_state()
    again, _ = run(model, x, cache_dir)
    assert again.cache_info().loads == 1


# -- 5: SIGKILL mid-write ---------------------------------------------------------------------------

KILL_IN_WRITE = {
    # half of the value file written (torch.jit.save writes it in the cache directory), then
    # killed: no row, a partial file
    "file": """
        import torch
        _save = torch.jit.save
        def _half(module, f, *a, **k):
            _save(module, f, *a, **k)
            if str(f).startswith(args["cache_dir"]):
                with open(f, "r+b") as fh:
                    fh.truncate(os.path.getsize(f) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        torch.jit.save = _half
    """,
    # the payload saved, killed while its envelope is appended
    "seal": """
        from jitfreeze.cache import envelope as artifact
        def _die(path, *a, **k):
            with open(path, "ab") as fh:
                fh.write(b"partial envelope"); fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        artifact.seal_file = _die
    """,
    # the file complete, killed before the row is inserted
    "before-row": """
        from jitfreeze.cache.rawdisk import RawOnlyDisk
        _store = RawOnlyDisk.store
        def _then_die(self, *a, **k):
            out = _store(self, *a, **k)
            if out[2] is not None:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        RawOnlyDisk.store = _then_die
    """,
    # the row inserted inside the transaction, killed before COMMIT
    "before-commit": """
        import diskcache
        _insert = diskcache.Cache._row_insert
        def _then_die(self, *a, **k):
            _insert(self, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
        diskcache.Cache._row_insert = _then_die
    """,
}


@pytest.mark.parametrize("when", list(KILL_IN_WRITE))
def test_sigkill_mid_write(cache_dir, when):
    """Fault 5: later reads are a clean miss; maintenance removes the orphan; check() is clean."""
    _, proc = model_child(cache_dir, KILL_IN_WRITE[when], check=False, model="projected")   # > 32 KiB: a file
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert len(value_files(cache_dir)) == 1                   # the orphan
    model, (x,) = make("projected")
    after, out = run(model, x, cache_dir)                      # a clean miss: no warning (they are errors here)
    assert_same(out, eager(model, x), atol=1e-4)
    assert after.cache_info().compiles == 1
    counts = maintain(cache_dir, min_age=0)
    assert counts["orphan_files"] == 1 and counts["problems"] == 0
    assert counts["unsafe_rows"] == counts["missing_files"] == counts["wrong_size"] == 0
    assert len(value_files(cache_dir)) == 1                   # the good entry's file stays
    fresh_process_state()
    warm, _ = run(make("projected")[0], x, cache_dir)
    assert warm.cache_info().loads == 1


def test_maintain_keeps_young_orphans_and_lock_files(cache_dir):
    """A value file younger than min_age may be a write in progress: kept. Lock files: never removed."""
    model, (x,) = make("projected")
    run(model, x, cache_dir)
    (orphan_dir := cache_dir / "ab" / "cd").mkdir(parents=True)
    (orphan_dir / ("0" * 28 + ".val")).write_bytes(b"partial")
    locks = sorted((cache_dir / "locks").glob("*.lock"))
    assert locks
    assert maintain(cache_dir)["orphan_files"] == 0
    assert maintain(cache_dir, min_age=0)["orphan_files"] == 1
    assert sorted((cache_dir / "locks").glob("*.lock")) == locks
    assert repair.check(DiskStore(cache_dir, 2**30)) == []


# -- 6: truncated or bit-flipped artifacts ----------------------------------------------------------

def _corrupt_entry(cache_dir, where, how):
    con = sqlite3.connect(cache_dir / "cache.db")
    try:
        (rowid, filename, value), = con.execute(
            "SELECT rowid, filename, value FROM Cache WHERE key LIKE 'a/%'").fetchall()
        if where == "file":
            path = cache_dir / filename
            data = bytearray(path.read_bytes())
        else:
            assert filename is None
            data = bytearray(value)
        if how == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 2] ^= 0x10
        if where == "file":
            path.write_bytes(bytes(data))
        else:
            con.execute("UPDATE Cache SET value = ? WHERE rowid = ?", (bytes(data), rowid))
            con.commit()
    finally:
        con.close()


@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("where", ["file", "inline"])
def test_corrupt_artifact_never_reaches_torch_jit_load(cache_dir, monkeypatch, where, how):
    """Fault 6 (the cross-process versions: tests/test_process.py): caught by the checksum before
    torch.jit.load, evicted, one warning, recompiled, correct."""
    from jitfreeze.backend import torchscript
    name = "projected" if where == "file" else "mlp"
    model, (x,) = make(name)
    run(model, x, cache_dir)
    _corrupt_entry(cache_dir, where, how)
    fresh_process_state()
    compiled, loaded = [], []
    real_compile, real_load = torchscript.TorchScriptBackend.compile, torchscript.TorchScriptBackend.load
    monkeypatch.setattr(torchscript.TorchScriptBackend, "compile",
                        lambda self, t, *a: compiled.append(real_compile(self, t, *a)) or compiled[-1])
    monkeypatch.setattr(torchscript.TorchScriptBackend, "load",
                        lambda self, data, *a: loaded.append(data) or real_load(self, data, *a))
    with recorded() as caught:
        fast, out = run(model, x, cache_dir)
    assert_same(out, eager(model, x), atol=1e-4)
    assert len(messages(caught)) == 1 and "bad jitfreeze cache entry" in messages(caught)[0]
    assert fast.cache_info().compiles == 1
    assert loaded and all(data in compiled for data in loaded)     # only bytes compiled here were loaded
    fresh_process_state()
    warm, _ = run(make(name)[0], x, cache_dir)
    assert warm.cache_info().loads == 1


@pytest.mark.parametrize("mapped", [True, False])
def test_entry_files_verify_the_same_mapped_or_read(tmp_path, monkeypatch, mapped):
    """unpack_file hashes a file through a read-only mapping, or in chunks where it can't be
    mapped: the same metadata either way, and a flipped bit in the payload or the metadata, a
    truncation, another key or a wrong HMAC key are refused either way."""
    import mmap

    from jitfreeze.cache import envelope as artifact

    if not mapped:
        def no_mmap(*args, **kwargs):
            raise OSError("no mmap here")
        monkeypatch.setattr(mmap, "mmap", no_mmap)
    payload = os.urandom(3 * 2**20 + 123)             # more than one read chunk
    for hmac_key in (None, b"secret"):
        data = artifact.pack("a/k", {"n": 1}, payload, hmac_key)
        path = tmp_path / "entry.val"
        path.write_bytes(data)
        meta, payload_len = artifact.unpack_file(path, "a/k", hmac_key)
        assert meta == {"n": 1, "key": "a/k"} and payload_len == len(payload)
        with pytest.raises(artifact.BadEntry, match="another key"):
            artifact.unpack_file(path, "a/other", hmac_key)
        with pytest.raises(artifact.BadEntry):
            artifact.unpack_file(path, "a/k", b"wrong")
        for at in (len(payload) // 2, len(payload) + 3):    # the payload, then the metadata
            flipped = bytearray(data)
            flipped[at] ^= 0x01
            path.write_bytes(bytes(flipped))
            with pytest.raises(artifact.BadEntry, match="checksum|signature"):
                artifact.unpack_file(path, "a/k", hmac_key)
        path.write_bytes(data[:-1])
        with pytest.raises(artifact.BadEntry):
            artifact.unpack_file(path, "a/k", hmac_key)


# -- 7: corrupt cache.db ----------------------------------------------------------------------------

def _corrupt_db(cache_dir, how):
    db = cache_dir / "cache.db"
    data = bytearray(db.read_bytes())
    if how == "garbage":
        data = bytearray(b"this is not a database " * 200)
    elif how == "truncated":
        data = data[:1024]
    elif how == "index-page":
        # zero the page of diskcache's (key, raw) index: the file opens, lookups fail as 'malformed'
        con = sqlite3.connect(db)
        (root,), = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'Cache_key_raw'").fetchall()
        (page_size,), = con.execute("PRAGMA page_size").fetchall()
        con.close()
        data[(root - 1) * page_size: root * page_size] = bytes(page_size)
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["garbage", "truncated", "index-page"])
def test_corrupt_cache_db_is_set_aside(cache_dir, how):
    """Fault 7: one warning, the index set aside (with its -wal/-shm), the right answer, a working cache after."""
    first, _ = model_child(cache_dir)
    assert first["info"]["compiles"] == 1 and not (cache_dir / "cache.db-wal").exists()
    _corrupt_db(cache_dir, how)
    model, (x,) = make("mlp")
    with recorded() as caught:
        fast, out = run(model, x, cache_dir)
        fast2, out2 = run(model, x * 2, cache_dir)                 # another signature: no new warning
    assert_same(out, eager(model, x))
    assert_same(out2, eager(model, x * 2))
    assert len(messages(caught)) == 1 and "corrupt" in messages(caught)[0], messages(caught)
    assert list(cache_dir.glob("cache.db.corrupt-*"))
    fresh_process_state()
    again, _ = run(model, x, cache_dir)                             # the new index works
    assert again.cache_info().loads == 1
    assert repair.check(DiskStore(cache_dir, 2**30)) == []


def test_corrupt_index_found_while_running(cache_dir):
    """A process that opened the index before it was damaged: the error is a miss plus one warning, the
    index is set aside once (not the fresh one another process started), and this process carries on."""
    first, _ = model_child(cache_dir)
    store = DiskStore(cache_dir, 2**30)
    assert store.get("a/nothing") is None
    ino = os.stat(cache_dir / "cache.db").st_ino
    store.close()
    _corrupt_db(cache_dir, "index-page")
    with pytest.raises(sqlindex.CorruptStore, match="set it aside"):
        DiskStore(cache_dir, 2**30).get("a/" + "0" * 64)
    assert os.stat(cache_dir / "cache.db").st_ino != ino
    # a stale view of the old index does not set the new one aside
    assert sqlindex.set_aside(cache_dir, expect_ino=(os.stat(cache_dir).st_dev, ino)) is None
    assert repair.check(DiskStore(cache_dir, 2**30)) == []


# -- 8: planted rows ----------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))          # unpickling this creates the marker file


def _plant(cache_dir, how, marker, victim):
    con = sqlite3.connect(cache_dir / "cache.db")
    rows = con.execute("SELECT rowid, key FROM Cache").fetchall()
    assert {k[:2] for _, k in rows} == {"a/", "i/", "h/"}
    for rowid, key in rows:
        if how == "pickle":
            con.execute("UPDATE Cache SET mode = 4, filename = NULL, value = ? WHERE rowid = ?",
                        (pickle.dumps(_Payload(str(marker))), rowid))
        elif how == "outside-file":
            name = str(victim) if key.startswith("a/") else os.path.relpath(victim, cache_dir)
            con.execute("UPDATE Cache SET mode = 2, filename = ?, value = NULL WHERE rowid = ?", (name, rowid))
        elif how == "symlinked-file":
            link = cache_dir / "ab" / "cd" / (("%028x" % rowid) + ".val")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(victim)
            con.execute("UPDATE Cache SET mode = 2, filename = ?, value = NULL WHERE rowid = ?",
                        (os.path.relpath(link, cache_dir), rowid))
    # and rows no lookup asks for: a pickled key, a text-mode row
    con.execute("INSERT INTO Cache (key, raw, store_time, access_time, access_count, size, mode, value) "
                "VALUES (?, 0, 0, 0, 0, 0, 4, ?)", (pickle.dumps(_Payload(str(marker))), pickle.dumps(1)))
    con.execute("INSERT INTO Cache (key, raw, store_time, access_time, access_count, size, mode, value) "
                "VALUES ('a/text', 1, 0, 0, 0, 0, 3, 'hello')")
    con.commit()
    con.close()


@pytest.mark.parametrize("how", ["pickle", "outside-file", "symlinked-file"])
def test_planted_rows_never_run_or_touch_files(cache_dir, tmp_path, how):
    """Fault 8: a pickle-mode row (and rows naming files outside the cache) is refused without being
    unpickled, read or deleted; the entry is dropped, recompiled, and maintenance removes the rest."""
    model, (x,) = make("mlp")
    run(model, x, cache_dir)
    marker, victim = tmp_path / "pwned", tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    _plant(cache_dir, how, marker, victim)
    fresh_process_state()
    with recorded() as caught:
        fast, out = run(model, x, cache_dir)
    assert_same(out, eager(model, x))
    assert fast.cache_info().compiles == 1
    assert not marker.exists()
    assert victim.read_bytes() == b"precious"
    assert 1 <= len(messages(caught)) <= 3          # the rows looked up: hint, index entry, artifact
    assert all("refused an unsafe cache entry" in m for m in messages(caught)), messages(caught)
    counts = maintain(cache_dir, min_age=0)
    assert counts["unsafe_rows"] == 2 and counts["problems"] == 0
    assert not marker.exists() and victim.read_bytes() == b"precious"
    assert repair.unsafe_rows(DiskStore(cache_dir, 2**30)) == []


def test_raw_only_disk_refuses_pickle_on_write(cache_dir):
    store = DiskStore(cache_dir, 2**30)
    with pytest.raises(TypeError):
        store.put("k", {"not": "bytes"})
    import diskcache

    with diskcache.Cache(str(cache_dir), disk=RawOnlyDisk) as raw:      # the disk the store's index uses
        with pytest.raises(TypeError):
            raw.set(("tuple", "key"), b"x")
    assert store.stats()["entries"] == 0


def test_store_constants_are_diskcaches():
    """The store reads rows without importing diskcache: its copies of diskcache's row modes and
    index name must be diskcache's."""
    import diskcache.core

    assert (jf_files.MODE_RAW, jf_files.MODE_BINARY, sqlindex.DB_NAME) == \
        (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY, diskcache.core.DBNAME)


def test_the_index_has_the_schema_sqlindex_relies_on(cache_dir):
    """jitfreeze.cache.sqlindex writes its own SQL against diskcache's tables: the columns and
    settings it names must be in the index the installed diskcache creates, and its major version
    the one they were read from."""
    import diskcache

    assert int(diskcache.__version__.split(".")[0]) == sqlindex.DISKCACHE_MAJOR, diskcache.__version__
    DiskStore(cache_dir, 2**30).close()
    con = sqlite3.connect(cache_dir / sqlindex.DB_NAME)
    try:
        columns = {row[1] for row in con.execute("PRAGMA table_info(Cache)")}
        settings = {row[0] for row in con.execute("SELECT key FROM Settings")}
    finally:
        con.close()
    assert set(sqlindex.CACHE_COLUMNS) <= columns, set(sqlindex.CACHE_COLUMNS) - columns
    assert set(sqlindex.SETTINGS_KEYS) <= settings, set(sqlindex.SETTINGS_KEYS) - settings


def test_reads_touch_access_times_off_the_reading_thread(cache_dir, monkeypatch):
    """A read queues its LRU touch for the touches thread (the first write after the index was
    closed syncs a new write-ahead log: milliseconds of disk flush a warm start must not wait
    for). The touch is written there, eviction and info() see it, a busy index drops it, and an
    index removed in the meantime is not created again."""
    from jitfreeze.cache import lru as touches

    threads = []
    real_write = touches.write_batch
    monkeypatch.setattr(touches, "write_batch", lambda batch: threads.append(threading.current_thread()) or
                        real_write(batch))
    store = DiskStore(cache_dir, 2**30)
    store.put("a/old", b"a" * 40_000)
    store.put("a/mid", b"b" * 40_000)
    limit = store.stats()["bytes"] + 20_000          # room for the two, not for a third
    store.close()
    store = DiskStore(cache_dir, limit)                # a warm process: the plain reader connection
    assert store.reading_plainly
    assert store.get("a/old") == b"a" * 40_000
    assert store.info("a/old")["access_count"] == 1    # info() waits for queued touches
    assert threads and all(t is not threading.main_thread() for t in threads)
    store.put("a/new", b"c" * 40_000)                    # over the limit: the least recently read goes
    assert store.get("a/mid") is None and store.get("a/old") is not None
    assert touches.drain(timeout=30)
    # A batch that fails in an unforeseen way does not stop the thread: the next one is written.
    monkeypatch.setattr(touches, "write_batch", lambda batch: (_ for _ in ()).throw(RuntimeError("boom")))
    assert store.get("a/old") is not None and touches.drain(timeout=30)
    monkeypatch.setattr(touches, "write_batch", real_write)
    store.get("a/old")
    assert store.info("a/old")["access_count"] == 3
    # A writer holding the index past the touch's wait: the touch is dropped, the read is not.
    busy = sqlite3.connect(cache_dir / "cache.db", isolation_level=None)
    busy.execute("BEGIN IMMEDIATE")
    try:
        before = store.info("a/new")["access_count"]
        assert store.get("a/new") == b"c" * 40_000
        assert touches.drain(timeout=30)
    finally:
        busy.execute("ROLLBACK")
        busy.close()
    assert store.info("a/new")["access_count"] == before
    store.close()
    # The index removed between a read and its touch: not created again.
    store = DiskStore(cache_dir, limit)
    gate = threading.Event()
    monkeypatch.setattr(touches, "write_batch", lambda batch: gate.wait(30) and real_write(batch))
    assert store.get("a/old") is not None
    for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(cache_dir / name)
    gate.set()
    assert touches.drain(timeout=30)
    assert not (cache_dir / "cache.db").exists()
    store.close()


def test_a_forked_child_writes_its_own_touches(cache_dir):
    """fork() waits for queued touches (no thread is cut off inside SQLite), and the child, which
    has no touches thread, starts its own."""
    from jitfreeze.cache import lru as touches

    store = DiskStore(cache_dir, 2**30)
    store.put("a/k", b"x" * 100)
    store.get("a/k")
    pid = os.fork()
    if pid == 0:                                       # the child: no assertions, an exit code
        code = 1
        try:
            child = DiskStore(cache_dir, 2**30)
            if child.get("a/k") == b"x" * 100 and touches.drain(timeout=30):
                code = 0 if child.info("a/k")["access_count"] == 2 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.info("a/k")["access_count"] == 2
    store.close()


def test_adopted_value_files_are_entries_like_put_ones(cache_dir):
    """A value file written in place (new_file + seal_file + put_file) reads back exactly like the
    same entry stored with put(pack(...)); a small one goes inline; a file outside the layout or
    a failed insert is refused and leaves no file."""
    import diskcache

    from jitfreeze.cache import envelope as artifact

    store = DiskStore(cache_dir, 2**30)
    for size in (100 * 1024, 1000):                       # a value file, then a small (inline) entry
        payload = os.urandom(size)
        new = store.new_file()
        with open(new.path, "wb") as f:
            f.write(payload)
        artifact.seal_file(new.path, f"a/k{size}", {"n": size})
        store.put_file(f"a/k{size}", new.name)
        new.close()
        data = store.get(f"a/k{size}")
        assert data == artifact.pack(f"a/k{size}", {"n": size}, payload)
        assert artifact.unpack(data, f"a/k{size}")[1] == payload
        assert (store.get_file(f"a/k{size}") is not None) == (size > 1000)
    assert len(value_files(cache_dir)) == 1 and repair.check(store) == []
    with pytest.raises(ValueError):
        store.put_file("a/x", "../outside.val")
    new = store.new_file()
    with open(new.path, "wb") as f:
        f.write(os.urandom(100 * 1024))
    real = diskcache.Cache._row_insert
    diskcache.Cache._row_insert = lambda *a, **k: (_ for _ in ()).throw(sqlite3.OperationalError("disk is full"))
    try:
        with pytest.raises(sqlite3.OperationalError):
            store.put_file("a/y", new.name)
    finally:
        diskcache.Cache._row_insert = real
        new.close()
    assert not os.path.exists(new.path) and len(value_files(cache_dir)) == 1
    assert store.get("a/y") is None


def test_a_value_file_being_written_survives_maintenance(cache_dir):
    """A compile writes its artifact straight into the cache directory, seconds before the row
    exists; `jitfreeze cache verify` (maintenance with no minimum age) meanwhile must neither
    remove it nor report it. Once its writer is gone without adopting it, it is an orphan."""
    store = DiskStore(cache_dir, 2**30)
    new = store.new_file()
    with open(new.path, "wb") as f:
        f.write(os.urandom(100 * 1024))
    assert repair.maintain_store(store, min_age=0.0)["orphan_files"] == 0 and os.path.exists(new.path)
    assert repair.check(store) == []
    new.close()                                           # the writer died (the kernel drops its flock)
    assert repair.maintain_store(store, min_age=0.0)["orphan_files"] == 1 and not os.path.exists(new.path)


# -- 9: read-only cache directory or file system -----------------------------------------------------

@pytest.mark.parametrize("state", ["empty", "populated", "missing-subdir"])
def test_read_only_file_system(tmpfs, monkeypatch, state):
    """Fault 9: uncached, exactly one warning for the process, the directory opened once (no retry storm)."""
    mnt = tmpfs.mount()
    cache_dir = mnt / "sub" if state == "missing-subdir" else mnt
    if state == "populated":
        first, _ = model_child(cache_dir)
        assert first["info"]["compiles"] == 1
    tmpfs.remount(ro=True)
    opens = []
    real_init = DiskStore.__init__
    monkeypatch.setattr(DiskStore, "__init__", lambda self, *a, **k: opens.append(1) or real_init(self, *a, **k))
    t = time.monotonic()
    with recorded() as caught:
        for name, seed in (("mlp", 0), ("mlp", 1), ("cnn", 0)):
            model, (x,) = make(name, seed=seed)
            fast, out = run(model, x, cache_dir)
            assert_same(out, eager(model, x), atol=1e-4)
            assert fast.cache_info().compiles == 1
            _, out2 = run(model, torch.cat([x, x]), cache_dir)           # another signature
            assert_same(out2, eager(model, torch.cat([x, x])), atol=1e-4)
    assert len(messages(caught)) == 1 and "running uncached" in messages(caught)[0], messages(caught)
    assert len(opens) <= 1
    assert time.monotonic() - t < 60


# -- 10: unsafe directories ---------------------------------------------------------------------------

def _unsafe(tmp_path, how):
    """(cache_dir, victim or None) set up the unsafe way ``how``."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    real.chmod(0o700)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    if how == "other-owner":
        os.chown(real, OTHER_UID, OTHER_UID)
        return real, None
    if how in ("group-writable", "world-writable", "opt-in"):
        real.chmod(0o770 if how == "group-writable" else 0o777)
        return real, None
    if how == "symlinked-dir":
        link = tmp_path / "link"
        link.symlink_to(real)
        os.lchown(link, OTHER_UID, OTHER_UID)
        return link, None
    if how == "symlinked-parent":
        parent = tmp_path / "parent"
        parent.symlink_to(real)
        os.lchown(parent, OTHER_UID, OTHER_UID)
        return parent / "jf", None
    if how == "symlinked-db":
        (real / "cache.db").symlink_to(victim)
        os.lchown(real / "cache.db", OTHER_UID, OTHER_UID)
        return real, victim
    if how == "symlinked-locks":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        (real / "locks").symlink_to(tmp_path / "elsewhere")
        os.lchown(real / "locks", OTHER_UID, OTHER_UID)
        return real, None
    raise KeyError(how)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another uid needs root")
@pytest.mark.parametrize("how", ["other-owner", "group-writable", "world-writable", "symlinked-dir",
                                 "symlinked-parent", "symlinked-db", "symlinked-locks", "opt-in"])
def test_unsafe_directory_is_refused(tmp_path, monkeypatch, how):
    """Fault 10: refused with one warning (unless opted in), run uncached, nothing created or modified."""
    cache_dir, victim = _unsafe(tmp_path, how)
    if how == "opt-in":
        monkeypatch.setenv("JITFREEZE_ALLOW_UNSAFE_CACHE_DIR", "1")
    before = sorted(p.name for p in (tmp_path / "real").iterdir())
    model, (x,) = make("mlp")
    with recorded() as caught:
        fast, out = run(model, x, cache_dir)
        run(model, x * 2, cache_dir)
    assert_same(out, eager(model, x))
    assert fast.cache_info().compiles == 1
    if how == "opt-in":
        assert messages(caught) == [] and (cache_dir / "cache.db").exists()
        return
    assert len(messages(caught)) == 1 and "refusing the jitfreeze cache directory" in messages(caught)[0]
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == before      # nothing created
    assert not list((tmp_path / "elsewhere").iterdir()) if (tmp_path / "elsewhere").exists() else True
    if victim is not None:
        assert victim.read_bytes() == b"precious"


def test_symlinked_lock_file_is_refused_and_its_target_untouched(cache_dir, tmp_path):
    """Fault 10: a lock path that is a symlink is never opened (filelock truncation CVEs): one warning,
    compiled without writing, the target unchanged."""
    model, (x,) = make("mlp")
    key = key_of(model, x)
    (cache_dir / "locks").mkdir(parents=True, mode=0o700)
    cache_dir.chmod(0o700)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    (cache_dir / "locks" / f"{key}.lock").symlink_to(victim)
    with recorded() as caught:
        fast, out = run(model, x, cache_dir)
    assert_same(out, eager(model, x))
    assert len(messages(caught)) == 1 and "symlink" in messages(caught)[0]
    assert victim.read_bytes() == b"precious"
    assert not any(k.startswith("a/") for k in DiskStore(cache_dir, 2**30).keys())   # not written


# -- 11: disk full ----------------------------------------------------------------------------------

def test_disk_full_tmpfs(tmpfs):
    """Fault 11 on a real full file system: the right answer, one warning, no partial file, and the
    entries already there still load (reads take no write lock), even with not a byte left."""
    mnt = tmpfs.mount("1m")
    cache_dir = mnt / "jf"
    kept, (kx,) = make("projected", seed=0)                                 # ~48 KB: a value file
    run(kept, kx, cache_dir)
    st = os.statvfs(mnt)
    with open(mnt / "filler", "wb") as f:
        f.write(bytes(st.f_bavail * st.f_frsize - 24 * 1024))               # leave less than an entry
    model, (x,) = make("projected", seed=1)
    with recorded() as caught:
        fast, out = run(model, x, cache_dir)
    assert_same(out, eager(model, x), atol=1e-4)
    assert fast.cache_info().compiles == 1
    assert len(messages(caught)) == 1 and "cannot write" in messages(caught)[0], messages(caught)
    assert len(value_files(cache_dir)) == 1                                  # no partial file left
    fd = os.open(mnt / "filler2", os.O_WRONLY | os.O_CREAT)                 # now fill it to the last byte
    with contextlib.suppress(OSError):
        while True:
            os.write(fd, bytes(4096))
    os.close(fd)
    warm, out = run(kept, kx, cache_dir)                                    # a new wrapper: read from disk
    assert_same(out, eager(kept, kx), atol=1e-4)
    assert warm.cache_info().loads == 1
    # A process that starts on the full disk reads the index without writing anything (diskcache,
    # which writes its settings when it opens, is not opened to read): it loads, with no warning.
    late, _ = model_child(cache_dir, model="projected", seed=0)
    assert late["ok"] and late["info"]["loads"] == 1 and late["info"]["compiles"] == 0
    assert late["warnings"] == []
    # A new signature there compiles, can't be stored, and says so once.
    late, _ = model_child(cache_dir, model="projected", seed=1)
    assert late["ok"] and late["info"]["compiles"] == 1
    assert len(late["warnings"]) == 1 and "cannot write" in late["warnings"][0]


@pytest.mark.parametrize("fault", ["enospc-in-save", "enospc-in-seal", "enospc-in-file", "sqlite-full"])
def test_disk_full_injected(cache_dir, monkeypatch, fault):
    """Fault 11, injected: ENOSPC half way through the value file (written by torch.jit.save straight
    into the cache directory, or by the envelope appended to it, or by a bytes write), or SQLite's
    'database or disk is full' at the row: no orphan file, one warning, the right answer, existing
    entries still readable."""
    import diskcache

    from jitfreeze.cache import envelope as artifact

    kept_model, (kx,) = make("projected", seed=0)
    run(kept_model, kx, cache_dir)
    fresh_process_state()

    def half_then_enospc(path):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    if fault == "enospc-in-save":
        real_save = torch.jit.save

        def save(module, f, *a, **k):
            real_save(module, f, *a, **k)
            if str(f).startswith(str(cache_dir)):
                half_then_enospc(f)
        monkeypatch.setattr(torch.jit, "save", save)
    elif fault == "enospc-in-seal":
        def seal(path, *a, **k):
            half_then_enospc(path)
        monkeypatch.setattr(artifact, "seal_file", seal)
    elif fault == "enospc-in-file":
        # bytes written by the store itself (e.g. an entry fetched from the remote tier): here,
        # every artifact goes through put(bytes) because no file is offered for saving into
        monkeypatch.setattr(DiskStore, "new_file", lambda self: (_ for _ in ()).throw(OSError("no file")))

        def write(self, full_path, reader, mode, encoding=None):
            data = b"".join(reader)
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            with open(full_path, mode) as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(RawOnlyDisk, "_write", write)
    else:
        def insert(self, *a, **k):
            raise sqlite3.OperationalError("database or disk is full")
        monkeypatch.setattr(diskcache.Cache, "_row_insert", insert)
    model, (x,) = make("projected", seed=1)
    with recorded() as caught:
        fast, out = run(model, x, cache_dir)
        fast2, out2 = run(model, x[:1], cache_dir)                          # no retry: no second warning
    assert_same(out, eager(model, x), atol=1e-4)
    assert_same(out2, eager(model, x[:1]), atol=1e-4)
    assert len(messages(caught)) == 1 and "cannot write" in messages(caught)[0]
    assert len(value_files(cache_dir)) == 1
    monkeypatch.undo()
    fresh_process_state()
    warm, _ = run(make("projected", seed=0)[0], kx, cache_dir)
    assert warm.cache_info().loads == 1
    assert repair.check(DiskStore(cache_dir, 2**30)) == []


# -- 12: lock held past the timeout ---------------------------------------------------------------------
# tests/test_env.py::test_lock_timeout_compiles_without_writing: another process holds the key's lock;
# with JITFREEZE_LOCK_TIMEOUT=0.5 the waiter gives up, compiles, warns once and writes nothing.


# -- 13: environment changes miss, and the output lands on the input's device ---------------------------

def test_torch_version_change_is_a_miss(cache_dir, monkeypatch):
    """Fault 13: another torch version (as the key sees it) is a miss, on the traced and the index path."""
    from jitfreeze import key
    from jitfreeze.key import environment_parts

    model, (x,) = make("mlp")
    run(model, x, cache_dir)
    monkeypatch.setattr(key, "environment_parts",
                        lambda: [(k, "9.9.9" if k == "torch" else v) for k, v in environment_parts()])
    fast, out = run(model, x, cache_dir)
    assert fast.cache_info().compiles == 1 and fast.cache_info().loads == 0
    assert_same(out, eager(model, x))
    monkeypatch.undo()
    fast, _ = run(model, x, cache_dir)
    assert fast.cache_info().loads == 1


def test_dtype_change_is_a_miss(cache_dir):
    def f(x, w):
        return torch.tanh(x @ w)

    x, w = torch.randn(4, 8), torch.randn(8, 3)
    fast = jitfreeze(f, cache_dir=cache_dir)
    assert fast(x, w).dtype == torch.float32
    out = fast(x.double(), w.double())
    assert out.dtype == torch.float64 and fast.cache_info().compiles == 2
    assert_same(out, f(x.double(), w.double()))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_cpu_vs_cuda_is_a_miss_and_output_stays_on_device(cache_dir):
    def f(x, w):
        return torch.relu(x @ w) * 2

    x, w = torch.randn(4, 8), torch.randn(8, 3)
    fast = jitfreeze(f, cache_dir=cache_dir)
    out_cpu = fast(x, w)
    out_gpu = fast(x.cuda(), w.cuda())
    assert out_cpu.device.type == "cpu" and out_gpu.device == torch.device("cuda", 0)
    assert fast.cache_info().compiles == 2
    assert_same(out_gpu.cpu(), out_cpu, atol=1e-4)
    fresh_process_state()
    warm = jitfreeze(f, cache_dir=cache_dir)
    assert warm(x.cuda(), w.cuda()).device.type == "cuda" and warm.cache_info().loads == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_device_index_is_a_miss(cache_dir):
    def f(x, w):
        return x @ w

    x, w = torch.randn(4, 8), torch.randn(8, 3)
    fast = jitfreeze(f, cache_dir=cache_dir)
    a = fast(x.to("cuda:0"), w.to("cuda:0"))
    b = fast(x.to("cuda:1"), w.to("cuda:1"))
    assert a.device == torch.device("cuda", 0) and b.device == torch.device("cuda", 1)
    assert fast.cache_info().compiles == 2


# -- 14: fork after warm-up -----------------------------------------------------------------------------

class _Calls(torch.utils.data.Dataset):
    def __init__(self, fast, model, cache_dir):
        self.fast, self.model, self.cache_dir = fast, model, cache_dir

    def __len__(self):
        return 6

    def __getitem__(self, i):
        torch.manual_seed(i)
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            x = torch.randn(4, 16)
            hot = self.fast(x)                                   # warmed in the parent: the hot path
            new = self.fast(torch.randn(i + 5, 16))               # a new signature: trace, lock, write
            other = jitfreeze(self.model, cache_dir=self.cache_dir)(x)   # a new wrapper: load from disk
            ref = self.model(x)
        ok = all(torch.allclose(t, ref, atol=1e-5) for t in (hot, other)) and new.shape == (i + 5, 4)
        return {"ok": ok, "warnings": len([w for w in caught if issubclass(w.category, JitFreezeWarning)]),
                "pid": os.getpid()}


def test_fork_after_warm_up_dataloader_workers(cache_dir):
    """Fault 14: DataLoader-style forked workers use the warmed function, compile and read the cache:
    no deadlock, no I/O error, right answers."""
    model, (x,) = make("mlp")
    fast, _ = run(model, x, cache_dir)
    assert fast.cache_info().compiles == 1
    loader = torch.utils.data.DataLoader(_Calls(fast, model, str(cache_dir)), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", timeout=120)
    results = list(loader)
    assert len(results) == 6 and all(r["ok"] for r in results), results
    assert sum(r["warnings"] for r in results) == 0
    assert len({r["pid"] for r in results}) == 2
    with torch.no_grad():
        assert_same(fast(x), model(x))                          # the parent is unaffected
    assert repair.check(DiskStore(cache_dir, 2**30)) == []


def test_fork_while_another_thread_compiles(cache_dir):
    """Fault 14, harder: the parent forks while a thread of its own is inside the slow path (holding the
    function's lock and the key's file lock). The child must not deadlock: it may wait for the file lock
    (the parent's compile is real and finishes), never for a thread lock no thread of its own will release."""
    from jitfreeze.backend import torchscript
    model, (x,) = make("mlp")
    fast, _ = run(model, x, cache_dir)
    entered, release = threading.Event(), threading.Event()
    real_compile = torchscript.TorchScriptBackend.compile

    def slow_compile(self, traced, *args):
        entered.set()
        release.wait(30)
        return real_compile(self, traced, *args)

    torchscript.TorchScriptBackend.compile = slow_compile
    try:
        def compile_in_thread():
            with torch.no_grad():
                fast(torch.randn(7, 16))

        worker = threading.Thread(target=compile_in_thread)
        with torch.no_grad():
            worker.start()
            assert entered.wait(30)
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:                                      # the child
                code = 1
                try:
                    torchscript.TorchScriptBackend.compile = real_compile
                    # as DataLoader workers do: after fork, torch's OpenMP pool must be one thread
                    # (a forked child that runs a parallel region hangs, eager included)
                    torch.set_num_threads(1)
                    with torch.no_grad():
                        ok = torch.allclose(fast(x), model(x), atol=1e-5)            # hot path
                        y = fast(torch.randn(9, 16))                                  # slow path
                        ok = ok and y.shape == (9, 4)
                    code = 0 if ok else 2
                finally:
                    os.write(w, bytes([code]))
                    os._exit(code)
            os.close(w)
            release.set()              # the parent's compile finishes and frees the key's file lock
            deadline = time.monotonic() + 15
            status = None
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child deadlocked on the slow path (a lock held by the parent's thread)")
            os.close(r)
            assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        worker.join(60)
        torchscript.TorchScriptBackend.compile = real_compile


# -- 15: eviction under concurrent readers --------------------------------------------------------------


def test_eviction_under_concurrent_readers(cache_dir):
    """Fault 15: 2 writers over a small size limit, 4 readers: readers get complete bytes or a miss,
    never a partial entry or an error; the size stays near the limit; check() is clean after."""
    limit, seconds = 400_000, 4.0
    DiskStore(cache_dir, limit).close()
    roles = ["writer"] * 2 + ["reader"] * 4
    results = run_children(EVICT_CHILD, [(cache_dir, role, seconds, limit, 40) for role in roles], timeout=120)
    writers, readers = results[:2], results[2:]
    assert all(r["errors"] == 0 and r["bad"] == 0 for r in results), results
    assert sum(r["complete"] for r in readers) > 0 and sum(r["miss"] for r in readers) > 0
    assert sum(r["puts"] for r in writers) > 50
    assert max(r["max_volume"] for r in writers) <= limit + 100_000          # near the limit (+ one entry, pages)
    store = DiskStore(cache_dir, limit)
    assert store.stats()["bytes"] <= limit + 100_000
    assert repair.check(store) == []


# -- 16: TorchScript failing as a whole ------------------------------------------------------------------


def test_torchscript_broken_everywhere(cache_dir):
    """Fault 16, under -W error::DeprecationWarning: with TorchScript working, no deprecation warning
    escapes (compiles as usual); with torch.jit.script, freeze or load raising, each function falls back
    to eager with one clear warning, and the answers are right."""
    results, proc = run_child(BROKEN_TS, cache_dir, env={"PYTHONWARNINGS": "error::DeprecationWarning"})
    assert all(r["ok"] for r in results.values()), results
    assert results["none"]["warnings"] == [] and results["none"]["compiles"] == 2
    for which, expected in (("script", "torch.jit.script failed"), ("freeze", "torch.jit.freeze failed"),
                            ("load", "does not load back")):
        r = results[which]
        assert r["fallbacks"] == 2 and r["compiles"] == 0, (which, r)
        assert len(r["warnings"]) == 2, (which, r["warnings"])                # one per function
        assert all("runs eagerly" in m and expected in m and "not available" in m for m in r["warnings"]), r


# -- 17: bad arguments --------------------------------------------------------------------------------
# Unhashable non-tensor arguments and Python generators: tests/test_core.py
# (test_unhashable_argument_falls_back_naming_it, test_unsupported_argument_type_falls_back).

def test_mixed_devices_is_a_clear_error_or_fallback(cache_dir):
    """Tensors on two devices: never compiled; eager then says what is wrong (here: meta vs cpu)."""
    fast = jitfreeze(lambda a, b: a + b, cache_dir=cache_dir)
    with pytest.warns(JitFreezeWarning, match="several devices"):
        with pytest.raises((RuntimeError, NotImplementedError)):
            fast(torch.ones(2), torch.ones(2, device="meta").expand(3, 2))
    assert fast.cache_info().compiles == 0


def test_torch_generator_argument_is_not_baked_in(cache_dir):
    """A torch.Generator argument: random numbers stay random (eager fallback), as eager gives them."""
    def f(x, g):
        return x + torch.rand(x.shape, generator=g)

    fast = jitfreeze(f, cache_dir=cache_dir)
    x = torch.zeros(3)
    with pytest.warns(JitFreezeWarning, match="Generator"):
        a = fast(x, torch.Generator().manual_seed(1))
    b = fast(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, f(x, torch.Generator().manual_seed(1)))
    assert torch.equal(b, f(x, torch.Generator().manual_seed(2)))
    assert not torch.equal(a, b) and fast.cache_info().compiles == 0


class _Box:
    def __init__(self, value):
        self.value = value


def test_output_torchscript_cannot_return_falls_back(cache_dir):
    """An output type a frozen graph can't return: the traced call's own result is returned (the function
    runs once), later calls run eagerly, all with the right values."""
    calls = []

    def f(x):
        calls.append(1)
        return _Box(x * 2)

    fast = jitfreeze(f, cache_dir=cache_dir)
    x = torch.arange(3.0)
    with pytest.warns(JitFreezeWarning, match="_Box"):
        out = fast(x)
    assert isinstance(out, _Box) and torch.equal(out.value, x * 2) and len(calls) == 1
    out = fast(x + 1)
    assert torch.equal(out.value, (x + 1) * 2) and fast.cache_info().compiles == 0


def test_hashable_object_argument_falls_back(cache_dir):
    """A hashable object whose value can change under the same hash is never baked in."""
    class Scale:
        def __init__(self, s):
            self.s = s

        def __rmul__(self, other):
            return other * self.s

    fast = jitfreeze(lambda x, s: x * s, cache_dir=cache_dir)
    s = Scale(2.0)
    with pytest.warns(JitFreezeWarning, match="not a tensor or a plain constant"):
        assert torch.equal(fast(torch.ones(2), s), torch.full((2,), 2.0))
    s.s = 5.0
    assert torch.equal(fast(torch.ones(2), s), torch.full((2,), 5.0))
