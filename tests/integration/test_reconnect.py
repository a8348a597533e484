"""Clients across daemon restarts and model swaps: reconnect with backoff, resubmit what was never
answered, name classes by the generation that computed them, report local cache hits promptly.

Real daemons on one socket path for restarts (SIGTERM drain, SIGKILL); a scripted fake daemon on a
real socket for the model-generation replies the daemon side is still growing.
"""
import json
import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest

from helpers import FakeDaemon, RawClient, client_hits, sample_images, short_dir, spawn_daemon, wait_until
from inferd.client import Client, DaemonUnavailable, PermissionDenied
from inferd.client import client as client_module
from inferd.client.connection import Connection
from inferd.client.errors import ConnectionLost, ShuttingDown
from inferd.client.retry import Backoff, reconnect
from inferd.shm import wire

pytestmark = pytest.mark.timeout(120)


# -- backoff and the reconnect loop, on a fake clock ------------------------------------------------
class FakeTime:
    def __init__(self):
        self.now = 0.0
        self.slept = []

    def clock(self):
        return self.now

    def sleep(self, s):
        self.slept.append(s)
        self.now += s


def test_backoff_starts_at_once_doubles_to_its_cap_with_jitter_and_resets():
    b = Backoff(first=0.05, cap=1.0, rand=lambda: 1.0)
    assert [round(b.next(), 3) for _ in range(8)] == [0.0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    low = Backoff(first=0.05, cap=1.0, rand=lambda: 0.0)
    assert [round(low.next(), 3) for _ in range(3)] == [0.0, 0.025, 0.05]     # never below half a step
    b.reset()
    assert b.next() == 0.0


def test_reconnect_retries_restarts_until_it_connects():
    t = FakeTime()
    failures = [ConnectionLost("refused"), ShuttingDown("draining"), ConnectionLost("reset")]

    def open_session(left):
        assert left > 0
        if failures:
            raise failures.pop(0)
        return "session"
    assert reconnect(open_session, 10.0, what="s", backoff=Backoff(rand=lambda: 1.0),
                     clock=t.clock, sleep=t.sleep) == "session"
    assert t.slept == [0.05, 0.1, 0.2]


def test_reconnect_gives_up_at_the_deadline_and_at_once_on_other_errors():
    t = FakeTime()

    def never(left):
        raise ConnectionLost("no daemon answers")
    with pytest.raises(DaemonUnavailable, match="before the request's deadline; last attempt: no daemon"):
        reconnect(never, 3.0, what="s", backoff=Backoff(), clock=t.clock, sleep=t.sleep)
    assert t.now == pytest.approx(3.0)                      # slept to the deadline, not past it

    t, calls = FakeTime(), []

    def denied(left):
        calls.append(left)
        raise PermissionDenied("uid not allowed")
    with pytest.raises(PermissionDenied):
        reconnect(denied, 3.0, what="s", backoff=Backoff(), clock=t.clock, sleep=t.sleep)
    assert len(calls) == 1


# -- restarts under load ----------------------------------------------------------------------------
EPOCHS = 3                # the first daemon, then two successors
LOAD_CLIENTS = 4
ENOUGH = 5                # answers each client must see from each daemon


def _classify_in_a_loop(socket_path, k, epoch, answered, stop, report):
    """A load client (a spawned process): classify the samples until told to stop, check every
    answer, count answers per restart epoch. Client 0 pipelines all samples at once."""
    samples = sample_images()
    errors = []
    with Client(socket_path, cache=False, timeout=30) as c:
        i = k
        while not stop.is_set():
            try:
                if k == 0:
                    got = [top[0].label for top in c.classify_many([img for _, img in samples], top_k=1)]
                    want = [label for label, _ in samples]
                else:
                    want, image = samples[i % len(samples)]
                    got = c.classify(image, top_k=1)[0].label
                if got != want:
                    errors.append(f"wanted {want}, answered {got}")
            except Exception as exc:       # noqa: every error the application would see is counted
                errors.append(repr(exc))
            answered[k * EPOCHS + epoch.value] += 1
            i += 1
        report.put((k, errors, c.reconnects, c.resubmitted))


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_restarts_under_load_fail_no_request():
    """Four client processes classify without pause while the daemon is stopped (SIGTERM: drain)
    and a successor started on the same socket and cache paths, twice; each successor has a ring
    of another slot count. No client sees an error or a wrong answer, and every client is
    answered by every daemon."""
    workdir = short_dir()
    path = os.path.join(workdir, "d.sock")
    slots = [4, 2, 8]                                    # classify_many pipelines over each size
    ctx = multiprocessing.get_context("spawn")
    epoch = ctx.Value("i", 0)
    answered = ctx.Array("q", LOAD_CLIENTS * EPOCHS, lock=False)
    stop, report = ctx.Event(), ctx.Queue()
    daemons = [spawn_daemon("--set", f"ring.default_slots={slots[0]}", socket_path=path, workdir=workdir)]
    procs = [ctx.Process(target=_classify_in_a_loop, args=(path, k, epoch, answered, stop, report))
             for k in range(LOAD_CLIENTS)]
    try:
        for p in procs:
            p.start()
        for e in range(EPOCHS):
            if e:
                assert daemons[-1].stop() == 0, daemons[-1].log()
                epoch.value = e                        # answers from here on come from a successor
                daemons.append(spawn_daemon("--set", f"ring.default_slots={slots[e]}",
                                            socket_path=path, workdir=workdir))
            wait_until(lambda: all(answered[k * EPOCHS + e] >= ENOUGH for k in range(LOAD_CLIENTS)),
                       timeout=30, what=f"every client answered by daemon {e}")
        stop.set()
        results = sorted(report.get(timeout=30) for _ in procs)
        assert all("SIGTERM: draining" in d.log() for d in daemons[:-1])
    finally:
        stop.set()
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        for d in daemons:
            d.kill()
        daemons[-1].cleanup()
    counts = [[answered[k * EPOCHS + e] for e in range(EPOCHS)] for k in range(LOAD_CLIENTS)]
    print("answers per client per daemon:", counts)
    print("reconnects, resubmitted per client:", [(r[2], r[3]) for r in results])
    assert [r[1] for r in results] == [[]] * LOAD_CLIENTS, "errors seen by the applications"
    assert all(r[2] == EPOCHS - 1 for r in results), "every client reconnected once per restart"
    assert all(r[3] >= EPOCHS - 1 for r in results), "every restart caught each client mid-request"


# -- a request in flight on a daemon that is killed ---------------------------------------------------
def _write_control(path, control):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(control, fh)
    os.replace(tmp, path)       # a new inode: the model sees a new mtime, never a half-written file


@pytest.mark.timeout(90)
def test_a_request_in_flight_on_a_killed_daemon_is_answered_by_its_successor(monkeypatch):
    workdir = short_dir()
    control = os.path.join(workdir, "synthetic.json")
    _write_control(control, {})
    monkeypatch.setenv("INFERD_SYNTHETIC", control)
    # The synthetic model's "hang" holds the batch; health must not take the device out first.
    args = ("--set", "health.watchdog_floor_s=600")
    d = spawn_daemon(*args, model="synthetic", workdir=workdir)
    successor = None
    frame = np.full((16, 16, 3), 255, np.uint8)              # the synthetic model says level_9
    answer, failure = [], []
    client = Client(d.socket_path, cache=False, timeout=60)
    try:
        _write_control(control, {"fault": {"0": "hang"}})

        def ask():
            try:
                answer.append(client.classify(frame, top_k=1)[0])
            except Exception as exc:
                failure.append(exc)
        sent = threading.Event()
        real_send = Connection.send

        def send(conn, data):
            real_send(conn, data)
            if b"classify" in data:
                sent.set()
        monkeypatch.setattr(Connection, "send", send)
        asker = threading.Thread(target=ask)
        asker.start()
        assert sent.wait(30), "the request was not sent"
        # Sent, and never answered: the device hangs on every batch until the daemon dies.
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(30)
        _write_control(control, {})
        successor = spawn_daemon(*args, model="synthetic", socket_path=d.socket_path, workdir=workdir)
        asker.join(60)
        assert not asker.is_alive() and not failure, failure
        assert answer[0].label == "level_9"
        assert client.resubmitted == 1 and client.reconnects == 1
    finally:
        client.close()
        d.kill()
        if successor is not None:
            assert successor.stop() == 0
            successor.cleanup()


@pytest.mark.timeout(60)
def test_without_reconnect_a_killed_daemon_is_daemon_unavailable(fresh_daemon):
    d = fresh_daemon()
    label, image = sample_images()[0]
    with Client(d.socket_path, cache=False, reconnect=False) as c:
        assert c.classify(image)[0].label == label
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(30)
        with pytest.raises(DaemonUnavailable, match="closed the connection|connection to the daemon failed"):
            c.classify(image)
        with pytest.raises(DaemonUnavailable, match="this Client is closed"):
            c.classify(image)
        assert c.reconnects == 0


@pytest.mark.timeout(60)
def test_with_reconnect_and_no_successor_the_deadline_bounds_the_wait(fresh_daemon):
    d = fresh_daemon()
    label, image = sample_images()[0]
    with Client(d.socket_path, cache=False) as c:
        assert c.classify(image)[0].label == label
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(30)
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable, match="no inferd daemon took over .* before the request's deadline"):
            c.classify(image, timeout=1.0)
        assert time.monotonic() - t0 < 10            # the deadline, plus scheduling slack
        # A successor later on: the same Client is served again.
        successor = fresh_daemon(socket_path=d.socket_path, workdir=d.workdir)
        assert c.classify(image)[0].label == label
        assert c.reconnects == 1
        successor.stop()


# -- client-side cache hits reach the daemon ------------------------------------------------------------
@pytest.mark.timeout(60)
def test_local_hits_reach_the_daemon_within_a_second_and_at_close(fresh_daemon, monkeypatch):
    d = fresh_daemon("--set", "cache.sample_every=1")
    (_, a), (_, b) = sample_images()[:2]
    with Client(d.socket_path, cache=False) as observer:
        hitter = Client(d.socket_path)
        try:
            hitter.classify(a)                                  # computed, and cached by the daemon
            before = client_hits(observer.info())
            wait_until(lambda: hitter.classify(a) and hitter.cache_hits, what="a local hit")
            hit_at = time.monotonic()
            # No other request from the hitter: only its timer can tell the daemon.
            wait_until(lambda: client_hits(observer.info()) == before + hitter.cache_hits, timeout=5,
                       what="the hit reported without another request")
            print(f"hit reported after {time.monotonic() - hit_at:.2f} s")
        finally:
            hitter.close()

        # Hits made just before close() are sent by close(): with the timer far off, nothing else can.
        monkeypatch.setattr(client_module, "HITS_REPORT_DELAY_S", 600.0)
        before = client_hits(observer.info())
        with Client(d.socket_path) as closer:
            closer.classify(b)
            wait_until(lambda: closer.classify(b) and closer.cache_hits, what="a local hit")
            for _ in range(3):
                closer.classify(b)
            made = closer.cache_hits
            assert made >= 4
        wait_until(lambda: client_hits(observer.info()) == before + made, timeout=5,
                   what="the hits reported at close")


def test_hits_notifications_get_no_reply_and_bad_counts_an_error(daemon):
    c = RawClient(daemon.socket_path)
    try:
        c.send({"op": "hits", "id": 7, "n": 3})
        c.send({"op": "hits", "id": 8, "n": 0})
        c.send({"op": "hits", "id": 9, "n": 1 << 30})
        c.send({"op": "hits", "id": 10, "n": "3"})
        c.send({"op": "ping", "id": 11})
        replies = [c.recv() for _ in range(4)]
    finally:
        c.close()
    assert [(r["id"], r.get("code")) for r in replies] == [
        (8, wire.E_INVALID_INPUT), (9, wire.E_INVALID_INPUT), (10, wire.E_INVALID_INPUT), (11, None)]
    assert replies[-1]["ok"]


# -- model generations, against a scripted daemon ----------------------------------------------------
def _model(gen, labels, digest):
    return {"name": "fake", "digest": digest, "input": [8, 8, 3], "dtype": "uint8",
            "labels": list(labels), "top_k": 1, **({"gen": gen} if gen is not None else {})}


@pytest.mark.timeout(30)
def test_a_reply_of_a_new_generation_updates_the_model_and_names_its_classes():
    path = os.path.join(short_dir(), "fake.sock")
    old, new = ("a", "b", "c"), ("x", "y", "z")
    script = iter([
        {"ok": True, "top": [[1, 0.9]], "gen": 1},                                  # before the swap
        {"ok": True, "top": [[1, 0.8]], "gen": 2, "model": _model(2, new, "d2")},   # first of gen 2
        {"ok": True, "top": [[2, 0.7]], "gen": 1},                                  # old gen, late
        {"ok": True, "top": [[0, 0.6]], "gen": 2},
        {"ok": True, "top": [[0, 0.5]]},                                            # no gen: current
    ])
    fake = FakeDaemon(path, _model(1, old, "d1"), lambda msg: next(script))
    image = np.zeros((8, 8, 3), np.uint8)
    try:
        with Client(path) as c:
            assert (c.model.gen, c.model.labels, c.model.digest) == (1, old, "d1")
            assert c.classify(image, top_k=1)[0].label == "b"
            assert c.classify(image, top_k=1)[0].label == "y"
            assert (c.model.gen, c.model.labels, c.model.digest) == (2, new, "d2")
            assert c.classify(image, top_k=1)[0].label == "c"                      # by gen 1's labels
            assert c.model.gen == 2                                                # not moved back
            assert c.classify(image, top_k=1)[0].label == "x"
            assert c.classify(image, top_k=1)[0].label == "x"
    finally:
        fake.close()


@pytest.mark.timeout(30)
def test_an_older_daemon_without_gen_is_served_and_a_refused_hits_note_is_ignored():
    path = os.path.join(short_dir(), "fake.sock")

    def answer(msg):
        if msg["op"] == "hits":                       # what an older daemon says to a notification
            return {"ok": False, "code": wire.E_UNKNOWN_OP, "message": "unknown op 'hits'"}
        return {"ok": True, "top": [[2, 0.9]]}
    fake = FakeDaemon(path, _model(None, ("a", "b", "c"), "d1"), answer)
    try:
        with Client(path) as c:
            assert c.model.gen == 0
            c._hits.add(2)                            # as if two frames were answered locally
            wait_until(lambda: any(m["op"] == "hits" for m in fake.received), what="the hits note")
            assert c.classify(np.zeros((8, 8, 3), np.uint8), top_k=1)[0].label == "c"
        assert [m.get("n") for m in fake.received if m["op"] == "hits"] == [2]
    finally:
        fake.close()


@pytest.mark.timeout(30)
def test_shutting_down_replies_are_resubmitted_to_the_successor():
    """The draining daemon answers what it admitted and refuses the rest; the refused requests go
    to the daemon that takes over the path, the answered ones are not sent again."""
    path = os.path.join(short_dir(), "fake.sock")
    labels = ("a", "b", "c")
    first_seen = []

    def draining(msg):
        first_seen.append(msg["slot"])
        if len(first_seen) == 1:
            return {"ok": True, "top": [[0, 0.9]]}
        return {"ok": False, "code": wire.E_SHUTTING_DOWN, "message": "draining"}

    fake = FakeDaemon(path, _model(1, labels, "d1"), draining)
    successor = None
    done = []
    c = Client(path, ring_slots=4)
    try:
        t = threading.Thread(target=lambda: done.append(c.classify_many(
            [np.full((8, 8, 3), i, np.uint8) for i in range(3)], top_k=1, timeout=20)))
        t.start()
        wait_until(lambda: len(first_seen) == 3, what="three requests at the draining daemon")
        fake.close()                                  # as a draining daemon does: stop listening,
        os.unlink(path)                               # unlink the path
        successor = FakeDaemon(path, _model(1, labels, "d1"), lambda msg: {"ok": True, "top": [[2, 0.5]]})
        t.join(20)
        assert not t.is_alive() and done
        assert [top[0].label for top in done[0]] == ["a", "c", "c"]
        assert len([m for m in successor.received if m["op"] == "classify"]) == 2
        assert c.resubmitted == 2 and c.reconnects == 1
    finally:
        c.close()
        fake.close()
        if successor is not None:
            successor.close()
