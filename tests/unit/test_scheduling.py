"""Batch planning, latency profiles, device queues, dispatch policies and the health state machine,
driven by injected clocks and plain numbers: nothing here waits on real time."""
import collections
import math
from types import SimpleNamespace

import pytest

from helpers import Clock

from inferd.daemon.dispatch import policy as policies
from inferd.daemon.config import HealthConfig
from inferd.daemon.dispatch.device import HEALTHY, OUT, PROBING, Device
from inferd.daemon.dispatch.health import HealthMonitor
from inferd.daemon.dispatch.profile import LatencyProfile
from inferd.daemon.dispatch.queues import GRACE, LEAD, DeviceQueue, StagingLead, ThinkTime, plan_batch


def req(arrived=100.0, deadline=200.0):
    return SimpleNamespace(arrived=arrived, deadline=deadline, attempt=0)


def linear(base, per):               # a latency profile as a function: base + per * b seconds
    return lambda b: base + per * b


# plan_batch -------------------------------------------------------------------------------------
def test_fixed_window_full_batch_goes_at_once_and_a_lone_frame_waits_exactly_max_delay():
    full = [req() for _ in range(4)]
    assert plan_batch(100.0, full, linear(0, 0), 4, 0.002, math.inf, adaptive=False) == (4, 0.0)
    assert plan_batch(100.0, [req()], linear(0, 0), 4, 0.002, math.inf, adaptive=False) == (0, 100.002)
    assert plan_batch(100.002, [req()], linear(0, 0), 4, 0.002, math.inf, adaptive=False) == (1, 0.0)


def test_fixed_window_counts_from_arrival_so_time_spent_queued_is_not_waited_again():
    old = [req(arrived=99.990), req(arrived=99.995)]
    assert plan_batch(100.0, old, linear(0, 0), 32, 0.002, math.inf, adaptive=False) == (2, 0.0)


def test_adaptive_low_load_does_not_sit_through_the_window():
    # next arrival expected in 50 ms, the window is 2 ms: waiting cannot help
    assert plan_batch(100.0, [req()], linear(0.005, 0.001), 32, 0.002, gap=0.050) == (1, 0.0)


def test_adaptive_waits_when_company_is_expected_inside_the_window():
    n, until = plan_batch(100.0, [req()], linear(0.005, 0.001), 32, 0.004, gap=0.0005)
    assert n == 0 and until == pytest.approx(100.004)


def test_adaptive_never_waits_past_what_the_deadline_allows():
    # deadline 10 ms away, one arrival per ms, L(b) = 5 + b ms: a batch of 3 starting at 100.002
    # ends at 100.010 (meets it), a batch of 4 from 100.003 would end at 100.012: wait for the 3
    n, until = plan_batch(100.0, [req(deadline=100.010)], linear(0.005, 0.001), 32, 0.008, gap=0.001)
    assert n == 0 and until == pytest.approx(100.002)
    # expected company arrives too late for the deadline: go now
    assert plan_batch(100.0, [req(deadline=100.010)], linear(0.005, 0.001), 32, 0.008, gap=0.004) == (1, 0.0)


def test_adaptive_batch_size_keeps_the_oldest_deadline():
    # 10 queued, the oldest due in 11.9 ms; L(b) = 2 ms + 1 ms * b: L(10) = 12 ms misses it,
    # so a batch of 9 (11 ms) leaves now and the tenth waits for the next
    queued = [req(deadline=100.0119)] + [req(deadline=101.0) for _ in range(9)]
    assert plan_batch(100.0, queued, linear(0.002, 0.001), 32, 0.002, gap=0.0001) == (9, 0.0)


def test_adaptive_full_batch_goes_at_once():
    queued = [req() for _ in range(40)]
    assert plan_batch(100.0, queued, linear(0.002, 0.001), 32, 0.002, gap=0.0001) == (32, 0.0)


def test_a_backlog_is_never_shrunk_to_save_its_oldest():
    # the oldest is due in 5 ms and a batch of 32 takes 34 ms: still a full batch (its doomed
    # requests are answered deadline_exceeded uncomputed by the device thread)
    queued = [req(deadline=100.005)] + [req(deadline=101.0) for _ in range(39)]
    assert plan_batch(100.0, queued, linear(0.002, 0.001), 32, 0.002, gap=0.0001) == (32, 0.0)


def test_a_busy_device_waits_for_company_until_just_before_it_is_free():
    # the running batch ends at 100.020: a lone request waits (for free) until LEAD before that
    n, until, listen = plan_batch(100.0, [req()], linear(0.005, 0.001), 32, 0.002, math.inf, free_at=100.020)
    assert n == 0 and until == pytest.approx(100.020 - LEAD) and not listen
    # ... a full batch too: closed at the last moment, it takes whoever the fair order puts first then
    full = [req() for _ in range(40)]
    assert plan_batch(100.0, full, linear(0.005, 0.001), 32, 0.002, math.inf, free_at=100.020)[:2] == \
        (0, pytest.approx(100.020 - LEAD))
    # ... whatever the window says: the window is about waiting on an idle device
    assert plan_batch(100.0195, [req(arrived=99.9)], linear(0.005, 0.001), 32, 0.002, math.inf,
                      free_at=100.020) == (1, 0.0)


def test_deadlines_are_checked_from_when_the_device_will_be_free():
    # free at 100.010, staged from LEAD before; L(b) = 2 + 1 b ms; the oldest is due at 100.0145:
    # from 100.010 only a batch of up to 2 (4 ms) meets it, so 2 go to be staged, not all 3
    queued = [req(deadline=100.0145), req(), req()]
    assert plan_batch(100.010 - LEAD / 2, queued, linear(0.002, 0.001), 32, 0.002, math.inf,
                      free_at=100.010) == (2, 0.0)


def test_closed_loop_clients_expected_back_are_waited_for():
    # 4 closed-loop clients: one is back, three are expected within 0.3 ms; the smoothed gap
    # (about a batch time over four, past the window here) alone says go: batches of 1.7 were
    # seen before this rule
    lat = linear(0.008, 0.003)
    assert plan_batch(100.0, [req()], lat, 16, 0.005, gap=0.006) == (1, 0.0)
    expected = [100.0001, 100.0002, 100.0003]
    n, until = plan_batch(100.0, [req()], lat, 16, 0.005, gap=0.005, expected=expected)
    assert n == 0 and until == pytest.approx(100.0003)            # the last of the three


def test_half_batches_wait_for_the_other_half_about_to_come_back():
    # 8 of 16 clients queued while the other 8 compute; L(b) = 20 + 2.5 b ms: L(8) = 40, L(16) = 60.
    # Going at once gives 8 / 40 ms; the running 8 come back 1 ms after the device is free: 16 / 61
    # ms is faster, so wait, though the 8 queued arrived long before the window (the device was busy)
    lat = linear(0.020, 0.0025)
    queued = [req(arrived=99.97) for _ in range(8)]
    back = [100.001] * 8
    n, until = plan_batch(100.0, queued, lat, 16, 0.005, math.inf, free_at=100.0, expected=back,
                          idle_since=100.0)
    assert n == 0 and until == pytest.approx(100.001)
    # counted from the arrivals instead, the window is long closed: no waiting
    assert plan_batch(100.0, queued, lat, 16, 0.005, math.inf, free_at=100.0, expected=back) == (8, 0.0)


def test_expected_arrivals_are_not_waited_for_when_batching_does_not_pay():
    # no fixed cost per batch (L(b) = 10 ms x b): a bigger batch is no faster per frame
    expected = [100.0001, 100.0002]
    assert plan_batch(100.0, [req()], linear(0.0, 0.010), 16, 0.005, math.inf, expected=expected) == (1, 0.0)


def test_an_overdue_arrival_is_waited_for_until_given_up_not_polled():
    # expected at 99.9995, not here at 100.0: wait until GRACE after it was due, one wake-up
    n, until = plan_batch(100.0, [req()], linear(0.008, 0.001), 16, 0.005, math.inf, expected=[99.9995])
    assert n == 0 and until == pytest.approx(99.9995 + GRACE)
    # and never past the window of the first request
    n, until = plan_batch(100.0, [req(arrived=99.9965)], linear(0.008, 0.001), 16, 0.005, math.inf,
                          expected=[99.9995])
    assert n == 0 and until == pytest.approx(100.0015)


def test_an_arrival_given_up_on_exactly_now_is_not_waited_for():
    # due 2 ms (GRACE) ago: waiting "until now" would have the collector plan again at once, forever
    n, *_ = plan_batch(100.0, [req() for _ in range(15)], linear(0.0095, 0.0013), 16, 0.005, math.inf,
                       free_at=100.0, expected=[100.0 - GRACE], idle_since=100.0)
    assert n == 15


def test_queue_counts_expected_arrivals_down_and_forgets_overdue_ones():
    clock = Clock(100.0)
    q = DeviceQueue(clock=clock)
    a, b = object(), object()
    q.expect(a, 2, 100.001)
    q.expect(b, 1, 100.002)
    seen = []

    def plan(now, queued, expected):
        seen.append(list(expected))
        return 1, 0.0

    q.put(SimpleNamespace(session=a, arrived=100.0, deadline=200.0))
    q.take(plan, 0.0)
    assert seen[-1] == [100.001, 100.002]                         # a: 2 - 1 left, b: 1
    q.arrived(b)                                                   # b's went to another device
    clock.now += 0.001 + GRACE + 0.0001                          # a's is overdue by > GRACE
    q.put(SimpleNamespace(session=None, arrived=clock(), deadline=200.0))
    q.take(plan, 0.0)
    assert seen[-1] == []


@pytest.mark.timeout(30)
def test_arrivals_do_not_wake_a_planner_waiting_on_a_busy_device_but_its_executor_does():
    import threading
    q = DeviceQueue()
    notified = []
    real_notify = q._cond.notify
    q._cond.notify = lambda *a: (notified.append(1), real_notify(*a))
    planned, free = threading.Event(), threading.Event()

    def plan(now, queued, expected):
        planned.set()
        return (len(queued), 0.0) if free.is_set() else (0, now + 60.0, False)   # busy a minute

    q.put(req())
    got = []
    t = threading.Thread(target=lambda: got.append(q.take(plan, 60.0)))
    t.start()
    assert planned.wait(10)
    notified.clear()
    q.put(req())                                                   # rule 0: no wake-up for it
    assert notified == [] and t.is_alive()
    free.set()
    q.poke()                                                       # the batch ended early
    t.join(10)
    assert not t.is_alive() and len(got[0]) == 2


def test_the_staging_lead_grows_on_late_handovers_and_shrinks_on_timely_ones_within_bounds():
    lead, batch = StagingLead(), 0.020                      # a 20 ms batch: floor 2 ms, cap 10 ms
    assert lead.seconds(batch) == pytest.approx(0.002)
    assert lead.seconds(0.0) == LEAD                        # nothing running: the copy's lead
    # late: the device went idle at 100.000 with the whole batch queued, handed over 2 ms later
    lead.handed(busy=False, free_since=100.0, queued_by=99.9, batch=batch, now=100.002)
    assert lead.late == 1 and lead.seconds(batch) == pytest.approx(0.002 + 0.9 * 0.001)
    for _ in range(100):
        lead.handed(False, 100.0, 99.9, batch, 100.002)
    assert lead.seconds(batch) == pytest.approx(0.010)     # half the batch at most
    assert lead.seconds(0.004) == pytest.approx(0.002)     # ... of the batch running now
    # in time: nine of them undo one late handover, and it never goes below the floor
    before = lead.seconds(batch)
    for _ in range(9):
        lead.handed(True, 100.0, 99.9, batch, 100.5)
    assert lead.in_time == 9 and before - lead.seconds(batch) == pytest.approx(0.9 * 0.001)
    for _ in range(1000):
        lead.handed(True, 100.0, 99.9, batch, 100.5)
    assert lead.seconds(batch) == pytest.approx(0.002)
    # idle, but a request of the batch came after the device went idle (no work, or company
    # waited for): no lesson
    lead.handed(False, 100.0, 100.001, batch, 100.002)
    assert lead.late == 101 and lead.seconds(batch) == pytest.approx(0.002)


def test_a_device_judges_a_handover_by_what_its_executor_holds():
    (dev,) = make_devices(linear(0.010, 0.001))
    entries = [SimpleNamespace(request=req(arrived=99.0)) for _ in range(32)]
    dev.last_finished = 100.0
    dev.staged = [object()]                                 # a batch staged: in time
    dev.handover(entries, 100.5, full=True)
    dev.staged, dev.running = [], [object()]                # moving to running: still in time
    dev.handover(entries, 100.5, full=True)
    dev.running = []
    dev.handover(entries, 100.5, full=False)                # idle, but a partial batch: no lesson
    assert (dev.lead.late, dev.lead.in_time) == (0, 2)
    dev.handover(entries, 100.5, full=True)                 # idle with a full batch queued: late
    assert dev.lead.late == 1 and dev.describe()["late_handovers"] == 1
    assert dev.describe()["stage_lead_ms"] == pytest.approx(LEAD * 1000)   # nothing running


def test_think_time_is_learnt_from_reply_to_next_request_and_sets_expectations():
    clock = Clock(100.0)
    q = DeviceQueue(clock=clock)
    session, think = object(), ThinkTime()
    think.replied(session, 100.0, 1, q, horizon=0.005)             # nothing learnt yet: no expectation
    think.submitted(session, 100.0004, q)
    assert think.seconds == pytest.approx(0.0004)
    think.replied(session, 100.010, 3, q, horizon=0.005)
    seen = []
    q.put(SimpleNamespace(session=session, arrived=100.0104, deadline=200.0))
    q.take(lambda now, queued, expected: (seen.append(list(expected)), (1, 0.0))[1], 0.0)
    assert seen == [[pytest.approx(100.0104)] * 2]                 # 3 expected, 1 came
    think.submitted(session, 100.020, q)                           # a slow one: smoothed, not replaced
    assert think.seconds == pytest.approx(0.0004 + 0.2 * (0.010 - 0.0004))
    slow = ThinkTime()
    slow.seconds = 0.050                                           # past the horizon: nothing expected
    slow.replied(object(), 100.0, 1, q, horizon=0.005)
    assert len(q._expected) == 1


# profile ----------------------------------------------------------------------------------------
def test_profile_smooths_per_size_and_interpolates():
    p = LatencyProfile(alpha=0.5)
    assert p.latency(8) == 0.0 and not p.known
    p.observe(1, 0.010)
    assert p.latency(4) == pytest.approx(0.040)              # one size: proportional
    p.observe(16, 0.040)
    assert p.latency(8) == pytest.approx(0.010 + 0.030 * 7 / 15)
    assert p.latency(32) == pytest.approx(0.080)             # not cheaper per frame than b=16
    p.observe(16, 0.060)
    assert p.latency(16) == pytest.approx(0.050)             # EWMA, alpha 0.5
    assert p.throughput(16) == pytest.approx(320.0)
    assert p.snapshot() == {"1": 10.0, "16": 50.0}



def test_profile_seeded_by_warmup_ignores_a_cold_first_batch():
    """A warm-up's first batch pays for cold caches and threads: the profile starts at the typical
    batch of the warm-up, so the capacity a host reports at start is what it delivers."""
    samples = [0.100, 0.022, 0.023, 0.022, 0.021, 0.022, 0.024, 0.022]
    seeded = LatencyProfile()
    seeded.seed(32, samples)
    assert seeded.latency(32) == pytest.approx(0.022)
    averaged = LatencyProfile()
    for s in samples:
        averaged.observe(32, s)
    assert averaged.latency(32) > 0.036                      # what a moving average from the first kept
    seeded.observe(32, 0.032)                                # and later batches move it as before
    assert seeded.latency(32) == pytest.approx(0.024)
    seeded.seed(32, [0.050, 0.040])                          # a new warm-up (a reload) replaces it
    assert seeded.latency(32) == pytest.approx(0.040)

# queue ------------------------------------------------------------------------------------------
def test_queue_take_steal_drain_and_put_front():
    clock = iter(range(1000)).__next__
    q = DeviceQueue(clock=lambda: float(clock()))
    items = [req(arrived=i) for i in range(6)]
    for it in items:
        q.put(it)
    assert q.gap == pytest.approx(1.0)
    assert q.take(lambda now, queued, expected=(): (2, 0.0), 0.1) == items[:2]
    assert q.steal(2) == items[4:6]                           # newest, oldest of them first
    q.put_front(items[:2])
    assert q.drain() == items[:4] and len(q) == 0
    assert q.take(lambda now, queued, expected=(): (1, 0.0), 0.0) == []   # idle
    q.stop()
    assert q.take(lambda now, queued, expected=(): (1, 0.0), 0.0) is None


# policies ---------------------------------------------------------------------------------------
def make_devices(*latencies):
    devs = []
    for i, lat in enumerate(latencies):
        d = Device(i, "cpu", 1)
        for b in (1, 32):
            d.profile.observe(b, lat(b))
        devs.append(d)
    return devs


def test_weighted_fills_devices_in_proportion_to_their_speed():
    slow, fast = make_devices(linear(0.003, 0.003), linear(0.001, 0.001))
    w = policies.Weighted()
    chosen = collections.Counter()
    for _ in range(400):                                      # fill the queues, as admission would
        dev = w.choose([slow, fast], 0.0, 32)
        dev.queue.put(req())
        chosen[dev.index] += 1
    assert 2.5 <= chosen[1] / chosen[0] <= 3.5, chosen


def test_weighted_skips_unhealthy_and_excluded_devices():
    a, b = make_devices(linear(0.001, 0.001), linear(0.001, 0.001))
    w = policies.Weighted()
    assert w.choose([a, b], 0.0, 32, exclude=a) is b
    b.state = OUT
    assert w.choose([a, b], 0.0, 32) is a
    a.state = OUT
    assert w.choose([a, b], 0.0, 32) is None


def test_a_batch_staged_behind_the_running_one_counts_in_the_expected_finish():
    (dev,) = make_devices(linear(0.010, 0.001))
    dev.running_since, dev.running_size = 0.0, 4                 # ends at 14 ms
    assert policies.running_left(dev, 0.004) == pytest.approx(0.010)
    dev.staged = [(req(), 0)] * 2                                 # then 12 ms more
    assert policies.running_left(dev, 0.004) == pytest.approx(0.022)
    assert policies.finish_in(dev, 0.004, 32, 1) == pytest.approx(0.022 + 0.011)
    dev.running_since, dev.staged = None, []
    assert policies.busy_until(dev, 5.0) == 5.0


def test_idle_fast_device_steals_but_a_slow_one_only_what_it_can_finish_sooner():
    slow, fast = make_devices(linear(0.030, 0.030), linear(0.001, 0.001))
    for _ in range(8):
        slow.queue.put(req())
    slow.running_since, slow.running_size = 0.0, 1
    w = policies.Weighted()
    victim, k = w.steal_from(fast, [slow, fast], 0.0, 32)
    assert victim is slow and k == 4
    fast.queue, slow.queue = slow.queue, DeviceQueue()        # now the fast one is the busy one
    fast.running_since, fast.running_size, slow.running_since = 0.0, 1, None
    assert w.steal_from(slow, [slow, fast], 0.0, 32) == (None, 0)
    assert policies.RoundRobin().steal_from(slow, [slow, fast], 0.0, 32) == (None, 0)


def test_round_robin_ignores_speed():
    slow, fast = make_devices(linear(0.003, 0.003), linear(0.001, 0.001))
    rr = policies.RoundRobin()
    assert [rr.choose([slow, fast], 0.0, 32).index for _ in range(4)] == [0, 1, 0, 1]


# health -----------------------------------------------------------------------------------------
def monitor(devices, **overrides):
    cfg = HealthConfig(**{"max_failures": 2, "watchdog_floor_s": 1.0, "watchdog_factor": 10.0,
                          "backoff_s": 1.0, "backoff_max_s": 4.0, **overrides})
    events = []
    clock = Clock()
    m = HealthMonitor(cfg, devices, on_out=lambda d, why, stuck: events.append(("out", d.index, stuck)),
                      send_canary=lambda d: events.append(("canary", d.index)),
                      counters=collections.Counter(), clock=clock)
    return m, events, clock


def test_failures_in_a_row_take_a_device_out_and_a_success_resets_the_count():
    (dev,) = make_devices(linear(0.01, 0.0))
    m, events, clock = monitor([dev])
    m.batch_failed(dev, False, "boom")
    m.batch_ok(dev, False)
    m.batch_failed(dev, False, "boom")
    assert dev.state == HEALTHY and events == []
    m.batch_failed(dev, False, "boom")
    assert dev.state == OUT and events == [("out", 0, False)]


def test_watchdog_bound_is_the_floor_or_a_multiple_of_the_measured_batch_time():
    fast, slow = make_devices(linear(0.01, 0.0), linear(0.5, 0.0))
    m, events, clock = monitor([fast, slow])
    assert m.bound(fast, 1) == 1.0 and m.bound(slow, 1) == pytest.approx(5.0)
    fast.running_since, fast.running_size = 0.0, 1
    clock.now = 0.99
    m.check()
    assert fast.state == HEALTHY
    clock.now = 1.01
    m.check()
    assert fast.state == OUT and events == [("out", 0, True)]
    assert m.tick <= 0.1          # removal within bound + tick


def test_the_only_device_in_rotation_is_not_taken_out_for_a_slow_batch():
    (dev,) = make_devices(linear(0.01, 0.0))
    m, events, clock = monitor([dev])
    dev.running_since, dev.running_size = 0.0, 1
    clock.now = 5.0
    m.check()
    m.check()
    assert dev.state == HEALTHY and events == [] and m._counters["health_stuck_kept"] == 1
    for _ in range(2):                                   # but it still leaves on failures
        m.batch_failed(dev, False, "boom")
    assert dev.state == OUT


def test_canary_after_backoff_readmits_or_doubles_the_backoff():
    (dev,) = make_devices(linear(0.01, 0.0))
    m, events, clock = monitor([dev])
    m.batch_failed(dev, False, "x")
    m.batch_failed(dev, False, "x")
    assert dev.state == OUT and dev.retry_at == 1.0
    clock.now = 0.5
    m.check()
    assert ("canary", 0) not in events
    clock.now = 1.0
    m.check()
    assert dev.state == PROBING and events[-1] == ("canary", 0)
    m.check()
    assert events.count(("canary", 0)) == 1                   # one canary at a time
    m.batch_failed(dev, True, "still broken")
    assert dev.state == OUT and dev.backoff == 2.0 and dev.retry_at == 3.0
    clock.now = 3.0
    m.check()
    m.batch_ok(dev, True)
    assert dev.state == HEALTHY and dev.backoff == 0.0
