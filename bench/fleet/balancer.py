"""Hosts behind HAProxy weighted by measured capacity: ``python -m bench.fleet.balancer [--quick] [--out bench/out]``.

Two hosts, each a daemon serving the ``synthetic`` model on one device (a batch of n frames takes
(2 + 2 n) ms / speed: the "slow" host at speed 1, the "fast" one at speed 3), its HAProxy
agent-check (``[fleet] agent``, 100% = ``fleet.reference_fps`` = 1000 frames/s) and its OIP HTTP
front; Debian's HAProxy in front of both with the configuration docs/fleet.md gives (shorter check
intervals: 300 ms; bench/fleet/haproxy.py). The load: keep-alive HTTP clients sending OIP inference
requests one after another (bench/fleet/oip_load.py), every answer checked. Three parts, one run:

1. **split**: N requests; each host's share of the answers against its share of the capacity the
   hosts report (target: within 10% of it).
2. **failover**: the load runs; the slow host's device starts raising on every batch; seconds until
   HAProxy has it DOWN (target <= 3 s), answers it gave after that (target 0), failed requests
   (target 0).
3. **drain**: the load runs; the slow host is SIGTERMed with ``fleet.drain_grace_s = 2``; seconds
   until HAProxy has it in DRAIN, requests HAProxy sent it after that (target 0), failed requests
   (target 0). Then the same with no grace, for comparison (the door closes at once: HAProxy's
   retries carry what reaches it before its checks notice). Last, **crash**: the slow host's daemon
   SIGKILLed under load (its agent gone, the regular check decides): seconds until DOWN, failed
   requests.

Writes ``OUT/balancer.json``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time

from ..lib import daemons, report
from .haproxy import Backend, HAProxy, free_port
from .oip_load import Load

SETTINGS = {"full": {"split_requests": 2000, "clients": 4, "after_requests": 300},
            "quick": {"split_requests": 600, "clients": 4, "after_requests": 100}}
REFERENCE_FPS = 1000.0
INTER_MS = 300
GRACE_S = 2.0
TARGETS = {"split": 0.10, "failover_s": 3.0}


@contextlib.contextmanager
def host(name: str, speed: float, *extra: str):
    """A daemon (synthetic model at ``speed``, the agent-check) and its OIP front; yields a dict."""
    from inferd.daemon.launch import DaemonProcess

    control_dir = daemons.short_workdir()
    control = os.path.join(control_dir, "synthetic.json")
    values = {"base_ms": 2.0, "per_frame_ms": 2.0, "speed": {"0": speed}, "fault": {}}

    def write(v):
        with open(control + ".tmp", "w") as fh:
            json.dump(v, fh)
        os.replace(control + ".tmp", control)
    write(values)
    http_port, agent_port = free_port(), free_port()
    args = ["--model", "synthetic", "--device", "cpu:1", "--set", "batching.max_batch=32",
            "--set", "model.warmup_batches=3", "--set", f'fleet.agent="127.0.0.1:{agent_port}"',
            "--set", f"fleet.reference_fps={REFERENCE_FPS}", "--set", "health.backoff_s=0.5", *extra]
    try:
        with daemons.daemon(args, env={"INFERD_SYNTHETIC": control}) as d:
            front = DaemonProcess.start(["--set", f'oip.http="127.0.0.1:{http_port}"', "--set", 'oip.grpc="off"'],
                                        socket_path=d["socket"], workdir=d["workdir"], module="inferd.daemon.oip")
            try:
                yield {"name": name, "daemon": d, "front": front,
                       "backend": Backend(name, http_port, agent_port),
                       "fault": lambda what: write({**values, "fault": {"0": what}})}
            finally:
                if front.proc.poll() is None:
                    front.stop()
    finally:
        shutil.rmtree(control_dir, ignore_errors=True)


def health(h) -> dict:
    from inferd.client import AdminClient

    with AdminClient(os.path.join(h["daemon"]["workdir"], "admin.sock"), timeout=10) as a:
        return a.call("health")


@contextlib.contextmanager
def fleet(*extra: str):
    with host("slow", 1.0, *extra) as slow, host("fast", 3.0, *extra) as fast:
        proxy = HAProxy()
        try:
            proxy.start([slow["backend"], fast["backend"]], check_path="/v2/health/ready",
                        inter_ms=INTER_MS, agent_inter_ms=INTER_MS)
            caps = {h["name"]: health(h)["capacity_fps"] for h in (slow, fast)}
            proxy.wait_for(lambda s: all(s[k]["status"] == "UP" and abs(int(s[k]["weight"]) - 100 * c / REFERENCE_FPS) <= 2
                                         for k, c in caps.items()), 15.0, "both hosts up at their agents' weights")
            yield {"slow": slow, "fast": fast}, proxy, caps
        finally:
            proxy.stop()


def part_split(s, log) -> dict:
    with fleet() as (hosts, proxy, caps):
        weights = {k: int(v["weight"]) for k, v in proxy.servers().items()}
        load = Load(proxy.port, threads=s["clients"], limit=s["split_requests"])
        t0 = time.monotonic()
        load.wait_served(s["split_requests"], 300.0)
        wall = time.monotonic() - t0
        load.stop()
        expected = caps["fast"] / (caps["fast"] + caps["slow"])
        share = load.served["fast"] / load.total
        out = {"capacity_fps": caps, "weights": weights, "served": dict(load.served), "failed": len(load.failures),
               "share_fast": share, "capacity_share_fast": expected, "error": abs(share - expected) / expected,
               "req_s": load.total / wall}
        log(f"split: {out}")
        return out


def part_failover(s, log) -> dict:
    with fleet() as (hosts, proxy, caps):
        load = Load(proxy.port, threads=s["clients"])
        try:
            load.wait_served(100, 60.0)
            t0 = time.monotonic()
            hosts["slow"]["fault"]("raise")
            out_s = proxy.wait_for(lambda v: v["slow"]["status"].startswith(("DOWN", "MAINT")), 30.0, "slow host out")
            seen = len(load.log)
            load.wait_served(load.total + s["after_requests"], 120.0)
            after = [h for t, h in load.log[seen:] if t > t0 + out_s + 0.05]
        finally:
            load.stop()
        out = {"out_s": out_s, "answered_by_it_after": after.count("slow"), "answered_after": len(after),
               "failed": len(load.failures), "failures": [repr(f) for f in load.failures[:5]],
               "served": dict(load.served)}
        log(f"failover: {out}")
        return out


def part_crash(s, log) -> dict:
    """The slow host's daemon SIGKILLed under load: its agent is gone (HAProxy ignores an agent it
    cannot reach), so its regular check (the front's readiness) takes it out."""
    with fleet() as (hosts, proxy, caps):
        load = Load(proxy.port, threads=s["clients"])
        try:
            load.wait_served(100, 60.0)
            t0 = time.monotonic()
            hosts["slow"]["daemon"]["proc"].proc.kill()
            out_s = proxy.wait_for(lambda v: v["slow"]["status"].startswith(("DOWN", "MAINT")), 30.0, "slow host out")
            load.wait_served(load.total + s["after_requests"], 120.0)
        finally:
            load.stop()
        out = {"out_s": out_s, "failed": len(load.failures), "failures": [repr(f) for f in load.failures[:5]],
               "served": dict(load.served), "elapsed_s": time.monotonic() - t0}
        log(f"crash: {out}")
        return out


def part_drain(s, log, grace_s: float) -> dict:
    with fleet("--set", f"fleet.drain_grace_s={grace_s}") as (hosts, proxy, caps):
        load = Load(proxy.port, threads=s["clients"])
        try:
            load.wait_served(100, 60.0)
            proc = hosts["slow"]["daemon"]["proc"]
            t0 = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            drain_s = proxy.wait_for(lambda v: not v["slow"]["status"].startswith("UP"), 30.0, "slow host drained")
            state = proxy.servers()["slow"]
            exit_code = proc.proc.wait(60)
            stopped_s = time.monotonic() - t0
            load.wait_served(load.total + s["after_requests"], 120.0)
            sent_after = int(proxy.servers()["slow"]["stot"]) - int(state["stot"])
        finally:
            load.stop()
        out = {"grace_s": grace_s, "drain_seen_s": drain_s, "status": state["status"], "sent_after_drain": sent_after,
               "stopped_s": stopped_s, "exit_code": exit_code, "failed": len(load.failures),
               "failures": [repr(f) for f in load.failures[:5]], "served": dict(load.served)}
        log(f"drain, grace {grace_s} s: {out}")
        return out


def measure(s, log) -> dict:
    return {"split": part_split(s, log), "failover": part_failover(s, log),
            "drain": part_drain(s, log, GRACE_S), "drain_no_grace": part_drain(s, log, 0.0),
            "crash": part_crash(s, log)}


def render(r: dict) -> str:
    sp, fo, dr, dn = r["split"], r["failover"], r["drain"], r["drain_no_grace"]
    met = lambda ok: "MET" if ok else "MISS"
    return "\n".join([
        "fleet behind HAProxy: 2 hosts (synthetic model, 1 device each, speeds 1 and 3), OIP HTTP fronts, "
        f"agent-check and HTTP check every {INTER_MS} ms",
        f"  split: capacities {sp['capacity_fps']} frames/s -> HAProxy weights {sp['weights']}; the fast host "
        f"answered {sp['share_fast']:.3f} of {sum(sp['served'].values())} requests, its capacity share "
        f"{sp['capacity_share_fast']:.3f}: off by {100 * sp['error']:.1f}% (target <= {100 * TARGETS['split']:.0f}%: "
        f"{met(sp['error'] <= TARGETS['split'])}); {sp['failed']} failed; {sp['req_s']:.0f} req/s through HAProxy",
        f"  failover: the slow host's device raising -> DOWN in HAProxy after {fo['out_s']:.2f} s (target <= "
        f"{TARGETS['failover_s']} s: {met(fo['out_s'] <= TARGETS['failover_s'])}); answers from it after that: "
        f"{fo['answered_by_it_after']} of {fo['answered_after']}; failed requests {fo['failed']} (target 0: "
        f"{met(fo['failed'] == 0)})",
        f"  drain (SIGTERM, grace {GRACE_S} s): HAProxy had it {dr['status']} after {dr['drain_seen_s']:.2f} s, "
        f"sent it {dr['sent_after_drain']} requests after that (target 0: {met(dr['sent_after_drain'] == 0)}); "
        f"it stopped after {dr['stopped_s']:.2f} s with exit {dr['exit_code']}; failed requests {dr['failed']} "
        f"(target 0: {met(dr['failed'] == 0)})",
        f"  drain without grace (fleet.drain_grace_s = 0): HAProxy had it {dn['status']} after "
        f"{dn['drain_seen_s']:.2f} s and sent it {dn['sent_after_drain']} requests after that; failed requests "
        f"{dn['failed']} (the ones it refused in between were retried on the other host: retry-on 503)",
        f"  crash (the slow host's daemon SIGKILLed): DOWN in HAProxy after {r['crash']['out_s']:.2f} s by its "
        f"regular check (an agent that is gone changes nothing); failed requests {r['crash']['failed']}"])


def main(argv=None) -> int:
    return report.settings_main(argv, __doc__, "balancer.json", "600 requests for the split, about 40 s",
                                SETTINGS, measure, render)


if __name__ == "__main__":
    raise SystemExit(main())
