"""Which device takes a request.

Policy ``least_outstanding``: the device holding the fewest requests (queued plus running), ties to
the lowest index. With one device this is that device. Measured-throughput weighting and work
stealing between devices are the next step (issue 3) and will replace this module's policy, not the
mechanism around it.
"""
from __future__ import annotations


def choose(devices: list):
    """The device a new request goes to; ``devices`` is never empty."""
    best = devices[0]
    for dev in devices[1:]:
        if dev.outstanding < best.outstanding:
            best = dev
    return best
