"""Batch formation with an injected clock: no test here waits on real time."""
import queue
from types import SimpleNamespace

from inferd.daemon.batcher import STOP, collect


class FakeQueue:
    """A queue whose timed get advances a fake clock instead of sleeping."""

    def __init__(self, clock, items=()):
        self.items = list(items)
        self.clock = clock
        self.timed_waits = []

    def get(self, timeout=None):
        if self.items:
            return self.items.pop(0)
        assert timeout is not None, "collect blocked forever on an empty queue"
        self.timed_waits.append(timeout)
        self.clock.now += timeout
        raise queue.Empty

    def get_nowait(self):
        if self.items:
            return self.items.pop(0)
        raise queue.Empty

    def put(self, item):
        self.items.append(item)


class Clock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


def req(arrived):
    return SimpleNamespace(arrived=arrived)


def test_a_full_batch_leaves_at_once():
    clock = Clock()
    q = FakeQueue(clock, [req(100.0) for _ in range(10)])
    batch = collect(q, max_batch=4, max_delay=0.002, clock=clock)
    assert len(batch) == 4 and q.timed_waits == [] and clock.now == 100.0
    assert len(q.items) == 6


def test_a_lone_frame_waits_exactly_until_its_window_closes():
    clock = Clock(100.0)
    q = FakeQueue(clock, [req(100.0)])
    batch = collect(q, max_batch=32, max_delay=0.002, clock=clock)
    assert len(batch) == 1
    assert len(q.timed_waits) == 1 and abs(q.timed_waits[0] - 0.002) < 1e-9
    assert abs(clock.now - 100.002) < 1e-9


def test_the_window_counts_from_arrival_so_time_spent_queued_is_not_waited_again():
    clock = Clock(100.0)
    q = FakeQueue(clock, [req(99.990), req(99.995)])   # arrived 10 ms ago while a batch ran
    batch = collect(q, max_batch=32, max_delay=0.002, clock=clock)
    assert len(batch) == 2 and q.timed_waits == []


def test_stop_mid_batch_is_put_back_for_the_next_call():
    clock = Clock()
    q = FakeQueue(clock, [req(100.0), STOP])
    assert len(collect(q, 32, 0.002, clock)) == 1
    assert collect(q, 32, 0.002, clock) is None


def test_zero_delay_takes_only_what_is_already_queued():
    clock = Clock()
    q = FakeQueue(clock, [req(100.0), req(100.0)])
    assert len(collect(q, 32, 0.0, clock)) == 2 and q.timed_waits == []
