"""The front's own time per request, for benchmarks: from a request's last bytes read to its
reply written (HTTP), or from the gRPC handler's start to the reply handed back to grpcio (gRPC: what
grpcio does before and after is not the front's to see); and of that, the time it waited for the
daemon's answer (the backend's classify: the client library's path, the daemon and the model).

Off unless the environment names a file: ``INFERD_OIP_TIMINGS=/path/timings.json``. Then each
door records its requests, and SIGUSR1 writes what was recorded since the last SIGUSR1 to that
file (written beside it and renamed into place, so a reader never sees half) and starts afresh:
``{"http": [[total_s, waited_s], ...], "grpc": [...]}``. bench/oip/run.py reads it around a measured window.
"""
from __future__ import annotations

import json
import os
import time

ENV = "INFERD_OIP_TIMINGS"


class Timings:
    """One door's samples: (seconds in all, seconds of it waiting for the daemon's answer)."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []

    def add(self, since: float, waited: float) -> None:
        self.samples.append((time.perf_counter() - since, waited))


class Recorder:
    """The doors' Timings and the file they are written to (None: not measured)."""

    def __init__(self, path: str):
        self.path = path
        self.doors = {"http": Timings(), "grpc": Timings()}

    @classmethod
    def from_env(cls) -> "Recorder | None":
        path = os.environ.get(ENV)
        return cls(path) if path else None

    def dump(self) -> None:
        """Write the samples since the last dump, and start afresh."""
        out = {name: t.samples for name, t in self.doors.items()}
        for t in self.doors.values():
            t.samples = []
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump(out, fh)
        os.replace(tmp, self.path)
