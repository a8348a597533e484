"""The device interface of an Engine: where its copies and its compute run, and the events between them.

daemon/pipeline/engine.py writes its pipeline once against this interface (NOTE [ engine streams ] there);
what differs per device lives here:

    method                       CpuStreams (today's CPU path)       CudaStreams (one per CUDA device)
    ---------------------------  ----------------------------------  --------------------------------------
    input_buffer(shape)          None: the model reads the staging   a uint8 device tensor the frames are
                                 rows themselves (no copy)           copied into
    copy_in(dst, src, after)     nothing to copy                     on the copy stream: wait for ``after``
                                                                     (the last compute that read ``dst``),
                                                                     dst.copy_(src, non_blocking)
    compute(after)               a no-op context                     the compute stream made current, after
                                                                     it waited for ``after`` (the copy)
    record()                     a completed event                   an event on the compute stream
    copy_out(src)                ``src`` itself                      one non_blocking copy into pinned host
                                                                     memory on the compute stream
    follow_default()             nothing                             both streams wait for the current
                                                                     stream (the upload of the weights)
    synchronize()                nothing                             both streams, never the whole device

An event has ``query()`` (done yet?) and ``synchronize()`` (wait for this one event only). A CPU
event is always done: every call above has finished its work when it returns. tests/unit/test_engine.py
has a third implementation whose events complete only when waited on, and which checks the order.
"""
from __future__ import annotations

import contextlib

import torch


class DoneEvent:
    """The event of work that finished before it was recorded (the CPU's)."""

    __slots__ = ()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


DONE = DoneEvent()


class CpuStreams:
    """Everything runs on the calling thread, in program order; events are always complete."""

    asynchronous = False

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = device

    def input_buffer(self, shape: tuple) -> torch.Tensor | None:
        return None

    def copy_in(self, dst, src: torch.Tensor, after=None):
        if dst is not None:
            dst.copy_(src)
            return dst, DONE
        return src, DONE

    def compute(self, after=None):
        return contextlib.nullcontext()

    def record(self):
        return DONE

    def copy_out(self, src: torch.Tensor):
        return src, DONE

    def follow_default(self) -> None:
        return None

    def synchronize(self) -> None:
        return None


class CudaStreams:
    """A copy stream and a compute stream on one CUDA device, and pinned host memory for results.

    The host buffers come from torch's caching host allocator (``pin_memory=True``), which keeps a
    block from reuse until the copies recorded on it are done, so each launch may take a fresh one.
    """

    asynchronous = True

    def __init__(self, device: torch.device):
        self.device = device
        with torch.cuda.device(device):
            self.copy_stream = torch.cuda.Stream(device)
            self.compute_stream = torch.cuda.Stream(device)

    def input_buffer(self, shape: tuple) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.uint8, device=self.device)

    def copy_in(self, dst: torch.Tensor, src: torch.Tensor, after=None):
        with torch.cuda.stream(self.copy_stream):
            if after is not None:
                self.copy_stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            return dst, self._event(self.copy_stream)

    @contextlib.contextmanager
    def compute(self, after=None):
        with torch.cuda.device(self.device), torch.cuda.stream(self.compute_stream):
            if after is not None:
                self.compute_stream.wait_event(after)
            yield

    def record(self):
        return self._event(self.compute_stream)

    def copy_out(self, src: torch.Tensor):
        """``src`` (on the device, made on the compute stream) into pinned host memory; call inside
        ``compute()``. The returned host tensor is valid once the event completes."""
        host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        host.copy_(src, non_blocking=True)
        return host, self._event(self.compute_stream)

    def follow_default(self) -> None:
        """Order both streams after the work queued so far on the device's current stream (the
        weights' upload and the output check at load)."""
        current = torch.cuda.current_stream(self.device)
        self.copy_stream.wait_stream(current)
        self.compute_stream.wait_stream(current)

    def synchronize(self) -> None:
        self.copy_stream.synchronize()
        self.compute_stream.synchronize()

    @staticmethod
    def _event(stream):
        # blocking: a host that waits on it sleeps (cudaEventBlockingSync) instead of spinning a
        # core for the whole batch, which the event loop and the clients need
        # timing: Pending.device_seconds() (daemon/pipeline/engine.py) reads the time between two of them
        event = torch.cuda.Event(enable_timing=True, blocking=True)
        event.record(stream)
        return event


def streams_for(device: torch.device):
    """The Streams of ``device``: CudaStreams for cuda, CpuStreams otherwise."""
    return CudaStreams(device) if device.type == "cuda" else CpuStreams(device)
