"""Figures per model (NOTE [ stats per model ] in daemon/ops/stats.py) and their Prometheus labels:
a scheduler serving two models, driven by hand on an injected clock, keeps each model's outcomes,
latency, batches and device seconds apart; a one-model daemon's row is its own figures; a second
model arriving at run time forks the first one's record from them. A real daemon serving two models:
tests/integration/test_models_stats.py."""
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from helpers import Clock, FakeSession
from inferd.daemon.config import Config
from inferd.daemon.dispatch.device import Device
from inferd.daemon.dispatch.scheduler import Scheduler
from inferd.daemon.front.admission import Rejected
from inferd.daemon.models.catalog import Catalog
from inferd.daemon.models.loading import ModelSpec
from inferd.daemon.ops.metrics import SnapshotCollector
from inferd.daemon.pipeline.records import BatchEntry, BatchResult, Outcome
from inferd.shm import wire


def _spec(name: str) -> ModelSpec:
    return ModelSpec(name, 64, 64, (0.5,) * 3, (0.25,) * 3, tuple("abcdefgh"), 5)


def _model(name: str, digest: str):
    return SimpleNamespace(spec=_spec(name), digest=digest, gen=0)


class _Entry(SimpleNamespace):
    share = 1.0


def _scheduler(clock, models, shares=None):
    cfg = Config()
    cfg.batching.queue_limit = 1024
    dev = Device(0, "cpu", 1)
    shares = shares or [1.0] * len(models)
    catalog = Catalog.of([(_Entry(share=share), m) for share, m in zip(shares, models)])
    return Scheduler(cfg, catalog, [dev], clock), dev


def _classify(spec, slot, **extra):
    return {"op": "classify", "slot": slot, "nbytes": spec.frame_bytes, "dtype": "uint8",
            "shape": list(spec.frame_shape), **extra}


def _run(sched, dev, requests, mid, started, finished, reply_at, clock):
    result = BatchResult.taking(dev, requests)
    for e in result.entries:
        e.outcome, e.top = Outcome.DONE, [[0, 1.0]]
    result.started, result.finished, result.mid = started, finished, mid
    clock.now = reply_at
    sched.on_batch_done(result)


def _samples(snap: dict) -> dict:
    text = generate_latest(SnapshotCollector(lambda: snap)).decode()
    return {(x.name, tuple(sorted(x.labels.items()))): x.value
            for fam in text_string_to_metric_families(text) for x in fam.samples}


def _full(sched, snap: dict) -> dict:
    snap.update(model={"name": "shapes", "digest": "d1", "gen": 0}, pid=1, policy="weighted",
                in_flight=sched.outstanding, sessions={"open": 1, "opened": 1}, cache=sched.caches.stats())
    return snap


def test_two_models_keep_their_own_outcomes_latency_batches_and_device_share():
    clock = Clock(10.0)
    heavy, light = _model("heavy", "d1"), _model("light", "d2")
    sched, dev = _scheduler(clock, [heavy, light], shares=[2.0, 1.0])
    s = FakeSession(1000, heavy.spec.frame_bytes, slots=16)
    for slot in range(3):
        sched.submit(s, slot, _classify(heavy.spec, slot, model="heavy"))
    sched.submit(s, 3, _classify(light.spec, 3, model="light"))
    with pytest.raises(Rejected):                           # refused before any model was known
        sched.submit(s, 4, _classify(light.spec, 4, model="nope"))
    with pytest.raises(Rejected):                           # refused for its model: a bad top_k
        sched.submit(s, 5, _classify(light.spec, 5, model="light", top_k=0))
    taken = dev.queue.drain()
    _run(sched, dev, [r for r in taken if r.mid == 0], 0, 10.010, 10.040, 10.041, clock)
    _run(sched, dev, [r for r in taken if r.mid == 1], 1, 10.041, 10.051, 10.052, clock)

    rows = {m["name"]: m for m in sched.stats.snapshot()["models"]}
    h, li = rows["heavy"], rows["light"]
    assert h["outcomes"] == {"ok": 3} and h["requests"] == h["answers"] == 3 and h["errors"] == 0
    assert li["outcomes"] == {"ok": 1, wire.E_INVALID_INPUT: 1} and li["requests"] == 2 and li["errors"] == 1
    assert h["batch_sizes"] == [[3, 1]] and li["batch_sizes"] == [[1, 1]] and h["frames"] == 3
    assert h["latency"]["compute"]["count"] == 3 and li["latency"]["queue"]["count"] == 1
    assert h["latency"]["queue"]["p50_ms"] == pytest.approx(10.0, rel=0.6)   # arrived 10.0, started 10.01
    (hd,), (ld,) = h["devices"], li["devices"]
    assert hd["seconds"] == pytest.approx(0.030) and ld["seconds"] == pytest.approx(0.010)
    assert hd["share"] == pytest.approx(0.75) and ld["share"] == pytest.approx(0.25)
    assert hd["share_configured"] == pytest.approx(2 / 3, abs=1e-4)
    assert ld["share_configured"] == pytest.approx(1 / 3, abs=1e-4)
    assert h["default"] and not li["default"] and h["share"] == 2.0
    # the daemon's own figures are the sum of the models' and what no model owned
    assert sched.stats.outcomes == {"ok": 4, wire.E_INVALID_INPUT: 1, wire.E_UNKNOWN_MODEL: 1}

    samples = _samples(_full(sched, sched.stats.snapshot()))
    key = lambda family, **lab: (family, tuple(sorted(lab.items())))
    assert samples[key("inferd_requests_total", outcome="ok", model="heavy", version="1")] == 3
    assert samples[key("inferd_requests_total", outcome="ok", model="light", version="1")] == 1
    assert samples[key("inferd_requests_total", outcome="unknown_model", model="", version="")] == 1
    assert samples[key("inferd_device_busy_seconds_total", device="cpu#0", model="heavy", version="1")] == \
        pytest.approx(0.030)
    assert samples[key("inferd_device_frames_total", device="cpu#0", model="light", version="1")] == 1
    assert samples[key("inferd_request_duration_seconds_count", phase="total", model="light", version="1")] == 1
    assert samples[key("inferd_model_share", model="heavy", version="1")] == 2.0
    assert samples[key("inferd_model_info", name="light", version="1", digest="d2", generation="0",
                       is_default="0")] == 1
    assert sum(v for (name, _), v in samples.items() if name == "inferd_requests_total") == 6


def test_one_model_row_is_the_daemons_own_figures_and_costs_no_per_model_record():
    clock = Clock(10.0)
    sched, dev = _scheduler(clock, [_model("shapes", "d1")])
    s = FakeSession(1000, _spec("shapes").frame_bytes)
    for slot in range(2):
        sched.submit(s, slot, _classify(_spec("shapes"), slot))
    _run(sched, dev, dev.queue.drain(), 0, 10.01, 10.02, 10.03, clock)
    assert sched.stats.models == {}                         # nothing kept twice
    snap = sched.stats.snapshot()
    (row,) = snap["models"]
    assert row["name"] == "shapes" and row["outcomes"] == {"ok": 2} and row["batch_sizes"] == [[2, 1]]
    assert row["latency"]["total"] == snap["latency"]["total"]
    assert row["devices"][0]["seconds"] == pytest.approx(0.01) and row["devices"][0]["share"] == 1.0


def test_a_second_model_arriving_forks_the_first_ones_record_from_the_daemons():
    clock = Clock(10.0)
    sched, dev = _scheduler(clock, [_model("shapes", "d1")])
    s = FakeSession(1000, _spec("shapes").frame_bytes)
    for slot in range(2):
        sched.submit(s, slot, _classify(_spec("shapes"), slot))
    _run(sched, dev, dev.queue.drain(), 0, 10.01, 10.02, 10.03, clock)
    late = sched.catalog.add("late", 1, _model("late", "d3"))     # as a live load would
    request = SimpleNamespace(session=object(), served=late, arrived=10.1, deadline=20.0)
    result = BatchResult(dev, [BatchEntry(request, 0, Outcome.DONE)], started=10.2, finished=10.25, mid=late.mid)
    sched.stats.batch(result, [request], 10.26)
    rows = {m["name"]: m for m in sched.stats.snapshot()["models"]}
    assert rows["shapes"]["outcomes"] == {"ok": 2} and rows["shapes"]["batch_sizes"] == [[2, 1]]
    assert rows["late"]["outcomes"] == {"ok": 1} and rows["late"]["latency"]["total"]["count"] == 1
    assert rows["shapes"]["devices"][0]["share"] == pytest.approx(0.01 / 0.06, abs=1e-3)
    assert sched.stats.outcomes["ok"] == 3


def test_an_unloaded_models_row_stays_and_the_one_left_keeps_its_own_figures():
    """After an unload leaves one model, figures stay per model (the daemon's hold the other's too)."""
    clock = Clock(10.0)
    heavy, light = _model("heavy", "d1"), _model("light", "d2")
    sched, dev = _scheduler(clock, [heavy, light])
    s = FakeSession(1000, heavy.spec.frame_bytes, slots=16)
    sched.submit(s, 0, _classify(heavy.spec, 0, model="heavy"))
    sched.submit(s, 1, _classify(light.spec, 1, model="light"))
    taken = dev.queue.drain()
    _run(sched, dev, [r for r in taken if r.mid == 0], 0, 10.01, 10.02, 10.03, clock)
    _run(sched, dev, [r for r in taken if r.mid == 1], 1, 10.03, 10.04, 10.05, clock)
    catalog = sched.catalog
    catalog.remove(catalog.by_id[1])                        # as an unload does
    assert catalog.single
    sched.submit(s, 2, _classify(heavy.spec, 2))
    _run(sched, dev, dev.queue.drain(), 0, 10.06, 10.07, 10.08, clock)
    rows = {m["name"]: m for m in sched.stats.snapshot()["models"]}
    assert rows["heavy"]["outcomes"] == {"ok": 2} and rows["heavy"]["served"]
    assert rows["light"]["outcomes"] == {"ok": 1} and not rows["light"]["served"]
    assert sched.stats.outcomes["ok"] == 3
    names = {lab["name"] for (fam, lab) in ((f, dict(l)) for f, l in _samples(_full(sched, sched.stats.snapshot())))
             if fam == "inferd_model_info"}
    assert names == {"heavy"}                               # metrics list the models served
