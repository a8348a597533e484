"""Reconnecting to a restarted daemon: which failures are worth a retry, and how long to wait.

A restart, seen from a client (systemctl restart, SIGTERM then a successor on the same path)::

    old daemon draining: new requests answered shutting_down, socket path unlinked
        -> connect: FileNotFoundError / ECONNREFUSED          (ConnectionLost)
    old daemon gone: the session's socket reads EOF or ECONNRESET  (ConnectionLost)
    successor binding, loading torch, warming its model (seconds)
        -> connect succeeds, hello waits in the listen backlog until the model is warm
    successor ready: hello reply, fresh ring

``reconnect`` retries ConnectionLost and ShuttingDown with exponential backoff and jitter until
the caller's deadline; anything else (PermissionDenied, ProtocolError, ...) is not a restart and
is raised at once. The clock and the sleep are injected so tests drive them without waiting.
"""
from __future__ import annotations

import random
import time
from typing import Callable, TypeVar

from . import errors

T = TypeVar("T")

#: First retry delay and the cap it doubles up to, in seconds.
BACKOFF_FIRST_S = 0.05
BACKOFF_CAP_S = 1.0

RETRYABLE = (errors.ConnectionLost, errors.ShuttingDown)


class Backoff:
    """Delays before successive reconnection attempts: none before the first (a restart is
    usually seen as soon as it happens), then ``first`` doubling up to ``cap``, each drawn
    uniformly from the upper half of its step ("equal jitter"), so the clients of one restarted
    daemon neither knock in lockstep nor wait much less than the step. One Backoff lives for one
    call and is ``reset`` when a reply arrives, so a connection that breaks again at once (a
    daemon dying on each request) is retried ever more slowly, not in a busy loop."""

    def __init__(self, first: float = BACKOFF_FIRST_S, cap: float = BACKOFF_CAP_S,
                 rand: Callable[[], float] = random.random):
        self._first = first
        self._cap = cap
        self._rand = rand
        self._step = 0.0

    def next(self) -> float:
        step = self._step
        self._step = min(max(step * 2, self._first), self._cap)
        return step / 2 + self._rand() * step / 2

    def reset(self) -> None:
        self._step = 0.0


def reconnect(open_session: Callable[[float], T], deadline: float, *, what: str, backoff: Backoff,
              clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep) -> T:
    """``open_session(seconds_left)``, after ``backoff``'s delay, until it succeeds or ``deadline``
    (on ``clock``) passes.

    Raises DaemonUnavailable naming ``what`` and the last failure when the deadline passes, or the
    first failure that is not a restart.
    """
    last: Exception | None = None
    while True:
        delay = backoff.next()
        if delay > 0:
            sleep(min(delay, max(deadline - clock(), 0.0)))
        left = deadline - clock()
        if left <= 0:
            break
        try:
            return open_session(left)
        except RETRYABLE as exc:
            last = exc
    raise errors.DaemonUnavailable(f"no inferd daemon took over {what} before the request's deadline"
                                   + (f"; last attempt: {last}" if last else ""))
