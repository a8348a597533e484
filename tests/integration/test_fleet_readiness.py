"""Readiness a balancer can trust, with real daemons: the HAProxy agent-check (``[fleet] agent``), the
admin ``health`` and the client ``info`` say the same thing while the daemon starts, serves, loses
its devices and gets them back, loses one of two, and drains (with ``fleet.drain_grace_s`` it keeps
serving while it says ``drain``).

The daemons serve the ``synthetic`` model (inferd.daemon.models.zoo.synthetic): known batch costs,
so a known capacity, and faults injected per device through its control file.
"""
import json
import os
import signal
import socket
import time

import numpy as np
import pytest

from haproxy_server import free_port
from helpers import admin_path, short_dir, spawn_daemon, wait_until
from inferd.client import AdminClient, Client, DaemonUnavailable, InferdError
from inferd.daemon.models.zoo.synthetic import level_of

pytestmark = pytest.mark.timeout(120)

BASE_MS, PER_FRAME_MS, MAX_BATCH = 2.0, 2.0, 32


class Host:
    """A daemon with an agent-check listener and a synthetic model whose faults a test sets."""

    def __init__(self, devices=1, *args, wait=True, fault=None, reference_fps=1000.0):
        self.workdir = short_dir()
        self.control = os.path.join(self.workdir, "synthetic.json")
        self.values = {"base_ms": BASE_MS, "per_frame_ms": PER_FRAME_MS, "speed": {}, "fault": fault or {}}
        self.write()
        self.agent_port = free_port()
        os.environ["INFERD_SYNTHETIC"] = self.control
        try:
            self.d = spawn_daemon(*[a for _ in range(devices) for a in ("--device", "cpu:1")],
                                  "--set", "cache.enabled=false", "--set", f"batching.max_batch={MAX_BATCH}",
                                  "--set", f'fleet.agent="127.0.0.1:{self.agent_port}"',
                                  "--set", f"fleet.reference_fps={reference_fps}", *args,
                                  model="synthetic", workdir=self.workdir, wait=wait)
        finally:
            del os.environ["INFERD_SYNTHETIC"]

    def write(self):
        with open(self.control + ".tmp", "w") as fh:
            json.dump(self.values, fh)
        os.replace(self.control + ".tmp", self.control)

    def fault(self, index, what):
        self.values["fault"] = {**self.values["fault"], str(index): what}
        self.write()

    def agent(self) -> str:
        """One agent check, as HAProxy makes it: connect, read a line."""
        with socket.create_connection(("127.0.0.1", self.agent_port), timeout=5) as s:
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(512)
                if not chunk:
                    break
                data += chunk
        return data.decode()

    def health(self) -> dict:
        with AdminClient(admin_path(self.d), timeout=10) as a:
            return a.call("health")

    def info(self) -> dict:
        with Client(self.d.socket_path) as c:
            return c.info()

    def close(self):
        self.d.stop()
        self.d.cleanup()


def frame(level=128):
    return np.full((16, 16, 3), level, np.uint8)


def expected_fps(devices=1):
    return devices * MAX_BATCH * 1000.0 / (BASE_MS + PER_FRAME_MS * MAX_BATCH)   # 484.8 a device


def profile_fps(host) -> dict[int, float]:
    """Frames/s each device's measured latency profile says it delivers at MAX_BATCH (admin stats)."""
    with AdminClient(admin_path(host.d)) as a:
        devices = a.call("stats")["devices"]
    return {d["index"]: MAX_BATCH * 1000.0 / d["batch_ms"][str(MAX_BATCH)] for d in devices}


def test_starting_ready_and_capacity_agree():
    host = Host(2, wait=False, fault={"0": "hang"})         # the warm-up hangs: the daemon stays starting
    try:
        wait_until(lambda: _answers(host), 30.0, "the agent listener while starting")
        assert host.agent().startswith("down #starting")
        health = wait_until(lambda: _health_or_none(host), 30.0, "the admin socket")   # up while starting
        assert health["state"] == "starting" and not health["ready"] and health["reason"].startswith("starting")
        host.fault(0, "none")
        host.d.wait_notify("READY=1")
        health, info, line = host.health(), host.info(), host.agent()
        assert health["ready"] and info["ready"] and health["reason"] is None and info["state"] == "ready"
        # capacity: what the two devices' profiles say they deliver at full batches, and the
        # agent's weight is that on its scale; the profiles are measured times of the synthetic
        # model's sleeps, never faster than those (a loaded machine makes them slower: a CI run
        # with four test workers measured 0.3x)
        by_profile = profile_fps(host)
        assert health["capacity_fps"] == pytest.approx(sum(by_profile.values()), rel=0.01)
        assert expected_fps(2) * 0.1 < health["capacity_fps"] <= expected_fps(2) * 1.02
        assert line == f"up ready {round(health['capacity_fps'] / 10)}%\n"
        assert health["agent"]["line"] == line.strip()
        with AdminClient(admin_path(host.d)) as a:               # and Prometheus says the same
            text = a.call("metrics")["text"]
        assert "inferd_ready 1.0" in text and "inferd_capacity_frames_per_second " in text
        # one device out by an operator: half the capacity, still ready
        with AdminClient(admin_path(host.d)) as a:
            a.call("device", index=1, action="disable")
        half = host.health()["capacity_fps"]
        assert half == pytest.approx(profile_fps(host)[0], rel=0.01)
        assert host.agent() == f"up ready {round(half / 10)}%\n"
    finally:
        host.close()


def _health_or_none(host):
    try:
        return host.health()
    except DaemonUnavailable:               # the agent listens first; the admin socket comes next
        return None


def _answers(host) -> bool:
    try:
        host.agent()
        return True
    except OSError:
        return False


def test_no_device_in_rotation_is_down_until_one_comes_back():
    host = Host(2, "--set", "health.backoff_s=0.2")
    try:
        assert host.agent().startswith("up ready")
        host.fault(0, "raise")
        host.fault(1, "raise")
        with Client(host.d.socket_path) as c:
            def failed_out():
                try:
                    c.classify(frame())
                except InferdError:
                    pass
                return host.health()["in_rotation"] == 0
            wait_until(failed_out, 30.0, "both devices out of rotation")
        line, health, info = host.agent(), host.health(), host.info()
        assert line.startswith("down #no device in rotation"), line
        assert not health["ready"] and not info["ready"]
        assert health["reason"] == info["reason"] and health["reason"].startswith("no device in rotation")
        host.fault(0, "none")
        host.fault(1, "none")
        wait_until(lambda: host.agent().startswith("up ready"), 30.0, "a canary bringing a device back")
        assert host.health()["ready"]
    finally:
        host.close()


@pytest.mark.slow
def test_drain_grace_says_drain_and_still_serves():
    host = Host(1, "--set", "fleet.drain_grace_s=2.0")
    try:
        with Client(host.d.socket_path) as c:
            assert c.classify(frame())[0].index == level_of(128)
            t0 = time.monotonic()
            host.d.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: host.agent().startswith("drain #draining"), 5.0, "the agent saying drain")
            health = host.health()
            assert health["state"] == "draining" and not health["ready"]
            served = 0
            while time.monotonic() - t0 < 1.5:                # inside the grace: still served
                assert c.classify(frame(200))[0].index == level_of(200)
                served += 1
            assert served > 0
        assert host.d.proc.wait(30) == 0
        assert time.monotonic() - t0 >= 2.0                   # it waited the grace out
    finally:
        host.d.cleanup()


def test_a_second_signal_ends_the_grace():
    host = Host(1, "--set", "fleet.drain_grace_s=60")
    try:
        t0 = time.monotonic()
        host.d.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: host.agent().startswith("drain #"), 5.0, "the agent saying drain")
        host.d.proc.send_signal(signal.SIGTERM)
        assert host.d.proc.wait(30) == 0
        assert time.monotonic() - t0 < 30
        assert "draining now" in host.d.log()
    finally:
        host.d.cleanup()
