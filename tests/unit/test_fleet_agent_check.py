"""Readiness (daemon/ops/readiness.py) and the HAProxy agent-check listener (daemon/ops/agent_check.py)
without a daemon: the readiness table, the agent's line for each case and its weight scale, and the
listener over a real TCP socket (one line per connection, agent-send read and dropped, a flood of
idle connections costing nothing but its own thread, close twice)."""
import socket
import time

import pytest

from helpers import wait_until
from inferd.daemon import config
from inferd.daemon.config import ConfigError
from inferd.daemon.dispatch.device import DISABLED, HEALTHY, OUT, PROBING
from inferd.daemon.dispatch.profile import LatencyProfile
from inferd.daemon.ops import readiness
from inferd.daemon.ops.agent_check import MAX_PERCENT, AgentCheck, agent_line, parse_agent, weight_percent

pytestmark = pytest.mark.timeout(60)


class Dev:
    """What readiness reads of a device (daemon/dispatch/device.py): state, label, profile."""

    def __init__(self, index, state=HEALTHY, batch_s=None, max_batch=32):
        self.index, self.state, self.profile = index, state, LatencyProfile()
        if batch_s is not None:
            self.profile.observe(max_batch, batch_s)

    healthy = property(lambda self: self.state == HEALTHY)
    label = property(lambda self: f"cpu#{self.index}")


def test_readiness_table():
    devs = [Dev(0, batch_s=0.032), Dev(1, batch_s=0.016)]          # 1000 + 2000 frames/s at 32
    r = readiness.assess("ready", devs, 32)
    assert (r.ready, r.reason, r.in_rotation, r.capacity_fps) == (True, None, 2, 3000.0)
    assert readiness.assess("starting", devs, 32).reason.startswith("starting")
    assert not readiness.assess("starting", devs, 32).ready
    drain = readiness.assess("draining", devs, 32)
    assert not drain.ready and drain.reason.startswith("draining") and drain.capacity_fps == 3000.0
    door = readiness.assess("ready", devs, 32, "no file descriptor is left")
    assert not door.ready and door.reason == "new connections are refused: no file descriptor is left"
    devs[1].state = OUT                                               # one out: its capacity goes
    r = readiness.assess("ready", devs, 32)
    assert r.ready and r.in_rotation == 1 and r.capacity_fps == 1000.0
    devs[0].state = PROBING
    r = readiness.assess("ready", devs, 32)
    assert not r.ready and r.capacity_fps == 0.0 and "no device in rotation: cpu#0 probing, cpu#1 out" in r.reason
    for d in devs:
        d.state = DISABLED
    assert "disabled by an operator" in readiness.assess("ready", devs, 32).reason


def test_agent_lines_and_scale():
    devs = [Dev(0, batch_s=0.032)]                                    # 1000 frames/s
    assert agent_line(readiness.assess("ready", devs, 32), 2000.0) == "up ready 50%\n"
    assert agent_line(readiness.assess("ready", devs, 32), 1000.0) == "up ready 100%\n"
    assert agent_line(readiness.assess("draining", devs, 32), 1000.0).startswith("drain #draining")
    assert agent_line(readiness.assess("starting", devs, 32), 1000.0).startswith("down #starting")
    devs[0].state = OUT
    line = agent_line(readiness.assess("ready", devs, 32), 1000.0)
    assert line.startswith("down #no device in rotation") and line.count("\n") == 1
    # never 0% (HAProxy reads it as a drain), never above what HAProxy's weight can take
    assert weight_percent(0.0, 1000.0) == 1 and weight_percent(1e9, 1000.0) == MAX_PERCENT
    assert weight_percent(1234.0, 1000.0) == 123


def test_fleet_config_keys():
    cfg = config.from_dict({"fleet": {"agent": "[::1]:9777", "reference_fps": 500, "drain_grace_s": 2}})
    assert parse_agent(cfg.fleet.agent) == ("::1", 9777) and cfg.fleet.drain_grace_s == 2.0
    assert config.from_dict({}).fleet.agent == ""                     # off by default
    with pytest.raises(ConfigError, match="fleet.agent: '9777' is not HOST:PORT"):
        config.from_dict({"fleet": {"agent": "9777"}})
    with pytest.raises(ConfigError, match="fleet.reference_fps: 0.0 is out of range"):
        config.from_dict({"fleet": {"reference_fps": 0}})


def _ask(port, send=b""):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        if send:
            s.sendall(send)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                break
            data += chunk
        return data


def test_listener_answers_one_line_per_connection():
    state = {"r": readiness.Readiness("starting", False, "starting: warming", 0, 0.0)}
    agent = AgentCheck("127.0.0.1:0", 1000.0, lambda: state["r"])
    try:
        assert _ask(agent.port) == b"down #starting: warming\n"
        state["r"] = readiness.Readiness("ready", True, None, 1, 750.0)
        assert _ask(agent.port, send=b"inferd-backend\n") == b"up ready 75%\n"    # agent-send: read, dropped
        # idle connections that never read nor close hold nothing up: the next check is answered
        idle = [socket.create_connection(("127.0.0.1", agent.port)) for _ in range(100)]
        t0 = time.monotonic()
        assert _ask(agent.port) == b"up ready 75%\n"
        assert time.monotonic() - t0 < 1.0
        for s in idle:
            s.close()
        wait_until(lambda: agent.checks == 103, 5.0, "every connection answered")
    finally:
        agent.close()
        agent.close()                                                  # idempotent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", agent.port), timeout=2).close()


def test_listener_refuses_a_taken_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match="fleet.agent: cannot listen on"):
            AgentCheck(f"127.0.0.1:{s.getsockname()[1]}", 1000.0, lambda: None)


def test_a_failing_readiness_costs_one_connection_not_the_listener():
    calls = {"n": 0}

    def readiness_():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug")
        return readiness.Readiness("ready", True, None, 1, 500.0)
    agent = AgentCheck("127.0.0.1:0", 1000.0, readiness_)
    try:
        assert _ask(agent.port) == b""                                 # closed without a line
        assert _ask(agent.port) == b"up ready 50%\n"                   # and the next is answered
    finally:
        agent.close()
