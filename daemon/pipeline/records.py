"""The records of a request in flight through a device's pipeline (NOTE [ request path ] in
daemon/pipeline/collector.py), and the one rule that decides who is not computed.

    Request       one request from admission to its reply; the loop's, lives as long as the request
      |           (across re-dispatches: ``attempt`` counts them)
      | taken by a batch (the collector, from the device's queue)
      v
    BatchEntry    one request as one batch took it: the attempt noted then, what became of it in
      |           that batch (``outcome``) and its answer (``top``, ``embedding``, ``logits``, ``matches``) or
      |           why not (``why``): the answer travels with the request it answers, never by
      |           position in a list beside it
      v
    BatchResult   one batch, back to the loop in one call: its entries in the order taken, and
                  what belongs to the batch (device, model generation, error, times)

An entry is written by one pipeline thread at a time (the collector until it hands the batch over,
then the executor until it delivers it) and read by the loop only after delivery. A batch may come
back late, after its device was given up on and its requests went elsewhere: ``BatchEntry.current``
tells the loop whether the entry still speaks for its request.

Nothing here imports the rest of the daemon at run time (the types named in annotations are
imported for type checkers only): the scheduler, the collector, the executor and the stats all
import this module, and it imports none of them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from ..caching.results import Upload
    from ..dispatch.device import Device
    from ..models.catalog import Served
    from ..front.session import Session
    from ...shm.ring import Ring


@dataclass(slots=True, eq=False)
class Request:
    """One classify, embed or near request, from admission until its reply. Lives on the loop
    thread except while a pipeline thread holds it; there ``session``, ``ring`` and ``slot`` are
    read-only. A canary (daemon/dispatch/health.py) has no session and no ring: a blank frame."""

    session: Session | None
    ring: Ring | None        # the session's ring
    id: int
    slot: int
    top_k: int
    arrived: float           # monotonic seconds
    deadline: float          # monotonic seconds
    device: Device | None = None    # the Device whose ``outstanding`` counts it
    attempt: int = 0         # bumped by each re-dispatch (daemon/dispatch/scheduler.py)
    done: bool = False       # answered
    frame: np.ndarray | None = None  # a private copy taken on the loop (only with the fleet cache, or
    #                          embed / near: NOTE [ request path ]), or None: the collector stages the slot
    key: bytes = b""         # result-cache key of the daemon's copy (set at admission with ``frame``,
    #                          else by the collector when it hashes the staged row)
    content: bytes = b""     # content hash of that copy (keys the embedding store)
    hash: bool = False       # the collector hashes its staged row, looks it up and coalesces it
    insert: bool = False     # sampled for insert although its client looked it up
    #                          (NOTE [ unhashed misses ] in daemon/caching/results.py)
    answer: list | None = None   # its computed top pairs once answered (for followers that come late)
    op: str = "classify"     # classify | embed | near
    tag: str | None = None   # client tag stored with the embedding
    args: tuple[int, float] | None = None   # near: (k, min_similarity)
    followers: list[tuple[int, int, int]] = field(default_factory=list)
    #                          identical frames of the session coalesced with it: (id, slot, top_k)
    gen: int = 0             # model generation at admission: the digest ``key`` was made with
    logits: bool = False     # classify that asked for the model's raw output row: always computed
    #                          (never a cache hit, never coalesced), its top-k still cached
    served: Served | None = None   # the model (name, version) it resolved to (daemon/models/catalog.py)
    mid: int = 0             # ``served.mid``: its lane, profile and runner on a device
    upload: tuple[range, int] | None = None
    #                          its encoded upload: (slots of the run, bytes the collector copies
    #                          for verification, 0: none) (NOTE [ encoded uploads ] in daemon/caching/results.py)


class Outcome(enum.Enum):
    """What became of a request in one batch."""

    PENDING = "pending"          # taken; not settled yet (staged, or computing)
    DONE = "done"                # computed: ``top`` (and ``embedding``, ``matches``) set
    EXPIRED = "expired"          # its deadline passed before it could run: not computed
    DROPPED = "dropped"          # its session closed, it was answered or re-dispatched: no reply
    FAILED = "failed"            # the batch raised (``BatchResult.error``): re-dispatched or failed
    UNREADABLE = "unreadable"    # its slot could not be read whole (``why``): its own error
    HIT = "hit"                  # its staged row's key was in the result cache: ``top``, not computed
    COALESCED = "coalesced"      # an identical frame of its session is in flight: ``leader``, not computed


@dataclass(slots=True, eq=False)
class BatchEntry:
    """One request in one batch, and what became of it there."""

    request: Request
    attempt: int                                   # the request's attempt when the batch took it
    outcome: Outcome = Outcome.PENDING
    top: list[list] | None = None                  # DONE: [[index, score], ...], best first (keep_k+)
    embedding: np.ndarray | None = None            # DONE: float32 unit row, when a store keeps them
    logits: np.ndarray | None = None               # DONE: its float32 logits row, when it asked
    matches: list | None = None                    # DONE near: the embedding store's search result
    why: str = ""                                  # UNREADABLE: why its slot could not be read
    key: bytes = b""                               # the collector's hash of its staged row: cache key
    content: bytes = b""                           # ... and content hash (Request.hash)
    looked: bool = False                           # the collector looked its key up (hit or miss)
    leader: Request | None = None                  # COALESCED: the request whose answer it takes
    frame: np.ndarray | None = None                # a private copy of its staged row, for an upload's check
    upload: np.ndarray | None = None               # the collector's copy of its upload's encoded bytes
    sealed: tuple | None = None                    # DONE: its cache entry sealed by the delivering
    #                                                thread (Scheduler.seal_answers), or None

    def current(self) -> bool:
        """The entry still speaks for its request: not answered meanwhile, and not re-dispatched
        since this batch took it (a stuck device's late batch is stale)."""
        return not self.request.done and self.request.attempt == self.attempt


@dataclass(slots=True)
class BatchResult:
    """One batch, back to the loop: every request taken, each as one entry in one outcome."""

    device: Device
    entries: list[BatchEntry]
    error: str = ""                                # FAILED: what the batch raised
    seconds: float = 0.0                           # copy + model time of the batch
    started: float = 0.0                           # the executor's clock when the batch began computing
    finished: float = 0.0                          # ... and when it was done (daemon/ops/stats.py)
    gen: int = 0                                   # generation of the model that computed it
    mid: int = -1                                  # ... and its model id (daemon/models/catalog.py);
    #                                                -1: not computed
    early: bool = False                            # only entries settled before computing (HIT,
    #                                                COALESCED), sent ahead of their batch
    hash_seconds: float = 0.0                      # the collector's time hashing ...
    hashed: int = 0                                # ... this many rows
    settled: dict | None = field(default=None, repr=False)
    #                                                outcome's value -> its entries, once the loop has it
    #                                                (``settle``): every outcome final by then

    @classmethod
    def taking(cls, device: Device, requests: list[Request]) -> BatchResult:
        """A batch of ``requests`` just taken from a queue: each entry notes its attempt now."""
        return cls(device, [BatchEntry(r, r.attempt) for r in requests])

    @property
    def canary(self) -> bool:
        """A health probe (requests without a session, daemon/dispatch/health.py): no replies."""
        return bool(self.entries) and self.entries[0].request.session is None

    def with_outcome(self, outcome: Outcome) -> list[BatchEntry]:
        """Its entries in ``outcome``, in the order taken (for PENDING: the staging buffer's rows)."""
        if self.settled is not None:
            return self.settled.get(outcome._value_, [])
        return [e for e in self.entries if e.outcome is outcome]

    def count(self, outcome: Outcome) -> int:
        if self.settled is not None:
            return len(self.settled.get(outcome._value_, ()))
        return sum(e.outcome is outcome for e in self.entries)

    def settle(self) -> dict:
        """The entries by outcome, in one pass, kept: on the loop, once the batch is back and no
        pipeline thread writes an entry any more (``with_outcome`` and ``count`` read it then)."""
        # keyed by each outcome's value: an Enum member's own hash is Python code, a str's is not
        done, others = [], []
        for e in self.entries:
            (done if e.outcome is Outcome.DONE else others).append(e)
        by: dict = {Outcome.DONE._value_: done} if done else {}
        for e in others:
            key = e.outcome._value_
            group = by.get(key)
            if group is None:
                by[key] = [e]
            else:
                group.append(e)
        self.settled = by
        return by


def screen(entries: list[BatchEntry], cutoff: float) -> list[BatchEntry]:
    """Settle the entries not worth computing, and return the rest in order: a request whose
    session closed, that was answered meanwhile (a late fleet-cache hit) or re-dispatched since it
    was taken is DROPPED; one whose deadline is before ``cutoff`` is EXPIRED. The collector screens
    a batch it takes, the executor again once the device is free (NOTE [ request path ])."""
    live = []
    for e in entries:
        r = e.request
        if r.attempt != e.attempt or (r.session is not None and (r.session.closed or r.done)):
            e.outcome = Outcome.DROPPED
        elif r.deadline < cutoff:
            e.outcome = Outcome.EXPIRED
        else:
            live.append(e)
    return live
