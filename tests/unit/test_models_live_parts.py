"""The pieces a live load and unload change, in process: the catalog's enter / remove / free_mid,
a device queue that gains a lane (a one-model queue turning into lanes with requests in it), the
model share's new lane."""
from types import SimpleNamespace

import pytest

from inferd.daemon.config import from_dict
from inferd.daemon.dispatch.fairness import Fifo
from inferd.daemon.dispatch.model_share import ModelShare
from inferd.daemon.dispatch.device import Device
from inferd.daemon.dispatch.lanes import ModelLanes
from inferd.daemon.models.catalog import Catalog, Served, UnknownModel


def model(name: str):
    spec = SimpleNamespace(name=name, frame_shape=(16, 16, 3), frame_bytes=768, input_form="float_nchw",
                           preprocess_id="p")
    return SimpleNamespace(spec=spec, digest=f"d-{name}", gen=1, describe=lambda: {"name": name})


def entry(name: str, **keys):
    return from_dict({"models": [{"builtin": "synthetic", "name": name, **keys}]}).models[0]


def served(catalog: Catalog, name: str, version: int = 1, **keys) -> Served:
    cfg = entry(name, version=version, **keys)
    return Served(catalog.free_mid(), name, version, model(name), config=cfg)


def test_a_model_entered_is_resolved_and_one_removed_is_unknown():
    catalog = Catalog.of([(entry("a"), model("a"))])
    assert catalog.single
    b = served(catalog, "b")
    assert b.mid == 1
    catalog.enter(b)
    assert not catalog.single and catalog.resolve("b", None, 0, 1) is b
    assert [m["name"] for m in catalog.describe()] == ["a", "b"]
    catalog.remove(b)
    assert catalog.single and b.retired and catalog.by_id[1] is b      # its id stays until released
    with pytest.raises(UnknownModel, match=r"'b'.*a \(versions 1\)"):
        catalog.resolve("b", None, 0, 1)
    assert [m["name"] for m in catalog.describe()] == ["a"] and catalog.live == [catalog.by_id[0]]
    assert catalog.free_mid() == 2                 # not reused before its devices let it go
    b.released = True
    assert catalog.free_mid() == 1 and catalog.free_mid({1}) == 2 and catalog.free_mid({1, 2}) == 3
    c = served(catalog, "c")
    catalog.enter(c)
    assert catalog.by_id[1] is c and catalog.resolve("c", None, 0, 1) is c


def test_a_newer_version_takes_the_route_and_the_route_survives_its_removal():
    catalog = Catalog.of([(entry("a"), model("a")), (entry("m"), model("m"))])
    v2 = served(catalog, "m", 2, canary_percent=50.0)
    catalog.enter(v2)
    route = catalog.routes["m"]
    assert route.canary is v2 and route.stable.version == 1 and route.canary_percent == 50.0
    v0 = served(catalog, "m", 0 + 3)               # newest again, no split: stable, takes all
    catalog.enter(v0)
    assert route.stable is v0 and route.canary is None
    catalog.remove(v0)                              # the stable one leaves: the newest left is stable
    assert route.stable is v2 and route.canary is None
    catalog.remove(v2)
    assert route.stable.version == 1
    catalog.remove(route.stable)
    assert "m" not in catalog.routes and catalog.single


def test_a_one_model_device_gains_a_lane_with_requests_queued():
    """Its queue becomes lanes: the requests queued move to lane 0 in their order, none lost, and
    batches never mix the two models; an empty lane may be given to a new model again."""
    dev = Device(0, "cpu", 1, clock=lambda: 0.0)
    dev.queue.use(Fifo())
    old = dev.queue
    for i in range(3):
        dev.queue.put(SimpleNamespace(mid=0, deadline=1e9, arrived=0.0, session=None, i=i))
    dev.add_model(1, [1.0, 2.0], Fifo, 4)
    assert isinstance(dev.queue, ModelLanes) and dev.queue is not old and len(old) == 0
    dev.queue.put(SimpleNamespace(mid=1, deadline=1e9, arrived=0.0, session=None, i=9))
    assert len(dev.queue) == 4 and dev.queue.lane_len(0) == 3 and dev.queue.lane_len(1) == 1
    assert len(dev.profiles) == 2
    batches = []
    while len(dev.queue):
        batches.append(dev.queue.take(lambda now, queued, expected, mid=0: (len(queued), 0.0), 0.0))
    assert sorted(tuple(r.i for r in b) for b in batches) == [(0, 1, 2), (9,)]   # in order, none mixed
    assert old.take(lambda *a: (1, 0.0), 0.0) == []     # its collector, woken, finds it empty
    dev.add_model(1, [1.0, 2.0], Fifo, 4)               # an empty lane may be reused
    dev.queue.put(SimpleNamespace(mid=1, deadline=1e9, arrived=0.0, session=None, i=10))
    with pytest.raises(RuntimeError, match="still holds"):
        dev.add_model(1, [1.0, 2.0], Fifo, 4)
    with pytest.raises(RuntimeError, match="every device has a lane"):
        dev.add_model(5, [1.0] * 6, Fifo, 4)


def test_a_lane_added_gets_its_share_from_where_the_others_are():
    share = ModelShare([1.0, 1.0])
    for lane in (0, 1):
        share.active(lane)
    for _ in range(50):
        share.charge(share.head(), 0.01)
    share.add(2, 2.0)
    share.active(2)
    assert share.vt[2] >= min(share.vt[:2]) - 0.01 - share.run_s    # level with the others, within a
    # batch and a run: it does not start at 0, which would hand it the device until it caught up
    share.served = [0.0, 0.0, 0.0]
    for _ in range(400):
        share.charge(share.head(), 0.01)
    parts = share.shares()
    assert parts[2] == pytest.approx(0.5, abs=0.03) and parts[0] == pytest.approx(0.25, abs=0.03)
