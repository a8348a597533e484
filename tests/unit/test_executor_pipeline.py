"""The per-device pipeline (NOTE [ request path ] in daemon/pipeline/collector.py) in one process: the executor
(daemon/pipeline/executor.py) runs staged batches in order, frees each staging buffer once its frames are on
the device, and on an asynchronous device queues batch k+1 before it collects batch k, so the device
never waits for the host between two batches. The device is the fake of tests/unit/test_engine.py, whose work runs only
when the host waits for it, so the order of launches and collections is exactly what is recorded."""
import queue
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from test_engine import FakeStreams, _want

from inferd.daemon.pipeline import executor as executor_mod
from inferd.daemon.models import loading as model_mod
from inferd.daemon.pipeline.executor import Executor
from inferd.daemon.pipeline.records import BatchResult, Outcome, Request
from inferd.daemon.config import ModelConfig
from inferd.daemon.dispatch.device import Device
from inferd.daemon.dispatch.fairness import Fifo
from inferd.daemon.pipeline.engine import Engine
from inferd.daemon.models.zoo.shapes import make_dataset

pytestmark = pytest.mark.timeout(60)


def _executor(monkeypatch, streams, order):
    """An Executor of the shapes model on a CPU Device whose engine runs on ``streams``; every
    launch and collection is appended to ``order``."""

    class Logged(Engine):
        def __init__(self, device, model, keep_k):
            super().__init__(device, model, keep_k, streams=streams)

        def launch(self, frames, n, k, want_embedding=False, *, wait_copy=True):
            order.append(("launch", n))
            return _Logged(super().launch(frames, n, k, want_embedding, wait_copy=wait_copy), n, order)

    monkeypatch.setattr(executor_mod, "Engine", Logged)
    model = model_mod.load(ModelConfig(builtin="shapes"))
    dev = Device(0, "cpu", 1)
    delivered = queue.SimpleQueue()
    ex = Executor(dev, model, deliver=delivered.put, max_batch=8, warmup_batches=0, keep_k=3)
    assert [ex.free.get_nowait() for _ in range(2)] == [0, 1]      # both taken, as a collector does
    return model, dev, ex.staging, ex.free, delivered, ex


class _Logged:
    """A Pending whose ``result()`` is logged."""

    def __init__(self, pending, n, order):
        self._pending, self._n, self._order = pending, n, order

    def __getattr__(self, name):
        return getattr(self._pending, name)

    def result(self):
        self._order.append(("collect", self._n))
        return self._pending.result()


def _stage(dev, staging, buffer, images):
    """A batch of requests without sessions (as canaries are) over ``images``, staged in ``buffer``."""
    now = time.monotonic()
    live = [Request(None, None, i, -1, 3, now, now + 60, dev) for i in range(len(images))]
    staging.arrays[buffer][:len(images)] = images
    return BatchResult.taking(dev, live), live


@pytest.mark.parametrize("asynchronous", [True, False])
def test_batches_run_in_order_and_an_asynchronous_device_gets_the_next_before_the_last_is_collected(
        monkeypatch, asynchronous):
    streams = FakeStreams()
    streams.asynchronous = asynchronous
    order = []
    model, dev, staging, free, delivered, ex = _executor(monkeypatch, streams, order)
    images, _ = make_dataset(5, seed=3)
    first, second = images[:3], images[3:]
    ex.submit(_stage(dev, staging, 0, first)[0], 0)     # both waiting before the executor starts
    ex.submit(_stage(dev, staging, 1, second)[0], 1)
    ex.start()
    results = [delivered.get(timeout=30), delivered.get(timeout=30)]
    ex.stop()
    ex.join(30)
    if asynchronous:
        assert order == [("launch", 3), ("launch", 2), ("collect", 3), ("collect", 2)]
    else:
        assert order == [("launch", 3), ("collect", 3), ("launch", 2), ("collect", 2)]
    assert sorted([free.get_nowait(), free.get_nowait()]) == [0, 1]     # both buffers given back
    for result, frames in zip(results, (first, second)):
        idx, scores, _ = _want(model, frames, 3)
        assert all(e.outcome is Outcome.DONE for e in result.entries)
        assert [[i for i, _ in e.top] for e in result.entries] == idx
        assert np.allclose([[s for _, s in e.top] for e in result.entries], scores)
        assert result.finished >= result.started and not result.error
    # the second computed while the first was collected: its busy time starts when the first ended
    assert results[1].started >= results[0].finished
    assert dev.running == [] and dev.running_since is None


def test_a_request_re_dispatched_while_its_batch_was_staged_is_not_computed(monkeypatch):
    order = []
    model, dev, staging, free, delivered, ex = _executor(monkeypatch, FakeStreams(), order)
    images, _ = make_dataset(3, seed=4)
    result, live = _stage(dev, staging, 0, images)
    live[1].attempt = 1                                # the loop moved it elsewhere meanwhile
    ex.submit(result, 0)
    ex.start()
    got = delivered.get(timeout=30)
    ex.stop()
    ex.join(30)
    assert order[0] == ("launch", 2)
    assert [e.outcome for e in got.entries] == [Outcome.DONE, Outcome.DROPPED, Outcome.DONE]
    assert [e.request for e in got.entries] == live
    idx, _, _ = _want(model, images[[0, 2]], 3)        # the rows closed up: each answer is its own
    assert [[i for i, _ in e.top] for e in got.with_outcome(Outcome.DONE)] == idx


def test_a_model_that_does_not_fit_the_device_is_named(monkeypatch):
    """Start-up with several models: the one whose load runs out of device memory is named in a
    ConfigError (the daemon exits 78 with it), not a bare OutOfMemoryError of some model."""
    from inferd.daemon.config import ConfigError, from_dict
    from inferd.daemon.models.catalog import Catalog

    class Full(Engine):
        def load(self):
            if self.model.spec.name == "big":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore")
            return super().load()

    monkeypatch.setattr(executor_mod, "Engine", Full)
    cfg = from_dict({"models": [{"builtin": "noop", "name": "small"}, {"builtin": "noop", "name": "big"}]})
    catalog = Catalog.of([(m, model_mod.load(m)) for m in cfg.models])
    dev = Device(0, "cpu", 1)
    dev.use_models([1.0, 1.0], Fifo, 4)
    ex = Executor(dev, catalog.by_id, deliver=lambda r: None, max_batch=4, warmup_batches=0)
    ex.start()
    assert ex.ready.wait(30)
    ex.join(10)
    assert isinstance(ex.startup_error, ConfigError)
    message = str(ex.startup_error)
    assert "model big does not fit cpu#0's memory" in message and "20.00 GiB" in message and "\n" not in message
