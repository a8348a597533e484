"""Which device the calling thread serves: each executor thread (daemon/pipeline/executor.py) enters
its device first thing; code that runs inside a forward pass and must act per device reads it (the
test model daemon/models/zoo/synthetic.py, whose costs and faults are set per device).

A module of its own, importing nothing, so that a model reads the identity without importing the
executor, which imports the models (the cycle a lazy import used to hide).
"""
from __future__ import annotations

import threading

_current = threading.local()


def enter(device) -> None:
    """Mark the calling thread as ``device``'s executor (daemon/dispatch/device.py Device)."""
    _current.device = device


def current_device():
    """The Device whose executor thread is calling; None on any other thread."""
    return getattr(_current, "device", None)
