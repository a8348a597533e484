"""The fleet cache's circuit breaker: stop asking a Redis that keeps failing, probe, come back.

States and transitions (``l2.breaker_failures`` = N, ``l2.breaker_cooldown_s`` = C)::

    closed --N failures in a row--> open --C seconds--> half_open --probe ok--> closed
      ^  \\__ a success resets the count       ^              |
      |                                        +--probe fails-+
      +-- (a success in half_open)

A failure is a lookup that raised or passed its budget, or a write that raised. While open, no
lookup is made (a miss goes straight to its device) and writes are dropped; half_open lets exactly
one lookup through as the probe, and everything else waits for its verdict as if open.

Time comes from an injected monotonic ``clock`` so tests drive the cool-down without sleeping.
"""
from __future__ import annotations

import time
from typing import Callable

STATES = ("closed", "open", "half_open")


class Breaker:
    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str, str], None] | None = None):
        self.failures = failures
        self.cooldown_s = cooldown_s
        self.state = "closed"
        self.in_a_row = 0
        self.opened = 0                     # times it opened
        self._clock = clock
        self._since = clock()
        self._probing = False
        self._on_change = on_change

    def allow(self) -> bool:
        """Whether a lookup may go to Redis now. In half_open, True once (the probe)."""
        if self.state == "closed":
            return True
        if self.state == "open" and self._clock() - self._since >= self.cooldown_s:
            self._move("half_open")
        if self.state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    @property
    def writing(self) -> bool:
        """Writes go out only while closed: a failing Redis gets no load from us."""
        return self.state == "closed"

    def success(self) -> None:
        self.in_a_row = 0
        if self.state != "closed":
            self._move("closed")

    def failure(self) -> None:
        self.in_a_row += 1
        if self.state == "half_open" or (self.state == "closed" and self.in_a_row >= self.failures):
            self.opened += 1
            self._move("open")

    def _move(self, state: str) -> None:
        old, self.state = self.state, state
        self._since = self._clock()
        self._probing = False
        if self._on_change is not None:
            self._on_change(old, state)
