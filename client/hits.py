"""Local cache hits the daemon has not been told of yet, and the timer that tells it.

A Client answers repeats from its read-only mapping of the daemon's result cache; the daemon's
hit rate counts them only when told. They ride on the next request (its ``hits`` field) or, when
no request comes, go in a ``hits`` notification that a timer sends ``delay`` seconds after the
first unreported hit, and at close (the clients send; this module keeps count). The timer is
injected: a thread timer for Client, the event loop's ``call_later`` for AsyncClient.
"""
from __future__ import annotations

import threading
from typing import Any, Callable


def thread_timer(delay: float, callback: Callable[[], None]) -> threading.Timer:
    """The timer Client uses: a daemon thread, so a Client left open does not hold the interpreter."""
    timer = threading.Timer(delay, callback)
    timer.daemon = True
    timer.start()
    return timer


class HitReport:
    """Local cache hits the daemon has not been told of, and the timer that tells it.

    Used under the Client's lock (AsyncClient: on its event loop). ``add`` arms the timer on the first unreported hit; the timer's
    callback (``report``, which takes the lock) calls ``fired`` then sends what ``take`` returns.
    A request that carries the hits ``take``s them too; the timer then finds nothing to send."""

    def __init__(self, report: Callable[[], None], delay: float,
                 schedule: Callable[[float, Callable[[], None]], Any] = thread_timer):
        self.n = 0
        self._report = report
        self._delay = delay
        self._schedule = schedule           # (delay, callback) -> a handle with cancel()
        self._timer = None

    def add(self, n: int, arm: bool = True) -> None:
        self.n += n
        if arm and self.n and self._timer is None:
            self._timer = self._schedule(self._delay, self._report)

    def take(self) -> int:
        n, self.n = self.n, 0
        return n

    def fired(self) -> None:
        self._timer = None

    def cancel(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
