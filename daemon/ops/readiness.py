"""Readiness and capacity: the one answer to "should anyone send this daemon work now, and how much".

Every face that tells the outside asks ``assess`` and reports what it says, so they never disagree:
the admin socket's ``health`` (``inferctl health``), the client socket's ``info`` (what a network
front such as the OIP front asks for its /v2/health/ready), and the HAProxy agent-check
(daemon/ops/agent_check.py).

    state       devices in rotation   door        ready   reason
    starting    -                     -           no      "starting: ..."
    draining    -                     -           no      "draining: ..."
    ready       none                  -           no      "no device in rotation: ..."
    ready       >= 1                  blocked     no      "new connections are refused: ..."
    ready       >= 1                  open        yes     None

``state`` is the server's lifecycle (daemon/server.py): ``starting`` until every device warmed its
model, ``draining`` from SIGTERM or the admin ``drain`` (including ``fleet.drain_grace_s``, while it
still serves, so a balancer stops sending before the door closes), ``ready`` in between. A device
is in rotation when its health state is ``healthy`` (daemon/dispatch/health.py: a device out after
failures, probing with a canary, or disabled by an operator is not).

Capacity is what the devices in rotation deliver at full batches by their live profiles
(daemon/dispatch/profile.py, seeded by the warm-up at ``batching.max_batch`` and moved by every batch
since): sum over them of ``max_batch / latency(max_batch)`` frames per second. Devices out of
rotation count for nothing, so a host that loses one of two equal GPUs reports half.

Thread safety: ``assess`` only reads single attributes that their writers replace whole (the
server's state, each device's state, a profile's floats), so the agent-check thread may call it
beside the event loop; it may see a change one check late, never a torn value.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

STARTING, READY, DRAINING = "starting", "ready", "draining"


@dataclass(frozen=True)
class Readiness:
    state: str                  # starting | ready | draining (the server's lifecycle)
    ready: bool                 # send it work: ready, a device in rotation, the door open
    reason: str | None          # why not ready, in words an operator can act on; None when ready
    in_rotation: int            # devices whose health state is healthy
    capacity_fps: float         # frames/s the devices in rotation deliver at full batches

    def as_dict(self) -> dict:
        return asdict(self)


def capacity(devices, max_batch: int) -> float:
    """Frames per second the devices in rotation deliver at batches of ``max_batch``, by their
    measured profiles (0.0 for a device not measured yet)."""
    return sum(d.profile.throughput(max_batch) for d in devices if d.healthy)


def assess(state: str, devices, max_batch: int, door_blocked: str | None = None) -> Readiness:
    """The daemon's readiness (the table in this module's docstring)."""
    in_rotation = sum(1 for d in devices if d.healthy)
    fps = round(capacity(devices, max_batch), 1)
    if state == STARTING:
        reason = "starting: the devices are loading and warming the model"
    elif state == DRAINING:
        reason = "draining: finishing the work in flight before it stops"
    elif in_rotation == 0:
        reason = f"no device in rotation: {_devices_out(devices)}"
    elif door_blocked:
        reason = f"new connections are refused: {door_blocked}"
    else:
        reason = None
    return Readiness(state, reason is None, reason, in_rotation, fps)


def _devices_out(devices) -> str:
    states = [d.state for d in devices]
    if states and all(s == "disabled" for s in states):
        return "every device was disabled by an operator (inferctl device enable N)"
    return (", ".join(f"{d.label} {d.state}" for d in devices) +
            "; a device out after failing its health checks comes back after a canary batch")
