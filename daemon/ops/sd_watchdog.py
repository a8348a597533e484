"""systemd's watchdog (``WatchdogSec=``): WATCHDOG=1 only while the daemon makes progress; STATUS=.

systemd kills and restarts a service that stays silent for WatchdogSec, so a ping must mean "work
gets done", not "a timer fired". A ping is sent only when all of these hold:

- the event loop runs: the check is a task on it, so a blocked loop sends nothing;
- every device thread of a device *in rotation* (state ``healthy``) is alive, and either
  - runs a batch that is still within its health watchdog bound (``HealthMonitor.bound``) plus
    SLACK: health takes a stuck device out within bound + its tick, on this same loop, which a
    loaded host runs late, and a device health is about to take out is no reason to withhold, or
  - beat recently: ``Device.beat`` is stamped each time ``DeviceQueue.take`` returns, at least
    every IDLE_TIMEOUT (0.1 s) when idle. Between two beats the thread runs at most one batch
    (within its bound, else health takes the device out) and waits at most max_delay for a batch
    to fill, so a beat older than bound(last batch size) + max_delay + IDLE_TIMEOUT + SLACK means
    the thread is stuck outside a batch.

Devices out of rotation (``out``, ``probing``) are ignored: health (daemon/dispatch/health.py) already moved
their work to the others and probes them with canaries; a restart would take the healthy devices
down with them. A stuck batch is health's first: it takes the device out within bound + 0.1 s, and
from then on it is ignored here. What is left for systemd is what the daemon cannot heal itself:
a blocked loop, a dead device thread, or a thread stuck where health does not look. During a
drain the threads are being stopped on purpose; only the loop counts. During a model swap
(daemon/ops/reload.py) each thread loads and warms the new model between two batches, seconds without
a beat: a silent thread then counts as loading, while a dead thread or a batch past its bound
still withholds the ping.

Timing: checked every WATCHDOG_USEC / 2 (sd_watchdog_enabled(3)); after a miss, again after
MISS_RETRY, so a transient miss (a stuck batch that health is about to take out) costs one second
of the watchdog's budget, not half of it. STATUS= (a one-line summary for ``systemctl status``) goes
out with the ping when it changed, at most every STATUS_EVERY seconds, also without a watchdog.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable

from ..pipeline.collector import IDLE_TIMEOUT
from ..dispatch.device import HEALTHY
from .sd_notify import notify, watchdog_interval

log = logging.getLogger("inferd.watchdog")

SLACK = 1.0            # seconds of scheduling noise (GIL, a loaded host) a beat may be late by
MISS_RETRY = 1.0       # seconds until the next look after a miss
STATUS_EVERY = 5.0     # seconds between STATUS= updates, at most


def stalls(devices, now: float, *, bound: Callable[[object, int], float], max_delay: float,
           loading: bool = False) -> list[str]:
    """Why the daemon is not making progress, one reason per stalled in-rotation device; empty when
    every one is. ``loading``: a model swap is under way, so a thread may be silent while it warms
    the new model. Pure: reads ``state``, ``collector``, ``executor``, ``running_since``,
    ``running_size``, ``beat`` and ``label`` of each device (each a single attribute the batching
    thread replaces whole)."""
    reasons = []
    for dev in devices:
        if dev.state != HEALTHY:
            continue
        if dev.collector is None or not (dev.collector.is_alive() and dev.executor.is_alive()):
            reasons.append(f"{dev.label}: its device thread has exited")
            continue
        started, size = dev.running_since, dev.running_size
        if started is not None:
            limit = bound(dev, size)
            if now - started > limit + SLACK:
                reasons.append(f"{dev.label}: batch of {size} running for {now - started:.1f} s, "
                               f"past its bound of {limit:.1f} s")
            continue
        limit = bound(dev, max(size, 1)) + max_delay + IDLE_TIMEOUT + SLACK
        if now - dev.beat > limit and not loading:
            reasons.append(f"{dev.label}: device thread silent for {now - dev.beat:.1f} s "
                           f"(limit {limit:.1f} s)")
    return reasons


class Watchdog:
    """The loop task's state: what was last said, and the frame counter for frames/s."""

    def __init__(self, server, interval: float | None, *, clock: Callable[[], float] = time.monotonic,
                 send: Callable[[str], bool] = notify):
        self.server = server
        self.interval = interval           # WatchdogSec in seconds, or None: STATUS= only
        self._clock = clock
        self._send = send
        self._status = ""
        self._status_at = -float("inf")
        self._frames = (clock(), self._frames_done())
        self.missing: list[str] = []        # the reasons of the last miss, [] while all is well
        now = clock()
        for dev in server.devices:          # made at READY: the warm-up that just ended is a
            if not dev.beat:                # thread's last sign of life, though a thread slow to
                dev.beat = now              # take its first batch on a loaded host has not beaten

    def _frames_done(self) -> int:
        return sum(dev.frames for dev in self.server.devices)

    def check(self) -> list[str]:
        s = self.server
        if s.draining:
            return []
        return stalls(s.devices, self._clock(), bound=s.scheduler.health.bound,
                      max_delay=s.cfg.batching.max_delay_ms / 1000,
                      loading=getattr(s, "reloading", False))   # Server.reloading: a swap under way

    def status_line(self) -> str:
        s, now, frames = self.server, self._clock(), self._frames_done()
        then, before = self._frames
        self._frames = (now, frames)
        rate = (frames - before) / (now - then) if now > then else 0.0
        healthy = [d for d in s.devices if d.state == HEALTHY]
        head = "draining" if s.draining else "serving"
        line = (f"{head} {s.model.spec.name} (digest {s.model.digest[:12]}) on "
                f"{', '.join(d.label for d in s.devices)}; {len(s.sessions)} sessions; {rate:.0f} frames/s; "
                f"{len(healthy)} of {len(s.devices)} devices in rotation")
        if self.missing:
            line += f"; watchdog withheld: {self.missing[0]}"
        return line

    def tick(self) -> float:
        """One look: ping if earned, STATUS= if due. Returns the seconds until the next look."""
        parts = []
        if self.interval is not None:
            reasons = self.check()
            if reasons and not self.missing:
                log.error("not sending WATCHDOG=1 (systemd restarts inferd after WatchdogSec=%g s "
                          "without one): %s", self.interval, "; ".join(reasons))
            elif self.missing and not reasons:
                log.warning("progress again: WATCHDOG=1 resumed")
            self.missing = reasons
            if not reasons:
                parts.append("WATCHDOG=1")
        now = self._clock()
        if now - self._status_at >= STATUS_EVERY:
            line = self.status_line()
            if line != self._status:
                parts.append(f"STATUS={line}")
                self._status = line
            self._status_at = now
        if parts:
            self._send("\n".join(parts))
        return min(self.period, MISS_RETRY) if self.missing else self.period

    @property
    def period(self) -> float:
        return STATUS_EVERY if self.interval is None else min(self.interval / 2, STATUS_EVERY)


async def _run(dog: Watchdog) -> None:
    # first look one period after READY=1: systemd arms the watchdog at READY, and the threads
    # that just finished warming up have not beaten yet
    delay = dog.period
    while True:
        await asyncio.sleep(delay)
        delay = dog.tick()


def start(server) -> asyncio.Task | None:
    """Start the watchdog / STATUS= task on the running loop (call once the daemon is ready).
    None when no service manager listens (NOTIFY_SOCKET unset): there is no one to tell."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    task = asyncio.get_running_loop().create_task(_run(Watchdog(server, watchdog_interval())))
    _tasks.add(task)                    # the loop holds tasks weakly; the caller may not keep it
    task.add_done_callback(_tasks.discard)
    return task


_tasks: set = set()
