"""Closed-loop OIP HTTP load for the balancer runs (tests/system/test_haproxy_fleet.py and
``python -m bench.fleet.balancer``): ``threads`` keep-alive connections, each sending one inference
request of the ``synthetic`` model after another until ``stop()`` (or ``limit`` requests in all).

Every answer is checked: 200, and the class the synthetic model gives the frame's grey level, so a
wrong or mixed-up answer counts as a failure. HAProxy stamps each response with the server that
answered it (X-Inferd-Host, bench/fleet/haproxy.py), so the split is counted per answer.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter

from inferd.daemon.models.zoo.synthetic import level_of


def _frame_body(level: int) -> bytes:
    return json.dumps({"inputs": [{"name": "IMAGE", "datatype": "UINT8", "shape": [1, 16, 16, 3],
                                   "data": [level] * 768}],
                       "outputs": [{"name": "SCORES", "parameters": {"classification": 1}}]}).encode()


BODIES = [(level, _frame_body(level)) for level in range(0, 256, 17)]


class Load:
    def __init__(self, port: int, threads: int = 4, limit: int | None = None, model: str = "synthetic"):
        self.port, self.limit, self.path = port, limit, f"/v2/models/{model}/infer"
        self.served: Counter = Counter()         # X-Inferd-Host -> requests answered 200, right
        self.failures: list = []                 # (status, body, host) of every other answer
        self.log: list = []                      # (monotonic time, host) of each right answer
        self._sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]
        for t in self._threads:
            t.start()

    @property
    def total(self) -> int:
        return sum(self.served.values())

    def _take(self) -> bool:
        with self._lock:
            if self._stop.is_set() or (self.limit is not None and self._sent >= self.limit):
                return False
            self._sent += 1
            return True

    def _run(self, k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        i = k
        while self._take():
            level, body = BODIES[i % len(BODIES)]
            i += 1
            try:
                conn.request("POST", self.path, body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.failures.append(("connection", repr(exc), None))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                continue
            host = r.getheader("X-Inferd-Host", "?")
            try:
                ok = r.status == 200 and \
                    json.loads(data)["outputs"][0]["data"][0].split(":")[1] == str(level_of(level))
            except (ValueError, KeyError, IndexError):
                ok = False
            with self._lock:
                if ok:
                    self.served[host] += 1
                    self.log.append((time.monotonic(), host))
                else:
                    self.failures.append((r.status, data[:300], host))
        conn.close()

    def wait_served(self, n: int, timeout: float) -> None:
        """Until ``n`` requests were answered right (AssertionError past ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.total < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.total} of {n} requests answered; failures {self.failures[:3]}")
            time.sleep(0.02)  # noqa: sleep-ok: polling the load's progress with a deadline

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)
