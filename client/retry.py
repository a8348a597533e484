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
is raised at once. The clock and the sleep are injected so tests drive them without waiting.

``Call`` keeps, for one pipelined call, which requests are still owed an answer and so go again on
the next connection; a request in flight on MAX_LOSSES broken connections in a row does not.
"""
from __future__ import annotations

import collections
import random
import time
from typing import Callable, NamedTuple, TypeVar

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


class Pending(NamedTuple):
    index: int               # which frame of the call
    slot: int                # its slot in the ring of the connection it was sent on
    hits: int                # local hits this request reported (given back if it is refused unread)


class Call:
    """Which requests of one pipelined call go (again): to send, in flight on the current
    connection, answered (see NOTE [ resubmission ] in inferd.client.client).

    A frame index is in exactly one of ``todo``, ``pending`` or ``results``; ``requeue`` moves
    what was in flight on a lost connection back to ``todo``."""

    def __init__(self, n: int):
        self.todo = collections.deque(range(n))
        self.pending: dict[int, Pending] = {}          # request id -> what it carries
        self.results: list = [None] * n                 # (reply, ModelInfo) per frame
        self.first_error: errors.InferdError | None = None
        self.losses = collections.Counter()             # frame index -> connections lost under it
        self.backoff = Backoff()                        # reset by every reply

    def unfinished(self) -> bool:
        return bool(self.pending) or (bool(self.todo) and self.first_error is None)

    def requeue(self) -> int:
        """The connection broke: what was in flight goes back to ``todo`` (unless it was lost
        MAX_LOSSES times); how many will be resubmitted."""
        again = []
        for index in sorted(p.index for p in self.pending.values()):
            self.losses[index] += 1
            if self.losses[index] >= MAX_LOSSES:
                self.fail(lost_too_often(self.losses[index]))
            else:
                again.append(index)
        self.todo.extendleft(reversed(again))
        self.pending.clear()
        return len(again)

    def fail(self, error: errors.InferdError) -> None:
        if self.first_error is None:
            self.first_error = error
