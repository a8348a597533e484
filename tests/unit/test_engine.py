"""The engine (daemon/pipeline/engine.py) on CPU: exact answers, the stream/event order of the GPU path
(NOTE [ engine streams ]) through a fake device whose events complete only when waited on, padded
batches, and the model options (precision, channels_last, compile) with their checks."""
import contextlib

import numpy as np
import pytest
import torch

from inferd.daemon.pipeline import engine as engine_mod
from inferd.daemon.models import loading as model_mod
from inferd.daemon.config import ConfigError, ModelConfig, from_dict
from inferd.daemon.pipeline.engine import Engine, Staging, embedding_of
from inferd.daemon.models.embedding_pooling import Pool
from inferd.daemon.pipeline.engine_options import EngineOptions, batch_sizes, size_for
from inferd.daemon.pipeline.preprocess import to_input
from inferd.daemon.models.zoo.shapes import make_dataset

pytestmark = pytest.mark.timeout(120)
CPU = torch.device("cpu")


class FakeEvent:
    def __init__(self, device: "FakeStreams", name: str):
        self.device, self.name, self.done = device, name, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.device.log.append(("host-wait", self.name))
        self.device.complete(self)


class FakeStreams:
    """A device that runs its queued work in issue order, but only when the host waits for an event
    (so nothing is done that was not waited for). It records every step and checks the two reuse
    rules of NOTE [ engine streams ]: a device input buffer is written only after the event of the
    compute that last read it, and a host staging buffer only after the copies that read it."""

    asynchronous = True

    def __init__(self):
        self.log: list = []
        self.events: list[FakeEvent] = []
        self.copies: list = []          # (source data_ptr range, copied event)
        self.reader: dict = {}          # device buffer data_ptr -> event recorded after its compute
        self._copied_into = None
        self._count = 0

    def _event(self, what: str) -> FakeEvent:
        self._count += 1
        event = FakeEvent(self, f"{what}#{self._count}")
        self.events.append(event)
        return event

    def complete(self, event: FakeEvent) -> None:
        for e in self.events[:self.events.index(event) + 1]:
            e.done = True

    def input_buffer(self, shape):
        return torch.zeros(shape, dtype=torch.uint8)

    def copy_in(self, dst, src, after=None):
        key = dst.untyped_storage().data_ptr()
        last = self.reader.get(key)
        assert last is None or last.done or after is last, \
            f"device buffer rewritten before {last.name} (its last reader) and without waiting for it"
        dst.copy_(src)
        copied = self._event("copied")
        self.log.append(("copy-in", copied.name, after.name if after else None))
        self.copies.append((src.untyped_storage().data_ptr(), copied))
        self._copied_into = key
        return dst, copied

    @contextlib.contextmanager
    def compute(self, after=None):
        self.log.append(("compute-wait", after.name if after else None))
        yield
        self.log.append(("compute-end",))

    def record(self):
        event = self._event("consumed")
        self.log.append(("record", event.name))
        if self._copied_into is not None:
            self.reader[self._copied_into] = event
        return event

    def copy_out(self, src):
        done = self._event("done")
        self.log.append(("copy-out", done.name, tuple(src.shape)))
        return src.clone(), done

    def follow_default(self) -> None:
        self.log.append(("follow-default",))

    def synchronize(self) -> None:
        self.log.append(("sync-streams",))
        for e in self.events:
            e.done = True

    def host_write(self, staging: torch.Tensor) -> None:
        """The collector rewrites ``staging``: every copy that read it must be done."""
        key = staging.untyped_storage().data_ptr()
        pending = [e.name for ptr, e in self.copies if ptr == key and not e.done]
        assert not pending, f"staging buffer rewritten before its copy event {pending}"


def _shapes(options=None, streams=None, embed=False):
    model = model_mod.load(ModelConfig(builtin="shapes"))
    engine = Engine(CPU, model, keep_k=3, streams=streams, options=options)
    engine.load()
    return model, engine


def _frames(n: int, seed: int = 7):
    images, _ = make_dataset(n, seed=seed)
    staging = Staging(CPU, 16, (64, 64, 3))
    staging.arrays[0][:n] = images
    return images, staging


def _want(model, images, k):
    with torch.inference_mode():
        x = to_input(torch.from_numpy(images), model.spec.mean, model.spec.std)
        raw = model.module(x)
        scores, idx = torch.softmax(raw, dim=1).topk(k, dim=1)
        vectors = embedding_of(raw, torch.from_numpy(images), Pool.parse(model.spec.embedding_pool))
    return idx.tolist(), scores.tolist(), vectors.numpy()


def test_cpu_answers_and_embeddings_equal_the_model_bit_for_bit():
    model, engine = _shapes()
    images, staging = _frames(11)
    indices, scores, vectors = engine.launch(staging.tensors[0], 11, 4, want_embedding=True).result()
    want_idx, want_scores, want_vectors = _want(model, images, 4)
    assert indices == want_idx and scores == want_scores
    assert vectors.dtype == np.float32 and np.array_equal(vectors, want_vectors)
    assert engine.launch(staging.tensors[0], 11, 4).result()[2] is None


def test_the_gpu_order_copy_compute_copy_back_with_events_only():
    fake = FakeStreams()
    model, engine = _shapes(streams=fake)
    images, staging = _frames(5)
    fake.log.clear()
    pending = engine.launch(staging.tensors[0], 5, 3, want_embedding=True)
    steps = [s[0] for s in fake.log]
    # started, (model), consumed, one packed copy back
    assert steps == ["copy-in", "compute-wait", "record", "record", "copy-out", "compute-end", "host-wait"], fake.log
    copied = fake.log[0][1]
    assert fake.log[1] == ("compute-wait", copied)          # compute waits for its own copy
    assert fake.log[-1] == ("host-wait", copied)            # wait_copy: the staging buffer is free
    assert fake.log[4][2] == (5, 3 + 3 + engine.embedding_dim)   # indices, scores, embedding
    done = fake.log[4][1]
    assert not next(e for e in fake.events if e.name == done).done   # nothing waited for it yet
    indices, scores, vectors = pending.result()
    assert fake.log[-1] == ("host-wait", done) and ("sync-streams",) not in fake.log
    assert pending.device_seconds() is None                 # the fake keeps no time
    want_idx, want_scores, want_vectors = _want(model, images, 3)
    assert indices == want_idx and scores == want_scores and np.array_equal(vectors, want_vectors)


def _want_logits(model, images):
    with torch.inference_mode():
        return model.module(to_input(torch.from_numpy(images), model.spec.mean, model.spec.std)).float().numpy()


def test_the_logits_rows_asked_for_come_back_equal_to_the_model_on_a_cpu():
    model, engine = _shapes()
    images, staging = _frames(9)
    pending = engine.launch(staging.tensors[0], 9, 3, logits_rows=[1, 4, 8])
    indices, _, _ = pending.result()
    got = pending.logits()
    assert got.dtype == np.float32 and got.shape == (3, len(model.spec.labels))
    np.testing.assert_allclose(got, _want_logits(model, images)[[1, 4, 8]], atol=1e-5, rtol=0)
    assert indices == _want(model, images, 3)[0]
    plain = engine.launch(staging.tensors[0], 9, 3)
    plain.result()
    assert plain.logits() is None


def test_logits_ride_in_the_one_copy_back_and_only_when_asked_for():
    fake = FakeStreams()
    model, engine = _shapes(streams=fake)
    images, staging = _frames(6)
    fake.log.clear()
    engine.launch(staging.tensors[0], 6, 3).result()
    assert [s[2] for s in fake.log if s[0] == "copy-out"] == [(6, 6)]     # unchanged without logits
    fake.log.clear()
    pending = engine.launch(staging.tensors[0], 6, 3, logits_rows=[0, 5])
    classes = len(model.spec.labels)
    copies = [s[2] for s in fake.log if s[0] == "copy-out"]
    assert copies == [(6 * 6 + 2 * classes,)], fake.log                    # still one copy back
    indices, scores, _ = pending.result()
    want_idx, want_scores, _ = _want(model, images, 3)
    assert indices == want_idx and scores == want_scores
    np.testing.assert_allclose(pending.logits(), _want_logits(model, images)[[0, 5]], atol=1e-5, rtol=0)
    run = engine.launch(staging.tensors[0], 6, 3, logits_rows=[2, 3, 4])      # a run of rows: a slice
    run.result()
    np.testing.assert_allclose(run.logits(), _want_logits(model, images)[2:5], atol=1e-5, rtol=0)


def test_device_input_buffers_alternate_and_wait_for_their_last_reader():
    fake = FakeStreams()
    model, engine = _shapes(streams=fake)
    images, staging = _frames(12)
    staging.arrays[1][:12] = images[::-1]
    fake.log.clear()
    pendings = [engine.launch(staging.tensors[i % 2], 12, 2, wait_copy=False) for i in range(3)]
    copies = [s for s in fake.log if s[0] == "copy-in"]
    records = [s[1] for s in fake.log if s[0] == "record"][1::2]     # each batch's "consumed"
    assert copies[0][2] is None and copies[1][2] is None     # two fresh buffers
    assert copies[2][2] == records[0]                        # the third reuses the first one's, after it
    results = [p.result() for p in reversed(pendings)]       # any order
    assert results[0] == results[2] and results[0][0] == _want(model, images, 2)[0]


def test_a_staging_buffer_is_free_only_once_its_copy_event_completed():
    fake = FakeStreams()
    model, engine = _shapes(streams=fake)
    images, staging = _frames(4)
    pending = engine.launch(staging.tensors[0], 4, 1, wait_copy=False)
    assert not pending.staged()
    with pytest.raises(AssertionError, match="staging buffer rewritten before its copy event"):
        fake.host_write(staging.tensors[0])
    pending.wait_staged()
    assert pending.staged()
    fake.host_write(staging.tensors[0])
    engine.launch(staging.tensors[0], 4, 1)                  # the executor's order: wait_copy
    fake.host_write(staging.tensors[0])


def test_padded_batches_answer_only_their_rows(monkeypatch):
    """model.compile pads a batch up to the next prepared size; the compiler itself is replaced
    here (inductor takes minutes on this host), the padding logic is what is tested."""
    monkeypatch.setattr(engine_mod, "compiled", lambda module: module)
    fake = FakeStreams()
    model, engine = _shapes(options=EngineOptions(compile="compile"), streams=fake)
    images, staging = _frames(16)
    fake.log.clear()
    indices, scores, _ = engine.launch(staging.tensors[0], 5, 3).result()
    assert engine._sizes == (1, 2, 4, 8, 16)                # prepared at the first launch
    assert [s[2] for s in fake.log if s[0] == "copy-out"] == [(5, 6)]   # 5 rows back, not 8
    want_idx, want_scores, _ = _want(model, images[:5], 3)
    assert indices == want_idx
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # a CPU reads the staging rows themselves: padded there too (compiled graphs are per size)
    _, cpu = _shapes(options=EngineOptions(compile="compile"))
    seen = []
    forward = cpu._forward
    monkeypatch.setattr(cpu, "_forward", lambda rows, want=True: seen.append(rows.shape[0]) or forward(rows, want))
    assert cpu.launch(staging.tensors[0], 5, 3).result()[0] == want_idx
    assert seen == [1, 2, 4, 8, 16, 8]


def test_prepare_readies_every_size_before_the_first_timed_batch(monkeypatch):
    calls = []
    monkeypatch.setattr(engine_mod, "compiled", lambda module: calls.append(module) or module)
    fake = FakeStreams()
    model, engine = _shapes(options=EngineOptions(compile="compile"), streams=fake)
    seen = []
    monkeypatch.setattr(engine, "_forward", lambda rows, want=True: seen.append(rows.shape[0]) or
                        (torch.zeros((rows.shape[0], 8)), None))
    engine.prepare(8)
    assert seen == [1, 2, 4, 8] and len(calls) == 1 and ("sync-streams",) in fake.log
    images, staging = _frames(8)
    fake.log.clear()
    engine.launch(staging.tensors[0], 3, 2).result()
    assert seen[4:] == [4] and ("sync-streams",) not in fake.log   # padded 3 -> 4, nothing prepared
    _, eager = _shapes(streams=FakeStreams())
    monkeypatch.setattr(eager, "_forward", lambda rows, want=True: seen.append(-rows.shape[0]) or
                        (torch.zeros((rows.shape[0], 8)), None))
    eager.prepare(16)                   # an asynchronous device warms 1 and max once
    assert seen[5:] == [-1, -16]


def test_sizes_of_padded_batches():
    assert batch_sizes(1) == (1,) and batch_sizes(16) == (1, 2, 4, 8, 16)
    assert batch_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    assert [size_for(n, batch_sizes(48)) for n in (1, 3, 17, 33, 48)] == [1, 4, 32, 48, 48]
    with pytest.raises(ValueError, match="above the largest prepared size 16"):
        size_for(17, batch_sizes(16))


def test_bf16_and_channels_last_on_cpu_agree_with_fp32():
    model, fp32 = _shapes()
    images, staging = _frames(16, seed=3)
    want_idx, want_scores, _ = fp32.launch(staging.tensors[0], 16, 1).result()
    _, bf16 = _shapes(options=EngineOptions(precision="bf16"))
    got_idx, got_scores, vectors = bf16.launch(staging.tensors[0], 16, 1, want_embedding=True).result()
    assert sum(a == b for a, b in zip(got_idx, want_idx)) >= 15
    np.testing.assert_allclose(got_scores, want_scores, atol=0.05)
    assert vectors.dtype == np.float32
    _, nhwc = _shapes(options=EngineOptions(channels_last=True))
    got_idx, got_scores, _ = nhwc.launch(staging.tensors[0], 16, 1).result()
    assert got_idx == want_idx
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    assert nhwc.replica is not nhwc.model.module           # the shared CPU module is left as it was
    conv = next(m for m in nhwc.model.module.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw input", "channels_last input"])
def test_a_frozen_model_answers_within_float_rounding_at_any_batch_size_with_its_embeddings(channels_last):
    """model.compile = freeze: a channels_last copy traced once on one frame and frozen; batches of
    1, 5 and 11 run as they are (no padding), with the answers and the embedding layer's pooled
    output of the eager model within float rounding, and the shared module left as it was: no
    trace's hook, its weights in their own memory format."""
    model, engine = _shapes(options=EngineOptions(compile="freeze", channels_last=channels_last))
    assert isinstance(engine.replica, torch.jit.ScriptModule) and not engine.options.padded
    layer = dict(model.module.named_modules())[model.spec.embedding_layer]
    assert not layer._forward_hooks                          # the trace's own hook is gone
    weights = [p for p in model.module.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous() for p in weights)   # the copy went channels_last
    engine_mod._hook(layer)                                  # for the eager reference (_want)
    images, staging = _frames(11)
    seen = []
    forward = engine._forward
    engine._forward = lambda rows, want=True: seen.append(rows.shape[0]) or forward(rows, want)
    for n in (1, 5, 11):
        indices, scores, vectors = engine.launch(staging.tensors[0], n, 4, want_embedding=True).result()
        want_idx, want_scores, want_vectors = _want(model, images[:n], 4)
        assert indices == want_idx
        np.testing.assert_allclose(scores, want_scores, atol=1e-5)
        np.testing.assert_allclose(vectors, want_vectors, atol=1e-5)
    assert seen == [1, 5, 11] and engine.embedding_dim == want_vectors.shape[1]


class _ConvBn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).mean((2, 3))


def test_a_torchscript_model_is_frozen_as_a_copy_and_names_no_embedding_layer():
    """A TorchScript model under freeze: frozen as it is, from a channels_last copy (the shared
    module keeps its weights' format), within float rounding at another batch size; an embedding
    layer inside it is refused by name, since TorchScript takes no hooks."""
    from inferd.daemon.pipeline.engine_options import frozen
    bn = _ConvBn().eval()
    bn.bn.running_mean.uniform_(-1, 1)                      # folding that ignored the statistics
    bn.bn.running_var.uniform_(0.5, 2)                      # would show
    scripted = torch.jit.script(bn)
    module = frozen(scripted, torch.zeros(1, 3, 8, 8))
    assert isinstance(module, torch.jit.ScriptModule) and scripted.conv.weight.is_contiguous()
    x = torch.randn(5, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(module(x), scripted(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="model.embedding_layer: 'conv' is in a TorchScript module"):
        frozen(scripted, torch.zeros(1, 3, 8, 8), "conv")


@pytest.mark.parametrize("options, message", [
    (EngineOptions(precision="fp16"), "model.precision: fp16 needs a CUDA device"),
    (EngineOptions(compile="graphs"), "model.compile: graphs are CUDA graphs"),
    (EngineOptions(compile="freeze", precision="bf16"), "model.compile: freeze is for CPU devices at fp32"),
])
def test_options_a_cpu_cannot_run_stop_the_load(options, message):
    with pytest.raises(ConfigError, match=message):
        _shapes(options=options)


def test_option_keys_are_checked_and_precision_changes_the_digest():
    with pytest.raises(ConfigError, match="model.precision: 'fp64' is not one of fp32, bf16, fp16"):
        from_dict({"model": {"precision": "fp64"}})
    with pytest.raises(ConfigError, match="model.compile: graphs prepares every batch size"):
        from_dict({"model": {"compile": "graphs", "warmup_batches": 0}})
    fp32 = model_mod.load(ModelConfig(builtin="shapes"))
    bf16 = model_mod.load(ModelConfig(builtin="shapes", precision="bf16"))
    nhwc = model_mod.load(ModelConfig(builtin="shapes", channels_last=True))
    assert bf16.digest == fp32.digest + "+bf16" and nhwc.digest == fp32.digest
    assert bf16.options == EngineOptions(precision="bf16")


def test_with_per_batch_auto_each_cpu_batch_runs_on_the_team_its_size_measured_fastest(monkeypatch):
    """threads.per_batch = auto (NOTE [ team size per batch ]): the engine asks its TeamSize before
    each batch, sets the executor thread's torch threads to it, and reports the batch time; the
    answers do not depend on it."""
    from inferd.daemon.pipeline import team_size, thread_pools

    monkeypatch.setattr(thread_pools._state, "per_batch", "auto")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model, engine = _shapes()
        assert engine.team is not None and engine.team.candidates == (1, 2)
        seen = []
        pick, observe = engine.team.pick, engine.team.observe
        monkeypatch.setattr(engine.team, "pick", lambda n: seen.append(("pick", n, p := pick(n))) or p)
        monkeypatch.setattr(engine.team, "observe",
                            lambda n, t, s: seen.append(("ran", n, t, torch.get_num_threads(), s > 0)) or observe(n, t, s))
        images, staging = _frames(5)
        for _ in range(2 * team_size.TRIALS + 2):
            indices, scores, _ = engine.launch(staging.tensors[0], 5, 3).result()
            assert (indices, scores) == _want(model, images, 3)[:2]
        picks = [e[2] for e in seen if e[0] == "pick"]
        assert sorted(picks[:2 * team_size.TRIALS]) == [1] * team_size.TRIALS + [2] * team_size.TRIALS
        assert all(e[2] == e[3] and e[4] for e in seen if e[0] == "ran")    # ran on the team picked
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(thread_pools._state, "per_batch", "fixed")
    assert _shapes()[1].team is None
