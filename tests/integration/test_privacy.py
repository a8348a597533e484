"""Nobody reads what others classified, no client crashes the daemon through its ring, and groups
count as operators expect: no disclosure of one uid's results, tags or near-duplicates to another,
a client that truncates its posix ring under the daemon (SIGBUS on a mapped read) hurts only its
own requests, and supplementary groups let a client in.

The tests that act as a second uid need root (they drop to uid 65534 after their imports, as
tests/integration/test_admin_socket_and_inferctl.py does); the others run as anyone.
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import mmap
import os
import stat
import subprocess
import sys
import threading
import zlib

import numpy as np
import pytest

from helpers import RawClient, sample_images, short_dir, wait_until
from inferd.client import Client
from inferd.daemon.caching import results as caching
from inferd.daemon.caching.embedding_store import HEADER_SIZE as STORE_HEADER
from inferd.daemon.caching.embedding_store import EmbeddingStore
from inferd.shm import wire
from inferd.shm.cache import CacheUnavailable, ResultCache, cache_key, content_hash

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
NOBODY = 65534
GROUP = 4242                  # a gid nobody has as its primary group (it need not exist in /etc/group)


def h(n: int) -> bytes:
    return n.to_bytes(32, "little")


# the result cache file ------------------------------------------------------------------------
def test_cache_file_is_0600_and_its_shared_descriptor_cannot_write(tmp_path):
    path = str(tmp_path / "results.cache")
    writer = ResultCache.open_writer(path, 1 << 18)
    key = cache_key("digest", "pre", content_hash(np.zeros((2, 2, 3), np.uint8)))
    writer.insert(key, [(3, 0.75)])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    fd = writer.share_fd()
    try:
        assert os.get_inheritable(fd) is False
        reader = ResultCache.open_reader(fd)             # the descriptor itself, no path
        assert reader.lookup(key) == [(3, 0.75)]
        size = os.fstat(fd).st_size
        # The kernel, not the library, keeps an O_RDONLY descriptor from changing the file (root too):
        with pytest.raises(PermissionError):
            mmap.mmap(fd, size)                          # PROT_WRITE + MAP_SHARED needs O_RDWR
        with pytest.raises(OSError) as err:
            os.pwrite(fd, b"x", 0)
        assert err.value.errno == errno.EBADF
        with pytest.raises(OSError) as err:
            os.ftruncate(fd, 0)
        assert err.value.errno in (errno.EBADF, errno.EINVAL)
        private = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)   # copy-on-write: never the file
        private[4096:4104] = b"\xff" * 8
        private.close()
        assert reader.lookup(key) == [(3, 0.75)] and os.fstat(fd).st_size == size
        reader.close()
    finally:
        os.close(fd)
        writer.close()


def test_a_wider_cache_file_left_by_an_older_daemon_is_narrowed(tmp_path):
    path = str(tmp_path / "results.cache")
    ResultCache.open_writer(path, 1 << 18).close()
    os.chmod(path, 0o644)
    lines = []
    ResultCache.open_writer(path, 1 << 18, log=lines.append).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert lines == [f"result cache {path}: mode 0644 narrowed to 0600"]


def test_reader_of_a_descriptor_that_is_no_cache_is_unavailable(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(CacheUnavailable, match="descriptor"):
            ResultCache.open_reader(fd)
    finally:
        os.close(fd)


def test_cache_directory_made_0700_and_a_listable_one_is_warned_about(tmp_path, caplog):
    made = tmp_path / "made" / "here"
    caching.private_directory(str(made))
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o755)
    caplog.set_level(logging.WARNING, logger="inferd.caching")
    caching.private_directory(str(made))
    assert not caplog.records                            # ours, 0700: nothing to say
    caching.private_directory(str(open_dir))
    assert [r.getMessage() for r in caplog.records][0].startswith(f"directory {open_dir} is mode 755")


# the embedding store, per uid -----------------------------------------------------------------
def test_store_rows_are_per_uid(tmp_path):
    store = EmbeddingStore.open(str(tmp_path / "e.store"), capacity=8, dim=4)
    store.add(h(1), np.eye(4)[0], tag="root-secret", uid=0)
    store.add(h(2), np.eye(4)[1], tag="root-other", uid=0)
    assert store.search(np.eye(4)[0], k=100, min_similarity=-1.0, uid=NOBODY) == []
    assert store.get(h(1), uid=NOBODY) is None and store.get(h(1), uid=0) is not None
    # the other uid stores the same image with its own tag: a row of its own; root's tag stays
    store.add(h(1), np.eye(4)[0], tag="mine", uid=NOBODY)
    assert store.search(np.eye(4)[0], k=100, min_similarity=-1.0, uid=NOBODY) == \
        [(h(1), "mine", pytest.approx(1.0))]
    assert [t for _, t, _ in store.search(np.eye(4)[0], k=100, min_similarity=-1.0, uid=0)] == \
        ["root-secret", "root-other"]
    assert len(store) == 3
    assert len(store.search(np.eye(4)[0], k=100, min_similarity=-1.0, uid=None)) == 3   # the daemon's view
    store.close()
    reopened = EmbeddingStore.open(str(tmp_path / "e.store"), capacity=8, dim=4)       # uids survive
    assert [t for _, t, _ in reopened.search(np.eye(4)[0], k=9, min_similarity=-1.0, uid=NOBODY)] == ["mine"]
    reopened.close()


def test_shared_store_shows_every_row_and_eviction_forgets_only_its_owner(tmp_path):
    store = EmbeddingStore.open(str(tmp_path / "e.store"), capacity=3, dim=4, shared=True)
    store.add(h(1), np.eye(4)[0], tag="a", uid=0)
    store.add(h(1), np.eye(4)[0], tag="b", uid=NOBODY)
    assert sorted(t for _, t, _ in store.search(np.eye(4)[0], k=9, min_similarity=-1.0, uid=NOBODY)) == ["a", "b"]
    assert store.get(h(1), uid=1234) is not None          # shared: any uid's row
    store.add(h(2), np.eye(4)[1], uid=0)
    store.add(h(3), np.eye(4)[2], uid=0)                  # full: takes the oldest row, uid 0's h(1)
    assert len(store) == 3
    assert [t for _, t, _ in store.search(np.eye(4)[0], k=9, min_similarity=0.5, uid=0)] == ["b"]
    assert store.get(h(1), uid=NOBODY) is not None
    store.close()


def test_an_old_format_store_is_set_aside_and_rebuilt(tmp_path):
    path = str(tmp_path / "e.store")
    EmbeddingStore.open(path, capacity=4, dim=4).close()
    with open(path, "r+b") as fh:                         # make it a version 1 file, check and all
        head = bytearray(fh.read(32))
        head[8:12] = (1).to_bytes(4, "little")
        fh.seek(0)
        fh.write(bytes(head) + zlib.crc32(bytes(head)).to_bytes(4, "little"))
    lines = []
    store = EmbeddingStore.open(path, capacity=4, dim=4, log=lines.append)
    assert len(lines) == 1 and "version 1, expected" in lines[0] and "set aside" in lines[0]
    assert len(store) == 0 and os.path.getsize(path) >= STORE_HEADER
    store.close()


# no client crashes the daemon through a posix ring --------------------------------------------
def _frame_message(rid: int, slot: int, frame) -> dict:
    return {"op": "classify", "id": rid, "slot": slot, "shape": list(frame.shape), "dtype": "uint8",
            "nbytes": frame.nbytes}


def _posix_daemon(fresh_daemon, hashing: bool):
    args = ["--set", 'ring.backend="posix"']
    if not hashing:                                       # the device thread reads the slot itself
        args += ["--set", "cache.enabled=false", "--set", "embeddings.enabled=false"]
    return fresh_daemon(*args)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("hashing", [True, False], ids=["copy-at-admission", "read-by-batch"])
def test_posix_ring_truncated_to_zero_is_its_clients_error_alone(fresh_daemon, hashing):
    d = _posix_daemon(fresh_daemon, hashing)
    label, image = sample_images()[1]
    attacker = RawClient(d.socket_path, ring_slots=4)
    attacker.ring.slot(0, image.nbytes)[:] = image.reshape(-1)
    attacker.ring.close()                                 # our own mapping would SIGBUS us
    os.ftruncate(attacker.fd, 0)
    attacker.send(_frame_message(1, 0, image))
    reply = attacker.recv()
    assert reply["ok"] is False and reply["code"] == wire.E_INVALID_INPUT, reply
    assert "slot 0 cannot be read" in reply["message"] and "ftruncate" in reply["message"]
    assert d.proc.poll() is None
    with Client(d.socket_path, cache=False) as victim:
        assert victim.classify(image)[0].label == label
    attacker.send(_frame_message(2, 1, image))            # the attacker's session still answers
    assert attacker.recv()["code"] == wire.E_INVALID_INPUT
    attacker.close()
    assert d.stop() == 0


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("hashing", [True, False], ids=["copy-at-admission", "read-by-batch"])
def test_posix_ring_truncated_mid_flood_while_a_victim_is_served(fresh_daemon, hashing):
    """Each round: 32 requests sent, the ring truncated at once (those still unread by the daemon
    then fail), 32 more sent that the daemon can only find truncated. The second half lands on the
    truncated ring by construction, so the fault is counted, not hoped for."""
    d = _posix_daemon(fresh_daemon, hashing)
    samples = sample_images()
    stop, victim_answers, victim_errors = threading.Event(), [], []

    def victim():
        with Client(d.socket_path, cache=False) as c:
            while not stop.is_set():
                for label, image in samples:
                    try:
                        victim_answers.append(c.classify(image)[0].label == label)
                    except Exception as exc:  # noqa: BLE001 - any error is the test's finding
                        victim_errors.append(repr(exc))
                        return
    thread = threading.Thread(target=victim)
    thread.start()
    wait_until(lambda: victim_answers or victim_errors, timeout=60, what="the victim's first answer")
    attacker = RawClient(d.socket_path, ring_slots=64)
    attacker.ring.close()                                 # the attacker writes with pwrite: no mapping
    geometry, fd = attacker.ring.geometry, attacker.fd
    attacker.send({"op": "labels", "id": 1})                # names: asked once, not in hello
    labels = attacker.recv()["labels"]
    in_flight_hits = after_hits = 0
    try:
        for round_ in range(3):
            os.ftruncate(fd, geometry.total_size)
            for slot in range(64):
                os.pwrite(fd, samples[slot % len(samples)][1].tobytes(), geometry.offset(slot))
            first = b"".join(wire.encode(_frame_message(100 * round_ + s, s, samples[s % len(samples)][1]))
                             for s in range(32))
            attacker.send_raw(first)
            os.ftruncate(fd, 0)
            attacker.send_raw(b"".join(wire.encode(_frame_message(100 * round_ + s, s, samples[0][1]))
                                       for s in range(32, 64)))
            for _ in range(64):
                reply = attacker.recv()
                slot = reply["id"] % 100
                if reply["ok"]:                           # read before the truncation: right, too
                    assert slot < 32 and labels[reply["top"][0][0]] == samples[slot % len(samples)][0]
                else:
                    assert reply["code"] == wire.E_INVALID_INPUT, reply
                    in_flight_hits += slot < 32
                    after_hits += slot >= 32
            assert d.proc.poll() is None
        served = len(victim_answers)                      # ... and it is still served after them
        wait_until(lambda: len(victim_answers) > served or victim_errors, timeout=60,
                   what="a victim answer after the attack")
    finally:
        stop.set()
        thread.join(60)
        attacker.close()
    print(f"truncations: {in_flight_hits} requests in flight and {after_hits} sent after found the ring "
          f"truncated; victim answered {len(victim_answers)}")
    assert after_hits == 3 * 32                           # every post-truncation read was refused, typed
    assert not victim_errors and victim_answers and all(victim_answers)
    assert d.stop() == 0


# a second uid ---------------------------------------------------------------------------------
AS_NOBODY = """
import json, os, sys
import numpy as np
from inferd.client import Client, PermissionDenied
images = np.load(sys.argv[2])
os.setgroups([int(g) for g in sys.argv[4].split(",") if g]); os.setgid(65534); os.setuid(65534)
out = {}
for name in ("cache", "store"):
    try:
        open(json.loads(sys.argv[3])[name], "rb").close()
        out[name] = "read"
    except PermissionError as exc:
        out[name] = exc.errno
try:
    with Client(sys.argv[1], reconnect=False) as c:
        out["labels"] = [c.classify(img)[0].label for img in images]    # untagged: local hits first
        out["local_hits"] = c.cache_hits
        c.classify(images[0], tag="nobody-tag")                          # a hit, tagged: retag path
        c.embed(images[0][::-1].copy(), tag="nobody-own")                # an image of its own
        out["near"] = [[m.content_hash.hex(), m.tag] for m in
                       c.near_duplicates(images[0], k=1000, min_similarity=-1.0)]
except PermissionDenied as exc:
    out["denied"] = str(exc)
print(json.dumps(out))
"""


def _as_nobody(d, images, groups=()) -> dict:
    """Run AS_NOBODY against daemon ``d`` as uid/gid 65534 with supplementary ``groups``."""
    npy = os.path.join(d.workdir, "images.npy")
    np.save(npy, np.stack(images))
    os.chmod(npy, 0o644)
    paths = {"cache": os.path.join(d.workdir, "results.cache"),
             "store": (glob.glob(os.path.join(d.workdir, "embeddings-*.store")) or ["none"])[0]}
    out = subprocess.run([sys.executable, "-c", AS_NOBODY, d.socket_path, npy, json.dumps(paths),
                          ",".join(map(str, groups))], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _multi_user_daemon(fresh_daemon, *args):
    workdir = short_dir()
    os.chmod(workdir, 0o755)                              # the socket must be reachable; the files not
    return fresh_daemon("--set", "server.socket_mode=0o666", *args, workdir=workdir)


@pytest.mark.slow
@needs_root
@pytest.mark.timeout(180)
@pytest.mark.parametrize("shared", [False, True], ids=["per-uid", "shared"])
def test_second_uid_reads_nothing_of_roots_but_its_own_hits(fresh_daemon, shared):
    d = _multi_user_daemon(fresh_daemon, "--set", f"server.allow_uids=[{NOBODY}]",
                           "--set", f"embeddings.shared={'true' if shared else 'false'}")
    samples = sample_images()
    images = [img for _, img in samples]
    with Client(d.socket_path) as root:
        for i, (label, img) in enumerate(samples):
            assert root.classify(img, tag=f"root-{i}")[0].label == label
        assert [root.classify(img)[0].label for img in images] == [label for label, _ in samples]
        assert root.cache_hits == len(images)             # precondition: every image is in the cache
        out = _as_nobody(d, images)
        root_view = root.near_duplicates(images[0], k=1000, min_similarity=-1.0)
    # the files: 0600, so not even opened by another uid (EACCES); the directory is listable here
    assert out["cache"] == errno.EACCES and out["store"] == errno.EACCES, out
    assert "other users can list" in d.log()
    # ... yet the passed descriptor serves every one of root's answers as a local hit
    assert out["labels"] == [label for label, _ in samples] and out["local_hits"] == len(images), out
    tags = [tag for _, tag in out["near"]]
    root_tags = {f"root-{i}" for i in range(len(samples))}
    if shared:
        assert root_tags <= set(tags) and {"nobody-tag", "nobody-own"} <= set(tags), tags
    else:
        assert sorted(tags) == ["nobody-own", "nobody-tag"], tags          # its own rows alone
        assert out["near"][0] == [content_hash(images[0]).hex(), "nobody-tag"]
    # nobody's tag went to a row of its own: root's tag for the same image is unchanged
    mine = [m.tag for m in root_view if m.content_hash == content_hash(images[0])]
    assert "root-0" in mine and ("nobody-tag" in mine) == shared, mine
    assert d.stop() == 0


@needs_root
@pytest.mark.timeout(120)
def test_supplementary_group_lets_a_client_in(fresh_daemon):
    d = _multi_user_daemon(fresh_daemon, "--set", f"server.allow_gids=[{GROUP}]")
    label, image = sample_images()[3]
    member = _as_nobody(d, [image], groups=(GROUP,))
    assert "denied" not in member and member["labels"] == [label], member
    outsider = _as_nobody(d, [image])
    assert outsider["denied"].startswith(f"uid {NOBODY} gid {NOBODY} is not allowed"), outsider
    assert d.stop() == 0
