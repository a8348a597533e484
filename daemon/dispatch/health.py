"""Device health: out of rotation on repeated failures or a stuck batch, back in by a canary.

    HEALTHY --health.max_failures batches in a row raise--------------> OUT
    HEALTHY --a batch runs past its watchdog bound---------------------> OUT (stuck)
    OUT     --backoff elapsed: one canary batch (a blank frame) queued--> PROBING
    PROBING --the canary succeeds----------------------------------------> HEALTHY (backoff reset)
    PROBING --the canary raises or overruns its bound--------------------> OUT (backoff doubled)
    any     --an operator's `inferctl device disable N`------------------> DISABLED (no canaries)
    DISABLED --`inferctl device enable N`-----------------------------------> HEALTHY (backoff reset)

Watchdog bound of a batch of b frames: max(health.watchdog_floor_s, health.watchdog_factor * L(b))
with L the device's measured profile. The monitor (``check``) runs on the event loop at least every
``tick`` seconds, so a stuck batch leaves rotation by bound + tick after it started: with the
defaults (floor 1.0 s, tick 0.1 s) within 1.1 s for any model whose batches take under 0.1 s.
Backoff starts at health.backoff_s and doubles per failed canary up to health.backoff_max_s.

The last device in rotation is never taken out for being slow: with nowhere to move its work, that
would only turn late answers into ``no_healthy_device`` errors. A host whose cores are swamped (64
client processes starting on 2 cores) stretches a CPU batch past the floor without anything being
wrong. Its batch runs on; the overrun is logged and counted (``health_stuck_kept``), requests keep
their deadlines, and a device that is really hung stops the systemd watchdog's pings, so the
manager restarts the daemon. A device that raises still leaves rotation.

Taking a device out is the scheduler's job (``on_out``): it re-dispatches the device's queued
requests, and for a stuck device its running batch too, to healthy devices. Every transition is
logged and counted.
"""
from __future__ import annotations

import logging
from typing import Callable

from .device import DISABLED, HEALTHY, OUT, PROBING
from ..ops.logs import RateLimitedLog

log = logging.getLogger("inferd.health")
_kept = RateLimitedLog(log)             # an overloaded host may overrun every batch


class HealthMonitor:
    def __init__(self, cfg, devices: list, *, on_out: Callable, send_canary: Callable, counters,
                 clock: Callable[[], float], stats=None):
        self.cfg = cfg                     # HealthConfig
        self.devices = devices
        self._on_out = on_out              # on_out(device, reason, stuck)
        self._send_canary = send_canary    # send_canary(device)
        self._counters = counters
        self._stats = stats                # daemon/ops/stats.py: state and time of each transition
        self._clock = clock
        self.tick = min(0.1, cfg.watchdog_floor_s / 5)

    def bound(self, dev, size: int) -> float:
        return max(self.cfg.watchdog_floor_s, self.cfg.watchdog_factor * dev.running_profile.latency(size))

    def batch_ok(self, dev, canary: bool) -> None:
        dev.failures = 0
        if canary:
            dev.canary_pending = False
            if dev.state == PROBING:
                self._transition(dev, HEALTHY, "canary batch succeeded")
                dev.backoff = 0.0

    def batch_failed(self, dev, canary: bool, error: str) -> None:
        if canary:
            dev.canary_pending = False
            if dev.state == PROBING:
                self._out(dev, f"canary batch failed: {error}", stuck=False)
            return
        dev.failures += 1
        if dev.state == HEALTHY and dev.failures >= self.cfg.max_failures:
            self._out(dev, f"{dev.failures} batches in a row failed, last: {error}", stuck=False)

    def disable(self, dev, who: str) -> None:
        """Out of rotation on an operator's word: queued work moves to the other devices, the
        running batch finishes here, and no canary brings it back until ``enable``."""
        if dev.state == DISABLED:
            return
        dev.canary_pending = False
        dev.outs += 1
        self._transition(dev, DISABLED, f"disabled {who}")
        self._on_out(dev, f"disabled {who}", False)

    def enable(self, dev, who: str) -> None:
        if dev.state != DISABLED:
            return
        dev.failures, dev.backoff = 0, 0.0
        self._transition(dev, HEALTHY, f"enabled {who}")

    def check(self) -> None:
        """Watchdog and canary pass over every device (call at least every ``tick`` seconds)."""
        now = self._clock()
        for dev in self.devices:
            started = dev.running_since
            if dev.state in (HEALTHY, PROBING) and started is not None:
                bound = self.bound(dev, dev.running_size)
                if now - started > bound:
                    why = f"batch of {dev.running_size} running for {now - started:.2f} s, past its " \
                          f"watchdog bound of {bound:.2f} s"
                    if dev.state == HEALTHY and not any(d.healthy for d in self.devices if d is not dev):
                        if dev.kept_since != started:     # once per batch
                            dev.kept_since = started
                            self._counters["health_stuck_kept"] += 1
                            _kept.warning("device %s: %s; kept in rotation: it is the only one",
                                          dev.label, why)
                        continue
                    self._out(dev, why, stuck=True)
                    continue
            if dev.state == OUT and now >= dev.retry_at and not dev.canary_pending:
                dev.canary_pending = True
                self._transition(dev, PROBING, "backoff over; canary batch queued")
                self._send_canary(dev)

    def _out(self, dev, reason: str, stuck: bool) -> None:
        h = self.cfg
        dev.backoff = h.backoff_s if dev.backoff == 0.0 else min(dev.backoff * 2, h.backoff_max_s)
        dev.retry_at = self._clock() + dev.backoff
        if dev.state == PROBING and stuck:
            dev.canary_pending = True      # the canary is what is stuck; no second one behind it
        dev.outs += 1
        self._transition(dev, OUT, f"{reason}; retry in {dev.backoff:.1f} s")
        self._on_out(dev, reason, stuck)

    def _transition(self, dev, state: str, reason: str) -> None:
        level = logging.WARNING if state in (OUT, DISABLED) else logging.INFO
        log.log(level, "device %s: %s -> %s: %s", dev.label, dev.state, state, reason)
        self._counters[f"health_{state}"] += 1
        dev.state = state
        if self._stats is not None:
            self._stats.device_state(dev, state)
