"""Statistics kept as events happen (daemon/ops/stats.py) and their Prometheus face (daemon/ops/metrics.py).

An injected clock drives them (nothing sleeps); the scheduler is driven by hand with fake
sessions, so the counts it keeps are checked against what was submitted. A real daemon's counts:
tests/integration/test_metrics_through_daemon.py.
"""
import secrets
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from helpers import Clock, FakeSession
from inferd.daemon.pipeline.records import BatchEntry, BatchResult, Outcome
from inferd.daemon.config import Config, ConfigError
from inferd.daemon.dispatch.device import Device
from inferd.daemon.ops.metrics import SnapshotCollector, parse_listen
from inferd.daemon.models.loading import ModelSpec
from inferd.daemon.dispatch.scheduler import Scheduler
from inferd.daemon.front.admission import Rejected
from inferd.daemon.ops.stats import (LATENCY_BOUNDS, Histogram, SizeHistogram, Stats, Window,
                                     quantile)
from inferd.shm import wire
from inferd.shm.cache import ResultCache


# histograms ---------------------------------------------------------------------------------------
def test_histogram_bounds_are_inclusive_and_quantiles_fall_in_the_right_bucket():
    h = Histogram(LATENCY_BOUNDS)
    assert h.quantile(0.5) is None
    h.observe(LATENCY_BOUNDS[3])                      # exactly on a bound: that bucket, as Prometheus
    assert h.counts[3] == 1
    h = Histogram(LATENCY_BOUNDS)
    rng = np.random.default_rng(7)
    values = np.exp(rng.uniform(np.log(1e-4), np.log(1.0), 5000))
    for v in values:
        h.observe(float(v))
    assert h.count == 5000 and h.sum == pytest.approx(values.sum())
    for q in (0.5, 0.9, 0.99):
        true = float(np.quantile(values, q))
        i = np.searchsorted(LATENCY_BOUNDS, true)     # the bucket holding the true quantile
        lower = LATENCY_BOUNDS[i - 1] if i else 0.0
        assert lower <= h.quantile(q) <= LATENCY_BOUNDS[i] * 1.0001, q
    assert h.quantile(0.0) <= h.quantile(0.5) <= h.quantile(1.0) <= 1.0


def test_histogram_weighted_observe_and_overflow():
    h = Histogram((0.1, 1.0))
    h.observe(0.5, n=4)
    h.observe(50.0)
    assert h.counts == [0, 4, 1] and h.sum == pytest.approx(52.0)
    assert h.quantile(1.0) == 1.0                     # above the last bound reads as the last bound
    assert h.buckets() == [[1.0, 4], [None, 1]]
    # a client diffing two readings gets the quantile of what happened in between
    assert quantile((0.1, 1.0), [0, 0, 1], 0.5) == 1.0 and quantile((0.1, 1.0), [2, 0, 0], 0.5) == 0.05


def test_batch_sizes_are_counted_exactly_and_exported_cumulatively():
    sizes = SizeHistogram(12)
    for n in (1, 1, 3, 12, 7):
        sizes.observe(n)
    assert sizes.pairs() == [[1, 2], [3, 1], [7, 1], [12, 1]] and sizes.sum == 24
    assert sizes.buckets() == [(1, 2), (2, 2), (4, 3), (8, 4), (12, 5)]


# rate windows -------------------------------------------------------------------------------------
def test_rates_over_1_10_60_seconds_follow_the_traffic():
    w = Window()
    t = 1000.0
    for _ in range(1200):                             # 120 s of 10-frame batches every 0.1 s, half busy
        w.add(t, t + 0.05, 10)
        t += 0.1
    fps, busy = w.rates(t, since=0.0)
    for window in (1, 10, 60):
        assert fps[window] == pytest.approx(100.0, rel=0.05), window
        assert busy[window] == pytest.approx(0.5, rel=0.05), window
    fps, busy = w.rates(t + 5.0, since=0.0)           # 5 s of silence
    assert fps[1] == 0.0 and busy[1] == 0.0
    assert fps[10] == pytest.approx(100.0 * 5 / 10, rel=0.15)
    assert fps[60] == pytest.approx(100.0 * 55 / 60, rel=0.05)
    fps, _ = w.rates(t + 120.0, since=0.0)            # the ring forgot it all
    assert fps == {1: 0.0, 10: 0.0, 60: 0.0}


def test_busy_time_is_split_over_the_seconds_a_batch_spans():
    w = Window()
    w.add(9.5, 11.25, 8)
    by_second = {w.sec[i]: w.busy[i] for i in range(len(w.sec)) if w.sec[i] >= 0}
    assert by_second == pytest.approx({9: 0.5, 10: 1.0, 11: 0.25})
    assert sum(w.frames) == 8 and w.frames[11 % len(w.sec)] == 8   # frames count when the batch ends
    # a window reaching back before the daemon started is measured from its start
    fps, busy = w.rates(11.5, since=9.5)
    assert busy[60] == pytest.approx(1.75 / 2.0) and fps[60] == pytest.approx(8 / 2.0)


def test_device_utilisation_through_stats():
    clock = Clock(50.0)
    dev = Device(0, "cpu", 1)
    stats = Stats(Config(), [dev], clock)
    clock.now = 60.0
    done = [BatchEntry(SimpleNamespace(session=object()), 0, Outcome.DONE) for _ in range(3)]
    result = BatchResult(dev, done, started=58.0, finished=59.5)
    stats.batch(result, [], 60.0)
    rec = stats.devices[dev]
    fps, busy = stats.rates(rec)
    assert busy[10] == pytest.approx(1.5 / 10) and fps[10] == pytest.approx(3 / 10)
    assert rec.frames == 3 and rec.batches == 1 and rec.busy == pytest.approx(1.5)
    assert rec.sizes.pairs() == [[3, 1]]


# the scheduler keeps them -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spec():
    return ModelSpec("shapes", 64, 64, (0.5,) * 3, (0.25,) * 3, tuple("abcdefgh"), 5)


def scheduler(spec, clock, enabled=True, queue_limit=1024):
    cfg = Config()
    cfg.metrics.enabled = enabled
    cfg.batching.queue_limit = queue_limit
    dev = Device(0, "cpu", 1)
    return Scheduler(cfg, SimpleNamespace(spec=spec, digest="digest", gen=0), [dev], clock), dev


def classify(spec, slot, **extra):
    return {"op": "classify", "slot": slot, "nbytes": spec.frame_bytes, "dtype": "uint8",
            "shape": list(spec.frame_shape), **extra}


def run_batch(sched, dev, started, finished, clock_at_reply, clock):
    taken = dev.queue.drain()
    result = BatchResult.taking(dev, taken)
    for e in result.entries:
        e.outcome, e.top = Outcome.DONE, [[0, 1.0]]
    result.started, result.finished = started, finished
    clock.now = clock_at_reply
    sched.on_batch_done(result)
    return taken


def test_per_uid_slots_go_up_at_admission_and_down_at_the_reply(spec):
    clock = Clock(10.0)
    sched, dev = scheduler(spec, clock)
    stats = sched.stats
    alice, alice2, bob = FakeSession(1000, spec.frame_bytes), FakeSession(1000, spec.frame_bytes), FakeSession(2000, spec.frame_bytes)
    for s in (alice, alice2, bob):
        stats.session_opened(s.peer[1])
    for slot in range(3):
        sched.submit(alice, slot, classify(spec, slot, timeout_ms=800))
    sched.submit(alice2, 0, classify(spec, 0, timeout_ms=5000))
    sched.submit(bob, 0, classify(spec, 0, timeout_ms=5000))
    assert (stats.uids[1000].sessions, stats.uids[1000].in_flight, stats.uids[2000].in_flight) == (2, 4, 1)
    with pytest.raises(Rejected):
        sched.submit(bob, 0, classify(spec, 0))            # slot busy: refused, not admitted
    with pytest.raises(Rejected):
        sched.submit(bob, 1, classify(spec, 1, shape=[1, 2, 3]))
    assert stats.uids[2000].in_flight == 1 and stats.uids[2000].requests == 1
    # one batch: admitted at 10.0, started 10.5, finished 10.7, replies written at 11.0
    run_batch(sched, dev, 10.5, 10.7, 11.0, clock)
    assert all(u.in_flight == 0 for u in stats.uids.values())
    assert stats.outcomes == {"ok": 5, "slot_busy": 1, "invalid_input": 1}
    assert stats.late == 3                                  # alice's three had 800 ms
    for phase, seconds in (("queue", 0.5), ("compute", 0.2), ("reply", 0.3), ("total", 1.0)):
        h = stats.latency[phase]
        assert h.count == 5, phase
        i = LATENCY_BOUNDS.index(next(b for b in LATENCY_BOUNDS if b >= seconds - 1e-9))
        assert LATENCY_BOUNDS[i - 1] <= h.quantile(0.5) <= LATENCY_BOUNDS[i], phase
    assert stats.devices[dev].sizes.pairs() == [[5, 1]]
    assert stats.devices[dev].latency.count == 5 and 0.631 <= stats.devices[dev].latency.quantile(0.5) <= 1.0
    stats.session_closed(1000)
    assert stats.uids[1000].sessions == 1
    assert sched.stats.snapshot()["uids"] == [
        {"uid": 1000, "sessions": 1, "in_flight": 0, "requests": 4},
        {"uid": 2000, "sessions": 1, "in_flight": 0, "requests": 1}]


def test_refusals_expiries_and_drops_are_outcomes_and_free_their_slots(spec):
    clock = Clock(10.0)
    sched, dev = scheduler(spec, clock, queue_limit=2)
    s = FakeSession(1000, spec.frame_bytes)
    sched.submit(s, 0, classify(spec, 0))
    sched.submit(s, 1, classify(spec, 1))
    with pytest.raises(Rejected) as exc:
        sched.submit(s, 2, classify(spec, 2))
    assert exc.value.code == wire.E_OVERLOADED
    taken = dev.queue.drain()
    result = BatchResult.taking(dev, taken)
    for e, outcome in zip(result.entries, (Outcome.EXPIRED, Outcome.DROPPED)):
        e.outcome = outcome
    result.started = result.finished = 10.1
    sched.on_batch_done(result)
    assert sched.stats.outcomes == {"overloaded": 1, "deadline_exceeded": 1, "dropped": 1}
    assert sched.stats.uids[1000].in_flight == 0 and not s.inflight
    assert sched.stats.latency["total"].count == 0          # nothing computed: no latency kept
    sched.draining = True
    with pytest.raises(Rejected):
        sched.submit(s, 3, classify(spec, 3))
    assert sched.stats.outcomes["shutting_down"] == 1


def test_metrics_disabled_keeps_counters_but_no_histograms(spec):
    clock = Clock(10.0)
    sched, dev = scheduler(spec, clock, enabled=False)
    s = FakeSession(1000, spec.frame_bytes)
    sched.submit(s, 0, classify(spec, 0, timeout_ms=100))
    run_batch(sched, dev, 10.01, 10.02, 10.5, clock)
    stats = sched.stats
    assert stats.outcomes["ok"] == 1 and stats.late == 1 and stats.devices[dev].frames == 1
    assert all(h.count == 0 for h in stats.latency.values()) and stats.devices[dev].sizes.pairs() == []


def test_stalls_count_idle_time_only_while_work_waited(spec):
    clock = Clock(10.0)
    sched, dev = scheduler(spec, clock)
    s = FakeSession(1000, spec.frame_bytes)
    sched.submit(s, 0, classify(spec, 0))                  # arrives 10.0, starts 10.5: 0.5 s stalled
    run_batch(sched, dev, 10.5, 10.7, 10.7, clock)
    clock.now = 10.6                                        # arrives while the first computes ...
    sched.submit(s, 1, classify(spec, 1))
    run_batch(sched, dev, 10.75, 10.8, 10.8, clock)         # ... and starts 50 ms after it ended
    clock.now = 12.0                                        # nothing waited: the device was just idle
    sched.submit(s, 2, classify(spec, 2))
    run_batch(sched, dev, 12.0, 12.1, 12.1, clock)
    rec = sched.stats.devices[dev]
    assert rec.stall == pytest.approx(0.55) and rec.stalls.count == 3
    summary = sched.stats.snapshot()["devices"][0]
    assert summary["stall_s"] == pytest.approx(0.55) and summary["queue_wait"]["count"] == 3
    assert summary["idle_ratio"]["60s"] == pytest.approx(1 - summary["busy_ratio"]["60s"], abs=1e-4)


def test_health_transitions_keep_state_and_time(spec):
    clock = Clock(10.0)
    sched, dev = scheduler(spec, clock)
    clock.now = 12.5
    for _ in range(sched.cfg.health.max_failures):
        sched.health.batch_failed(dev, False, "boom")
    rec = sched.stats.devices[dev]
    assert rec.state == "out" and rec.since == 12.5 and rec.transitions == {"out": 1}
    clock.now = 14.0
    summary = sched.stats.snapshot()["devices"][0]
    assert summary["state"] == "out" and summary["state_for_s"] == 1.5


def test_prometheus_families_of_a_snapshot_parse_back(spec):
    clock = Clock(10.0)
    sched, dev = scheduler(spec, clock)
    s = FakeSession(1000, spec.frame_bytes)
    for slot in range(4):
        sched.submit(s, slot, classify(spec, slot))
    run_batch(sched, dev, 10.0012, 10.004, 10.005, clock)
    snap = sched.stats.snapshot()
    snap.update(model={"name": "shapes", "digest": "d" * 8, "gen": 0}, pid=1, policy="weighted",
                in_flight=sched.outstanding, sessions={"open": 1, "opened": 1}, cache=sched.caches.stats())
    assert wire.decode_body(wire.encode(snap)[wire.HEADER_SIZE:]) == snap      # msgpack carries it as is
    text = generate_latest(SnapshotCollector(lambda: snap)).decode()
    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value
               for fam in text_string_to_metric_families(text) for x in fam.samples}
    one = {"model": "shapes", "version": "1"}           # a one-model daemon labels every series

    def at(name, **labels):
        return samples[(name, tuple(sorted({**one, **labels}.items())))]
    assert at("inferd_requests_total", outcome="ok") == 4
    assert at("inferd_request_duration_seconds_count", phase="total") == 4
    assert at("inferd_request_duration_seconds_bucket", le="+Inf", phase="queue") == 4
    assert at("inferd_request_duration_seconds_bucket", le="0.001", phase="queue") == 0
    assert at("inferd_request_duration_seconds_bucket", le="0.00158", phase="queue") == 4
    assert at("inferd_device_batch_size_bucket", device="cpu#0", le="2") == 0
    assert at("inferd_device_batch_size_bucket", device="cpu#0", le="4") == 1
    assert samples[("inferd_uid_requests_total", (("uid", "1000"),))] == 4
    assert samples[("inferd_device_state", (("device", "cpu#0"), ("state", "healthy")))] == 1


def test_metrics_listen_accepts_loopback_only():
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("localhost:9464") == ("localhost", 9464)
    for bad in ("0.0.0.0:9464", "10.1.2.3:80", "[::]:9464", "example.com:9464", "127.0.0.1", "127.0.0.1:x",
                "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="metrics.listen"):
            parse_listen(bad)


# the cache keeps its count ------------------------------------------------------------------------
def test_cache_entries_used_are_kept_by_insert_and_flush_not_scanned(tmp_path):
    path = str(tmp_path / "c.cache")
    cache = ResultCache.open_writer(path, 4096 + 2 * 8 * (48 + 8 * 4), max_k=4)   # 2 sets of 8 ways
    rng = np.random.default_rng(3)
    keys = [secrets.token_bytes(32) for _ in range(40)]
    for i in range(200):
        cache.insert(keys[rng.integers(len(keys))], [(i % 7, 0.5)])
        assert cache.used == np.count_nonzero(cache._stamps), i           # ways written since the open
    assert cache.stats()["used"] == cache.used == 16                    # full: every way holds one
    cache.flush()
    assert cache.used == np.count_nonzero(cache._stamps) == 0
    cache.insert(keys[0], [(1, 0.5)])
    cache.close()
    reopened = ResultCache.open_writer(path, 4096 + 2 * 8 * (48 + 8 * 4), max_k=4)
    assert reopened.used == 0 and reopened.lookup(keys[0]) == [(1, 0.5)]   # the file holds no count
    reopened.insert(keys[1], [(1, 0.5)])
    assert reopened.used == 1
    reopened.close()
