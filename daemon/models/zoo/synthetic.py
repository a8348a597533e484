"""A model with a known cost and injectable faults, per device: for tests and benchmarks of a pool.

Cost. A batch of n frames takes ``(base_ms + per_frame_ms * n) / speed`` of wall time, spent in
``time.sleep`` (which releases the GIL), so several devices really run side by side even on a
2-core host and a pool's capacity is known exactly: device d serves at most
``speed_d * 1000 * B / (base_ms + per_frame_ms * B)`` frames per second at batch B.

Answer. Frames are read as grey levels: ``logits[n, k] = -(m_n - k / 9)^2 * 100`` where m_n is the
mean of frame n after scaling to 0..1 (mean 0, std 1), so a frame filled with value v is class
round(9 v / 255): any answer sent to the wrong request, or computed from the wrong slot, shows.

Control. ``$INFERD_SYNTHETIC`` names a JSON file, read again whenever it changes::

    {"base_ms": 2.0, "per_frame_ms": 0.5,
     "speed": {"0": 1.0, "1": 3.0},              # by device index; default 1.0
     "fault": {"1": "raise"}}                     # raise | hang | slow:F | none; default none

``raise`` makes every batch on that device raise RuntimeError; ``hang`` blocks the batch (in 10 ms
steps) until the file no longer says hang, so a stuck device can come back and its late result be
seen and discarded; ``slow:F`` divides the device's speed by F. The device is the one whose executor
thread runs the forward pass (daemon/pipeline/device_thread.py).
"""
from __future__ import annotations

import json
import os
import time

import torch
from torch import nn

from ...pipeline.device_thread import current_device

LABELS = tuple(f"level_{k}" for k in range(10))
SIZE = 16
DEFAULTS = {"base_ms": 2.0, "per_frame_ms": 0.5, "speed": {}, "fault": {}}


class _Control:
    """The control file, parsed again when its mtime changes."""

    def __init__(self, path: str | None):
        self.path = path
        self._stamp = None
        self.values = dict(DEFAULTS)

    def read(self) -> dict:
        if not self.path:
            return self.values
        try:
            stamp = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return self.values
        if stamp != self._stamp:
            with open(self.path) as fh:
                self.values = {**DEFAULTS, **json.load(fh)}
            self._stamp = stamp
        return self.values


class SyntheticNet(nn.Module):
    def __init__(self, control_path: str | None = None):
        super().__init__()
        self._control = _Control(control_path if control_path is not None else os.environ.get("INFERD_SYNTHETIC"))
        self.register_buffer("levels", torch.arange(10, dtype=torch.float32) / 9.0)

    def _device_index(self) -> str:
        dev = current_device()
        return str(dev.index) if dev is not None else "-1"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctl = self._control.read()
        index = self._device_index()
        fault = ctl["fault"].get(index, "none")
        if fault == "raise":
            raise RuntimeError(f"injected fault on device {index}")
        while fault == "hang":
            time.sleep(0.01)
            fault = self._control.read()["fault"].get(index, "none")
        speed = float(ctl["speed"].get(index, 1.0))
        if fault.startswith("slow:"):
            speed /= float(fault[5:])
        time.sleep((ctl["base_ms"] + ctl["per_frame_ms"] * x.shape[0]) / speed / 1000.0)
        m = x.mean(dim=(1, 2, 3)).unsqueeze(1)
        return -((m - self.levels) ** 2) * 100.0


def level_of(value: int) -> int:
    """The class a frame filled with ``value`` gets."""
    return round(9 * value / 255)
