"""NOTE [ model share ]: the policy over a device's lanes, and the queue that holds one lane per
model (batches never mix models)."""
import random
from types import SimpleNamespace

import pytest

from inferd.daemon.dispatch.fairness import Fifo
from inferd.daemon.dispatch.model_share import ModelShare
from inferd.daemon.dispatch.lanes import ModelLanes
from inferd.daemon.dispatch.queues import DeviceQueue


def drive(share: ModelShare, cost: list[float], batches: int) -> list[float]:
    """Every lane backlogged: take ``batches`` batches as the queue does (head, charge)."""
    for lane in range(len(cost)):
        share.active(lane)
    for _ in range(batches):
        lane = share.head()
        share.charge(lane, cost[lane])
    return share.shares()


@pytest.mark.parametrize("shares, cost", [
    ([1, 1], [0.010, 0.010]),
    ([2, 1], [0.010, 0.010]),
    ([1, 3], [0.018, 0.004]),       # unequal batch times: shares are of device time, not batches
    ([1, 1, 2], [0.030, 0.002, 0.011]),
])
def test_backlogged_lanes_get_their_share_of_device_time(shares, cost):
    got = drive(ModelShare(shares), cost, 3000)
    want = [s / sum(shares) for s in shares]
    for g, w in zip(got, want):
        assert abs(g - w) < 0.02 * w + 0.002, (got, want)


def test_lanes_alternate_in_runs_of_batches_not_one_each():
    share = ModelShare([1, 1], run_s=0.008)
    order = []
    for lane in (0, 1):
        share.active(lane)
    for _ in range(28):
        lane = share.head()
        order.append(lane)
        share.charge(lane, 0.002)
    # the first run until 8 ms ahead, then each run from 8 ms behind to 8 ms ahead
    assert order == [0] * 4 + [1] * 8 + [0] * 8 + [1] * 8


def test_a_closed_loop_lane_that_empties_keeps_its_place():
    """A model whose clients wait for their answers empties its lane at each batch; it keeps its
    virtual time, so it still gets its share (DRR lost its turn each time and served 1:1)."""
    share = ModelShare([2, 1], run_s=0.008)
    share.active(1)
    for _ in range(3000):
        share.active(0)                    # lane 0's clients are back: one batch's worth
        lane = share.head()
        share.charge(lane, 0.010)
        if lane == 0:
            share.idle(0)                  # taken whole: empty until its answers go out
    got = share.shares()
    assert abs(got[0] - 2 / 3) < 0.02, got


def test_an_idle_lane_saves_up_at_most_one_run():
    share = ModelShare([1, 1], run_s=0.008)
    share.active(0)
    for _ in range(100):                    # lane 0 alone for a second
        share.charge(share.head(), 0.01)
    share.active(1)
    order = []
    for _ in range(200):
        lane = share.head()
        order.append(lane)
        share.charge(lane, 0.004)
    first_run = order.index(0)
    # its first run: the credit it kept (one run), a run ahead, and lane 0's last batch
    assert 1 <= first_run <= (2 * 0.008 + 0.01) / 0.004 + 1, order[:12]
    assert abs(order.count(1) / len(order) - 0.5) < 0.05


def request(mid: int, deadline: float = 1e9, arrived: float = 0.0):
    return SimpleNamespace(mid=mid, deadline=deadline, arrived=arrived, session=None)


def lanes_queue(shares, latency=lambda mid, n: 0.001 * n, max_batch=4):
    return ModelLanes(Fifo, shares, latency, max_batch, clock=lambda: 0.0)


def take_all(q: ModelLanes, max_batch: int = 4) -> list[list]:
    out = []
    while len(q):
        out.append(q.take(lambda now, queued, expected, mid=0: (min(len(queued), max_batch), 0.0), 0.0))
    return out


def test_batches_never_mix_models():
    rng = random.Random(5)
    print("seed 5")
    q = lanes_queue([1, 2, 1])
    for _ in range(300):
        q.put(request(rng.randrange(3)))
    batches = take_all(q)
    assert sum(map(len, batches)) == 300
    assert all(len({r.mid for r in b}) == 1 for b in batches)
    assert {b[0].mid for b in batches} == {0, 1, 2}


def test_a_request_near_its_deadline_goes_before_the_turn():
    q = lanes_queue([1, 1], latency=lambda mid, n: 0.010)
    for _ in range(8):
        q.put(request(0))
    q.put(request(1, deadline=0.015))       # misses it behind one more batch of lane 0 (10 ms)
    first = q.take(lambda now, queued, expected, mid=0: (min(len(queued), 4), 0.0), 0.0)
    assert [r.mid for r in first] == [1]


def test_steal_takes_one_lane_the_thief_runs():
    q = lanes_queue([1, 1])
    for mid in (0, 1, 1, 1, 0):
        q.put(request(mid))
    assert [r.mid for r in q.steal(8, serves=lambda mid: mid == 0)] == [0, 0]
    assert [r.mid for r in q.steal(8)] == [1, 1, 1]
    assert len(q) == 0


def test_one_model_queue_is_the_plain_queue():
    q = DeviceQueue(clock=lambda: 0.0)
    for _ in range(5):
        q.put(request(0))
    got = q.take(lambda now, queued, expected: (len(queued), 0.0), 0.0)   # a three-argument plan
    assert len(got) == 5 and q.share_served() == []
