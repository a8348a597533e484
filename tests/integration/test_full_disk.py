"""A full filesystem never kills the daemon: the result cache and the embedding store have their
blocks reserved when they are created or opened (inferd.shm.ownedfile), so

- on a filesystem too small for them, start-up fails at once with exit 73 and a log line naming
  the file and its size, and leaves no file of that size behind;
- on a filesystem filled by someone else after start-up, inserts and adds write only blocks the
  files already own: every request is answered and the daemon stays up (without the reservation,
  the first insert into a page of a sparse file on a full ext4 is a SIGBUS, exit -7).

Real filesystems, mounted here (root): small tmpfs mounts, and for the running case an ext4 image on
a loop device as well. On tmpfs the daemon's own start-up scan of the files happens to allocate
every page, so only ext4 shows the SIGBUS without the reservation; both must hold.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

from helpers import short_dir, spawn_daemon
from inferd.client import Client
from inferd.daemon import exitcodes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount small filesystems")
SEED = 20261207


@contextlib.contextmanager
def small_fs(kind: str, size_kib: int):
    """A fresh directory on a filesystem of its own of about ``size_kib`` KiB, unmounted after."""
    mnt = tempfile.mkdtemp(prefix="inferd-fs", dir="/tmp")
    image = None
    try:
        if kind == "tmpfs":
            command = ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", mnt]
        else:
            if shutil.which("mkfs.ext4") is None:
                pytest.skip("mkfs.ext4 is not installed")
            fd, image = tempfile.mkstemp(prefix="inferd-fs", suffix=".ext4", dir="/tmp")
            os.ftruncate(fd, size_kib * 1024)
            os.close(fd)
            # -m 0: no blocks kept for root, who runs these daemons
            subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", image], check=True, capture_output=True)
            command = ["mount", "-o", "loop", image, mnt]
        mounted = subprocess.run(command, capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a {kind} here: {mounted.stderr.strip()}")
        try:
            yield mnt
        finally:
            subprocess.run(["umount", mnt], check=True)
    finally:
        os.rmdir(mnt)
        if image is not None:
            os.unlink(image)


def fill(directory: str) -> int:
    """Write a file in ``directory`` until its filesystem refuses; return the bytes written."""
    written = 0
    chunk = b"\xa5" * 65536
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as fh:
        for size in (65536, 4096, 512, 1):                # down to the last byte the fs takes
            try:
                while True:
                    written += fh.write(chunk[:size])
            except OSError as exc:
                assert exc.errno == 28, exc               # ENOSPC, nothing else
    return written


def exited(d, timeout: float = 120.0) -> int:
    try:
        return d.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the daemon is still running on a full filesystem:\n{d.log()}") from None


# full at start-up ---------------------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_a_cache_the_filesystem_cannot_hold_stops_start_up_and_leaves_nothing():
    workdir = short_dir()
    d = None
    try:
        with small_fs("tmpfs", 1024) as mnt:
            cache = os.path.join(mnt, "results.cache")
            d = spawn_daemon("--set", f'cache.path="{cache}"', "--set", "cache.size_mb=64",
                             workdir=workdir, wait=False)
            rc = exited(d)
            log = d.log()
            assert rc == exitcodes.NO_SPACE, log
            assert f"result cache {cache}: cannot reserve its {64 * 2**20} bytes (64.0 MiB)" in log, log
            assert "Traceback" not in log, log
            assert os.listdir(mnt) == []                  # neither the sparse file nor a temporary
    finally:
        if d is not None:
            d.kill()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.timeout(180)
def test_a_store_the_filesystem_cannot_hold_stops_start_up_and_leaves_nothing():
    workdir = short_dir()
    d = None
    try:
        with small_fs("tmpfs", 2048) as mnt:              # room for a 1 MiB cache, not the store
            d = spawn_daemon("--set", f'cache.path="{mnt}/results.cache"', "--set", "cache.size_mb=1",
                             "--set", "embeddings.capacity=100000", workdir=workdir, wait=False)
            rc = exited(d)
            log = d.log()
            assert rc == exitcodes.NO_SPACE, log
            assert "embedding store " + mnt in log and "cannot reserve its" in log, log
            assert "Traceback" not in log, log
            assert os.listdir(mnt) == ["results.cache"]   # the cache fitted; nothing of the store
    finally:
        if d is not None:
            d.kill()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.timeout(180)
def test_a_sparse_cache_an_older_daemon_left_is_reserved_at_open_or_refused():
    """A file that already passes every check but has holes (an older daemon made it sparse) gets
    its blocks at open; where the filesystem cannot give them, start-up stops as for a new file."""
    from inferd.shm.cache import ResultCache

    workdir = short_dir()
    d = None
    try:
        with small_fs("tmpfs", 1024) as mnt:
            cache = os.path.join(mnt, "results.cache")
            made = ResultCache.open_writer(cache, 1 << 20)   # reserved: 1 MiB fills this fs ...
            made.close()
            with open(cache, "r+b") as fh:                   # ... so punch it back to holes
                punch = 0x02 | 0x01                          # FALLOC_FL_PUNCH_HOLE | KEEP_SIZE
                libc = ctypes.CDLL(None, use_errno=True)
                assert libc.fallocate(fh.fileno(), punch, 4096, (1 << 20) - 4096) == 0
            assert os.stat(cache).st_blocks * 512 < 1 << 19   # sparse now
            d = spawn_daemon("--set", f'cache.path="{cache}"', "--set", "cache.size_mb=1",
                             "--set", "embeddings.enabled=false", workdir=workdir)
            assert os.stat(cache).st_blocks * 512 >= 1 << 20  # every block reserved again
            assert d.stop() == 0
            d.kill()                                         # reaped: closes its notify socket
            fill(mnt)
            with open(cache, "r+b") as fh:
                assert libc.fallocate(fh.fileno(), punch, 4096, (1 << 20) - 4096) == 0
            fill(mnt)                                        # the holes' room taken by another file
            d = spawn_daemon("--set", f'cache.path="{cache}"', "--set", "cache.size_mb=1",
                             "--set", "embeddings.enabled=false", workdir=workdir, wait=False)
            rc = exited(d)
            assert rc == exitcodes.NO_SPACE and f"result cache {cache}: cannot reserve" in d.log(), d.log()
            assert sorted(os.listdir(mnt)) == ["filler", "results.cache"]   # the file is left as it was
            os.unlink(os.path.join(mnt, "filler"))
    finally:
        if d is not None:
            d.kill()
        shutil.rmtree(workdir, ignore_errors=True)


# filled while running ----------------------------------------------------------------------------
@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_a_filesystem_filled_while_serving_kills_nothing(kind):
    rng = np.random.default_rng(SEED)
    print(f"seed {SEED}")
    workdir = short_dir()
    d = None
    try:
        with small_fs(kind, 16 * 1024) as mnt:
            d = spawn_daemon("--set", f'cache.path="{mnt}/results.cache"', "--set", "cache.size_mb=4",
                             "--set", "embeddings.capacity=512", workdir=workdir)
            store = glob.glob(os.path.join(mnt, "embeddings-*.store"))
            assert len(store) == 1, os.listdir(mnt)
            try:
                filled = fill(mnt)
                assert os.statvfs(mnt).f_bavail == 0 and filled > 0
                with Client(d.socket_path) as client:
                    h, w, c = client.model.input_shape
                    before = client.info()["cache"]["inserts"]
                    answered = 0
                    for _ in range(8):                    # 1,024 unique frames: the store wraps twice
                        frames = list(rng.integers(0, 256, (128, h, w, c), dtype=np.uint8))
                        answers = client.classify_many(frames, top_k=3)
                        answered += sum(len(a) == 3 for a in answers)
                        assert d.proc.poll() is None, d.log()
                    after = client.info()["cache"]
                assert answered == 1024
                # the writes landed on the full filesystem: cache entries inserted, the store full
                assert after["inserts"] - before > 0 and after["embeddings"] == 512, after
                assert d.proc.poll() is None, d.log()
                with Client(d.socket_path) as again:          # and a new client is served
                    assert len(again.classify(frames[0], top_k=1)) == 1
            finally:
                os.unlink(os.path.join(mnt, "filler"))
            assert d.stop() == 0, d.log()
            assert "Bus error" not in d.log()
    finally:
        if d is not None:
            d.kill()
        shutil.rmtree(workdir, ignore_errors=True)


# the same, in the library: typed errors, nothing left ---------------------------------------------
def test_the_files_raise_their_no_space_errors_and_leave_nothing():
    from inferd.daemon.caching.embedding_store import EmbeddingStore, EmbeddingStoreNoSpace
    from inferd.shm.cache import CacheNoSpace, ResultCache

    with small_fs("tmpfs", 1024) as mnt:
        cache, store = os.path.join(mnt, "results.cache"), os.path.join(mnt, "e.store")
        with pytest.raises(CacheNoSpace, match=f"result cache {cache}: cannot reserve its 4194304 bytes"):
            ResultCache.open_writer(cache, 4 << 20)
        with pytest.raises(EmbeddingStoreNoSpace, match=f"embedding store {store}: cannot reserve"):
            EmbeddingStore.open(store, capacity=4096, dim=128)
        assert os.listdir(mnt) == []
        # a damaged file that cannot be rebuilt for want of room stays where it is, unchanged
        with open(cache, "wb") as fh:
            fh.write(b"garbage" * 100)
        fill(mnt)
        with pytest.raises(CacheNoSpace):
            ResultCache.open_writer(cache, 512 << 10)
        assert sorted(os.listdir(mnt)) == ["filler", "results.cache"]
        with open(cache, "rb") as fh:
            assert fh.read() == b"garbage" * 100
