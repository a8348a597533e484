"""A real daemon's statistics, scraped over its HTTP listener and parsed with prometheus_client's own
parser, count exactly what its clients sent; a listener off loopback stops start-up (the counts
themselves, on an injected clock: tests/unit/test_stats_and_metrics.py)."""
import os
import re
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import RawClient, wait_until
from inferd.shm import wire


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(x.name, tuple(sorted(x.labels.items()))): x.value
            for fam in text_string_to_metric_families(text) for x in fam.samples}


def _total(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


@pytest.mark.timeout(120)
def test_a_daemon_counts_exactly_what_its_clients_sent(fresh_daemon):
    d = fresh_daemon("--set", 'metrics.listen="127.0.0.1:0"', "--set", "metrics.allow_anonymous=true",
                     "--set", "metrics.per_uid=true")
    port = int(re.search(r"metrics: http://127\.0\.0\.1:(\d+)/metrics", d.log()).group(1))
    frame_shape = (64, 64, 3)
    rng = np.random.default_rng(11)
    sent = 30
    client = RawClient(d.socket_path, ring_slots=8)
    bad = RawClient(d.socket_path)
    uid = str(os.getuid())
    try:
        before = _scrape(port)
        assert _total(before, "inferd_uid_sessions", uid=uid) == 2
        for i in range(sent):                                  # unique frames: every one computed
            client.classify(i, i % 8, rng.integers(0, 256, frame_shape, dtype=np.uint8))
            reply = client.recv()
            assert reply["ok"] and reply["id"] == i and "cached" not in reply, reply
        for i in range(3):                                     # refused at the door
            bad.classify(i, 0, np.zeros((8, 8, 3), np.uint8))
            assert bad.recv()["code"] == wire.E_INVALID_INPUT
        after = _scrape(port)
        client.send({"op": "info", "id": 1000})               # the client socket's view agrees
        info = client.recv()
        assert info["ok"] and info["requests"] == {"ok": sent, "invalid_input": 3}, info["requests"]
        assert info["cache"]["misses"] == sent and info["cache"]["file"]["used"] >= 1
    finally:
        client.close()
        bad.close()
    assert _total(after, "inferd_requests_total", outcome="ok") == sent
    assert _total(after, "inferd_requests_total", outcome="invalid_input") == 3
    assert _total(after, "inferd_requests_total") == sent + 3
    assert _total(after, "inferd_device_frames_total") == sent
    assert _total(after, "inferd_cache_misses_total") == sent
    for phase in ("queue", "compute", "reply", "total"):
        assert _total(after, "inferd_request_duration_seconds_count", phase=phase) == sent, phase
    assert _total(after, "inferd_device_batch_size_sum") == sent
    assert _total(after, "inferd_device_request_duration_seconds_count") == sent
    assert _total(after, "inferd_device_batch_size_count") == _total(after, "inferd_device_batches_total")
    assert _total(after, "inferd_uid_requests_total", uid=uid) == sent
    assert _total(after, "inferd_uid_requests_in_flight", uid=uid) == 0
    assert _total(after, "inferd_device_frames_per_second", window="60s") > 0
    assert 0 < _total(after, "inferd_device_busy_ratio", window="60s") <= 1
    assert _total(after, "inferd_device_state", state="healthy") == 1
    assert _total(after, "process_resident_memory_bytes") > 0
    # the sessions close on the daemon's side a moment after ours
    wait_until(lambda: _total(_scrape(port), "inferd_uid_sessions", uid=uid) == 0, what="sessions closed")
    assert d.stop() == 0


@pytest.mark.timeout(120)
def test_a_non_loopback_listener_stops_start_up_naming_the_key(fresh_daemon):
    d = fresh_daemon("--set", 'metrics.listen="0.0.0.0:9464"', wait=False)
    assert d.proc.wait(timeout=100) == 78
    assert "metrics.listen" in d.log()
