"""Load for bench/pool/run.py: client processes against a daemon serving the ``synthetic`` model.

Two kinds of child process, both spawned (``bench/lib/procs.py``) and both started against one shared
monotonic start time (CLOCK_MONOTONIC is system-wide):

* ``saturator``: the library's own ``inferd.client.Client`` in a closed loop, ``classify_many`` on
  2 x ring_slots frames at a time, so up to ring_slots frames stay in flight. Used to saturate a
  daemon; throughput is read from the daemon's counters by the parent, not here.

* ``generator``: speaks the wire protocol by hand (hello, ring descriptor by SCM_RIGHTS, frame into
  a free slot, ``classify`` naming it; replies matched by id), because the synchronous Client cannot
  send while it waits. A sender thread paces Poisson arrivals by ``time.monotonic`` (``open`` mode),
  a receiver thread matches replies; in ``closed`` mode the receiver sends a new request for every
  reply, keeping ``depth`` in flight. Every request is followed from send to reply, so it counts
  what the library would hide: answers for ids already answered (``twice``), for ids never sent
  (``unknown``), and requests with no answer when the run ends (``lost``). A request that finds no
  free ring slot is not sent and counts as ``dropped`` (by the generator, not the daemon).

Every frame is a grey level v (all 16 x 16 x 3 bytes = v); the expected class is
``inferd.daemon.models.zoo.synthetic.level_of(v)``, passed in as a 256-entry table so that no child imports
torch. Nothing here imports torch or matplotlib.
"""
from __future__ import annotations

import array
import collections
import itertools
import select
import socket
import sys
import threading
import time
import traceback

import numpy as np

from ..lib.measure import sleep_until

FRAME_SIDE = 16                       # the synthetic model's input: 16 x 16 x 3 uint8
FRAME_SHAPE = [FRAME_SIDE, FRAME_SIDE, 3]
FRAME_BYTES = FRAME_SIDE * FRAME_SIDE * 3

#: Outcome codes of a request, as small ints in the arrays a generator returns.
OK, WRONG = 0, 1
ERROR_CODES = ("overloaded", "deadline_exceeded", "internal", "no_healthy_device", "shutting_down",
               "invalid_input", "slot_busy", "bad_request")
CODE_OF = {name: i + 2 for i, name in enumerate(ERROR_CODES)}
OTHER_ERROR = len(ERROR_CODES) + 2
CODE_NAMES = ["ok", "wrong"] + list(ERROR_CODES) + ["other_error"]


# ---------------------------------------------------------------------------------------- Client
def saturator(q, index: int, socket_path: str, ring_slots: int, table: list, seed: int,
              start, go, stop) -> None:
    """Closed loop with the library's Client until ``stop`` is set: ``classify_many`` on
    2 x ``ring_slots`` grey frames per call. Reports frames answered, wrong answers, errors by type
    and CPU cores used."""
    try:
        from inferd.client import Client, DaemonUnavailable, InferdError, ProtocolError

        rng = np.random.default_rng(seed)
        chunk = 2 * ring_slots
        counts = collections.Counter()
        with Client(socket_path, ring_slots=ring_slots, timeout=60.0) as client:
            client.classify(np.zeros((FRAME_SIDE, FRAME_SIDE, 3), np.uint8), top_k=1)
            q.put(("ok", ("ready", index)))
            if not go.wait(timeout=120):
                raise RuntimeError("no start signal from the parent")
            sleep_until(start.value)
            wall0, cpu0 = time.monotonic(), time.process_time()
            while not stop.is_set():
                values = rng.integers(0, 256, chunk)
                imgs = [np.full((FRAME_SIDE, FRAME_SIDE, 3), v, np.uint8) for v in values]
                try:
                    results = client.classify_many(imgs, top_k=1)
                except InferdError as exc:
                    counts[f"error_{type(exc).__name__}"] += 1
                    if isinstance(exc, (DaemonUnavailable, ProtocolError)):   # the session is closed
                        client.close()
                        client = Client(socket_path, ring_slots=ring_slots, timeout=60.0)
                    continue
                counts["frames"] += len(results)
                counts["wrong"] += sum(r[0].index != table[v] for r, v in zip(results, values))
            cpu = (time.process_time() - cpu0) / max(time.monotonic() - wall0, 1e-9)
        q.put(("ok", ("done", index, dict(counts), cpu)))
    except BaseException:
        q.put(("error", traceback.format_exc()))


# ------------------------------------------------------------------------------------- raw wire
class _Conn:
    """One raw session: socket, ring mapped from the descriptor the hello reply carried."""

    def __init__(self, socket_path: str, ring_slots: int):
        from inferd.shm import wire
        from inferd.shm.ring import Ring

        self.wire = wire
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(30)
        self.sock.connect(socket_path)
        self.reader = wire.FrameReader(wire.MAX_REPLY_FRAME)
        self.sock.sendall(wire.encode({"op": "hello", "id": 0, "version": wire.PROTOCOL_VERSION,
                                       "ring_slots": ring_slots, "slot_bytes": 0}))
        fds, ready = [], []
        while not ready:
            data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
            if not data:
                raise RuntimeError("the daemon closed the connection during hello")
            fds += [fd for lvl, typ, p in anc if lvl == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS
                    for fd in array.array("i", p[:len(p) - len(p) % 4])]
            ready += self.reader.feed(data)
        self.hello = ready.pop(0)
        self.early = ready
        import os

        for extra in fds[1:]:                   # a result cache's descriptor: not used here
            os.close(extra)
        if not self.hello.get("ok") or not fds:
            raise RuntimeError(f"hello refused or no ring descriptor: {self.hello}")
        self.ring = Ring.attach(fds[0])
        self.fd = fds[0]
        self.sock.settimeout(None)              # blocking; the receiver waits in select
        slots = self.ring.geometry.slots
        self.views = [self.ring.slot(i, FRAME_BYTES) for i in range(slots)]

    def close(self) -> None:
        import os

        self.sock.close()
        self.views = []
        self.ring.close()
        os.close(self.fd)


class _Generator:
    """State shared by the sender and receiver threads of one generator process."""

    def __init__(self, conn: _Conn, cfg: dict, table: list, t0: float):
        self.conn = conn
        self.cfg = cfg
        self.table = table
        self.t0 = t0
        self.rng = np.random.default_rng(cfg["seed"])
        self.free = collections.deque(range(len(conn.views)))   # deque: thread-safe append/pop
        self.frames = [np.full(FRAME_BYTES, v, np.uint8) for v in range(256)]
        self.ids = itertools.count(1)
        self.pending: dict = {}           # id -> [value, slot, t_sched, t_send]
        self.answered: set = set()
        self.records: list = []           # (t_sched, t_send, t_reply, outcome) per first reply
        self.counts = collections.Counter()
        self.samples: list = []           # first few duplicate / unknown replies, for the report
        self.t_send_end = t0 + cfg["send_s"]
        self.sending = True               # cleared when sending stops
        self.send_lock = threading.Lock()
        self.timeout_ms = float(cfg["timeout_ms"])
        self.error: str | None = None

    # sending ----------------------------------------------------------------------------------
    def _request(self, t_sched: float) -> tuple[int, bytes] | None:
        """(id, encoded classify) for a fresh grey frame in a free slot, registered as pending;
        None (counted as dropped) when no slot is free."""
        try:
            slot = self.free.pop()
        except IndexError:
            self.counts["dropped_no_slot"] += 1
            return None
        v = int(self.rng.integers(0, 256))
        self.conn.views[slot][:] = self.frames[v]
        rid = next(self.ids)
        self.pending[rid] = [v, slot, t_sched, 0.0]
        self.counts["sent"] += 1
        return rid, self.conn.wire.encode({"op": "classify", "id": rid, "slot": slot, "shape": FRAME_SHAPE,
                                           "dtype": "uint8", "nbytes": FRAME_BYTES, "top_k": 1,
                                           "timeout_ms": self.timeout_ms})

    def _send(self, reqs: list) -> None:
        if not reqs:
            return
        now = time.monotonic()
        for rid, _ in reqs:
            self.pending[rid][3] = now    # set before sendall: a reply cannot come before it
        with self.send_lock:
            self.conn.sock.sendall(b"".join(m for _, m in reqs))

    def open_loop(self, stop) -> None:
        """Sender thread: Poisson arrivals at cfg["rate"] per second until send_s or ``stop``."""
        try:
            rate = self.cfg["rate"]
            gaps = iter(self.rng.exponential(1.0 / rate, size=int(rate * self.cfg["send_s"] * 1.5) + 1000))
            next_t = self.t0
            next_check = 0.0
            while next_t < self.t_send_end:
                now = time.monotonic()
                if now >= next_check:
                    if stop.is_set():
                        break
                    next_check = now + 0.05
                if next_t > now:
                    time.sleep(next_t - now)
                    now = time.monotonic()
                reqs = []
                while next_t <= now and next_t < self.t_send_end:
                    r = self._request(next_t)
                    if r is not None:
                        reqs.append(r)
                    next_t += next(gaps, 1.0 / rate)
                self._send(reqs)
        except BaseException:
            self.error = traceback.format_exc()
        finally:
            self.sending = False

    # receiving --------------------------------------------------------------------------------
    def receive(self, stop, closed_loop: bool) -> None:
        """Receiver thread: match replies by id until sending stopped and nothing is pending, or
        drain_s after sending stopped."""
        try:
            sock = self.conn.sock
            drain_until = None
            next_check = 0.0
            for msg in self.conn.early:
                self._reply(msg)
            while True:
                now = time.monotonic()
                if closed_loop and self.sending and now >= next_check:
                    next_check = now + 0.05
                    if stop.is_set() or now >= self.t_send_end:
                        self.sending = False
                if not self.sending:
                    if not self.pending:
                        break
                    if drain_until is None:
                        drain_until = now + self.cfg["drain_s"]
                    elif now > drain_until:
                        break
                readable, _, _ = select.select([sock], [], [], 0.05)
                if not readable:
                    continue
                data = sock.recv(1 << 18)
                if not data:
                    self.counts["connection_closed"] += 1
                    break
                t_reply = time.monotonic()
                again = []
                for msg in self.conn.reader.feed(data):
                    if self._reply(msg, t_reply) and closed_loop and self.sending:
                        r = self._request(time.monotonic())
                        if r is not None:
                            again.append(r)
                self._send(again)
        except BaseException:
            self.error = traceback.format_exc()
        finally:
            self.sending = False

    def _reply(self, msg, t_reply: float = 0.0) -> bool:
        """Account for one reply; True if it answered a pending request."""
        if not isinstance(msg, dict):
            self.counts["bad_reply_frame"] += 1
            return False
        rid = msg.get("id")
        entry = self.pending.pop(rid, None)
        if entry is None:
            kind = "twice" if rid in self.answered else "unknown"
            self.counts[kind] += 1
            if len(self.samples) < 10:
                self.samples.append({"kind": kind, "reply": {k: msg.get(k) for k in ("id", "ok", "code", "message")}})
            return False
        self.answered.add(rid)
        v, slot, t_sched, t_send = entry
        self.free.append(slot)
        if msg.get("ok"):
            outcome = OK if msg["top"][0][0] == self.table[v] else WRONG
        else:
            outcome = CODE_OF.get(msg.get("code"), OTHER_ERROR)
        self.records.append((t_sched, t_send, t_reply, outcome))
        return True


def generator(q, index: int, socket_path: str, cfg: dict, table: list, start, go, stop) -> None:
    """A raw-protocol load generator process (see the module docstring).

    ``cfg``: mode ("open" | "closed"), rate (open: requests/s), depth (closed: in flight), seed,
    ring_slots, timeout_ms (each request's deadline), send_s (send from the start for this long,
    or until ``stop``), drain_s (then wait this long at most for outstanding replies), window
    ([from, to] seconds after the start: requests *sent* in it are returned one by one).
    Reports counts over the whole run, and per request of the window: send time (s after the
    start), latency send->reply (s), lag of the send behind its scheduled time (s), outcome code.
    """
    try:
        sys.setswitchinterval(0.0005)        # the sender must not wait 5 ms for the receiver's GIL
        conn = _Conn(socket_path, cfg["ring_slots"])
        try:
            q.put(("ok", ("ready", index)))
            if not go.wait(timeout=120):
                raise RuntimeError("no start signal from the parent")
            g = _Generator(conn, cfg, table, start.value)
            closed = cfg["mode"] == "closed"
            sleep_until(g.t0)
            wall0, cpu0 = time.monotonic(), time.process_time()
            if closed:
                g._send([r for r in (g._request(g.t0) for _ in range(cfg["depth"])) if r is not None])
                threads = [threading.Thread(target=g.receive, args=(stop, True), daemon=True)]
            else:
                threads = [threading.Thread(target=g.open_loop, args=(stop,), daemon=True),
                           threading.Thread(target=g.receive, args=(stop, False), daemon=True)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            cpu = (time.process_time() - cpu0) / max(time.monotonic() - wall0, 1e-9)
        finally:
            conn.close()
        if g.error:
            raise RuntimeError(f"generator thread failed:\n{g.error}")
        counts = dict(g.counts)
        counts["lost"] = len(g.pending)
        counts["answered"] = len(g.answered)
        rec = np.asarray(g.records, dtype=np.float64).reshape(-1, 4)
        outcomes = np.bincount(rec[:, 3].astype(np.int64), minlength=len(CODE_NAMES)) if len(rec) else \
            np.zeros(len(CODE_NAMES), np.int64)
        counts.update({f"reply_{name}": int(n) for name, n in zip(CODE_NAMES, outcomes) if n})
        w0, w1 = (g.t0 + cfg["window"][0], g.t0 + cfg["window"][1])
        sel = rec[(rec[:, 1] >= w0) & (rec[:, 1] < w1)] if len(rec) else rec
        window = {"t_send": (sel[:, 1] - g.t0).tolist(), "latency": (sel[:, 2] - sel[:, 1]).tolist(),
                  "lag": (sel[:, 1] - sel[:, 0]).tolist(), "outcome": sel[:, 3].astype(int).tolist()}
        sent_in_window = sum(1 for e in g.pending.values() if w0 <= e[3] < w1) + len(sel)
        q.put(("ok", ("done", index, {"counts": counts, "cpu": cpu, "window": window,
                                      "sent_in_window": sent_in_window,
                                      "lost_ids": sorted(g.pending)[:20], "samples": g.samples})))
    except BaseException:
        q.put(("error", traceback.format_exc()))
