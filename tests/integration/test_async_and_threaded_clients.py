"""AsyncClient, and Client with many threads: many concurrent callers on one connection, cancellation
that never reuses a slot the daemon still holds, a daemon restart under load, bad replies.

Real daemons for answers and restarts; a scripted daemon on a real socket (a real hello with a ring
over SCM_RIGHTS) for what a real daemon never sends, and to hold replies back on demand.
"""
import asyncio
import os
import random
import threading

import numpy as np
import pytest

from helpers import ROOT, FakeDaemon, client_hits, sample_images, short_dir, spawn_daemon, wait_until
from inferd.client import (AsyncClient, Client, DaemonUnavailable, InvalidInput, ProtocolError,
                           ShuttingDown)
from inferd.client import aio as aio_module
from inferd.shm import wire

pytestmark = pytest.mark.timeout(120)


def _images(n, seed):
    """n distinct 8x8 frames (never cached twice) with their expected first byte."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (64, 64, 3), np.uint8) for _ in range(n)]


def _free_again(client) -> bool:
    core = client._core
    return not core.inflight and len(core.free) == client._stream.conn.ring.geometry.slots


def _run_on(loop: str, coro):
    """``coro`` on asyncio's default loop or on uvloop (which applications often use)."""
    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.run(coro)
    return asyncio.run(coro)


# -- a real daemon ----------------------------------------------------------------------------------
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_many_tasks_share_one_connection_and_get_what_client_gets(daemon, loop):
    samples = sample_images()
    images = [img for _, img in samples] * 8
    extra = _images(40, seed=1)

    async def main():
        async with AsyncClient(daemon.socket_path, ring_slots=4) as c:
            tops = await asyncio.gather(*(c.classify(im, top_k=2) for im in images + extra))
            many = await c.classify_many(extra, top_k=2)
            assert await c.ping() > 0 and (await c.info())["ok"]
            assert await c.labels() == c.model.labels or len(await c.labels()) == c.model.classes
            assert _free_again(c)
            return tops, many, c.cache_hits

    tops, many, hits = _run_on(loop, main())
    with Client(daemon.socket_path, cache=False) as sync:
        want = sync.classify_many(images + extra, top_k=2)
    assert [t[0].label for t in tops[:len(samples)]] == [label for label, _ in samples]
    assert [[p.index for p in t] for t in tops] == [[p.index for p in t] for t in want]
    assert [[p.index for p in t] for t in many] == [[p.index for p in t] for t in want[-len(extra):]]
    assert hits >= len(extra)           # the second round of `extra` came from the local cache


def test_client_shared_by_many_threads_answers_each_correctly(daemon):
    samples = sample_images()
    errors, answered = [], []
    with Client(daemon.socket_path, cache=False) as c:
        def worker(k):
            for i in range(12):
                label, image = samples[(k + i) % len(samples)]
                try:
                    got = c.classify(image, top_k=1)[0].label
                    answered.append(got == label or f"wanted {label}, got {got}")
                except Exception as exc:     # noqa: every error a thread sees is counted
                    errors.append(repr(exc))
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not c._core.inflight and len(c._core.free) == c._conn.ring.geometry.slots
    assert errors == [] and answered == [True] * 96


def test_cancelled_calls_free_their_slots_and_the_rest_are_answered(daemon):
    """Tasks cancelled at random points, mid-flight included, on a ring of 3 slots: every other
    call is answered correctly, none sees a slot the daemon still held (slot_busy), and every slot
    is free again once the daemon answered."""
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rnd = random.Random(seed)
    samples = sample_images()

    async def main():
        async with AsyncClient(daemon.socket_path, ring_slots=3, cache=False) as c:
            async def one(i):
                label, image = samples[i % len(samples)]
                return label, (await c.classify(image, top_k=1))[0].label
            tasks = [asyncio.ensure_future(one(i)) for i in range(N_TASKS)]
            for _ in range(N_TASKS // 3):
                for _ in range(rnd.randrange(3)):       # a few loop turns: calls at every stage
                    await asyncio.sleep(0)
                rnd.choice(tasks).cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
            cancelled = sum(t.cancelled() for t in tasks)
            answered = [d for d in done if not isinstance(d, asyncio.CancelledError)]
            assert all(not isinstance(d, BaseException) for d in answered), answered
            assert all(want == got for want, got in answered)
            await asyncio.wait_for(_until(lambda: _free_again(c)), 30)
            assert (await c.classify(samples[0][1], top_k=1))[0].label == samples[0][0]
            return cancelled, len(answered)

    cancelled, answered = asyncio.run(main())
    assert cancelled > 0 and answered + cancelled == N_TASKS


N_TASKS = 300


async def _until(predicate):
    while not predicate():
        await asyncio.sleep(0.01)   # noqa: sleep-ok: polling with a deadline (the caller's wait_for)


def test_embed_near_duplicates_and_a_bad_image(daemon):
    frame = _images(1, seed=7)[0]

    async def main():
        async with AsyncClient(daemon.socket_path) as c:
            vec = await c.embed(frame, tag="aio-original")
            near = await c.near_duplicates(frame, k=3, min_similarity=0.5)
            with pytest.raises(InvalidInput):
                await c.classify(np.zeros((4, 4), np.float32))
            with pytest.raises(InvalidInput, match="top_k"):
                await c.classify(frame, top_k=0)
            return vec, near

    vec, near = asyncio.run(main())
    assert vec.dtype == np.float32 and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-3
    assert near and near[0].tag == "aio-original" and near[0].similarity > 0.99


def test_encoded_files_are_decoded_off_the_loop_and_a_repeat_not_at_all(fresh_daemon, monkeypatch):
    from inferd.client import decode as decode_module

    d = fresh_daemon()
    png = sorted((ROOT / "samples").glob("*.png"))[0]
    label = png.stem.rsplit("_", 1)[0]
    decoded_on = []
    real = decode_module.decode
    monkeypatch.setattr(decode_module, "decode",
                        lambda *a: decoded_on.append(threading.current_thread()) or real(*a))

    async def main():
        async with AsyncClient(d.socket_path) as c:
            assert (await c.classify(str(png), top_k=1))[0].label == label
            with open(png, "rb") as fh:
                assert (await c.classify(fh, top_k=1))[0].label == label
            data = png.read_bytes()
            for _ in range(200):          # until the daemon's entry for these bytes is there
                decodes, hits = len(decoded_on), c.cache_hits
                assert (await c.classify(data, top_k=1))[0].label == label
                if c.cache_hits > hits and len(decoded_on) == decodes:
                    return True           # answered from the cache by its bytes' hash, not decoded
                await asyncio.sleep(0.01)   # noqa: sleep-ok: polling with a bound
            return False

    assert asyncio.run(main()), "no repeat upload was answered without decoding"
    assert decoded_on and threading.main_thread() not in decoded_on     # never on the loop's thread


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_restarts_under_async_load_fail_no_request(how):
    """16 tasks of one AsyncClient classify without pause while the daemon is stopped (SIGTERM:
    drain; or SIGKILL: what was in flight is never answered) and a successor with a ring of
    another size takes the path, twice: no task sees an error or a wrong answer, and every daemon
    answers."""
    workdir = short_dir()
    path = os.path.join(workdir, "d.sock")
    slots = [4, 2, 8]
    daemons = [spawn_daemon("--set", f"ring.default_slots={slots[0]}", socket_path=path, workdir=workdir)]
    samples = sample_images()
    epoch, answered, errors, stop = [0], [0, 0, 0], [], threading.Event()
    stats = {}

    async def load():
        async with AsyncClient(path, cache=False, timeout=30) as c:
            async def task(k):
                i = k
                while not stop.is_set():
                    label, image = samples[i % len(samples)]
                    try:
                        got = (await c.classify(image, top_k=1))[0].label
                        if got != label:
                            errors.append(f"wanted {label}, answered {got}")
                    except Exception as exc:     # noqa: every error the application would see is counted
                        errors.append(repr(exc))
                    answered[epoch[0]] += 1
                    i += 1
            await asyncio.gather(*(task(k) for k in range(16)))
            stats.update(reconnects=c.reconnects, resubmitted=c.resubmitted)

    runner = threading.Thread(target=asyncio.run, args=(load(),))
    runner.start()
    try:
        for e in range(3):
            if e:
                if how == "sigterm":
                    assert daemons[-1].stop() == 0, daemons[-1].log()
                else:
                    daemons[-1].kill()
                epoch[0] = e
                daemons.append(spawn_daemon("--set", f"ring.default_slots={slots[e]}", socket_path=path,
                                            workdir=workdir))
            wait_until(lambda: answered[e] >= 40, timeout=30, what=f"answers from daemon {e}")
    finally:
        stop.set()
        runner.join(60)
        for d in daemons:
            d.kill()
        daemons[-1].cleanup()
    print("answers per daemon:", answered, stats)
    assert errors == []
    assert stats["reconnects"] == 2 and stats["resubmitted"] >= 2


def test_without_reconnect_a_killed_daemon_is_daemon_unavailable(fresh_daemon):
    d = fresh_daemon()

    async def main():
        async with AsyncClient(d.socket_path, cache=False, reconnect=False) as c:
            await c.ping()
            d.kill()
            with pytest.raises(DaemonUnavailable):
                await c.ping()
            with pytest.raises(DaemonUnavailable, match="closed"):
                await c.ping()

    asyncio.run(main())


def test_no_daemon_is_daemon_unavailable_at_once():
    async def main():
        with pytest.raises(DaemonUnavailable, match="no inferd daemon"):
            await AsyncClient.open(os.path.join(short_dir(), "nobody.sock"), reconnect=False)

    asyncio.run(main())


# -- a scripted daemon ------------------------------------------------------------------------------
def _scripted(answer, labels=("a", "b", "c")):
    """A FakeDaemon (tests/helpers.py) serving an 8x8 model of generation 1 with ``labels``."""
    model = {"name": "fake", "digest": "d1", "input": [8, 8, 3], "dtype": "uint8",
             "labels": list(labels), "top_k": 1, "gen": 1}
    return FakeDaemon(os.path.join(short_dir(), "fake.sock"), model, answer)


FRAME = np.zeros((8, 8, 3), np.uint8)


def test_a_cancelled_call_keeps_its_slot_until_the_daemon_answers():
    fake = _scripted(lambda msg: {"ok": True, "top": [[1, 0.9]]})

    async def main():
        async with AsyncClient(fake.path) as c:
            fake.hold = True
            first = asyncio.ensure_future(c.classify(FRAME, top_k=1))
            await _until(lambda: len(fake.held) == 1)
            slot = fake.received[-1]["slot"]
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            assert slot not in c._core.free and len(c._core.free) == 3
            # the other slots still serve: three calls in flight, none in the cancelled one's slot
            others = [asyncio.ensure_future(c.classify(FRAME, top_k=1)) for _ in range(3)]
            await _until(lambda: len(fake.held) == 4)
            assert slot not in [m["slot"] for m in fake.received[1:]]
            fake.release()
            assert [t[0].label for t in await asyncio.gather(*others)] == ["b"] * 3
            assert len(c._core.free) == 4 and not c._core.inflight       # the reply freed it
            assert (await c.classify(FRAME, top_k=1))[0].label == "b"

    try:
        asyncio.run(main())
    finally:
        fake.close()


@pytest.mark.parametrize("reply, match", [
    ({"ok": True, "top": [[7, 0.9]]}, "outside 0..2"),
    ({"ok": True, "top": "nonsense"}, "unreadable classify reply"),
    ({"ok": True}, "unreadable classify reply"),
])
def test_a_malformed_reply_is_a_protocol_error_for_that_call(reply, match):
    fake = _scripted(lambda msg: reply if msg["op"] == "classify" else {"ok": True})

    async def main():
        async with AsyncClient(fake.path) as c:
            with pytest.raises(ProtocolError, match=match):
                await c.classify(FRAME, top_k=1)
            assert await c.ping() >= 0                    # the session is still in step
        with Client(fake2.path) as s:
            with pytest.raises(ProtocolError, match=match):
                s.classify(FRAME, top_k=1)

    fake2 = _scripted(lambda msg: reply if msg["op"] == "classify" else {"ok": True})
    try:
        asyncio.run(main())
    finally:
        fake.close()
        fake2.close()


def test_a_reply_for_no_request_closes_the_async_client():
    fake = _scripted(lambda msg: {"ok": True, "top": [[0, 0.5]]} if msg["op"] == "classify"
                     else {"ok": True, "extra": 1})

    async def main():
        async with AsyncClient(fake.path) as c:
            c._stream.transport.write(wire.encode({"op": "ping", "id": 10**6}))
            with pytest.raises(ProtocolError, match="reply for id 1000000.*session is closed"):
                await c.classify(FRAME, top_k=1)
            with pytest.raises(DaemonUnavailable, match="closed"):
                await c.ping()

    try:
        asyncio.run(main())
    finally:
        fake.close()


def test_shutting_down_without_reconnect_and_a_silent_daemon(monkeypatch):
    """A draining daemon's refusal reaches a reconnect=False client as ShuttingDown; a daemon that
    never answers is given up on one grace period after the deadline."""
    refusing = _scripted(lambda msg: {"ok": False, "code": wire.E_SHUTTING_DOWN, "message": "draining"})
    silent = _scripted(lambda msg: None)
    monkeypatch.setattr(aio_module, "READ_GRACE_S", 0.0)

    async def main():
        async with AsyncClient(refusing.path, reconnect=False) as c:
            with pytest.raises(ShuttingDown):
                await c.classify(FRAME, top_k=1)
        async with AsyncClient(silent.path) as c:
            with pytest.raises(DaemonUnavailable, match="no reply"):
                await c.classify(FRAME, top_k=1, timeout=0.2)

    try:
        asyncio.run(main())
    finally:
        refusing.close()
        silent.close()


def test_local_hits_reach_the_daemon_by_the_loops_timer(fresh_daemon):
    d = fresh_daemon()
    frame = _images(1, seed=11)[0]

    async def main():
        async with AsyncClient(d.socket_path) as c:
            await c.classify(frame, top_k=1)
            for _ in range(200):                     # until the daemon's entry is there
                await c.classify(frame, top_k=1)
                if c.cache_hits:
                    break
                await asyncio.sleep(0.01)   # noqa: sleep-ok: polling with a bound
            hits = c.cache_hits
            assert hits
            for _ in range(500):                     # the timer sends them within half a second
                if client_hits(await c.info()) == hits:
                    return True
                await asyncio.sleep(0.01)   # noqa: sleep-ok: polling with a bound
            return False

    assert asyncio.run(main()), "the local hits never reached the daemon"


def test_aclose_fails_the_calls_under_way():
    fake = _scripted(lambda msg: {"ok": True, "top": [[1, 0.9]]})

    async def main():
        c = await AsyncClient.open(fake.path)
        fake.hold = True
        calls = [asyncio.ensure_future(c.classify(FRAME, top_k=1)) for _ in range(6)]   # 4 sent, 2 wait
        await _until(lambda: len(fake.held) == 4)
        await c.aclose()
        done = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(e, DaemonUnavailable) and "closed" in str(e) for e in done), done
        with pytest.raises(DaemonUnavailable, match="closed"):
            await c.ping()
        await c.aclose()                              # idempotent

    try:
        asyncio.run(main())
    finally:
        fake.close()
