"""A classify_many admitted as one group (NOTE [ group admission ] in daemon/dispatch/scheduler.py)
ends exactly where its requests admitted one at a time would: the same queue order, refusals,
counts, gap and expectations; and its replies and bookkeeping come back per batch as they did per
request."""
from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest

import helpers
from helpers import Clock

from inferd.daemon.config import Config
from inferd.daemon.dispatch.device import Device
from inferd.daemon.dispatch.scheduler import Scheduler
from inferd.daemon.front.admission import Rejected
from inferd.daemon.models.loading import ModelSpec
from inferd.daemon.pipeline.records import BatchResult, Outcome
from inferd.shm import wire

SPEC = ModelSpec("shapes", 64, 64, (0.5,) * 3, (0.25,) * 3, tuple("abcdefgh"), 5)


def scheduler(**settings):
    cfg = Config()
    cfg.cache.enabled = False
    for key, value in settings.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    dev = Device(0, "cpu", 1)
    for b in (1, 32):
        dev.profile.observe(b, 0.001 * b)
    sched = Scheduler(cfg, SimpleNamespace(spec=SPEC, digest="digest", gen=0), [dev], Clock(100.0))
    errors = []
    sched._write = lambda replies: errors.extend((m["id"], m["code"]) for ms in replies.values()
                                                 for m in ms)
    return sched, dev, errors


def frame_fields(**extra):
    return {"nbytes": SPEC.frame_bytes, "dtype": "uint8", "shape": list(SPEC.frame_shape), **extra}


def state(sched, dev):
    queued = dev.queue.drain()
    return {"order": [(r.session.peer[1], r.id, r.slot, r.deadline) for r in queued],
            "outstanding": (sched.outstanding, dev.outstanding),
            "in_flight": {uid: u.in_flight for uid, u in sched.stats.uids.items()},
            "outcomes": dict(sched.stats.outcomes), "counters": dict(sched.counters)}


def one_at_a_time(sched, session, rid, slots, extra, errors):
    for i, slot in enumerate(slots):
        try:
            sched.submit(session, rid + i, {"op": "classify", "slot": slot, **frame_fields(**extra)})
        except Rejected as exc:
            errors.append((rid + i, exc.code))


SETTINGS = [
    {},                                                                  # everything fits
    {"server__max_inflight_per_uid": 20},                               # the uid's quota splits a group
    {"batching__queue_limit": 24},                                      # the queue's limit and share
    {"batching__queue_limit": 24, "dispatch__fair_share": False},
    {"dispatch__weights": {"1000": 3}},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(s) or "defaults")
@pytest.mark.parametrize("seed", range(4))
def test_a_group_ends_where_its_requests_one_at_a_time_would(settings, seed):
    rng = random.Random(seed)
    plan = []
    for n in range(6):                              # messages of two uids, some slots bad or busy
        uid = rng.choice((1000, 2000))
        k = rng.randint(1, 16)
        slots = [rng.randrange(70) for _ in range(k)]                    # >= 64: out of the ring
        timeout = rng.choice((60000, 60000, 15, 40))                     # some cannot all finish
        plan.append((uid, slots, timeout))
    runs = []
    for grouped in (True, False):
        sched, dev, errors = scheduler(**settings)
        sessions = {uid: helpers.FakeSession(uid, SPEC.frame_bytes, 64) for uid in (1000, 2000)}
        rid = itertools.count(1, 100)
        for uid, slots, timeout in plan:
            session, first = sessions[uid], next(rid)
            if grouped:
                sched.submit_many(session, first, {"op": "classify_many", "slots": slots,
                                                   **frame_fields(timeout_ms=timeout)})
            else:
                one_at_a_time(sched, session, first, slots, {"timeout_ms": timeout}, errors)
            sched._clock.now += 0.0003
        runs.append((sorted(errors), state(sched, dev)))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("fair", [True, False])
def test_put_many_keeps_the_gap_and_the_expectations_of_a_put_each(fair):
    from inferd.daemon.dispatch.fairness import DeficitRoundRobin, Fifo
    from inferd.daemon.dispatch.queues import DeviceQueue

    runs = []
    for many in (True, False):
        clock = Clock(100.0)
        order = DeficitRoundRobin(lambda r: (r.uid, r.session), lambda uid: 1.0) if fair else Fifo()
        q = DeviceQueue(clock, order)
        a, b = object(), object()
        q.expect(a, 20, 100.5)
        for n, (session, k) in enumerate(((a, 5), (b, 1), (a, 7), (b, 3))):
            items = [SimpleNamespace(session=session, uid=id(session), n=(n, i)) for i in range(k)]
            if many:
                q.put_many(items)
            else:
                for item in items:
                    q.put(item)
            clock.now += 0.001 * (n + 1)
        runs.append((q.gap, list(q._expected.values()), [r.n for r in q.drain()]))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-12)
    assert runs[0][1:] == runs[1][1:]


def test_a_slot_named_twice_in_one_message_is_refused_as_busy_the_second_time():
    sched, dev, errors = scheduler()
    session = helpers.FakeSession(1000, SPEC.frame_bytes, 64)
    sched.submit_many(session, 1, {"op": "classify_many", "slots": [3, 4, 3], **frame_fields()})
    assert errors == [(3, wire.E_SLOT_BUSY)]
    assert [r.slot for r in dev.queue.drain()] == [3, 4]


@pytest.mark.parametrize("packed", [False, True], ids=["replies", "answers"])
def test_a_group_is_one_put_and_its_replies_one_message_with_the_counts_given_back(packed):
    sched, dev, errors = scheduler()
    session = helpers.FakeSession(1000, SPEC.frame_bytes, 64)
    session.batches, session.packed = True, packed
    puts = []
    put_many = dev.queue.put_many
    dev.queue.put_many = lambda items: (puts.append(len(items)), put_many(items))
    sched.submit_many(session, 1, {"op": "classify_many", "slots": list(range(16)), **frame_fields(top_k=2)})
    assert puts == [16] and sched.stats.uids[1000].in_flight == 16 and dev.outstanding == 16
    batch = dev.queue.take(lambda now, queued, expected=(): (len(queued), 0.0), 0.0)
    result = BatchResult.taking(dev, batch)
    for n, e in enumerate(result.entries):
        e.outcome, e.top = Outcome.DONE, [[n, 0.9], [0, 0.1], [1, 0.0]]
    result.started, result.finished = 100.0, 100.001
    del sched._write                                # the real one: one ``replies`` message
    sched.on_batch_done(result)
    [sent] = session.sent
    message = wire.decode_body(sent[wire.HEADER.size:])
    replies = wire.unpack_answers(message) if packed else message["replies"]
    assert (wire.ANSWERS in message) == packed
    assert [m["id"] for m in replies] == list(range(1, 17))
    assert all(m["ok"] and len(m["top"]) == 2 and m["top"][0][0] == n for n, m in enumerate(replies))
    assert session.inflight == {} and sched.outstanding == 0 and dev.outstanding == 0
    assert sched.stats.uids[1000].in_flight == 0 and sched.stats.outcomes["ok"] == 16
    assert sched.stats.latency["total"].count == 16 and sched.stats.latency["queue"].count == 16


def test_latency_histograms_take_a_run_of_requests_that_arrived_together_as_one_weighted_observation():
    from inferd.daemon.ops.histograms import Histogram

    sched, dev, _ = scheduler()
    arrivals = [99.990] * 5 + [99.995] * 3 + [99.990] * 2 + [99.999]
    answered = [SimpleNamespace(arrived=a, deadline=99.996 + 0.01 * (n % 2)) for n, a in enumerate(arrivals)]
    result = BatchResult(dev, [])
    result.started, result.finished = 100.0, 100.001
    sched.stats.batch(result, answered, 100.002)
    lat = sched.stats.latency
    expect_total, expect_queue = Histogram(lat["total"].bounds), Histogram(lat["queue"].bounds)
    for a in arrivals:
        expect_total.observe(100.002 - a)
        expect_queue.observe(100.0 - a)
    assert lat["total"].counts == expect_total.counts and lat["queue"].counts == expect_queue.counts
    assert lat["total"].sum == pytest.approx(expect_total.sum)
    assert lat["total"].quantile(0.99) == expect_total.quantile(0.99)
    assert sched.stats.late == sum(100.002 > r.deadline for r in answered)
