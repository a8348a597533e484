"""Encoded uploads larger than one ring slot: the bytes span a run of consecutive slots (Runs in
inferd.shm.ring; docs/protocol.md). The ring reads a run whole on both backends, the daemon refuses a
bad run before reading anything, every slot of a run is held until its request's reply and let go on
every path, and a client with a small ring keeps going request after request."""
import asyncio
import io
import os

import numpy as np
import pytest
from PIL import Image

from helpers import Clock, FakeSession, RawClient, wait_until
from inferd.client import Client
from inferd.client import decode
from inferd.client.connection import ModelInfo
from inferd.client.hits import HitReport
from inferd.client.protocol import ProtocolCore
from inferd.client.retry import Call
from inferd.daemon.pipeline.records import BatchResult, Outcome
from inferd.daemon.config import Config
from inferd.daemon.dispatch.device import Device
from inferd.daemon.models.loading import ModelSpec
from inferd.daemon.dispatch.scheduler import Scheduler
from inferd.daemon.front.admission import Rejected
from inferd.shm import wire
from inferd.shm.ring import DATA_OFFSET, Ring, RingError, RingGeometry

pytestmark = pytest.mark.timeout(120)
H = W = 64
SLOT = H * W * 3                     # the default ring's slot: one frame of the built-in model


def jpeg(seed: int, h: int, w: int) -> bytes:
    """A noisy photo's JPEG (about 0.75 bytes a pixel at quality 90)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(rng.uniform(0, 255) + 60 * np.sin(x / (4 + c) + seed) + 40 * np.cos(y / 5)) % 256
                    for c in range(3)], -1) + rng.normal(0, 24, (h, w, 3))
    out = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


# the ring: a run read back whole, on both backends ------------------------------------------------
@pytest.mark.parametrize("backend", ["memfd", "posix"])
@pytest.mark.parametrize("slot_bytes", [4096, 1000])          # no padding between slots / 24 bytes of it
def test_a_run_is_read_back_whole_on_both_backends(backend, slot_bytes):
    owner, fd = Ring.create(RingGeometry(8, slot_bytes), backend=backend, prefix=f"inferdrun{os.getpid()}")
    client = Ring.attach(fd)
    try:
        data = np.random.default_rng(slot_bytes).integers(0, 256, 3 * slot_bytes - 5, np.uint8).tobytes()
        client.slot(2, slot_bytes)[:] = 0xEE                     # what a run must not reach back into
        client.write_run(3, data)
        assert owner.read_run(3, len(data)).tobytes() == data
        assert client.slot(4, slot_bytes).tobytes() == data[slot_bytes:2 * slot_bytes]   # slot by slot
        out = np.empty(len(data), np.uint8)
        assert owner.read_run(3, len(data), out=out) is out and out.tobytes() == data
        assert owner.read_run(7, slot_bytes).tobytes() == client.slot(7, slot_bytes).tobytes()
        assert (owner.read_slot(2, slot_bytes) == 0xEE).all()
        for first, nbytes in ((6, 2 * slot_bytes + 1), (-1, 10), (8, 1), (0, 0), (0, 8 * slot_bytes + 1)):
            with pytest.raises(RingError, match="outside this ring"):
                owner.read_run(first, nbytes)
    finally:
        client.close()
        os.close(fd)
        owner.close()


def test_a_run_of_a_shrunk_posix_ring_is_a_short_read_not_a_signal():
    owner, fd = Ring.create(RingGeometry(6, 4096), backend="posix", prefix=f"inferdrunshrink{os.getpid()}")
    try:
        os.ftruncate(fd, DATA_OFFSET + 4096 * 3 + 100)          # cut inside the run's third slot
        assert owner.read_run(0, 3 * 4096).shape == (3 * 4096,)
        with pytest.raises(RingError, match="holds only 8292 of 12288 bytes"):
            owner.read_run(1, 3 * 4096)
    finally:
        os.close(fd)
        owner.close()


# the client's core: runs taken from free slots and given back with the reply ---------------------
MODEL = ModelInfo("fake", "d1", (8, 8, 3), ("a", "b", "c"), 1, gen=1, classes=3)


class _Timers:
    def __call__(self, delay, callback):
        from types import SimpleNamespace
        return SimpleNamespace(cancel=lambda: None)


@pytest.fixture
def core():
    from types import SimpleNamespace

    ring, fd = Ring.create(RingGeometry(8, 192), prefix=f"inferdruncore{os.getpid()}")
    os.close(fd)
    c = ProtocolCore(HitReport(lambda: None, 0.5, _Timers()), resubmit=True)
    c.adopt(SimpleNamespace(session=1, model=MODEL, preprocess_id=None, cache=None, ring=ring))
    yield c
    ring.close()


def _sent(data: bytes) -> list[dict]:
    return wire.FrameReader(wire.MAX_REPLY_FRAME).feed(data) if data else []


def _call(uploads: list) -> Call:
    return Call("classify", {"top_k": 1}, 10.0, [np.full((8, 8, 3), i, np.uint8) for i in range(len(uploads))],
                uploads)


def test_the_client_writes_a_run_of_free_slots_and_frees_it_with_the_reply(core):
    data = bytes(range(256)) * 2                                 # 512 bytes: 3 slots of 192
    call = _call([data])
    (msg,) = _sent(core.submit(call, now=0.0))
    run = range(msg["upload_slot"], msg["upload_slot"] + 3)
    assert msg["upload_nbytes"] == 512 and msg["slot"] not in run and run.stop <= 8
    assert core._ring.read_run(run.start, 512).tobytes() == data
    assert sorted(core.free) == sorted(set(range(8)) - {msg["slot"], *run})
    core.receive(wire.error(msg["id"], wire.E_OVERLOADED, "refused"))   # an error frees it too
    assert sorted(core.free) == list(range(8))


def test_without_a_free_run_the_frame_goes_alone(core):
    too_big = bytes(5 * 192)                                     # 5 slots: over half of 8
    (alone,) = _sent(core.submit(_call([too_big]), now=0.0))
    assert "upload_slot" not in alone and len(core.free) == 7
    core.free[:] = [7, 5, 3, 1]                                  # four free, none of them adjacent
    (frag,) = _sent(core.submit(_call([bytes(300)]), now=0.0))
    assert "upload_slot" not in frag and sorted(core.free) == [3, 5, 7]
    core.free[:] = [6, 5, 3, 2, 1]
    (fits,) = _sent(core.submit(_call([bytes(300)]), now=0.0))   # 2 slots: the lowest pair left
    assert (fits["slot"], fits["upload_slot"]) == (1, 2) and sorted(core.free) == [5, 6]


def test_an_abandoned_call_frees_its_run_only_with_the_reply(core):
    call = _call([bytes(400)])
    (msg,) = _sent(core.submit(call, now=0.0))
    core.abandon(call)
    assert len(core.free) == 8 - 1 - 3
    assert core.receive({"id": msg["id"], "ok": True, "top": [[0, 1.0]]}) is None
    assert sorted(core.free) == list(range(8))


# the scheduler: every slot of a run held until the reply, on every path --------------------------
SPEC = ModelSpec("shapes", 64, 64, (0.5,) * 3, (0.25,) * 3, tuple("abcdefgh"), 5)


def _scheduler(clock, devices=1):
    cfg = Config()
    cfg.health.max_attempts = 2
    devs = [Device(i, "cpu", 1) for i in range(devices)]
    from types import SimpleNamespace

    return Scheduler(cfg, SimpleNamespace(spec=SPEC, digest="digest", gen=0), devs, clock), devs


def _classify(slot, **extra):
    return {"op": "classify", "slot": slot, "nbytes": SPEC.frame_bytes, "dtype": "uint8",
            "shape": list(SPEC.frame_shape), **extra}


@pytest.mark.parametrize("path", ["done", "expired", "dropped", "unreadable", "failed"])
def test_a_run_is_held_until_the_reply_and_let_go_on_every_path(path):
    clock = Clock(10.0)
    sched, (dev,) = _scheduler(clock)
    s = FakeSession(1000, SPEC.frame_bytes, slots=8)
    sched.submit(s, 1, _classify(0, upload_slot=2, upload_nbytes=3 * SPEC.frame_bytes))
    assert s.inflight == {0: 1, 2: 1, 3: 1, 4: 1}
    with pytest.raises(Rejected) as busy:                        # slot 4 is inside the held run
        sched.submit(s, 2, _classify(1, upload_slot=4, upload_nbytes=10))
    assert busy.value.code == wire.E_SLOT_BUSY and "slot 4, which already carries request 1" in str(busy.value)
    taken = dev.queue.drain()
    result = BatchResult.taking(dev, taken)
    (entry,) = result.entries
    entry.outcome = Outcome(path)
    if path == "done":
        entry.top = [[0, 1.0]]
    elif path == "unreadable":
        entry.why = "cut"
    elif path == "failed":                                       # no other device: answered with an error
        result.error = "boom"
    result.started = result.finished = 10.1
    sched.on_batch_done(result)
    assert s.inflight == {}


def test_a_redispatched_request_keeps_its_run():
    clock = Clock(10.0)
    sched, (a, b) = _scheduler(clock, devices=2)
    s = FakeSession(1000, SPEC.frame_bytes, slots=8)
    sched.submit(s, 1, _classify(5, upload_slot=0, upload_nbytes=2 * SPEC.frame_bytes))
    first = a if len(a.queue) else b
    taken = first.queue.drain()
    result = BatchResult.taking(first, taken)
    result.entries[0].outcome, result.error = Outcome.FAILED, "boom"
    sched.on_batch_done(result)                                  # sent to the other device
    assert s.inflight == {5: 1, 0: 1, 1: 1}


def test_upload_bytes_waiting_are_bounded():
    """A run can hold megabytes: past MAX_UPLOAD_BYTES waiting for the decode thread an upload is
    not verified (no entry), and room comes back with the verdicts."""
    from collections import Counter
    from types import SimpleNamespace

    from inferd.daemon.caching import results as caching

    memory = caching.Caches(Config(), SPEC, "digest", Counter())
    memory.cache = SimpleNamespace(insert=lambda key, top: False, close=lambda: None)
    frame = np.zeros(SPEC.frame_shape, np.uint8)
    data = np.zeros(600, np.uint8)

    async def main():
        caching.MAX_UPLOAD_BYTES, saved = 1000, caching.MAX_UPLOAD_BYTES
        try:
            memory.verify_upload(data, frame, [[0, 1.0]])
            assert memory._uploads_waiting == 1
            memory.verify_upload(data, frame, [[0, 1.0]])                  # 1200 bytes would wait
            assert memory.counters["uploads_skipped"] == 1 and memory._uploads_waiting <= 1
            deadline = asyncio.get_running_loop().time() + 10
            while memory.counters["uploads_mismatched"] == 0:              # zeros: not an image
                assert asyncio.get_running_loop().time() < deadline, "no verdict"
                await asyncio.sleep(0.01)
            memory.verify_upload(data, frame, [[0, 1.0]])                  # room again
            assert memory.counters["uploads_skipped"] == 1
        finally:
            caching.MAX_UPLOAD_BYTES = saved

    try:
        asyncio.run(main())
    finally:
        memory.close()


def test_an_upload_over_the_copy_limit_is_skipped_before_any_copy():
    """cache.max_upload_bytes bounds the copy per request (a hostile client asking for a 256 MiB
    ring could otherwise have its collector copy 32 MiB for each of its requests): admission says
    to copy nothing."""
    from collections import Counter
    from types import SimpleNamespace

    from inferd.daemon.caching import results as caching

    cfg = Config()
    cfg.cache.max_upload_bytes = 1000
    memory = caching.Caches(cfg, SPEC, "digest", Counter())
    memory.cache = SimpleNamespace(insert=lambda key, top: False, close=lambda: None)
    try:
        assert memory.upload_bytes(1001) == 0 and memory.counters["uploads_skipped"] == 1
        assert memory.upload_bytes(1000) == 1000
    finally:
        memory.close()


# the daemon: bad runs refused before anything is read ---------------------------------------------
@pytest.mark.parametrize("fields,code,match", [
    ({"upload_slot": 6, "upload_nbytes": 2 * SLOT + 1}, wire.E_INVALID_INPUT, "must lie within slots 0 to 7"),
    ({"upload_slot": 2, "upload_nbytes": 2 * SLOT + 1}, wire.E_INVALID_INPUT, "include the frame's slot 3"),
    ({"upload_slot": 0, "upload_nbytes": 4 * SLOT + 1}, wire.E_INVALID_INPUT, "at most 4, half this ring's 8"),
    ({"upload_slot": 0, "upload_nbytes": decode.MAX_ENCODED_BYTES + 1}, wire.E_INVALID_INPUT,
     "MAX_ENCODED_BYTES"),
])
def test_bad_runs_are_refused_with_typed_errors(daemon, fields, code, match):
    a = np.zeros((H, W, 3), np.uint8)
    raw = RawClient(daemon.socket_path, ring_slots=8)
    try:
        raw.classify(1, 3, a, **fields)
        reply = raw.recv()
        assert not reply["ok"] and reply["code"] == code and match in reply["message"], reply
        raw.classify(2, 3, a, upload_slot=4, upload_nbytes=10)   # nothing was taken
        assert raw.recv()["ok"]
    finally:
        raw.close()


def test_a_busy_slot_inside_a_run_is_refused(daemon):
    """Two requests in one write are admitted in one turn, before a batch can answer the first: the
    second's run covers the first's frame slot."""
    rng = np.random.default_rng(7)
    a, b = (rng.integers(0, 256, (H, W, 3), np.uint8) for _ in range(2))   # never cached: not answered at once
    raw = RawClient(daemon.socket_path, ring_slots=8)
    try:
        raw.ring.slot(3, a.nbytes)[:] = a.reshape(-1)
        raw.ring.slot(0, b.nbytes)[:] = b.reshape(-1)
        base = {"op": "classify", "shape": [H, W, 3], "dtype": "uint8", "nbytes": a.nbytes}
        raw.send_raw(wire.encode({**base, "id": 1, "slot": 3})
                     + wire.encode({**base, "id": 2, "slot": 0, "upload_slot": 2, "upload_nbytes": 2 * SLOT + 1}))
        replies = {r["id"]: r for r in (raw.recv(), raw.recv())}
        assert replies[1]["ok"]
        assert replies[2]["code"] == wire.E_SLOT_BUSY and "slot 3, which already carries request 1" \
            in replies[2]["message"], replies[2]
        raw.classify(3, 0, b, upload_slot=2, upload_nbytes=2 * SLOT + 1)   # free again after the reply
        assert raw.recv()["ok"]
    finally:
        raw.close()


# the daemon: a small ring keeps going --------------------------------------------------------------
def _sent_uploads(client) -> int:
    cache = client.info()["cache"]
    return sum(cache[k] for k in ("uploads_verified", "uploads_mismatched", "uploads_skipped"))


def test_a_client_with_a_small_ring_keeps_going_and_frees_every_run(daemon):
    files = [jpeg(100 + i, 144 + 16 * (i % 3), 192 + 16 * (i % 3)) for i in range(24)]
    with Client(daemon.socket_path, ring_slots=6) as c:
        assert all(1 < c._core._ring.geometry.run_slots(len(f)) <= 3 for f in files)   # runs of 2-3 of 6
        before = _sent_uploads(c)
        for f in files:                                          # one at a time: a run is free each time
            assert c.classify(f, top_k=1)[0].index in range(8)
        wait_until(lambda: _sent_uploads(c) == before + len(files), what="a verdict on every upload")
        assert sorted(c._core.free) == list(range(6))
        answers = c.classify_many(files[:6], top_k=1)             # more than the ring holds at once
        assert sorted(c._core.free) == list(range(6))
    with Client(daemon.socket_path, cache=False) as plain:
        assert answers == [plain.classify(decode.decode(f, H, W), top_k=1) for f in files[:6]]


def test_an_async_client_with_a_small_ring_frees_every_run(daemon):
    from inferd.client import AsyncClient

    files = [jpeg(200 + i, 160, 208) for i in range(12)]

    async def main():
        async with AsyncClient(daemon.socket_path, ring_slots=6) as c:
            answers = await asyncio.gather(*(c.classify(f, top_k=1) for f in files))
            assert sorted(c._core.free) == list(range(6))
            return answers

    answers = asyncio.run(main())
    with Client(daemon.socket_path, cache=False) as plain:
        assert answers == [plain.classify(decode.decode(f, H, W), top_k=1) for f in files]


def test_a_posix_ring_daemon_verifies_a_run(fresh_daemon, monkeypatch):
    d = fresh_daemon("--set", 'ring.backend="posix"')
    data = jpeg(300, 360, 480)
    with Client(d.socket_path) as c:
        assert c._core._ring.geometry.run_slots(len(data)) > 8
        first = c.classify(data, top_k=2)
        wait_until(lambda: c.info()["cache"]["uploads_inserted"] == 1, what="the upload's entry")
        monkeypatch.setattr(decode, "decode", lambda *a: pytest.fail("a repeat upload was decoded"))
        assert c.classify(data, top_k=2) == first
    assert d.stop() == 0
