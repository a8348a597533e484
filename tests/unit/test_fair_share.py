"""Fair share of the devices across uids, per-uid limits, and refusal decided before any copy or
hash.

The policy (inferd.daemon.dispatch.fairness) and the queue around it are driven request by request on an
injected clock; admission through a Scheduler with fake sessions. The attacks against a real daemon
(a flood of refused requests, a uid holding its whole session quota, a flooding uid):
tests/integration/test_fair_share_attacks.py.
"""
import collections
import random
from functools import partial
from types import SimpleNamespace

import pytest

import helpers
from helpers import Clock
from inferd.daemon.config import Config, ConfigError
from inferd.daemon.dispatch.device import Device
from inferd.daemon.dispatch.fairness import DeficitRoundRobin, Fifo, quanta
from inferd.daemon.models.loading import ModelSpec
from inferd.daemon.dispatch.queues import DeviceQueue, plan_batch
from inferd.daemon.dispatch.scheduler import Scheduler
from inferd.daemon.front.admission import Rejected
from inferd.shm import wire



# the policy, request by request ----------------------------------------------------------------
def item(uid, session=None, n=0, arrived=100.0, deadline=200.0):
    return SimpleNamespace(uid=uid, session=uid if session is None else session, n=n,
                           arrived=arrived, deadline=deadline)


def drr(weights=None):
    table = weights or {}
    unit = min([1.0, *table.values()])
    return DeficitRoundRobin(lambda it: (it.uid, it.session), lambda uid: table.get(uid, 1.0) / unit)


def owners(items):
    return "".join(str(it.uid) for it in items)


def test_backlogged_uids_alternate_whoever_queued_first():
    order = drr()
    for n in range(6):
        order.push(item("A", n=n))
    for n in range(3):
        order.push(item("B", n=n))
    served = [order.pop() for _ in range(9)]
    assert owners(served) == "ABABABAAA"
    assert [it.n for it in served if it.uid == "A"] == list(range(6))   # each flow oldest first
    assert len(order) == 0


def test_weights_give_shares_in_proportion_within_one_quantum():
    order = drr({"A": 3.0, "B": 1.0, "C": 0.5})      # quanta 6, 2, 1
    for uid in "ABC":
        for n in range(300):
            order.push(item(uid, n=n))
    counts = collections.Counter(order.pop().uid for _ in range(270))
    assert abs(counts["A"] - 180) <= 6 and abs(counts["B"] - 60) <= 2 and abs(counts["C"] - 30) <= 1, counts


def test_fractional_quanta_carry_their_rest_to_the_next_turn():
    order = drr({"A": 1.5})
    for uid in "AB":
        for n in range(100):
            order.push(item(uid, n=n))
    counts = collections.Counter(order.pop().uid for _ in range(100))
    assert counts == {"A": 60, "B": 40}


def test_sessions_of_one_uid_share_its_part_and_buy_nothing_against_another_uid():
    order = drr()
    for s in ("s1", "s2", "s3"):
        for n in range(10):
            order.push(item("A", session=s, n=n))
    for n in range(10):
        order.push(item("B", n=n))
    served = [order.pop() for _ in range(12)]
    assert owners(served) == "AB" * 6
    assert [it.session for it in served if it.uid == "A"] == ["s1", "s2", "s3"] * 2


def test_a_newcomer_waits_one_turn_of_each_backlogged_uid_not_the_backlog():
    order = drr({"A": 4.0})                          # A's quantum 4
    for n in range(1000):
        order.push(item("A", n=n))
    order.pop()                                      # A's turn has begun
    order.push(item("V"))
    served = [order.pop() for _ in range(5)]
    assert "V" in owners(served), owners(served)
    # ... and a flow that ran empty saved nothing up: it comes back at the tail with no credit
    order.push(item("V", n=1))
    order.push(item("V", n=2))
    assert owners(order.pop() for _ in range(6)).count("V") == 1


def test_upcoming_is_exactly_what_pop_returns_whatever_happened_before():
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    order = drr({"A": 2.0, "B": 0.5})
    n = 0
    for _ in range(3000):
        op = rng.random()
        if op < 0.55:
            order.push(item(rng.choice("ABCD"), session=rng.choice("xyz"), n=n))
            n += 1
        elif op < 0.9 and len(order):
            order.pop()
        elif op < 0.95:
            order.take_newest(rng.randrange(1, 4))
        else:
            order.push_front([item("F", n=n)])
            n += 1
        if rng.random() < 0.05:
            ahead = list(order.upcoming())
            assert [order.pop() for _ in range(len(ahead))] == ahead, f"seed {seed}"
    assert list(order.upcoming()) == order.clear() and len(order) == 0


def test_put_front_goes_first_steal_takes_the_longest_flows_newest_clear_is_serving_order():
    order = drr()
    a = [item("A", n=n) for n in range(6)]
    b = [item("B", n=n) for n in range(2)]
    for it in a + b:
        order.push(it)
    assert order.take_newest(3) == a[3:6]            # A is the longest: its newest, oldest first
    back = [item("R", n=0), item("R", n=1)]
    order.push_front(back)
    assert order.pop() is back[0]
    assert order.clear() == [back[1], a[0], b[0], a[1], b[1], a[2]]


def test_ahead_counts_one_turn_of_others_per_own_request_and_share_is_by_weight():
    order = drr({"A": 3.0})
    for n in range(100):
        order.push(item("A", n=n))
    for n in range(2):
        order.push(item("B", n=n))
    assert order.ahead("V") == 4                      # a turn of A (3) and of B (1)
    assert order.ahead("B") == 11                     # B's 3rd: three turns of A and two of B first
    assert order.ahead("A") == 102                    # all of it: A is last
    assert order.over_share("A", 100) and not order.over_share("B", 100)
    assert not order.over_share("V", 100)             # holds nothing: under any share
    fifo = Fifo()
    fifo.push(item("A"))
    assert fifo.ahead("V") == 1 and fifo.over_share("V", 100)


def test_quanta_from_uids_and_groups_resolved_once():
    users = SimpleNamespace(getpwall=lambda: [SimpleNamespace(pw_name="alice", pw_uid=1000, pw_gid=1000),
                                              SimpleNamespace(pw_name="bob", pw_uid=1001, pw_gid=500),
                                              SimpleNamespace(pw_name="carol", pw_uid=1002, pw_gid=1002)])
    render = SimpleNamespace(gr_name="render", gr_gid=500, gr_mem=["alice"])
    groups = SimpleNamespace(getgrnam=lambda name: {"render": render}[name],
                             getgrgid=lambda gid: {500: render}[gid])
    q = quanta({"1002": 0.5, "@render": 4, "1000": 2}, groups=groups, users=users)
    assert q(1000) == 4.0          # its own entry beats its group's
    assert q(1001) == 8.0          # primary group render
    assert q(1002) == 1.0          # the smallest weight is quantum 1
    assert q(4242) == 2.0 and q(None) == 2.0
    assert quanta({"@500": 3}, groups=groups, users=users)(1000) == 3.0
    assert quanta(None)(0) == 1.0
    with pytest.raises(ConfigError, match="dispatch.weights: no group 'nosuch'"):
        quanta({"@nosuch": 2}, groups=groups, users=users)


# the queue around it, on an injected clock ------------------------------------------------------
def test_a_batch_is_planned_and_taken_in_fair_order():
    clock = Clock(100.0)
    q = DeviceQueue(clock, order=drr())
    for n in range(40):
        q.put(item("A", n=n, arrived=99.0))
    victim = item("V", arrived=100.0, deadline=100.030)
    q.put(victim)
    plan = partial(plan_batch, latency=lambda b: 0.001 * b, max_batch=8, max_delay=0.002, gap=0.0)
    batch = q.take(lambda now, queued, expected=(): plan(now, queued), 0.0)
    assert victim in batch and len(batch) == 8 and batch.index(victim) == 1
    assert q.ahead("V") == 1 and len(q) == 33          # gone: a newcomer again
    q.put_front(batch[:2])                           # re-dispatched: keeps its place first
    assert q.take(lambda now, queued, expected=(): (2, 0.0), 0.0) == batch[:2]


def test_the_plan_reads_the_deadlines_of_the_fair_front_not_of_the_oldest():
    # A's three are due in 10 ms, V's one in a second. Fair order: A V A A, and L(3) = 12 ms would
    # miss A's deadline: the plan sends the first two of the fair order (first come: A A)
    clock = Clock(100.0)
    q = DeviceQueue(clock, order=drr())
    for n in range(3):
        q.put(item("A", n=n, arrived=100.0, deadline=100.010))
    q.put(item("V", arrived=100.0, deadline=101.0))
    seen = []

    def plan(now, queued, expected=()):
        seen.append([queued[i].uid for i in range(len(queued))])
        return plan_batch(now, queued, lambda b: 0.004 * b, 32, 0.002, gap=1.0)

    batch = q.take(plan, 0.0)
    assert seen[0] == ["A", "V", "A", "A"]
    assert owners(batch) == "AV"                      # L(3) = 12 ms would miss A's 10 ms


def test_fair_share_off_is_first_come_first_served():
    cfg = Config()
    cfg.dispatch.fair_share = False
    dev = Device(0, "cpu", 1)
    Scheduler(cfg, SimpleNamespace(spec=SPEC, digest="digest", gen=0), [dev], Clock(100.0))
    for n in range(3):
        dev.queue.put(item("A", n=n))
    dev.queue.put(item("V"))
    assert owners(dev.queue.take(lambda now, queued, expected=(): (4, 0.0), 0.0)) == "AAAV"


# admission through the scheduler --------------------------------------------------------------
SPEC = ModelSpec("shapes", 64, 64, (0.5,) * 3, (0.25,) * 3, tuple("abcdefgh"), 5)


def FakeSession(uid, slots=64):          # noqa: N802: reads as the class it makes
    return helpers.FakeSession(uid, SPEC.frame_bytes, slots)


def classify(slot, **extra):
    return {"op": "classify", "slot": slot, "nbytes": SPEC.frame_bytes, "dtype": "uint8",
            "shape": list(SPEC.frame_shape), **extra}


def scheduler(**settings):
    cfg = Config()
    for key, value in settings.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    dev = Device(0, "cpu", 1)
    for b in (1, 32):
        dev.profile.observe(b, 0.001 * b)
    sched = Scheduler(cfg, SimpleNamespace(spec=SPEC, digest="digest", gen=0), [dev], Clock(100.0))
    return sched, dev


def test_per_uid_in_flight_quota_refuses_with_the_key_and_a_retry_hint():
    sched, dev = scheduler(server__max_inflight_per_uid=3)
    a1, a2, b = FakeSession(1000), FakeSession(1000), FakeSession(2000)
    for slot in range(2):
        sched.submit(a1, slot, classify(slot))
    sched.submit(a2, 0, classify(0))
    with pytest.raises(Rejected) as refused:
        sched.submit(a2, 1, classify(1))            # the uid's 4th, in another session
    assert refused.value.code == wire.E_OVERLOADED
    assert "server.max_inflight_per_uid 3" in str(refused.value) and "uid 1000 has 3" in str(refused.value)
    assert refused.value.extra["retry_after_ms"] >= 1.0
    sched.submit(b, 0, classify(0))                  # another uid is not held to it
    assert sched.stats.uids[1000].in_flight == 3 and 1 not in a2.inflight


def test_a_full_queue_still_admits_a_uid_under_its_share():
    sched, dev = scheduler(batching__queue_limit=8, server__max_inflight_per_uid=100)
    flood, victim = FakeSession(1000), FakeSession(2000)
    for slot in range(8):
        sched.submit(flood, slot, classify(slot))
    with pytest.raises(Rejected, match="batching.queue_limit 8"):
        sched.submit(flood, 8, classify(8))
    for slot in range(4):                            # half of 8: its share with two uids queued
        sched.submit(victim, slot, classify(slot))
    with pytest.raises(Rejected, match="uid 2000's share"):
        sched.submit(victim, 4, classify(4))
    assert dev.outstanding == 12 and len(dev.queue) == 12


def test_the_scheduler_queues_by_uid_with_the_configured_weights():
    sched, dev = scheduler(dispatch__weights={"1000": 3})
    heavy, light = FakeSession(1000), FakeSession(2000)
    for slot in range(40):
        sched.submit(heavy, slot, classify(slot))
        sched.submit(light, slot, classify(slot))
    batch = dev.queue.take(lambda now, queued, expected=(): (8, 0.0), 0.0)
    assert [r.session.peer[1] for r in batch] == [1000] * 3 + [2000] + [1000] * 3 + [2000]


@pytest.mark.parametrize("fair", [True, False])
def test_the_deadline_is_checked_at_the_fair_place_not_behind_the_whole_queue(fair):
    sched, dev = scheduler(dispatch__fair_share=fair, batching__queue_limit=4096,
                           server__max_inflight_per_uid=4096)
    flood = FakeSession(1000, slots=1024)
    for slot in range(1024):                         # 32 batches of 32 ms: a second of work
        sched.submit(flood, slot, classify(slot, timeout_ms=30000))
    with pytest.raises(Rejected, match="after its deadline"):
        sched.submit(FakeSession(1000), 0, classify(0, timeout_ms=100))    # behind its own uid's
    victim = FakeSession(2000)
    if fair:
        sched.submit(victim, 0, classify(0, timeout_ms=100))                # 2nd in the fair order
        assert dev.queue.ahead(2000) == 3
    else:
        with pytest.raises(Rejected, match="after its deadline"):          # behind the whole flood
            sched.submit(victim, 0, classify(0, timeout_ms=100))
