"""The measured batching window (NOTE [ measured window ] in daemon/dispatch/formation.py): a batch
waits for the sessions expected back while one batch of them all would end sooner than two, and no
longer; arrivals predicted only from the gap keep the fixed window. Plain numbers and an injected
clock: nothing here waits on real time."""
import math
from types import SimpleNamespace

import pytest

from helpers import Clock

from inferd.daemon.config import BatchingConfig
from inferd.daemon.dispatch.formation import horizon, overdue_grace, wait_for_company
from inferd.daemon.dispatch.profile import LatencyProfile
from inferd.daemon.dispatch.queues import GRACE, DeviceQueue, plan_batch


def req(arrived=100.0, deadline=200.0):
    return SimpleNamespace(arrived=arrived, deadline=deadline, attempt=0)


def linear(base, per):               # a latency profile as a function: base + per * b seconds
    return lambda b: base + per * b


# L(b) = 20 + 2.5 b ms: L(8) = 40, L(16) = 60, so one batch of 16 saves 20 ms over two of 8
LAT = linear(0.020, 0.0025)


def plan(now, queued, expected, free_at=0.0, idle_since=0.0, window="measured", max_delay=0.005, gap=math.inf):
    return plan_batch(now, queued, LAT, 16, max_delay, gap, True, free_at, expected, idle_since, window=window)


def test_half_batches_wait_for_the_other_half_however_long_the_first_half_queued():
    # 8 queued since long before (the device was busy), the other 8 back 8 ms after it is free:
    # the fixed window (counted from the arrivals) is long closed, so it sends 8 and the halves
    # alternate; measured: 8 + 60 ms for 16 beats 40 + 40 ms for two batches of 8, so wait
    queued = [req(arrived=99.95) for _ in range(8)]
    back = [100.008] * 8
    assert plan(100.0, queued, back, free_at=100.0, window="fixed") == (8, 0.0)
    n, until = plan(100.0, queued, back, free_at=100.0)
    assert n == 0 and until == pytest.approx(100.008)


def test_company_that_comes_back_later_than_batching_saves_is_not_waited_for():
    # back 25 ms after the device is free: 25 + 60 ms is later than 40 + 40 ms: go now
    queued = [req(arrived=99.95) for _ in range(8)]
    assert plan(100.0, queued, [100.025] * 8, free_at=100.0) == (8, 0.0)
    # ... and just inside the saving (19 ms), it is
    n, until = plan(100.0, queued, [100.019] * 8, free_at=100.0)
    assert n == 0 and until == pytest.approx(100.019)


def test_without_a_fixed_cost_nothing_is_waited_for():
    # L(b) = 10 ms x b: one batch of n + k never ends before two
    lat = linear(0.0, 0.010)
    assert wait_for_company(100.0, 100.0, 100.0, 1, lat, 16, 200.0, [100.0001, 100.0002]) == (1, 0.0)


def test_an_overdue_arrival_is_waited_for_until_the_break_even_and_no_longer():
    # 15 queued, the 16th was due 1 ms ago: worth waiting until one batch of 16 would end when a
    # batch of 15 now and one of 1 after it would: start + L(15) + L(1) - L(16) = 100 + 20 ms
    queued = [req() for _ in range(15)]
    n, until = plan(100.0, queued, [99.999], free_at=100.0, idle_since=100.0)
    assert n == 0 and until == pytest.approx(100.020)
    # the fixed window gives it up GRACE after it was due
    n, until = plan(100.0, queued, [99.999], free_at=100.0, idle_since=100.0, window="fixed")
    assert n == 0 and until == pytest.approx(99.999 + GRACE)
    # at the break-even, and after it, the 15 go (asked again at the time it said: no spinning):
    # the wait is counted from when they could have gone, not from each look at it
    assert plan(100.020, queued, [99.999], free_at=100.0, idle_since=100.0)[:2] == (15, 0.0)
    assert plan(100.030, queued, [99.999], free_at=100.0, idle_since=100.0)[:2] == (15, 0.0)
    # the last of the 15 arrived at 100.005: from then
    later = queued[:14] + [req(arrived=100.005)]
    n, until = plan(100.010, later, [99.999], free_at=100.0, idle_since=100.0)
    assert n == 0 and until == pytest.approx(100.025)


def test_the_break_even_counts_from_when_a_busy_device_is_free():
    # planned LEAD before the device is free at 100.010: an overdue one is worth waiting for until
    # 100.010 + L(15) + L(1) - L(16)
    queued = [req(arrived=99.99) for _ in range(15)]
    n, until = plan(100.0099, queued, [100.0], free_at=100.010)
    assert n == 0 and until == pytest.approx(100.030)


def test_never_waits_past_what_the_oldest_deadline_allows():
    # the oldest is due at 100.045; a batch of 8 now ends at 100.040: company back at 100.001
    # makes a batch of 9 end at 100.0435 (meets it), one back at 100.008 a batch ending at 100.0505
    queued = [req(deadline=100.045)] + [req() for _ in range(7)]
    n, until = plan(100.0, queued, [100.001] * 8, free_at=100.0)
    assert n == 0 and until == pytest.approx(100.001)
    assert plan(100.0, queued, [100.008] * 8, free_at=100.0) == (8, 0.0)


def test_the_best_rate_among_the_arrivals_that_pay_is_waited_for():
    # one queued, three back at 1, 2 and 30 ms: waiting for the third would end at 30 + L(4) = 60
    # ms, later than 22.5 + L(3) = 50 ms apart; for the first two at 2 + L(3) = 29.5 ms, 3 frames
    # at the best rate, so wait until the second
    n, until = plan(100.0, [req()], [100.001, 100.002, 100.030], idle_since=100.0)
    assert n == 0 and until == pytest.approx(100.002)


def test_a_lone_request_with_nobody_expected_goes_at_once():
    assert plan(100.0, [req()], [], idle_since=99.0) == (1, 0.0)


def test_arrivals_predicted_from_the_gap_keep_the_fixed_window():
    # nobody expected (open-loop clients): one arrival every 0.5 ms predicted, waited for only
    # inside max_delay after the first, as the fixed window does
    fixed = plan(100.0, [req()], [], idle_since=100.0, window="fixed", gap=0.0005)
    assert plan(100.0, [req()], [], idle_since=100.0, gap=0.0005) == fixed
    assert fixed[0] == 0 and fixed[1] == pytest.approx(100.005)


def test_rule_0_1_and_2_are_the_same_under_either_window():
    full = [req() for _ in range(20)]
    assert plan(100.0, full, [100.001]) == plan(100.0, full, [100.001], window="fixed") == (16, 0.0)
    busy = plan(100.0, [req()], [100.001], free_at=100.050)
    assert busy == plan(100.0, [req()], [100.001], free_at=100.050, window="fixed")
    assert busy[:2] == (0, pytest.approx(100.050 - 0.0005))
    queued = [req(deadline=100.074)] + [req() for _ in range(9)]        # L(10) = 45 ms misses
    assert plan(100.030, queued, [100.031]) == plan(100.030, queued, [100.031], window="fixed") == (9, 0.0)


def test_horizon_and_grace_follow_the_window():
    profile = LatencyProfile()
    profile.observe(1, 0.010)
    profile.observe(16, 0.050)
    measured = BatchingConfig(max_batch=16, max_delay_ms=5.0)
    fixed = BatchingConfig(max_batch=16, max_delay_ms=5.0, window="fixed")
    assert measured.window == "measured"                      # the default
    assert horizon(fixed, profile) == pytest.approx(0.005)
    assert horizon(measured, profile) == pytest.approx(0.050)    # one full batch
    assert horizon(measured, LatencyProfile()) == pytest.approx(0.005)   # nothing measured yet
    assert overdue_grace(fixed, 0.050) == GRACE
    assert overdue_grace(measured, 0.050) == 0.050


def test_the_queue_keeps_an_overdue_expectation_for_its_grace():
    clock = Clock(100.0)
    q = DeviceQueue(clock=clock)
    s = object()
    q.expect(s, 2, 100.001)
    clock.now = 100.001 + GRACE + 0.001
    assert q._expected_times(clock.now) == []                   # the fixed grace: given up
    q.expect(s, 2, 100.001)
    q.grace = 0.050
    assert q._expected_times(clock.now) == [100.001, 100.001]   # the measured window's: still expected


def test_a_stale_estimate_of_the_larger_batch_does_not_stop_the_wait():
    # L(4) stuck at 35 ms from a loaded moment, L(1) 9 and L(3) 16 ms now: as measured, one batch
    # of four (35) never beats three now and one after (16 + 9); read no dearer per frame than
    # the three (21.3 ms), a fourth client 2 ms away is worth waiting for
    table = {1: 0.009, 2: 0.012, 3: 0.016, 4: 0.035}
    lat = table.__getitem__
    queued = [req(arrived=100.0) for _ in range(3)]
    n, until = plan_batch(100.0, queued, lat, 16, 0.005, math.inf, True, 100.0, [100.002], 100.0,
                          window="measured")
    assert n == 0 and until == pytest.approx(100.002)
    # ... but not one 5 ms away: 5 + 21.3 ms is later than 16 + 9
    assert plan_batch(100.0, queued, lat, 16, 0.005, math.inf, True, 100.0, [100.005], 100.0,
                      window="measured") == (3, 0.0)
