"""Attacks on the event loop and the protocol: each hostile input runs against a real daemon while a
well-behaved client's answers (and, where it matters, latency) are checked.

What each hostile input gets (NOTE [ session flow control ] in daemon/front/session.py):

    attack                                          daemon's answer
    10,000 info requests in one write               all answered, max_frames_per_turn (32) per loop
                                                    turn; other clients are served between turns
    the same, again and again, on two sessions      the loop is busy all the time, yet a victim's
                                                    classify waits little: the device threads get the
                                                    GIL within threads.switch_interval_ms of asking
    pipelined pings and classifies, never read      reading stops at reply_buffer_bytes of unread
                                                    replies; after unread_timeout_s the client is
                                                    disconnected (one log line); memory stays bounded
    a session that sends nothing, nothing in flight closed after idle_timeout_s (EOF, no message);
                                                    the library reconnects on its next request
    half a frame, or a frame trickled byte by byte  bad_frame frame_timeout_s after its first byte,
                                                    then closed
    a hello of 100,000 (or 900) nested lists        bad_frame, and the connection is closed at once
    the same inside a session                       bad_frame; the session stays open
    100,000 fuzzed frames over several sessions     a well-formed reply each (hits: none), typed
                                                    errors only; bad lengths: frame_too_large, closed

The first two tests drive a Session with a fake transport, so the bound on work per turn and the
stop on unread replies are checked exactly; the rest use real processes and sockets. Latency and
memory figures are printed (run with -s); their bounds are generous, the figures go to bench/.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import socket
import threading
import time
from types import SimpleNamespace

import msgpack
import numpy as np
import psutil
import pytest

from helpers import (TESTS, RawClient, admin_path, during_attack, sample_images, short_dir, shm_leftovers,
                     spawn_daemon, wait_fused_preprocessing, wait_until)
from inferd.client import AdminClient, Client
from inferd.daemon.config import ServerConfig
from inferd.daemon.front.loop_share import LoopShare
from inferd.daemon.front.session import Session
from inferd.shm import wire

MiB = 1 << 20
ROOMY_FRAME = MiB          # lets 100,000 nested lists reach the decoder instead of frame_too_large


# --- a Session on a fake transport ----------------------------------------------------------------
class FakeServer:
    def __init__(self, **limits):
        self.cfg = SimpleNamespace(server=ServerConfig(**limits))
        self.pid = 4242
        self.turns = LoopShare(self.cfg.server.max_frames_per_turn)

    def info(self) -> dict:
        return {"sessions": 2}

    def session_closed(self, session) -> None:
        pass

    def session(self, sid: int, peer: tuple) -> Session:
        """A Session of this server with no ring; it may ping, nothing more."""
        return Session(self, sid, None, peer, submit=None, hits=None, turns=self.turns)


class FakeTransport:
    """Records replies in a shared ``order`` list; with ``drain=False`` nothing is ever read, and it
    calls pause_writing past the high-water mark the way asyncio's transports do."""

    def __init__(self, session: Session, order: list, drain: bool = True):
        self.session, self.order, self.drain = session, order, drain
        self.reader = wire.FrameReader(wire.MAX_REPLY_FRAME)
        self.replies: list = []
        self.buffered = 0
        self.high = None
        self.reading = True
        self.writing_paused = False
        self.closing = False
        self.aborted = asyncio.Event()

    def set_write_buffer_limits(self, high=None, low=None):
        self.high = high

    def write(self, data: bytes) -> None:
        assert not self.closing
        for msg in self.reader.feed(data):
            self.replies.append(msg)
            self.order.append((self.session.sid, msg["id"]))
        if not self.drain:
            self.buffered += len(data)
            if self.buffered > self.high and not self.writing_paused:
                self.writing_paused = True
                self.session.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self):
        self.closing = True

    def abort(self):
        self.closing = True
        self.aborted.set()


def _pings(n: int, first: int = 0) -> bytes:
    return b"".join(wire.encode({"op": "ping", "id": i}) for i in range(first, first + n))


def test_frame_reader_takes_a_bounded_number_of_frames_and_keeps_the_rest():
    reader = wire.FrameReader(1024, wire.MAX_REQUEST_DEPTH)
    big = wire.encode({"op": "ping", "id": 0, "pad": "x" * 500})
    reader.append(_pings(100) + big + big + wire.encode({"op": "ping", "id": 7})[:5])
    assert [m["id"] for m in reader.take(32)] == list(range(32))
    assert reader.has_frame() and reader.taken == 32
    assert len(reader.take(68)) == 68
    assert len(reader.take(1000, max_bytes=400)) == 1         # stops after the frame reaching 400
    assert len(reader.take()) == 1 and not reader.has_frame() and reader.pending() == 5
    reader.append(wire.encode({"op": "ping", "id": 7})[5:])
    assert reader.take() == [{"op": "ping", "id": 7}] and reader.pending() == 0


def test_a_turn_handles_a_bounded_number_of_frames_and_other_clients_run_between():
    """One 10,000-ping write is handled 32 frames per loop turn with reading paused meanwhile;
    another session's ping, arriving as a later event, is answered within two turns."""
    async def main():
        server, order = FakeServer(), []
        flood, victim = server.session(1, (1, 1000, 1000)), server.session(2, (2, 1001, 1001))
        ft, vt = FakeTransport(flood, order), FakeTransport(victim, order)
        flood.connection_made(ft)
        victim.connection_made(vt)
        loop = asyncio.get_running_loop()
        flood.data_received(_pings(10_000))
        assert len(ft.replies) == 32 and not ft.reading       # one turn, then reading stops
        loop.call_soon(victim.data_received, _pings(1, 77))   # the victim's event comes next
        turns = 0
        while len(ft.replies) < 10_000:
            turns += 1
            assert turns < 1000, "the flood's backlog is not being handled"
            await asyncio.sleep(0)
        answered_before = order.index((2, 77))
        assert answered_before <= 3 * 32, f"the victim waited for {answered_before} flood replies"
        assert turns >= 10_000 // 32 - 1, "more than max_frames_per_turn frames in one turn"
        assert ft.reading, "reading not resumed once the backlog was handled"
        assert [r["id"] for r in ft.replies] == list(range(10_000))
    asyncio.run(main())


def test_unread_replies_stop_reading_and_then_disconnect():
    """A client that never reads: frames stop being handled once reply_buffer_bytes are queued,
    and it is aborted after unread_timeout_s."""
    async def main():
        server = FakeServer(reply_buffer_bytes=4096, unread_timeout_s=0.2)
        s = server.session(1, (1, 1000, 1000))
        t = FakeTransport(s, [], drain=False)
        s.connection_made(t)
        s.data_received(_pings(100_000))
        for _ in range(200):                    # many loop turns: nothing more may be handled
            await asyncio.sleep(0)
        reply_size = len(wire.encode({"id": 99_999, "ok": True, "pid": 4242}))
        assert not t.reading and t.writing_paused
        assert len(t.replies) <= 4096 // (reply_size - 4) + 32, len(t.replies)
        handled = len(t.replies)
        t.buffered, t.writing_paused = 0, False  # the client reads once: handling goes on
        s.resume_writing()
        await asyncio.sleep(0)
        assert len(t.replies) > handled
        await asyncio.wait_for(t.aborted.wait(), 10)   # it stops reading again, for good
        assert len(t.replies) < 100_000
    asyncio.run(main())


# --- real daemons ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def roomy():
    """A daemon whose frame limit lets deeply nested bodies reach the decoder."""
    d = spawn_daemon("--set", f"server.max_frame_bytes={ROOMY_FRAME}")
    yield d
    rc = d.stop()
    d.cleanup()
    assert rc == 0, f"daemon exited with {rc}:\n{d.log()}"
    assert not shm_leftovers(d.prefix)


def _served_correctly(daemon) -> None:
    """Another client gets a correct answer, and the daemon process is alive."""
    assert daemon.proc.poll() is None, daemon.log()
    label, image = sample_images()[0]
    with Client(daemon.socket_path, cache=False) as good:
        assert good.classify(image)[0].label == label


def _p99(xs: list[float]) -> float:
    return float(np.percentile(xs, 99))


@pytest.mark.timing
@pytest.mark.timeout(120)
def test_ten_thousand_infos_in_one_write_do_not_stall_a_victim(roomy):
    """The attacker gets all 10,000 answers; the victim's pings keep coming back meanwhile."""
    victim = Client(roomy.socket_path, cache=False)   # DaemonUnavailable after 30 s without a reply
    unloaded = [victim.ping() for _ in range(300)]
    attacker = RawClient(roomy.socket_path)
    flood = b"".join(wire.encode({"op": "info", "id": i}) for i in range(10_000))
    assert 150_000 < len(flood) < 200_000
    replies: list = []
    done = threading.Event()

    def read_replies():
        while len(replies) < 10_000 and (reply := attacker.recv()) is not None:
            replies.append(reply)
        done.set()

    threads = [threading.Thread(target=attacker.send_raw, args=(flood,), daemon=True),
               threading.Thread(target=read_replies, daemon=True)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    attacked = []
    while True:                                       # pings until the attacker has every answer
        attacked.append(victim.ping())
        if done.is_set():
            break
    attack_s = time.perf_counter() - t0
    for t in threads:
        t.join(30)
    print(f"\n10,000 infos in one write ({len(flood)} bytes) served in {attack_s:.2f} s; victim ping "
          f"p99 unloaded {_p99(unloaded) * 1e3:.2f} ms, attacked {_p99(attacked) * 1e3:.2f} ms "
          f"(max {max(attacked) * 1e3:.1f} ms, {len(attacked)} pings)")
    assert len(replies) == 10_000 and all(r["ok"] for r in replies)
    assert sorted(r["id"] for r in replies) == list(range(10_000))
    assert len(attacked) >= 1 and _p99(attacked) < 1.0
    attacker.close()
    victim.close()
    _served_correctly(roomy)


# Another uid's info flood (uid 65534 as root, else this uid) on SESSIONS sessions: on each, one
# write of 10,000 info requests, every reply read, again, until stdin closes. Replies are counted by
# their headers and only the last of each round is decoded, so the attacker needs little CPU and
# the daemon's event loop always has its frames to handle. argv: tests dir, socket, uid or "-",
# sessions. Prints "flooding" once connected, then one JSON line: rounds done, replies read (each
# counted as it comes, so a slow machine's unfinished round counts too), every 1000th reply of a
# session decoded ("checked") and those not ok.
INFO_FLOOD = """
import json, os, select, sys
sys.path.insert(0, sys.argv[1])
from helpers import RawClient
from inferd.shm import wire
if sys.argv[3] != "-":
    os.setgroups([]); os.setgid(int(sys.argv[3])); os.setuid(int(sys.argv[3]))
flood = memoryview(b"".join(wire.encode({"op": "info", "id": i}) for i in range(10_000)))
sessions = {}
for _ in range(int(sys.argv[4])):
    c = RawClient(sys.argv[2])
    sessions[c.sock] = {"sent": 0, "got": 0, "buf": bytearray()}
counts = {"rounds": 0, "replies": 0, "checked": 0, "not_ok": 0}
print("flooding", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:    # until stdin closes
    r, w, _ = select.select(list(sessions), [s for s, v in sessions.items() if v["sent"] < len(flood)], [], 10)
    for sock in w:                                     # write and read as each socket allows
        sessions[sock]["sent"] += sock.send(flood[sessions[sock]["sent"]:][:65536])
    for sock in r:
        v = sessions[sock]
        data = sock.recv(1 << 20)
        assert data, "the daemon closed the session"
        buf, pos = v["buf"], 0
        buf += data
        while len(buf) - pos >= wire.HEADER_SIZE:
            end = pos + wire.HEADER_SIZE + wire.HEADER.unpack_from(buf, pos)[0]
            if end > len(buf):
                break
            v["got"] += 1
            counts["replies"] += 1
            if v["got"] % 1000 == 0:                   # a sample decoded: answered, not refused
                counts["checked"] += 1
                counts["not_ok"] += not wire.FrameReader(wire.MAX_REPLY_FRAME).feed(bytes(buf[pos:end]))[0].get("ok")
            pos = end
        del buf[:pos]
        if v["got"] == 10_000:                         # a round done: again
            counts["rounds"] += 1
            v["sent"] = v["got"] = 0
print(json.dumps(counts), flush=True)
"""
SESSIONS = 2


def _classify_for(client: Client, samples, seconds: float, first: int) -> list[float]:
    """Classify the samples in turn for ``seconds``, each with a corner pixel stamped by a counter,
    so the result cache never answers and every frame is computed by the device threads; every
    label checked. Latencies in seconds."""
    latencies, end, i = [], time.monotonic() + seconds, first
    while time.monotonic() < end:
        label, image = samples[i % len(samples)]
        image = image.copy()
        image[0, 0] = np.frombuffer(i.to_bytes(3, "little"), np.uint8)
        t0 = time.perf_counter()
        top = client.classify(image, top_k=1)
        latencies.append(time.perf_counter() - t0)
        assert top[0].label == label, f"request {i}: {top[0].label} for a {label}"
        i += 1
    return latencies


@pytest.mark.timing
@pytest.mark.timeout(180)
def test_an_info_flood_leaves_the_device_threads_the_gil(fresh_daemon):
    """Another uid's repeated 10,000-info writes on two sessions keep the event loop busy all the
    time; a victim classifying one new frame at a time is still answered within a fraction of a
    second. A device thread takes the GIL back after every torch op: with Python's 5 ms switch
    interval each take waited behind the loop, and here the victim's p99 was 0.8-2.5 s (its calls
    a dozen to a hundred in 5 s); with threads.switch_interval_ms (0.25) it is 15-130 ms on the
    shared 2-core machine (bench/isolation (a) has the ratio to the unloaded p99)."""
    root = os.geteuid() == 0
    workdir = short_dir()
    os.chmod(workdir, 0o755)                          # the socket must be reachable by uid 65534
    d = fresh_daemon("--set", "server.socket_mode=0o666", "--set", "server.allow_uids=[65534]",
                     workdir=workdir)
    with AdminClient(admin_path(d)) as admin:
        assert admin.call("stats")["threads"]["switch_interval_ms"] == pytest.approx(0.25)
    samples = sample_images()
    with Client(d.socket_path, cache=False) as victim:
        alone = _classify_for(victim, samples, 2.0, 0)
        attacked, counts = during_attack(
            INFO_FLOOD, [str(TESTS), d.socket_path, "65534" if root else "-", str(SESSIONS)],
            lambda: _classify_for(victim, samples, 5.0, len(alone)))
        print(f"\nvictim alone: {len(alone)} classifies, p50 {_p(alone, 50):.2f} ms p99 {_p(alone, 99):.2f} ms; "
              f"beside {'uid 65534' if root else 'this uid'}'s info flood ({counts}): {len(attacked)} "
              f"classifies, p50 {_p(attacked, 50):.2f} ms p99 {_p(attacked, 99):.2f} ms, max "
              f"{max(attacked) * 1e3:.0f} ms")
        # the flood ran and was answered: at least 1,000 infos a second (no client of the library
        # asks that often), counted as they came, since a slow machine may finish no 10,000 round
        assert counts["replies"] >= 5_000 and counts["checked"] >= 5 and counts["not_ok"] == 0, counts
        assert _p(attacked, 99) < 400, "the victim's frames waited behind the info flood for the GIL"
    assert d.proc.poll() is None, d.log()


def _p(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1e3


@pytest.mark.timing
@pytest.mark.timeout(120)
def test_a_client_that_never_reads_keeps_memory_bounded_and_is_disconnected():
    """Pipelined pings and classifies, replies never read: the daemon stops reading it, its RSS
    grows by less than 64 MiB, it is disconnected after unread_timeout_s with one log line, and
    its memory comes back (within 16 MiB) once it is gone; a victim is served throughout."""
    d = spawn_daemon("--set", "server.unread_timeout_s=3")
    try:
        proc = psutil.Process(d.pid)
        label, image = sample_images()[0]
        victim = Client(d.socket_path, cache=False)
        for _ in range(30):                               # warm: first requests allocate
            assert victim.classify(image)[0].label == label
        wait_fused_preprocessing(d)                       # numba's 20+ MiB, loaded after READY
        base = proc.memory_info().rss
        attacker = RawClient(d.socket_path, ring_slots=8)
        for slot in range(8):
            attacker.ring.slot(slot, image.nbytes)[:] = image.reshape(-1)
        chunk = b"".join(
            wire.encode({"op": "classify", "id": i, "slot": i // 4 % 8, "shape": [64, 64, 3], "dtype": "uint8",
                         "nbytes": image.nbytes}) if i % 4 == 0 else wire.encode({"op": "ping", "id": i})
            for i in range(4096))
        attacker.sock.settimeout(0.5)
        blocked, cut_off = threading.Event(), threading.Event()

        def flood():
            while True:
                off = 0
                while off < len(chunk):
                    try:
                        off += attacker.sock.send(chunk[off:])
                    except socket.timeout:
                        blocked.set()                     # the daemon stopped reading us
                    except OSError:
                        cut_off.set()
                        return

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        wait_until(blocked.is_set, 30, "the daemon pausing the reader")
        peak, latencies = 0, []
        give_up = time.monotonic() + 60                  # unread_timeout_s is 3 s
        while not cut_off.is_set() and time.monotonic() < give_up:
            peak = max(peak, proc.memory_info().rss)
            latencies.append(victim.ping())
            assert victim.classify(image)[0].label == label
        sender.join(30)
        assert cut_off.is_set(), "the never-reading client was not disconnected"
        wait_until(lambda: "replies unread for 3 s" in d.log(), 10, "the disconnect's log line")
        attacker.close()
        wait_until(lambda: victim.info()["sessions"] == 1, 10, "the attacker's session closed")
        try:                                              # freed memory may reach the OS a little later
            wait_until(lambda: proc.memory_info().rss < base + 16 * MiB, 10, "RSS back within 16 MiB")
        except AssertionError:
            pass                                          # asserted below, with the figures printed
        after = proc.memory_info().rss
        print(f"\nnever-reading client: RSS {base / MiB:.1f} MiB before, peak +{(peak - base) / MiB:.1f} MiB, "
              f"+{(after - base) / MiB:.1f} MiB after; victim ping p99 {_p99(latencies) * 1e3:.1f} ms over "
              f"{len(latencies)} pings while it was blocked")
        assert peak - base < 64 * MiB
        assert after - base < 16 * MiB
        assert latencies and _p99(latencies) < 1.0
        _served_correctly(d)
        victim.close()
        assert d.stop() == 0
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def impatient():
    """A daemon with half-second idle and half-frame timeouts."""
    d = spawn_daemon("--set", "server.idle_timeout_s=0.5", "--set", "server.frame_timeout_s=0.5")
    yield d
    rc = d.stop()
    d.cleanup()
    assert rc == 0, f"daemon exited with {rc}:\n{d.log()}"


@pytest.mark.timeout(60)
def test_an_idle_session_is_closed_and_the_library_reconnects(impatient):
    idle = RawClient(impatient.socket_path)
    t0 = time.monotonic()
    assert idle.recv() is None                        # EOF, no message
    assert 0.45 <= time.monotonic() - t0 < 5
    idle.close()

    busy = RawClient(impatient.socket_path)           # traffic keeps a session open
    deadline = time.monotonic() + 1.5
    rid = 0
    while time.monotonic() < deadline:
        rid += 1
        busy.send({"op": "ping", "id": rid})
        assert busy.recv() == {"id": rid, "ok": True, "pid": impatient.pid}
        time.sleep(0.1)  # noqa: sleep-ok: the client's pace between requests, under the idle timeout
    busy.close()

    label, image = sample_images()[0]
    with Client(impatient.socket_path, cache=False) as c:
        assert c.classify(image)[0].label == label
        with Client(impatient.socket_path, cache=False) as probe:
            wait_until(lambda: probe.info()["sessions"] == 1, 10, "the idle library session closed")
        assert c.classify(image)[0].label == label    # on a new session
        assert c.reconnects == 1


@pytest.mark.timeout(60)
def test_a_half_sent_frame_is_refused_after_frame_timeout(impatient):
    c = RawClient(impatient.socket_path)
    frame = wire.encode({"op": "ping", "id": 1, "pad": "x" * 100})
    c.send_raw(frame[:20])
    t0 = time.monotonic()
    reply = c.recv()
    assert reply["code"] == wire.E_BAD_FRAME and "frame_timeout_s" in reply["message"], reply
    assert 0.45 <= time.monotonic() - t0 < 5
    assert c.recv() is None
    c.close()


@pytest.mark.timing
@pytest.mark.timeout(60)
def test_a_trickled_frame_gets_no_more_time_than_a_stalled_one(impatient):
    """One byte every 0.1 s keeps data flowing but the frame is not whole within 0.5 s."""
    c = RawClient(impatient.socket_path)
    frame = wire.encode({"op": "ping", "id": 1, "pad": "x" * 100})
    stop = threading.Event()

    def trickle():
        for i in range(len(frame)):
            if stop.is_set():
                return
            try:
                c.send_raw(frame[i:i + 1])
            except OSError:
                return
            time.sleep(0.1)  # noqa: sleep-ok: the attack's pace, not a wait for the daemon
    sender = threading.Thread(target=trickle, daemon=True)
    t0 = time.monotonic()
    sender.start()
    reply = c.recv()
    elapsed = time.monotonic() - t0
    stop.set()
    assert reply["code"] == wire.E_BAD_FRAME and "frame_timeout_s" in reply["message"], reply
    assert 0.45 <= elapsed < 3, elapsed                # the whole frame would take 12 s
    try:
        assert c.recv() is None                        # closed
    except ConnectionResetError:                       # closed with a trickled byte unread: the
        pass                                           # kernel answers that byte with a reset
    sender.join(5)
    c.close()
    _served_correctly(impatient)


# --- nesting ------------------------------------------------------------------------------------------
def _nested(depth: int) -> bytes:
    """msgpack of ``depth`` lists each holding the next, the innermost holding nil."""
    return b"\x91" * depth + b"\xc0"


def _map_with(fields: dict, key: str, raw_value: bytes) -> bytes:
    """A msgpack map of ``fields`` plus ``key`` whose value is the raw msgpack ``raw_value``."""
    body = bytes([0x80 | (len(fields) + 1)])            # fixmap header (fewer than 16 keys)
    for k, v in fields.items():
        body += msgpack.packb(k) + msgpack.packb(v)
    return body + msgpack.packb(key) + raw_value


@pytest.mark.timeout(60)
@pytest.mark.parametrize("depth, where", [(100_000, "x"), (900, "op")])
def test_a_deeply_nested_hello_is_refused_and_closed_at_once(roomy, depth, where):
    """100,000 levels (over msgpack's own 1024) and 900 levels in the op (decodes, but its repr
    would recurse): both bad_frame, the connection closed, the daemon fine."""
    fields = {"op": "hello", "id": 0, "version": wire.PROTOCOL_VERSION}
    fields.pop(where, None)
    body = _map_with(fields, where, _nested(depth))
    c = RawClient(roomy.socket_path, hello=False)
    t0 = time.monotonic()
    c.send_raw(wire.HEADER.pack(len(body)) + body)
    reply = c.recv()
    assert reply is not None and reply["ok"] is False and reply["code"] == wire.E_BAD_FRAME, reply
    assert c.recv() is None                            # closed
    assert time.monotonic() - t0 < 3                   # at once, not at hello_timeout_s (5 s)
    c.close()
    _served_correctly(roomy)


@pytest.mark.timeout(60)
def test_deeply_nested_frames_in_a_session_get_bad_frame_and_it_stays_open(roomy):
    """A request may nest 4 levels (wire.MAX_REQUEST_DEPTH: its map and 3 lists); one more is
    bad_frame, as are 900 levels in op or id and 100,000 anywhere."""
    c = RawClient(roomy.socket_path)
    for depth, where in ((100_000, "x"), (900, "op"), (900, "id"), (4, "shape"), (3, "shape")):
        fields = {"op": "ping", "id": 1}
        fields.pop(where, None)
        body = _map_with(fields, where, _nested(depth))
        c.send_raw(wire.HEADER.pack(len(body)) + body)
        reply = c.recv()
        if depth == 3:                                  # within the bound: an ordinary ping
            assert reply == {"id": 1, "ok": True, "pid": roomy.pid}
            continue
        assert reply["id"] is None and reply["code"] == wire.E_BAD_FRAME, reply
        assert "deeper" in reply["message"] or "not valid msgpack" in reply["message"], reply
        c.send({"op": "ping", "id": 2})
        assert c.recv() == {"id": 2, "ok": True, "pid": roomy.pid}
    c.close()
    _served_correctly(roomy)


# --- fuzz ---------------------------------------------------------------------------------------------
FUZZ_FRAMES = 100_000
FUZZ_SESSIONS = 4
FUZZ_CHUNK = 500           # frames sent before a ping barrier: keeps each session's replies unread
#                            far below reply_buffer_bytes, so this fuzzes decoding, not backpressure
_INTS = (0, 1, 2, 3, 7, 8, 63, 64, 255, 12288, 12289, -1, -2**31, 2**31, 2**32 + 1, 2**63 - 1, -2**63,
         2**64 - 1)
_ODD = (None, True, False, "", "x" * 300, 1.5, float("nan"), float("inf"), -0.0, [], {}, [1, 2, 3],
        {"a": 1}, b"\x00" * 5)
_OPS = ("classify", "embed", "near", "ping", "info", "hits", "hello", "flush_cache", "stats", "",
        "classify\x00", "PING")


class Fuzzer:
    """A seeded generator of frames: right requests with one field made wrong, maps with each
    request field drawn from right, wrong and absurd values, some non-maps and some garbage bodies
    (their length header is right: a wrong length desynchronises the stream, which only the
    sacrificial connections try)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def value(self, good):
        r = self.rng.random()
        if r < 0.6:
            return good
        if r < 0.8:
            return self.pick(_INTS)
        return self.pick(_ODD)

    def body(self) -> bytes:
        rng = self.rng
        r = rng.random()
        if r < 0.03:
            return rng.bytes(int(rng.integers(0, 64)))                         # garbage
        if r < 0.05:
            return msgpack.packb(self.pick(_ODD[3:]) if rng.random() < 0.5 else self.pick(_INTS))
        if r < 0.25:                                   # a right request with one field made wrong
            msg = {"op": self.pick(_OPS[:3]), "id": int(rng.integers(1, 1 << 30)), "slot": int(rng.integers(8)),
                   "shape": [64, 64, 3], "dtype": "uint8", "nbytes": 12288, "top_k": int(rng.integers(1, 5)),
                   "timeout_ms": 30000.0, "k": 3, "min_similarity": 0.5}
            key = self.pick(sorted(msg))
            msg[key] = self.pick(_INTS + _ODD) if rng.random() < 0.7 else msg[key]
            return msgpack.packb(msg, use_bin_type=True)
        msg = {"op": self.pick(_OPS), "id": self.value(int(rng.integers(1, 1 << 30)))}
        fields = {"slot": int(rng.integers(-1, 10)), "shape": [64, 64, 3], "dtype": "uint8",
                  "nbytes": 12288, "top_k": int(rng.integers(0, 10)),
                  "timeout_ms": float(rng.choice([0.001, 1.0, 50.0, 30000.0, 4e6])),
                  "k": int(rng.integers(0, 10)), "min_similarity": float(rng.uniform(-2, 2)),
                  "n": int(rng.integers(-1, 5)), "tag": "t" * int(rng.integers(0, 100)),
                  "version": 1, "ring_slots": 4}
        for key, good in fields.items():
            if rng.random() < 0.7:
                msg[key] = self.value(good)
        if rng.random() < 0.05:
            msg["shape"] = [int(x) for x in rng.integers(-2, 100, int(rng.integers(0, 5)))]
        if rng.random() < 0.05:
            msg["junk" + str(int(rng.integers(100)))] = self.pick(_ODD)
        return msgpack.packb(msg, use_bin_type=True)

    def frame(self) -> bytes:
        body = self.body()
        return wire.HEADER.pack(len(body)) + body


def _well_formed(reply) -> str:
    """The reply's outcome ("ok" or its error code); fails on anything else."""
    assert isinstance(reply, dict) and "id" in reply, reply
    if reply["ok"] is True:
        return "ok"
    assert reply["ok"] is False and reply["code"] in wire.ERROR_CODES, reply
    assert isinstance(reply["message"], str) and reply["message"], reply
    return reply["code"]


def _sacrificial(path: str, fuzz: Fuzzer) -> str:
    """One connection sent a bad length (or a bad hello): it must get a typed error and be closed."""
    c = RawClient(path, hello=fuzz.rng.random() < 0.5)
    kind = fuzz.pick(("too_large", "garbage", "short_then_eof"))
    if kind == "too_large":
        c.send_raw(wire.HEADER.pack(int(fuzz.rng.integers(ROOMY_FRAME + 1, 1 << 32))))
    elif kind == "garbage":
        c.send_raw(b"\xff\xff\xff\xff" + fuzz.rng.bytes(64))     # a 4 GiB header, then noise
    else:
        body = fuzz.body()
        c.send_raw(wire.HEADER.pack(len(body) + 10) + body)     # 10 bytes short, then EOF
        c.sock.shutdown(socket.SHUT_WR)
    outcomes = []
    while (reply := c.recv()) is not None:
        outcomes.append(_well_formed(reply))
    c.close()
    assert kind == "short_then_eof" or outcomes[-1:] == [wire.E_FRAME_TOO_LARGE], (kind, outcomes)
    return kind


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_fuzzed_frames_get_typed_answers_while_a_good_client_stays_correct(roomy):
    seed = int(os.environ.get("INFERD_FUZZ_SEED", secrets.randbits(32)))
    print(f"\nfuzz seed {seed} (rerun with INFERD_FUZZ_SEED={seed})")
    fuzz = Fuzzer(seed)
    images = sample_images()
    good_errors: list = []
    checked = [0]
    stop = threading.Event()

    def good_client():
        try:
            with Client(roomy.socket_path, cache=False) as c:
                while not stop.is_set():
                    for label, image in images:
                        assert c.classify(image)[0].label == label
                        checked[0] += 1
        except Exception as exc:                      # reported by the main thread below
            good_errors.append(exc)

    good = threading.Thread(target=good_client, daemon=True)
    good.start()
    sessions = [RawClient(roomy.socket_path, ring_slots=8) for _ in range(FUZZ_SESSIONS)]
    outcomes: dict[str, int] = {}
    sacrificed: dict[str, int] = {}
    t0 = time.monotonic()
    sent = 0
    barrier = 1 << 40
    while sent < FUZZ_FRAMES:
        for c in sessions:
            if fuzz.rng.random() < 0.1:                # the client rewrites its own slots meanwhile
                slot = int(fuzz.rng.integers(8))
                c.ring.slot(slot, 12288)[:] = np.frombuffer(fuzz.rng.bytes(12288), np.uint8)
            c.send_raw(b"".join(fuzz.frame() for _ in range(FUZZ_CHUNK)))
            barrier += 1
            c.send({"op": "ping", "id": barrier})
            c.barrier = barrier
            sent += FUZZ_CHUNK
        for c in sessions:
            while (reply := c.recv()) != {"id": c.barrier, "ok": True, "pid": roomy.pid}:
                assert reply is not None, "a fuzz session was closed; its frames were all framed right"
                code = _well_formed(reply)
                outcomes[code] = outcomes.get(code, 0) + 1
        if fuzz.rng.random() < 0.3:
            kind = _sacrificial(roomy.socket_path, fuzz)
            sacrificed[kind] = sacrificed.get(kind, 0) + 1
        assert not good_errors, (good_errors, roomy.log()[-20000:])
    stop.set()
    good.join(60)
    elapsed = time.monotonic() - t0
    for c in sessions:
        c.close()
    print(f"{sent} fuzzed frames over {FUZZ_SESSIONS} sessions in {elapsed:.1f} s; replies by outcome "
          f"{dict(sorted(outcomes.items()))}; sacrificial connections {sacrificed}; "
          f"the good client checked {checked[0]} answers")
    assert not good_errors, (good_errors, roomy.log()[-20000:])
    assert checked[0] >= len(images)
    assert sum(outcomes.values()) > FUZZ_FRAMES // 2 and outcomes.get(wire.E_BAD_FRAME)
    assert outcomes.get("ok") and outcomes.get(wire.E_INVALID_INPUT) and outcomes.get(wire.E_BAD_REQUEST)
    _served_correctly(roomy)
