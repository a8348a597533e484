"""A pool of devices with real daemons: dispatch by speed, faults (raise, hang, mid-batch), removal
within 2 s, re-admission by canary, NoHealthyDevice, Overloaded and DeadlineExceeded.

The daemons serve the ``synthetic`` model (inferd.daemon.models.zoo.synthetic): its batches cost a known
sleep scaled per device, and faults are injected per device by rewriting its control file. Every
frame is a grey level whose class is known, so a misrouted answer shows; the client raises
ProtocolError on a reply for an id it is not waiting for, so a request answered twice shows too.
"""
import json
import os
import threading
import time

import numpy as np
import pytest

from helpers import spawn_daemon, wait_until
from inferd.client import Client, DeadlineExceeded, InvalidInput, NoHealthyDevice, Overloaded
from inferd.daemon.models.zoo.synthetic import level_of

pytestmark = pytest.mark.timeout(180)

REMOVAL_BOUND_S = 2.0


class Pool:
    def __init__(self, fresh_daemon, speeds=(1.0, 1.0), *args, base_ms=2.0, per_frame_ms=0.5):
        from helpers import short_dir
        self.workdir = short_dir()
        self.control = os.path.join(self.workdir, "synthetic.json")
        self.values = {"base_ms": base_ms, "per_frame_ms": per_frame_ms,
                       "speed": {str(i): s for i, s in enumerate(speeds)}, "fault": {}}
        self.write()
        devices = [a for _ in speeds for a in ("--device", "cpu:1")]
        os.environ["INFERD_SYNTHETIC"] = self.control     # inherited by the daemon
        try:
            # the frames repeat (256 grey levels): with the cache on, most would never reach a device
            self.d = fresh_daemon(*devices, "--set", "cache.enabled=false", *args, model="synthetic",
                                  workdir=self.workdir)
        finally:
            del os.environ["INFERD_SYNTHETIC"]

    def write(self):
        tmp = self.control + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.values, fh)
        os.replace(tmp, self.control)                      # readers see old or new, never half

    def fault(self, index: int, what: str | None):
        if what is None:
            self.values["fault"].pop(str(index), None)
        else:
            self.values["fault"][str(index)] = what
        self.write()

    def info(self):
        with Client(self.d.socket_path) as c:
            return c.info()

    def state(self, index):
        return self.info()["devices"][index]["state"]


def frames(n, seed=0):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 256, n)
    return values, [np.full((16, 16, 3), v, np.uint8) for v in values]


def check_answers(values, results):
    assert len(results) == len(values)
    assert [r[0].index for r in results] == [level_of(v) for v in values]


def flood(pool, n, seed, out, clients=2, timeout=60.0):
    """``clients`` threads, each its own Client, classify_many over n frames; thread k puts
    (values, results) or the exception it met at ``out[k]`` (a dict)."""
    def work(k):
        values, imgs = frames(n, seed + k)
        try:
            with Client(pool.d.socket_path, ring_slots=64, timeout=timeout) as c:
                out[k] = (values, c.classify_many(imgs, top_k=1))
        except Exception as exc:  # collected; the test asserts there were none
            out[k] = exc
    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    return threads


def finish(threads, out):
    """Join the flood's threads and check that every one of them produced its result, with the
    right answers: a thread still stuck, or one that ended without a result, fails the test."""
    for t in threads:
        t.join(120)
    assert not [t.name for t in threads if t.is_alive()], "a flood client is still waiting after 120 s"
    assert sorted(out) == list(range(len(threads))), f"results from threads {sorted(out)} only"
    for k, item in out.items():
        assert not isinstance(item, Exception), (k, item)   # a duplicate reply raises ProtocolError
        check_answers(*item)


def flood_and_check(pool, n, seed):
    """Two clients classify n frames each to the end; every answer is the right one."""
    out = {}
    finish(flood(pool, n, seed=seed, out=out), out)


@pytest.mark.timing
def test_a_faster_device_gets_proportionally_more_work(fresh_daemon):
    pool = Pool(fresh_daemon, speeds=(1.0, 3.0))
    flood_and_check(pool, 800, seed=1)
    devs = pool.info()["devices"]
    slow, fast = devs[0]["frames"], devs[1]["frames"]
    assert slow + fast == 1600
    # clearly more than its half (3x the capacity: 3/4 at saturation, which the next test checks
    # to 0.65-0.85); this flood of 2 x 800 ends in waves the slow device shares, 1.97x once in CI
    assert fast > 1.8 * slow, (slow, fast)


@pytest.mark.timing
def test_a_saturated_pool_splits_work_by_capacity_and_stages_the_fast_device_in_time(fresh_daemon):
    # a batch of n costs (2 + 1 n) ms / speed: full batches of 32 take 34 ms on device 0 and 11.3 ms
    # on device 1, so at capacity device 1 does 3/4 of the work; 4 clients x 64 frames in flight
    # keep both queues deeper than a batch
    pool = Pool(fresh_daemon, speeds=(1.0, 3.0), base_ms=2.0, per_frame_ms=1.0)
    out = {}
    finish(flood(pool, 1500, seed=3, out=out, clients=4), out)
    slow, fast = pool.info()["devices"]
    assert slow["frames"] + fast["frames"] == 6000
    share = fast["frames"] / 6000
    assert 0.65 <= share <= 0.85, (slow["frames"], fast["frames"])
    # the fast device's collector closes each batch early enough (the staging lead, NOTE [ batch
    # planning ] rule 0) that the device seldom idles waiting for it: about one batch in ten on a
    # loaded host, and never more than half the batch's time ahead
    batches = fast["frames"] / 32
    assert fast["late_handovers"] <= 0.3 * batches, (fast["late_handovers"], batches)
    assert fast["stage_lead_ms"] <= 0.5 * max(fast["batch_ms"].values()) + 0.5, fast


@pytest.mark.timing
@pytest.mark.parametrize("fault", ["raise", "hang"])
def test_a_failing_device_leaves_within_2s_and_nothing_is_lost_or_doubled(fresh_daemon, fault):
    pool = Pool(fresh_daemon, (1.0, 1.0), "--set", "health.backoff_s=0.3", "--set", "health.max_failures=2")
    out = {}
    threads = flood(pool, 1500, seed=7, out=out)
    wait_until(lambda: pool.info()["devices"][1]["frames"] > 50, what="device 1 serving")
    t_fault = time.monotonic()
    pool.fault(1, fault)                                     # fails mid-batch from now on
    wait_until(lambda: pool.state(1) != "healthy", timeout=10, what="device 1 out of rotation")
    removal = time.monotonic() - t_fault
    assert removal < REMOVAL_BOUND_S, f"removed after {removal:.2f} s"
    pool.fault(1, None)                                      # recover: a canary brings it back
    wait_until(lambda: pool.state(1) == "healthy", timeout=10, what="device 1 re-admitted")
    finish(threads, out)
    info = pool.info()
    assert info["counters"]["health_out"] >= 1 and info["counters"]["health_healthy"] >= 1
    assert sum(d["frames"] for d in info["devices"]) == 3000
    assert info["outstanding"] == 0
    if fault == "hang":                                      # the stuck batch came back late, unused
        assert info["counters"].get("stale_results", 0) >= 1
        # and taught the profile nothing: an honest batch here takes at most 2 + 0.5 * 32 = 18 ms
        assert max(info["devices"][1]["batch_ms"].values()) < 100, info["devices"][1]["batch_ms"]


def test_no_healthy_device_fails_at_once(fresh_daemon):
    pool = Pool(fresh_daemon, (1.0, 1.0), "--set", "health.max_failures=1", "--set", "health.backoff_s=60",
                "--set", "health.backoff_max_s=60")
    _, imgs = frames(4)
    pool.fault(0, "raise")
    pool.fault(1, "raise")
    with Client(pool.d.socket_path) as c:
        with pytest.raises(NoHealthyDevice):                 # raises on both: the last one left
            c.classify_many(imgs)
        wait_until(lambda: all(d["state"] == "out" for d in c.info()["devices"]), what="both out")
        t0 = time.monotonic()
        with pytest.raises(NoHealthyDevice, match="no device is in rotation"):
            c.classify(imgs[0])
        assert time.monotonic() - t0 < 1.0                   # refused at admission, not queued


def test_overloaded_at_admission_with_a_retry_hint(fresh_daemon):
    # one slow device: a batch of 32 takes (20 + 32 * 5) ms = 180 ms
    pool = Pool(fresh_daemon, (1.0,), base_ms=20.0, per_frame_ms=5.0)
    out = {}
    threads = flood(pool, 300, seed=3, out=out, clients=2)
    wait_until(lambda: pool.info()["devices"][0]["queued"] >= 40, what="a backlog over one full batch")
    _, imgs = frames(1)
    with Client(pool.d.socket_path) as c:
        with pytest.raises(Overloaded) as err:
            c.classify(imgs[0], timeout=0.05)                # cannot finish within 50 ms
        assert err.value.retry_after > 0 and "after its deadline" in str(err.value)
    finish(threads, out)


def test_deadline_passed_while_queued_is_not_computed(fresh_daemon):
    pool = Pool(fresh_daemon, (1.0,))
    values, imgs = frames(3, seed=5)
    pool.fault(0, "slow:100")                                # a batch of 1 now takes ~250 ms
    first = []
    with Client(pool.d.socket_path) as busy, Client(pool.d.socket_path) as c:
        before = c.info()["counters"]
        t = threading.Thread(target=lambda: first.append(busy.classify(imgs[0], timeout=30)))
        t.start()
        running = lambda: (lambda d: d["outstanding"] == 1 and d["queued"] == 0)(c.info()["devices"][0])
        wait_until(running, what="the first request running (held, not queued)")
        # admitted (the profile has not seen the slow-down yet), then expire behind the first
        with pytest.raises(DeadlineExceeded, match="not computed"):
            c.classify_many(imgs[1:], timeout=0.1)
        t.join(30)
        after = c.info()["counters"]
    assert first and first[0][0].index == level_of(values[0])
    assert after["expired"] - before.get("expired", 0) == 2
    assert after["frames"] - before.get("frames", 0) == 1


def test_round_robin_policy_is_selectable(fresh_daemon):
    pool = Pool(fresh_daemon, (1.0, 3.0), "--set", 'dispatch.policy="round_robin"')
    flood_and_check(pool, 400, seed=9)
    info = pool.info()
    assert info["policy"] == "round_robin"
    slow, fast = (d["frames"] for d in info["devices"])
    assert abs(slow - fast) <= 2                             # turns, whatever the speed
