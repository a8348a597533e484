"""One pipeline per device: a collector thread plans and stages batches, an executor runs them
(daemon/pipeline/executor.py); the records they pass along are in daemon/pipeline/records.py.

NOTE [ request path ]

    loop thread       Session.data_received -> Scheduler.submit (daemon/dispatch/scheduler.py):
                        checks every field, admits against the deadline, picks a device
                        (daemon/dispatch/policy.py); Request (records.py) -> device.queue.put;
                        a classify_many's requests as one group where each would pass alone
                        (NOTE [ group admission ]): one device choice, one put_many
                             |
                             v  DeviceQueue (daemon/dispatch/queues.py)
    collector thread  take a free staging buffer of the executor
    (one per device)  DeviceQueue.take(plan): wait until the plan says go (NOTE [ batch planning ]:
                        it knows when the running batch will end); idle: steal from a busy peer
                      BatchResult.taking(batch): one BatchEntry per request, its attempt noted
                      screen (records.py): DROPPED if its session closed or it was answered
                        meanwhile, EXPIRED if it cannot finish by its deadline
                      a pass at a time (PASS_BYTES of frames, so the rows are still in the core's
                        cache when hashed), in three steps over the pass:
                      copy each frame from its ring slot straight into its row of the buffer: a run
                        of one sealed ring's slots in one compiled gather (slot_copy.py: one GIL
                        hand-over for the run, not one a frame); a posix ring's slot by pread; a
                        slot not read whole: UNREADABLE
                      a request admitted to be hashed (Request.hash): BLAKE3 over its row, the
                        daemon's own copy (Caches.hash_row, GIL let go: devices hash in parallel),
                        its cache key one small update of a prepared state (shm/cache.py)
                      then each: an identical frame of its session in flight (Session.claim): COALESCED
                        behind that leader, the row not kept (the next frame is staged over it,
                        so it costs the model nothing); else it leads, and its key in the result
                        cache: HIT, its answer taken, the row not kept either (a request for its
                        logits is neither: always computed, hashed only for its top-k's insert)
                      an upload to verify: its row and encoded bytes copied (NOTE [ encoded uploads ])
                      HIT and COALESCED entries: deliver them at once (BatchResult.early)
                      nothing left to compute: deliver(result) at once, the buffer back
                      else Device.staged = the PENDING entries; executor.submit(result, buffer)
                             |
                             v  the executor's inbox (batches in order; model stage / activate /
                             |  discard from daemon/ops/reload.py, between two batches)
    executor thread   screen again, the device being free now (a request re-dispatched meanwhile
    (one per device)    is DROPPED); the rows of the rest close up
                      Device.running += them, running_since/size (health and the watchdog read them)
                      Engine.launch(buffer): preprocess, model, softmax, top-k on the device, and
                        the logits rows of requests that asked for them, in the same copy back
                        (daemon/pipeline/engine.py); the buffer back once its frames are there
                      each entry DONE with its top-k (its embedding row, near-duplicate matches
                        searched here), or every one FAILED with the batch's error
                      deliver(result): the cache entries the loop will surely insert sealed
                        here (Scheduler.seal_answers: the BLAKE3 of an insert, off the loop),
                        then call_soon_threadsafe, one call per batch
                             |
                             v
    loop thread       Scheduler.on_batch_done(result), by each entry's outcome: one reply per live
                        request, all of a session's in one write (one ``replies`` message for a
                        client that batches, its plain answers packed in one ``answers`` message
                        when it reads those), slot released, ring freed when a closed session's
                        last request comes back; answers stored (only here: the loop is the
                        cache's one writer); a COALESCED one rides on its leader (answered with
                        it, or from its answer if that came first, or queued again if it
                        failed); FAILED ones re-dispatched; an entry whose request went
                        elsewhere since it was taken (a stuck device's late batch) only counted

What the loop does per request is O(1) Python whatever the frame size: checks, admission, a
record on a queue, a reply (docs/architecture.md, "The request path"). Everything proportional to
the frame's bytes is a device thread's, with the GIL let go, so it runs in parallel across devices.

Why the trust argument holds. The row is the daemon's own copy: the client cannot write the staging
buffer, and the ring slot stays the daemon's (``Session.inflight``) until the request's reply, so
the client may reuse it only after that. The gather reads only a sealed (memfd) mapping, which
the client cannot shrink under it, at offsets from the daemon's own geometry and slot numbers it
checked; what it copies is the row, exactly as a per-frame copy would. The hash is taken over that row, the model computes on
that row, and the loop alone inserts (a pipeline thread may seal the entry beforehand, from that
key and that answer; the loop stores it only under the same key, sealed again if the cache was
flushed meanwhile), under the key of the row an answer was computed from: what
the client wrote before, during or after the copy can only change which bytes its own request is
answered for. Coalescing is per session: a frame only ever rides on an identical frame of the same
client (the same content hash under the same model), so it tells a client nothing about another's
frames. It lives on the collectors' side because only there is the hash known; the table
(``Session.pending``) is shared by every device's collector under a lock, so identical frames
coalesce across devices too, and a leader leaves it when the loop answers it (a late follower then
takes the leader's answer from the record).

Why the key and the entry's tag are still two small hashes after the frame's. The cache key binds
the frame's content hash to the model digest and preprocessing, and a client must compute the
same key from its own copy with nothing the daemon holds secret (it looks the cache up itself);
the content hash alone keys the embedding store. So the frame is hashed once (the ~25-30 us
BLAKE3 of 150 KB), and the key is a BLAKE3 over 32 bytes from a state prepared per model (about
1 us, GIL held); the entry's tag and MAC key (shm/cacheseal.py) come from the key, since a
reader has only the key (about 1.4 us). Folding the model prefix into the frame hash would save
the 1 us at the price of a new cache format and a content hash that means something else to the
store: not worth it beside the frame hash itself.

Two buffers per device ("double-buffered staging", owned by the executor): while the executor
computes batch k from one, the collector plans batch k+1, waiting for company for free while the
device is busy, and stages it into the other, so the device goes from one batch to the next
without waiting for the loop, the clients or a copy. Replies go out the moment a batch is done: the
executor delivers, the collector never holds results. The entries of a handed-over batch not yet
running are ``Device.staged``, those running ``Device.running``; a device taken out of rotation
re-dispatches them with its queue (daemon/dispatch/scheduler.py).

The server builds both threads of each device (daemon/server.py) and talks to the one that does
the thing: the executor for start-up, the embedding store and a model swap, the collector to start
and join the pipeline (the collector starts its executor, and stops it after the last batch once the
queue is stopped); the watchdog asks both whether they live (daemon/ops/sd_watchdog.py).

A ring is unmapped only after its last request came back, so no thread reads an unmapped slot.
Canary batches (daemon/dispatch/health.py) are requests without a session: a blank frame.
"""
from __future__ import annotations

import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import slot_copy
from .executor import Executor
from .records import BatchEntry, BatchResult, Outcome, screen
from ..dispatch.formation import horizon as expect_horizon, overdue_grace
from ..dispatch.policy import busy_until
from ..dispatch.queues import plan_batch
from ...shm.ring import RingError

if TYPE_CHECKING:
    from ..config import BatchingConfig
    from ..dispatch.device import Device

IDLE_TIMEOUT = 0.1          # an idle collector looks for work to steal and beats this often
#: Bytes of frames staged in one pass, copied and then hashed: the rows are still in the core's
#: cache when hashed (256 KiB: 21 frames of 64x64 a gather; a 224x224 frame alone, since passes of
#: 2, 3 and 6 such frames staged 3-9 % slower than one at a time, in process on this machine)
PASS_BYTES = 1 << 18


class Collector(threading.Thread):
    """The collector of one device's pipeline (NOTE [ request path ]): takes batches from the
    device's queue (or steals them from ``peers`` as ``policy`` allows), screens them, stages their
    frames into ``executor``'s free buffers and hands them over. Starts the executor first and
    collects only once its model is warm; when the device's queue is stopped, it stops the
    executor after the batches handed over and joins it. ``deliver(BatchResult)``, for a batch
    left with nothing to compute, must be thread-safe."""

    def __init__(self, device: Device, executor: Executor, *, batching: BatchingConfig, policy,
                 peers: list[Device], deliver: Callable[[BatchResult], None],
                 clock: Callable[[], float] = time.monotonic, caches=None):
        super().__init__(name=f"inferd-collect-{device.label}", daemon=True)
        self.device = device
        self.executor = executor
        self._max_batch = batching.max_batch
        self._plan = partial(_plan, device, batching)
        self._policy = policy
        self._peers = peers
        self._deliver = deliver
        self._clock = clock
        self._caches = caches               # hash_row and peek (daemon/caching/results.py), thread-safe

    def run(self) -> None:
        executor = self.executor
        executor.start()
        slot_copy.warm()                            # while the model loads: no request waits for it
        executor.ready.wait()
        try:
            if executor.startup_error is None:
                self._collect()
        finally:
            executor.stop()
            executor.join()

    def _collect(self) -> None:
        dev, executor = self.device, self.executor
        while True:
            buffer = executor.free.get()            # at most one batch waits behind the running one
            while (batch := dev.queue.take(self._plan, IDLE_TIMEOUT)) == []:
                dev.beat = self._clock()
                if (batch := self._steal()):
                    break
            if batch is None:
                return
            dev.beat = self._clock()
            mid = batch[0].mid                      # one model's lane: a batch never mixes models
            result = BatchResult.taking(dev, batch)
            now = result.started = result.finished = self._clock()
            live = screen(result.entries, self._cutoff(len(batch), now, mid))
            if live:
                live = self._stage(result, live, executor.staging_of(mid).arrays[buffer])
                settled = [e for e in result.entries if e.outcome in _SETTLED]
                if settled and live:        # answered now, not after the batch computes
                    result.entries = [e for e in result.entries if e.outcome not in _SETTLED]
                    self._deliver(BatchResult(dev, settled, started=now, finished=now, early=True))
            if not live:
                executor.free.put(buffer)
                self._deliver(result)
                continue
            dev.handover(live, self._clock(), full=len(batch) == self._max_batch, mid=mid)   # in time? (rule 0)
            dev.staged_profile = dev.profiles[mid]
            dev.staged = live
            executor.submit(result, buffer)

    def _steal(self) -> list:
        dev = self.device
        if not (dev.healthy and self._policy.steals):
            return []
        victim, count = self._policy.steal_from(dev, self._peers, self._clock(), self._max_batch)
        return victim.queue.steal(count, self.executor.runs) if victim is not None else []

    def _cutoff(self, size: int, now: float, mid: int = 0) -> float:
        """The deadline a request of a batch of ``size`` taken at ``now`` must meet to be computed.
        The batch starts when the device is free; a full batch is never shrunk for its oldest
        (NOTE [ batch planning ]): who cannot finish within it is not computed; otherwise only
        who is already late."""
        if size == self._max_batch:
            return max(now, busy_until(self.device, now)) + self.device.profiles[mid].latency(size)
        return now

    def _stage(self, result: BatchResult, live: list[BatchEntry], rows) -> list[BatchEntry]:
        """Stage ``live`` into ``rows`` a pass at a time (``PASS_BYTES`` of frames: copied, then
        hashed while still in the core's cache): the frames copied out of their slots (a run of
        one ring's slots in one gather, daemon/pipeline/slot_copy.py), the rows admitted to be
        hashed hashed (the GIL let go over each), then each claimed and looked up: a HIT or a
        COALESCED one settled and its row given to the next frame (the rows of the rest close
        up), what an upload's check needs copied. An entry whose slot cannot be read whole is
        settled UNREADABLE (its own error; the others are computed). Returns those to compute,
        one row each in order."""
        staged: list[BatchEntry] = []
        per_pass = max(1, PASS_BYTES // rows[0].nbytes)
        spent, hashed = 0.0, 0
        if per_pass == 1:                           # large frames: the same steps, one frame a pass
            return self._stage_each(result, live, rows)
        for at in range(0, len(live), per_pass):
            first = len(staged)
            filled = self._copy(live[at:at + per_pass], rows, first)
            t0 = time.perf_counter()
            keyed = self._hash(filled, rows, first)
            if keyed:
                spent += time.perf_counter() - t0
                hashed += keyed
            for i, e in enumerate(filled, first):
                if e.key and self._settle(e):
                    continue
                r, row = e.request, rows[len(staged)]
                if len(staged) < i:                 # a row settled before it: close up
                    np.copyto(row, rows[i])
                if r.upload is not None and r.upload[1]:
                    _keep_upload(e, row)
                staged.append(e)
        if hashed:
            result.hash_seconds, result.hashed = spent, hashed
        return staged

    def _stage_each(self, result: BatchResult, live: list[BatchEntry], rows) -> list[BatchEntry]:
        """``_stage`` for frames of a pass each (PASS_BYTES), without the passes' bookkeeping: a
        224x224 frame is ~3 us of Python cheaper a frame this way."""
        staged: list[BatchEntry] = []
        caches = self._caches
        spent, hashed = 0.0, 0
        for e in live:
            r, row = e.request, rows[len(staged)]
            if not _copy_one(e, row):
                continue
            if r.hash and caches is not None:
                t0 = time.perf_counter()
                e.content, e.key = caches.hash_row(row, r.served.keying if r.served is not None else None)
                spent += time.perf_counter() - t0
                hashed += 1
                if self._settle(e):
                    continue
            if r.upload is not None and r.upload[1]:
                _keep_upload(e, row)
            staged.append(e)
        if hashed:
            result.hash_seconds, result.hashed = spent, hashed
        return staged

    @staticmethod
    def _copy(chunk: list[BatchEntry], rows, first: int) -> list[BatchEntry]:
        """Copy each entry's frame into ``rows`` from ``first`` on, in order: a run of entries of
        one sealed (mapped) ring in one gather; a private copy taken on the loop, a canary's blank
        frame or a posix ring's slot one at a time (never a mapped read of an unsealed ring). An
        entry whose slot cannot be read is settled UNREADABLE and takes no row. The entries
        copied, one row each from ``first``."""
        filled: list[BatchEntry] = []
        nbytes = rows[0].nbytes
        i, n = 0, len(chunk)
        while i < n:
            e = chunk[i]
            r, row = e.request, rows[first + len(filled)]
            j = i + 1
            if r.frame is None and r.ring is not None and r.ring.mapped:
                while j < n and chunk[j].request.frame is None and chunk[j].request.ring is r.ring:
                    j += 1
            if j - i > 1:
                at = first + len(filled)
                try:
                    slot_copy.gather(r.ring, [c.request.slot for c in chunk[i:j]], nbytes, rows[at:at + j - i])
                except ValueError as exc:           # checked at admission: not seen unless a bug
                    for c in chunk[i:j]:
                        c.outcome, c.why = Outcome.UNREADABLE, f"slot {c.request.slot} cannot be read: {exc}"
                else:
                    filled += chunk[i:j]
                i = j
                continue
            i += 1
            if _copy_one(e, row):
                filled.append(e)
        return filled

    def _hash(self, filled: list[BatchEntry], rows, first: int) -> int:
        """BLAKE3 over the row of each entry admitted to be hashed (Request.hash): its content
        hash and cache key (Caches.hash_row, the GIL let go over the frame). The rows hashed."""
        caches, count = self._caches, 0
        if caches is None:
            return 0
        for i, e in enumerate(filled, first):
            r = e.request
            if r.hash:
                e.content, e.key = caches.hash_row(rows[i], r.served.keying if r.served is not None else None)
                count += 1
        return count

    def _settle(self, e: BatchEntry) -> bool:
        """A hashed classify's frame: COALESCED behind an identical frame of its session in flight,
        else it leads and its key is looked up in the result cache: HIT. True when settled (its
        row is not kept). A request for its logits is neither: always computed, its key only for
        the cache to store its top-k under."""
        r = e.request
        if r.op != "classify" or r.logits:
            return False
        # claim first, then look up: the loop inserts an answer before it lets its leader go, so
        # a frame that finds no leader in flight finds its answer
        if r.upload is None:                        # (an upload's run is freed with its own reply)
            leader = r.session.claim(e.key, r)
            if leader is not r:
                e.outcome, e.leader = Outcome.COALESCED, leader
                return True
        caches = self._caches
        e.looked = caches.cache is not None
        hit = caches.peek(e.key, r.top_k) if e.looked else None
        if hit is not None:
            e.outcome, e.top = Outcome.HIT, hit
            return True
        return False


def _copy_one(e: BatchEntry, row) -> bool:
    """One entry's frame into ``row``: a private copy taken on the loop, a canary's blank frame,
    or its slot (a posix ring by pread: never a mapped read of an unsealed ring). False, settled
    UNREADABLE, when the slot cannot be read whole."""
    r = e.request
    if r.frame is not None:
        np.copyto(row, r.frame.reshape(row.shape))
    elif r.ring is None:
        row.fill(0)
    else:
        try:
            r.ring.read_slot(r.slot, row.nbytes, out=row)
        except RingError as exc:
            e.outcome, e.why = Outcome.UNREADABLE, f"slot {r.slot} cannot be read: {exc}"
            return False
    return True


def _keep_upload(e: BatchEntry, row) -> None:
    """What an upload's check needs (shm/uploads.py): its encoded run, read now, and the decoded
    frame staged in ``row``; neither where the run cannot be read (computed from its frame, no
    entry)."""
    r = e.request
    try:
        e.upload = r.ring.read_run(r.upload[0].start, r.upload[1])
        e.frame = row.copy()
    except RingError:
        e.upload = None


#: Outcomes the collector settles before computing: answered at once.
_SETTLED = (Outcome.HIT, Outcome.COALESCED)


def _plan(device, batching, now: float, queued, expected, mid: int = 0) -> tuple[int, float]:
    """NOTE [ batch planning ] for the lane of model ``mid`` (its profile; the device's state)."""
    free_at = busy_until(device, now)
    horizon = expect_horizon(batching, device.profiles[mid])
    device.queue.grace = overdue_grace(batching, horizon)
    # the running batch's clients come back one think time after its replies (NOTE [ batch
    # planning ], expected arrivals)
    sessions = (e.request.session for e in device.running)
    back = [free_at + t for t in (s.think.seconds for s in sessions if s is not None)
            if t is not None and t <= horizon]
    if back:
        expected = sorted([*expected, *back])
    # stage early enough that a batch ending a little sooner than the profile says finds the next
    # one ready, learnt from the handovers (rule 0: StagingLead in daemon/dispatch/queues.py)
    lead = device.stage_lead()
    return plan_batch(now, queued, device.profiles[mid].latency, batching.max_batch, batching.max_delay_ms / 1000.0,
                      device.queue.gap, batching.adaptive, free_at, expected,
                      free_at if free_at > now else device.last_finished, lead, batching.window)
