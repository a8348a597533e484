"""Reconnecting to a restarted daemon: which failures are worth a retry, how long to wait, and
which requests of a call go again.

A restart, seen from a client (systemctl restart, SIGTERM then a successor on the same path)::

    old daemon draining: new requests answered shutting_down, socket path unlinked
        -> connect: FileNotFoundError / ECONNREFUSED          (ConnectionLost)
    old daemon gone: the session's socket reads EOF or ECONNRESET  (ConnectionLost)
    successor binding, loading torch, warming its model (seconds)
        -> connect succeeds, hello waits in the listen backlog until the model is warm
    successor ready: hello reply, fresh ring

``reconnect`` retries ConnectionLost and ShuttingDown with exponential backoff and jitter until
the caller's deadline; anything else (PermissionDenied, ProtocolError, ...) is not a restart and
is raised at once. A client's first connection waits the same way (within its ``connect_timeout``),
so an application started during a restart, or before the daemon at boot, finds the daemon that
comes up rather than failing on the one that went. The clock and the sleep are injected so tests drive them without waiting.

``Call`` keeps, for one call, which requests are still owed an answer and so go again on the next
connection; a request in flight on MAX_LOSSES broken connections in a row does not.
``reconnect_async`` is the same loop for AsyncClient, sleeping with asyncio.
"""
from __future__ import annotations

import collections
import random
import time
from typing import Awaitable, Callable, TypeVar

from . import errors

T = TypeVar("T")

#: First retry delay and the cap it doubles up to, in seconds.
BACKOFF_FIRST_S = 0.05
BACKOFF_CAP_S = 1.0

RETRYABLE = (errors.ConnectionLost, errors.ShuttingDown)

#: A request in flight on this many broken connections in a row is not sent again: a daemon that
#: dies on it (or drops it) every time gets no more of it, and the application sees the error.
MAX_LOSSES = 3


def lost_too_often(n: int) -> errors.DaemonUnavailable:
    return errors.DaemonUnavailable(
        f"the connection to the daemon broke {n} times while this request was in flight; it is "
        "not sent again (the daemon may be failing on it: see its log)")


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
              sleep: Callable[[float], None] = time.sleep, gave_up: str = "") -> T:
    """``open_session(seconds_left)``, after ``backoff``'s delay, until it succeeds or ``deadline``
    (on ``clock``) passes.

    Raises DaemonUnavailable naming ``what`` and the last failure when the deadline passes (its
    first words are ``gave_up`` when given), or the first failure that is not a restart.
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
    raise _gave_up(gave_up or f"no inferd daemon took over {what} before the request's deadline", last)


async def reconnect_async(open_session: Callable[[float], Awaitable[T]], deadline: float, *, what: str,
                          backoff: Backoff, clock: Callable[[], float] = time.monotonic,
                          gave_up: str = "") -> T:
    """``reconnect`` for AsyncClient: ``await open_session(seconds_left)``, sleeping with asyncio."""
    import asyncio   # here: a blocking Client never pays for importing asyncio

    last: Exception | None = None
    while True:
        delay = backoff.next()
        if delay > 0:
            await asyncio.sleep(min(delay, max(deadline - clock(), 0.0)))
        left = deadline - clock()
        if left <= 0:
            break
        try:
            return await open_session(left)
        except RETRYABLE as exc:
            last = exc
    raise _gave_up(gave_up or f"no inferd daemon took over {what} before the request's deadline", last)


def _gave_up(message: str, last: Exception | None) -> errors.DaemonUnavailable:
    return errors.DaemonUnavailable(message + (f"; last attempt: {last}" if last else ""))


class Call:
    """One call of an application (a classify_many, an embed, a ping ...): its requests, and which
    of them go (again). Both clients keep one per call; the protocol core (inferd.client.protocol)
    moves its requests between the states of NOTE [ resubmission ] there.

    A request index is in exactly one of ``todo`` (to send), in flight (``inflight`` counts them;
    the core's table says which), or answered (``results``, or ``first_error`` for a failure);
    ``requeue`` moves what was in flight on a lost connection back to ``todo``. ``frames`` is None
    for a call without images (ping, info, labels): one request, no slot."""

    def __init__(self, op: str, extra: dict, deadline: float, frames: list | None = None,
                 uploads: list | None = None):
        self.op = op
        self.uploads = uploads                          # per frame: its encoded bytes, or None
        self.extra = extra
        self.deadline = deadline
        self.frames = frames
        n = 1 if frames is None else len(frames)
        self.todo = collections.deque(range(n))
        self.inflight = 0
        self.results: list = [None] * n                 # (reply, ModelInfo) per request
        self.first_error: errors.InferdError | None = None
        self.losses = collections.Counter()             # request index -> connections lost under it
        self.backoff = Backoff()                        # reset by every reply
        self.waker = None                               # how AsyncClient wakes the call's task

    def unfinished(self) -> bool:
        return bool(self.inflight) or (bool(self.todo) and self.first_error is None)

    def requeue(self, indices: list[int]) -> int:
        """The connection broke under ``indices``: they go back to ``todo`` (unless lost
        MAX_LOSSES times); how many will be resubmitted."""
        again = []
        for index in sorted(indices):
            self.losses[index] += 1
            if self.losses[index] >= MAX_LOSSES:
                self.fail(lost_too_often(self.losses[index]))
            else:
                again.append(index)
        self.todo.extendleft(reversed(again))
        self.inflight -= len(indices)
        return len(again)

    def fail(self, error: errors.InferdError) -> None:
        if self.first_error is None:
            self.first_error = error
