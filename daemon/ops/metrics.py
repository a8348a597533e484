"""Prometheus exposition of the daemon's statistics, and the optional HTTP listener for a scraper.

One reading, two faces: a scrape takes ``Server.stats_snapshot()`` (plain data read off
daemon/ops/stats.py in O(devices + uids + buckets)) and turns it into metric families here, so the
Prometheus text and the admin socket's ``stats`` always agree. The text is built by
prometheus_client (``generate_latest`` over a private ``CollectorRegistry`` holding one custom
collector, plus its ProcessCollector for CPU and memory), never formatted by hand.

Threads. Stats are written and read on the event loop only (NOTE [ stats ] in daemon/ops/stats.py).
The admin socket asks for the text on the loop: the snapshot is taken in place. The HTTP listener
(``metrics.listen``, off by default) serves from prometheus_client's own thread; there the
collector hands the snapshot call to the loop (``call_soon_threadsafe``) and waits for the plain
dict, so the loop spends a snapshot per scrape and the text is rendered off the loop.

Who may read what. The admin socket's text is complete. The HTTP listener's doors (loopback TCP,
a Unix socket), their bearer token and what every local user can reach are
daemon/ops/metrics_listener.py's; its text leaves out the per-uid series (``inferd_uid_*``: who
uses the daemon and how much) unless ``metrics.per_uid`` asks for them, so it is rendered from a
registry of its own. docs/operations.md ("Metrics") lists every metric and what each door exposes.

Models. The families a model owns carry ``model`` and ``version`` labels: requests by outcome,
late requests, the latency phases, and per device its frames, batches, busy seconds and batch
sizes (so a device's share per model is a ratio of two ``rate(inferd_device_busy_seconds_total)``).
The names are those of a one-model daemon, whose one model labels every series; a refusal before a
request's model was known (unknown_model, bad_request) has empty ``model`` and ``version``. A
scrape stays O(models x devices x buckets): no family is labelled by uid and model at once, and
a device's request latency stays per device.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Callable

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .metrics_listener import HttpListeners, parse_listen  # noqa: F401 (parse_listen: its old home)
from .histograms import LATENCY_BOUNDS

log = logging.getLogger("inferd.metrics")

#: How long a scrape waits for the event loop to hand over a snapshot.
SCRAPE_TIMEOUT_S = 5.0
#: Outcomes always exported (zero until seen), so rate() has a series from the first scrape.
OUTCOMES = ("ok", "cached", "cached_l2", "coalesced", "overloaded", "no_healthy_device", "shutting_down",
            "deadline_exceeded", "invalid_input", "bad_request", "slot_busy", "failed", "dropped")
DEVICE_STATES = ("healthy", "probing", "out", "disabled")


class SnapshotCollector:
    """A prometheus_client collector: every ``collect()`` reads one snapshot and yields families
    (without the per-uid ones unless ``per_uid``)."""

    def __init__(self, read: Callable[[], dict], per_uid: bool = True):
        self._read = read
        self._per_uid = per_uid

    def describe(self) -> list:
        return []           # names vary with devices and uids; registering must not take a snapshot

    def collect(self):
        return families(self._read(), per_uid=self._per_uid)


class Exporter:
    """One daemon's registries, its text, and (``[metrics]`` listen / socket) the HTTP listener.
    ``close()`` is idempotent."""

    def __init__(self, snapshot: Callable[[], dict], loop: Callable[[], asyncio.AbstractEventLoop | None],
                 cfg=None):
        self._snapshot, self._loop = snapshot, loop
        self.registry = self._registry(per_uid=True)           # the admin socket's: everything
        self._listeners: HttpListeners | None = None
        self.address: tuple[str, int] | None = None
        if cfg is not None and (cfg.listen or cfg.socket):
            http = self.registry if cfg.per_uid else self._registry(per_uid=False)
            self._listeners = HttpListeners(cfg, http)
            self.address = self._listeners.address

    def _registry(self, per_uid: bool) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SnapshotCollector(self._read, per_uid))
        ProcessCollector(registry=registry)
        return registry

    def text(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4)."""
        return generate_latest(self.registry)

    def _read(self) -> dict:
        """A snapshot, taken on the event loop whichever thread asks."""
        loop = self._loop()
        if loop is None:
            return self._snapshot()             # not serving yet: nothing else touches the stats
        try:
            if asyncio.get_running_loop() is loop:
                return self._snapshot()
        except RuntimeError:
            pass                                # a thread without a loop: the HTTP listener's
        future: concurrent.futures.Future = concurrent.futures.Future()

        def take() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self._snapshot())
                except Exception as exc:  # handed to the scraping thread, which answers 500
                    future.set_exception(exc)

        loop.call_soon_threadsafe(take)
        try:
            return future.result(SCRAPE_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"the event loop did not hand over a snapshot within "
                               f"{SCRAPE_TIMEOUT_S} s") from None

    def close(self) -> None:
        """Stop the HTTP listener (blocks up to its 0.5 s poll interval)."""
        listeners, self._listeners = self._listeners, None
        if listeners is not None:
            listeners.close()


# families ---------------------------------------------------------------------------------------
def _counter(name, doc, value, labels=None):
    family = CounterMetricFamily(name, doc, labels=list(labels) if labels else None)
    if labels is None:
        family.add_metric([], value)
    return family


def _gauge(name, doc, value=None, labels=None):
    family = GaugeMetricFamily(name, doc, labels=list(labels) if labels else None)
    if labels is None:
        family.add_metric([], value)
    return family


def _latency_buckets(sparse: list) -> tuple[list, float]:
    """Cumulative [(le, count)] over LATENCY_BOUNDS and +Inf, from ``Histogram.buckets()`` pairs."""
    counts = dict((le, n) for le, n in sparse)
    out, seen = [], 0
    for le in LATENCY_BOUNDS:
        seen += counts.get(le, 0)
        out.append((repr(le), seen))
    out.append(("+Inf", seen + counts.get(None, 0)))
    return out


def _size_buckets(pairs: list, max_batch: int) -> list:
    """Cumulative [(le, count)] at 1, 2, 4, ... max_batch and +Inf, from [[size, batches]]."""
    bounds = sorted({*(2 ** i for i in range(max_batch.bit_length()) if 2 ** i <= max_batch), max_batch})
    out = []
    for le in bounds:
        out.append((str(le), sum(n for size, n in pairs if size <= le)))
    out.append(("+Inf", sum(n for _, n in pairs)))
    return out


def families(s: dict, per_uid: bool = True):
    """Metric families of one ``Server.stats_snapshot()``; docs/operations.md lists them. The
    per-uid families only with ``per_uid``."""
    models = [m for m in s.get("models", ()) if m.get("served", True)]
    info = GaugeMetricFamily("inferd_model_info", "A model being served (value 1): its name, version, "
                             "digest, generation, and whether requests naming no model get it",
                             labels=["name", "version", "digest", "generation", "is_default"])
    for m in models or [{**s["model"], "version": "", "default": True}]:
        info.add_metric([m["name"], str(m["version"]), m["digest"], str(m.get("gen", 0)),
                         str(int(bool(m["default"])))], 1)
    yield info
    if models:
        share = GaugeMetricFamily("inferd_model_share", "A model's configured weight of the time of the "
                                  "devices it runs on ([[models]] share)", labels=["model", "version"])
        for m in models:
            share.add_metric([m["name"], str(m["version"])], m["share"])
        yield share
    yield _gauge("inferd_start_time_seconds", "Unix time the daemon started", s["started_unix"])
    if "readiness" in s:                # daemon/ops/readiness.py: what a balancer is told
        r = s["readiness"]
        yield _gauge("inferd_ready", "1 when the daemon takes work (not starting or draining, a device "
                     "in rotation, the door open), else 0", int(r["ready"]))
        yield _gauge("inferd_capacity_frames_per_second", "Frames per second the devices in rotation "
                     "deliver at full batches, by their measured profiles", r["capacity_fps"])
    yield _gauge("inferd_sessions", "Client sessions open", s["sessions"]["open"])
    yield _counter("inferd_sessions_opened", "Client sessions that passed hello", s["sessions"]["opened"])

    yield from _request_families(s, models)

    if per_uid:
        yield from _uid_families(s["uids"])
    yield from _device_families(s["devices"], s["histograms"], s["max_batch"], s.get("models", ()))
    yield from _cache_families(s["cache"], s["counters"])
    if "l2" in s["cache"]:
        yield from _l2_families(s["cache"]["l2"])

    if s.get("door") is not None:
        yield from _door_families(s["door"])

    reloads = CounterMetricFamily("inferd_reloads", "Model reloads by result", labels=["result"])
    for result in ("ok", "failed"):
        reloads.add_metric([result], s["reloads"][result])
    yield reloads
    c = s["counters"]
    yield _counter("inferd_redispatched", "Requests moved off a device that failed or left rotation",
                   c.get("redispatched", 0))
    yield _counter("inferd_stale_results", "Results dropped because their request had gone elsewhere",
                   c.get("stale_results", 0))


def _request_families(s: dict, models: list):
    """Requests by outcome and model, late ones, in flight, the latency phases per model."""
    outcomes = s["requests"]["outcomes"]
    fam = CounterMetricFamily("inferd_requests", "Requests (classify, embed, near) by how they were "
                              "answered, per model (empty: refused before its model was known)",
                              labels=["outcome", "model", "version"])
    rest = dict(outcomes)
    for m in models or [{"name": "", "version": "", "outcomes": outcomes}]:
        mine, labels = m["outcomes"], [m["name"], str(m["version"])]
        for name in (*OUTCOMES, *sorted(set(mine) - set(OUTCOMES))):
            fam.add_metric([name, *labels], mine.get(name, 0))
            rest[name] = rest.get(name, 0) - mine.get(name, 0)
    for name, n in sorted(rest.items()):
        if n > 0:
            fam.add_metric([name, "", ""], n)
    yield fam
    late = CounterMetricFamily("inferd_requests_late", "Requests answered ok after their deadline",
                               labels=["model", "version"])
    for m in models or [{"name": "", "version": "", "late": s["requests"]["late"]}]:
        late.add_metric([m["name"], str(m["version"])], m["late"])
    yield late
    yield _gauge("inferd_requests_in_flight", "Requests admitted and not yet answered", s["in_flight"])
    if s["histograms"]:
        fam = HistogramMetricFamily("inferd_request_duration_seconds", "Latency of requests computed by "
                                    "a batch, by phase: queue (admission to batch start), compute (the "
                                    "batch), reply (batch done to reply written), total; per model",
                                    labels=["phase", "model", "version"])
        for m in models or [{"name": "", "version": "", "latency": s["latency"]}]:
            for phase, h in m["latency"].items():
                fam.add_metric([phase, m["name"], str(m["version"])], _latency_buckets(h["buckets"]), h["sum_s"])
        yield fam


DOOR_REFUSALS = ("prehello_uid", "prehello_total", "evicted", "descriptors")
DOOR_ERRORS = ("EMFILE", "ENFILE")


def _door_families(door: dict):
    """The client socket's door (NOTE [ the door ] in daemon/front/door.py)."""
    yield _gauge("inferd_door_open", "1 while a new client of any uid would be accepted; 0 while new "
                 "connections are turned away for lack of file descriptors (health is not ready)",
                 float(door["open"]))
    yield _gauge("inferd_door_waiting_hello", "Connections accepted that have not finished hello",
                 door["waiting_hello"])
    yield _gauge("inferd_door_fd_limit", "RLIMIT_NOFILE soft limit (raised to the hard limit at start-up)",
                 door["fd_limit"])
    refused = CounterMetricFamily("inferd_door_refused", "Connections closed at once by the door, by "
                                  "reason: prehello_uid (server.max_prehello_per_uid), prehello_total "
                                  "(server.max_prehello), evicted (waiting for hello, closed to make "
                                  "room for another uid), descriptors (only the reserve left, or none)",
                                  labels=["reason"])
    for reason in (*DOOR_REFUSALS, *sorted(set(door["refused"]) - set(DOOR_REFUSALS))):
        refused.add_metric([reason], door["refused"].get(reason, 0))
    yield refused
    errors = CounterMetricFamily("inferd_door_accept_errors", "accept() on the client socket failed, by "
                                 "errno (EMFILE, ENFILE: out of file descriptors; the door backs off and "
                                 "accepts again); other: an unexpected exception", labels=["errno"])
    for name in (*DOOR_ERRORS, *sorted(set(door["accept_errors"]) - set(DOOR_ERRORS))):
        errors.add_metric([name], door["accept_errors"].get(name, 0))
    yield errors


def _uid_families(uids: list):
    uid_sessions = GaugeMetricFamily("inferd_uid_sessions", "Sessions open, per client uid", labels=["uid"])
    uid_flight = GaugeMetricFamily("inferd_uid_requests_in_flight", "Slots holding a request in flight, "
                                   "per client uid", labels=["uid"])
    uid_total = CounterMetricFamily("inferd_uid_requests", "Requests admitted, per client uid",
                                    labels=["uid"])
    for u in uids:
        uid = str(u["uid"])
        uid_sessions.add_metric([uid], u["sessions"])
        uid_flight.add_metric([uid], u["in_flight"])
        uid_total.add_metric([uid], u["requests"])
    yield from (uid_sessions, uid_flight, uid_total)


# Past 50 lines on purpose: one table of the per-device families, then one loop that fills a row
# of each per device; split, a family's declaration and its filling would sit apart.
def _device_families(devices: list, histograms: bool, max_batch: int, models=()):
    labels, by_model = ["device"], ["device", "model", "version"]
    fams = {
        "state": GaugeMetricFamily("inferd_device_state", "1 for the device's health state, 0 for the "
                                   "others", labels=["device", "state"]),
        "since": GaugeMetricFamily("inferd_device_state_since_seconds", "Unix time of the device's last "
                                   "health transition (its start if none)", labels=labels),
        "transitions": CounterMetricFamily("inferd_device_transitions", "Health transitions into each "
                                           "state", labels=["device", "state"]),
        "frames": CounterMetricFamily("inferd_device_frames", "Frames computed, per model", labels=by_model),
        "batches": CounterMetricFamily("inferd_device_batches", "Batches computed, per model", labels=by_model),
        "failed": CounterMetricFamily("inferd_device_failed_batches", "Batches that raised", labels=labels),
        "busy": CounterMetricFamily("inferd_device_busy_seconds", "Seconds spent running batches, per model "
                                    "(a model's share of the device: its rate over the device's)",
                                    labels=by_model),
        "stall": CounterMetricFamily("inferd_device_stall_seconds", "Seconds the device sat idle while a "
                                     "request of its next batch was waiting (pipeline bubbles)", labels=labels),
        "fps": GaugeMetricFamily("inferd_device_frames_per_second", "Frames computed per second over the "
                                 "last window (1s, 10s, 60s)", labels=["device", "window"]),
        "ratio": GaugeMetricFamily("inferd_device_busy_ratio", "Share of wall time spent running batches "
                                   "over the last window (1s, 10s, 60s)", labels=["device", "window"]),
        "queued": GaugeMetricFamily("inferd_device_queued_requests", "Requests waiting in the device's "
                                    "queue", labels=labels),
        "outstanding": GaugeMetricFamily("inferd_device_outstanding_requests", "Requests assigned to the "
                                         "device, queued or running", labels=labels),
    }
    sizes = HistogramMetricFamily("inferd_device_batch_size", "Frames per computed batch, per model",
                                  labels=by_model)
    latency = HistogramMetricFamily("inferd_device_request_duration_seconds", "Latency (admission to "
                                    "reply) of the requests the device computed", labels=labels)
    per_device: dict = {}               # device index -> [(model, version, its row there)]
    for m in models:
        for row in m["devices"]:
            per_device.setdefault(row["index"], []).append((m["name"], str(m["version"]), row))
    for d in devices:
        dev = [d["label"]]
        for state in (*DEVICE_STATES, *([d["state"]] if d["state"] not in DEVICE_STATES else [])):
            fams["state"].add_metric([d["label"], state], float(d["state"] == state))
            fams["transitions"].add_metric([d["label"], state], d["transitions"].get(state, 0))
        fams["since"].add_metric(dev, d["state_since_unix"])
        fams["failed"].add_metric(dev, d["failed_batches"])
        fams["stall"].add_metric(dev, d["stall_s"])
        rows = per_device.get(d["index"]) or [("", "", {"frames": d["frames"], "batches": d["batches"],
                                                         "seconds": d["busy_s"], "batch_sizes": d["batch_sizes"]})]
        for name, version, row in rows:
            mine = [d["label"], name, version]
            fams["frames"].add_metric(mine, row["frames"])
            fams["batches"].add_metric(mine, row["batches"])
            fams["busy"].add_metric(mine, row["seconds"])
            sizes.add_metric(mine, _size_buckets(row["batch_sizes"], max_batch),
                             float(sum(size * n for size, n in row["batch_sizes"])))
        for window, value in d["frames_per_s"].items():
            fams["fps"].add_metric([d["label"], window], value)
        for window, value in d["busy_ratio"].items():
            fams["ratio"].add_metric([d["label"], window], value)
        fams["queued"].add_metric(dev, d["queued"])
        fams["outstanding"].add_metric(dev, d["outstanding"])
        latency.add_metric(dev, _latency_buckets(d["latency"]["buckets"]), d["latency"]["sum_s"])
    yield from fams.values()
    if histograms:
        yield sizes
        yield latency


def _cache_families(c: dict, counters: dict):
    yield _gauge("inferd_cache_enabled", "1 if the result cache is on", float(c["enabled"]))
    hits = CounterMetricFamily("inferd_cache_hits", "Repeated frames answered from the result cache: by "
                               "the daemon, or by a client from its read-only mapping (reported by it)",
                               labels=["side"])
    hits.add_metric(["daemon"], c["daemon_hits"])
    hits.add_metric(["client"], c["client_hits"])
    yield hits
    yield _counter("inferd_cache_misses", "Daemon lookups that missed", c["misses"])
    yield _counter("inferd_cache_inserts", "Answers stored", c["inserts"])
    yield _counter("inferd_cache_inserts_skipped", "Misses not stored (insert sampling while the hit "
                   "rate is low)", c["inserts_skipped"])
    yield _counter("inferd_cache_evictions", "Entries replaced by an insert", c["evictions"])
    uploads = CounterMetricFamily("inferd_cache_uploads", "Encoded uploads sent with their frames "
                                  "(NOTE [ encoded uploads ]): verified (decoded to the frame), mismatched, "
                                  "inserted under their encoded key, skipped (decode thread busy)", labels=["result"])
    for result in ("verified", "mismatched", "inserted", "skipped"):
        uploads.add_metric([result], c.get(f"uploads_{result}", 0))
    yield uploads
    yield _gauge("inferd_cache_hit_ratio", "Hits (daemon and client) over lookups since start", c["hit_rate"])
    yield _counter("inferd_cache_hashed_frames", "Frames copied and hashed by the daemon",
                   counters.get("hashed", 0))
    yield _counter("inferd_cache_hash_seconds", "Seconds spent copying and hashing frames",
                   counters.get("hash_seconds", 0.0))
    f = c.get("file")
    if f is not None:
        yield _gauge("inferd_cache_used_entries", "Entries written to the cache file since the daemon opened it", f["used"])
        yield _gauge("inferd_cache_capacity_entries", "Entries the cache file has room for", f["entries"])
    if "embeddings" in c:
        yield _gauge("inferd_embeddings_stored", "Embeddings in the store", c["embeddings"])
    ix = c.get("embedding_index")
    if ix is not None:                  # the near-duplicate index (daemon/caching/ann_index.py)
        yield _gauge("inferd_embedding_index_rows", "Rows in the near-duplicate index's graphs", ix["rows"])
        yield _gauge("inferd_embedding_index_pending", "Rows stored but not yet in the index (scanned "
                     "exactly beside it)", ix["pending"])
        yield _gauge("inferd_embedding_index_bytes", "Memory of the index's graphs", ix["bytes"])
        yield _counter("inferd_embedding_index_inserted", "Rows inserted into the index", ix["inserted"])
        yield _counter("inferd_embedding_index_busy", "Near-duplicate searches answered overloaded while "
                       "the index of a large store rebuilt", ix["busy"])
        yield _gauge("inferd_embedding_index_rebuilt", "1 if the index was rebuilt from the store at "
                     "start-up (missing, damaged or stale), 0 if reopened", ix["rebuilt"])


L2_LOOKUP_RESULTS = ("hits", "misses", "errors", "timeouts", "skipped")
L2_STATES = ("closed", "open", "half_open")


def _l2_families(l2: dict):
    """The fleet cache (daemon/caching/fleet/cache.py): lookups by result, entries failing their MAC, writes, the
    breaker, and how long requests waited for a verdict."""
    lookups = CounterMetricFamily("inferd_l2_lookups", "Local misses looked up in the fleet cache, by "
                                  "result: hits, misses, errors, timeouts (past l2.budget_ms), skipped "
                                  "(breaker open or too many lookups out)", labels=["result"])
    for result in L2_LOOKUP_RESULTS:
        lookups.add_metric([result], l2[result])
    yield lookups
    yield _counter("inferd_l2_forged_entries", "Fleet cache entries that failed their MAC check "
                   "(written without the fleet key, or corrupt): ignored", l2["forged"])
    writes = CounterMetricFamily("inferd_l2_writes", "Computed answers written to the fleet cache, by "
                                 "result: ok, failed, dropped (backlog full or breaker open)", labels=["result"])
    for result, key in (("ok", "writes"), ("failed", "write_errors"), ("dropped", "writes_dropped")):
        writes.add_metric([result], l2[key])
    yield writes
    yield _gauge("inferd_l2_write_backlog", "Answers waiting to be written to the fleet cache",
                 l2["write_backlog"])
    state = GaugeMetricFamily("inferd_l2_breaker_state", "1 for the fleet cache breaker's state, 0 for "
                              "the others", labels=["state"])
    for name in L2_STATES:
        state.add_metric([name], float(l2["state"] == name))
    yield state
    yield _counter("inferd_l2_breaker_opened", "Times the fleet cache breaker opened", l2["breaker_opened"])
    wait = HistogramMetricFamily("inferd_l2_wait_seconds", "Admission to the fleet cache's verdict, by "
                                 "verdict (hit; miss: a miss, error or timeout)", labels=["verdict"])
    for verdict in ("hit", "miss"):
        h = l2[f"wait_{verdict}"]
        wait.add_metric([verdict], _latency_buckets(h["buckets"]), h["sum_s"])
    yield wait

