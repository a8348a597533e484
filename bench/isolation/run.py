"""Isolation between clients: ``python -m bench.isolation [--quick] [--out bench/out]`` (as root).

What a hostile or careless client can do to another (a client may hurt only its own requests),
measured on this machine in one run against one daemon (the built-in ``shapes``
model on one CPU device of one thread, the result cache on and embeddings off, every other setting
its default; the daemon admits uid 65534 through ``server.allow_uids`` and a socket of mode 0666):

- a **victim** (this uid) classifies the sample images one at a time for the whole run; its
  unloaded p50/p99 come from the first ``baseline_s``, before any attack;
- each **attack** then runs for ``attack_s`` from another uid (65534, ``nobody``) while the victim
  goes on: (a) one write of 10,000 ``info`` requests, read back, again; (b) a client pipelining
  pings and classifies that never reads a reply, with the daemon's RSS sampled during and after it;
  (c) one session flooding the device (``FLOOD_SLOTS`` frames in flight); (d) one uid holding as
  many idle sessions and half-sent frames as it may, while this process opens a new session and
  classifies twice a second; (e) malformed frames, at least 100,000 (it goes on until all are sent);
  (f) four sessions of one uid, each keeping 64 repeats of one frame in flight: cache hits, each
  copied, hashed and answered on the daemon's event loop (the loop's share per uid, NOTE [ loop
  share ] in daemon/front/loop_share.py);
- for (c) the same flood then runs alone (``share_s``): its img/s is the device's **capacity**; and
  with ``LOADERS`` well-behaved closed-loop clients of this uid (``LOADER_DEPTH`` frames in flight
  each) beside it: their img/s over the capacity is their **share** with two uids active.

Target per attack: victim p99 <= 2 x unloaded p99 (3 x for (f)) + one batch time (the daemon's measured time of
its largest batch), 0 errors, 0 wrong labels. (b): RSS growth at most 64 MiB during, within 16 MiB
of the start after it. (c): share >= 45 %. The attacks of another uid need root (setuid in a
child); without root they run as this uid, except (c) and (d), which are skipped (they measure
what one uid can do to another). Writes ``OUT/isolation.json``. About 2 minutes (15 s baseline,
10 s share phases); ``--quick`` about 80 s (5 s and 4 s; the attacks still last 10 s each).
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from ..lib import daemons, procs, report
from ..lib.measure import latency_stats
from . import attacks

SETTINGS = {"full": {"baseline_s": 15.0, "attack_s": 10.0, "share_s": 10.0, "settle_s": 5.0},
            "quick": {"baseline_s": 5.0, "attack_s": 10.0, "share_s": 4.0, "settle_s": 3.0}}
NOBODY = 65534
DAEMON_ARGS = ["--model", "shapes", "--device", "cpu:1", "--set", f"server.allow_uids=[{NOBODY}]",
               "--set", "server.socket_mode=0o666", "--set", "cache.enabled=true",
               "--set", "embeddings.enabled=false"]
LOADERS, LOADER_DEPTH = 4, 16
FLOOD_DEPTH = 1024
ATTACKS = (("a", "info", "10,000 info requests in one write, repeated"),
           ("b", "unread", "pings and classifies pipelined, no reply ever read"),
           ("c", "flood", f"one session of another uid with {attacks.FLOOD_SLOTS} frames in flight"),
           ("d", "door", "one uid's idle sessions and half-sent frames"),
           ("e", "malformed", f"{attacks.MALFORMED_FRAMES:,}+ malformed frames"),
           ("f", "hits", f"{attacks.HITS_SESSIONS} sessions of another uid, {attacks.HITS_DEPTH} cache hits "
                         "in flight each"))
P99_FACTOR = {"f": 3}                # the loop's share per uid: within 3x, plus one batch
RSS_GROWTH_MIB, RSS_AFTER_MIB, SHARE = 64, 16, 0.45


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler(threading.Thread):
    """The daemon's RSS every 100 ms, with the monotonic time, until ``stopped``."""

    def __init__(self, pid: int):
        super().__init__(name="bench-rss", daemon=True)
        self.pid, self.samples, self.stopped = pid, [], threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append((time.monotonic(), rss_mib(self.pid)))
            self.stopped.wait(0.1)

    def between(self, t0: float, t1: float) -> list[float]:
        return [m for t, m in self.samples if t0 <= t <= t1]


class Child:
    """One spawned child of bench/isolation/attacks.py with its own result queue and stop event."""

    def __init__(self, target, *args, name: str):
        self.q, self.stop = procs.CTX.Queue(), procs.CTX.Event()
        self.proc = procs.CTX.Process(target=target, args=(self.q, self.stop, *args), name=name, daemon=True)
        self.proc.start()

    def ready(self) -> None:
        """Wait until the child says it is about to start (spawned, imported, connected)."""
        procs.collect_results(self.q, [self.proc], 1, procs.RESULT_GRACE_S)

    def result(self):
        """Stop the child and return its report."""
        self.stop.set()
        return procs.collect_results(self.q, [self.proc], 1, procs.RESULT_GRACE_S)[0]


def window(victim: dict, t0: float, t1: float) -> dict:
    """The victim's calls that ended in [t0, t1]: latency stats, errors, wrong labels."""
    ends = np.asarray(victim["ends"])
    sel = (ends >= t0) & (ends <= t1)
    outcomes = np.asarray(victim["outcomes"])[sel]
    return {**latency_stats(np.asarray(victim["lats"])[sel]),
            "wrong": int(np.count_nonzero(outcomes == 1)), "errors": int(np.count_nonzero(outcomes == 2))}


def img_s(report: dict, t0: float, t1: float) -> float:
    """Frames a loader completed in [t0, t1], per second (a call counts when it ends inside)."""
    ends = np.asarray(report["ends"])
    return float(np.count_nonzero((ends >= t0) & (ends <= t1)) * report["depth"] / (t1 - t0))


def probe_connects(socket_path: str, sample, stop: threading.Event, out: dict) -> None:
    """Open a new session and classify one sample twice a second until ``stop`` (attack d)."""
    from inferd.client import Client, InferdError

    label, image = sample
    while not stop.is_set():
        try:
            with Client(socket_path, cache=False, reconnect=False, connect_timeout=2.0, timeout=5.0) as c:
                ok = c.classify(image, top_k=1)[0].label == label
            out["ok" if ok else "wrong"] += 1
        except (InferdError, OSError) as exc:
            out["failed"] += 1
            out.setdefault("first_failure", repr(exc))
        stop.wait(0.5)


def run_attack(kids: list, d: dict, key: str, kind: str, s: dict, uid, hold, log) -> dict:
    """One attack for ``attack_s`` (e goes on until its 100,000 frames are sent); the parent's own
    measurements beside it: the daemon's RSS (b), the capacity and share phases (c), new sessions (d)."""
    sock, pid = d["socket"], d["proc"].pid
    row = {"attack": key, "kind": kind}
    rss = RssSampler(pid) if kind == "unread" else None
    probe_stop, probe, probe_out = threading.Event(), None, {"ok": 0, "wrong": 0, "failed": 0}
    if rss:
        rss.start()
        time.sleep(0.5)
    if kind == "flood":
        child = Child(attacks.loader, sock, FLOOD_DEPTH, uid, 7, name="bench-flood")
    else:
        child = Child(attacks.attacker, kind, sock, uid, 11, name=f"bench-attack-{kind}")
    kids.append(child)
    child.ready()
    t0 = time.monotonic()
    if kind == "door":
        probe = threading.Thread(target=probe_connects, args=(sock, attacks.sample_images()[0], probe_stop,
                                                              probe_out), daemon=True)
        probe.start()
    child.stop.wait(s["attack_s"])
    t1 = time.monotonic()
    if kind == "flood":                      # the same flood alone, then beside the loaders
        hold.set()
        try:
            row.update(share_phases(kids, d, s))
        finally:
            hold.clear()
    row["attacker"] = child.result()
    row["window"] = (t0, t1)
    if probe:
        probe_stop.set()
        probe.join(10)
        row["new_sessions"] = probe_out
    if rss:
        start = rss.between(0, t0)[-1]
        during = max(rss.between(t0, t1 + 0.5))
        time.sleep(s["settle_s"])
        rss.stopped.set()
        rss.join()
        row["rss_mib"] = {"start": start, "max_during": during, "after": rss.samples[-1][1]}
    log(f"  ({key}) {kind}: done; attacker {({k: v for k, v in row['attacker'].items() if k != 'ends'})}")
    return row


def share_phases(kids: list, d: dict, s: dict) -> dict:
    """Capacity (the flood alone) and the loaders' share beside it, while the flood goes on and
    the victim holds. The daemon's frame counter gives the totals (the flood's calls of
    ``FLOOD_DEPTH`` frames are too coarse to time); the loaders time their own calls."""
    from inferd.client import Client

    with Client(d["socket"], cache=False) as probe:
        time.sleep(0.5)                           # the victim's last call has ended
        alone = frames_per_s(probe, s["share_s"])
        loaders = [Child(attacks.loader, d["socket"], LOADER_DEPTH, None, 100 + i, name=f"bench-loader-{i}")
                   for i in range(LOADERS)]
        kids.extend(loaders)
        for child in loaders:
            child.ready()
        time.sleep(0.5)                           # every loader's pipeline full
        t_both = time.monotonic()
        both = frames_per_s(probe, s["share_s"])
        t_both = (t_both, time.monotonic())
        for child in loaders:
            child.stop.set()
        reports = [child.result() for child in loaders]
        batch_ms = probe.info()["devices"][0]["batch_ms"]
    return {"capacity_img_s": alone, "both_img_s": both, "both_window": t_both, "loaders": reports,
            "batch_ms": batch_ms}


def frames_per_s(probe, seconds: float) -> float:
    """Frames the daemon computed per second over the next ``seconds``, from its counters."""
    t0, f0 = time.monotonic(), probe.info()["counters"].get("frames", 0)
    time.sleep(seconds)
    t1, f1 = time.monotonic(), probe.info()["counters"].get("frames", 0)
    return (f1 - f0) / (t1 - t0)


def measure(s: dict, log) -> dict:
    """The whole run against one daemon; the victim's calls are cut into windows afterwards."""
    from inferd.client import Client, InferdError

    root = os.geteuid() == 0
    uid = NOBODY if root else None
    kids: list[Child] = []
    rows = []

    try:
        with daemons.daemon(DAEMON_ARGS) as d:
            os.chmod(d["workdir"], 0o755)                # another uid reaches the socket
            hold = procs.CTX.Event()
            victim = Child(attacks.victim, d["socket"], hold, name="bench-victim")
            kids.append(victim)
            victim.ready()
            t_base = (time.monotonic(), time.monotonic() + s["baseline_s"])
            time.sleep(s["baseline_s"])
            log(f"  unloaded baseline: {s['baseline_s']:.0f} s")
            for key, kind, _ in ATTACKS:
                if not root and kind in ("flood", "door", "hits"):
                    rows.append({"attack": key, "kind": kind, "skipped": "needs root to act as another uid"})
                    log(f"  ({key}) {kind}: skipped, needs root")
                    continue
                rows.append(run_attack(kids, d, key, kind, s, uid, hold, log))
                time.sleep(1.0)                          # the daemon back to idle between attacks
            victim = victim.result()
            try:
                with Client(d["socket"], cache=False, connect_timeout=10.0) as c:
                    info = c.info()
            except InferdError as exc:                   # reported: the daemon no longer answers
                info = {"unanswered": repr(exc)}
                log(f"  after the attacks: {exc}")
        results = {"baseline": window(victim, *t_base), "rows": rows, "victim_errors": victim["errors"],
                   "exit_code": d.get("exit_code"), "log_problems": d.get("log_problems", []),
                   "shm_leftovers": d.get("shm_leftovers", []), "root": root, "counters": info.get("counters"),
                   "after_run": info.get("unanswered", "answered")}
    finally:
        procs.stop_processes([k.proc for k in kids])
    for row in rows:
        if "window" in row:
            row["victim"] = window(victim, *row["window"])
        if "capacity_img_s" in row:
            capacity = row.pop("capacity_img_s")
            loaders = sum(img_s(r, *row["both_window"]) for r in row.pop("loaders"))
            row["share"] = {"capacity_img_s": capacity, "loaders_img_s": loaders,
                            "flood_img_s": row.pop("both_img_s") - loaders,
                            "loaders_share": loaders / capacity if capacity else None}
            row["attacker"] = {"calls": len(row["attacker"]["ends"]), "errors": row["attacker"]["errors"]}
    batch_ms = next((r["batch_ms"] for r in rows if "batch_ms" in r), None) or info.get("devices", [{}])[0].get("batch_ms")
    results["batch_ms"] = max(batch_ms.items(), key=lambda kv: int(kv[0])) if batch_ms else ("0", 0.0)
    return results


def verdicts(r: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for every target of the run."""
    base, (size, ms) = r["baseline"], r["batch_ms"]
    out = []
    for row in r["rows"]:
        if "skipped" in row:
            continue
        v = row["victim"]
        factor = P99_FACTOR.get(row["attack"], 2)
        bound = factor * base["p99_ms"] + ms
        out.append((f"({row['attack']}) victim p99 <= {factor} x {base['p99_ms']:.2f} + {ms:.2f} ms "
                    f"(batch of {size}), 0 errors, 0 wrong",
                    f"p99 {v['p99_ms']:.2f} ms (p50 {v['p50_ms']:.2f}), {v['errors']} errors, {v['wrong']} wrong",
                    v["p99_ms"] <= bound and v["errors"] == 0 and v["wrong"] == 0 and v["n"] > 0))
        if "rss_mib" in row:
            m = row["rss_mib"]
            grow, after = m["max_during"] - m["start"], m["after"] - m["start"]
            out.append((f"(b) daemon RSS growth <= {RSS_GROWTH_MIB} MiB, after <= {RSS_AFTER_MIB} MiB",
                        f"+{grow:.1f} MiB during, {after:+.1f} MiB after ({m['start']:.0f} MiB at start)",
                        grow <= RSS_GROWTH_MIB and after <= RSS_AFTER_MIB))
        if "share" in row:
            sh = row["share"]
            out.append((f"(c) well-behaved share of capacity >= {SHARE:.0%}",
                        f"{sh['loaders_share']:.1%} ({sh['loaders_img_s']:.0f} of {sh['capacity_img_s']:.0f} "
                        f"img/s; the flood kept {sh['flood_img_s']:.0f})",
                        (sh["loaders_share"] or 0) >= SHARE))
        if "new_sessions" in row:
            n = row["new_sessions"]
            out.append(("(d) a new session of the victim's uid connects and is answered",
                        f"{n['ok']} of {n['ok'] + n['failed'] + n['wrong']} new sessions answered right",
                        n["failed"] == 0 and n["wrong"] == 0 and n["ok"] > 0))
    return out


def render(r: dict) -> str:
    base = r["baseline"]
    lines = [f"isolation: shapes on cpu:1, one victim classifying the samples one at a time; attacks of "
             f"{'uid ' + str(NOBODY) if r['root'] else 'this uid (not root)'}, "
             f"{r['settings']['attack_s']:.0f} s each",
             f"  unloaded: p50 {base['p50_ms']:.2f} ms, p99 {base['p99_ms']:.2f} ms over {base['n']} calls; "
             f"largest batch ({r['batch_ms'][0]}) {r['batch_ms'][1]:.2f} ms"]
    described = {key: what for key, _, what in ATTACKS}
    for row in r["rows"]:
        if "skipped" in row:
            lines.append(f"  ({row['attack']}) {described[row['attack']]}: skipped ({row['skipped']})")
            continue
        v = row["victim"]
        lines.append(f"  ({row['attack']}) {described[row['attack']]}: victim p50 {v['p50_ms']:.2f} ms, "
                     f"p99 {v['p99_ms']:.2f} ms, max {v['max_ms']:.1f} ms, {v['n']} calls, "
                     f"{v['errors']} errors, {v['wrong']} wrong; attacker {row['attacker']}")
    met = verdicts(r)
    lines.append(f"  targets ({sum(m for *_, m in met)} of {len(met)} met):")
    lines += [f"    {target}: {measured}: {'MET' if ok else 'MISS'}" for target, measured, ok in met]
    if r["victim_errors"]:
        lines.append(f"  victim errors by type: {r['victim_errors']}")
    if r.get("after_run", "answered") != "answered":
        lines.append(f"  after the attacks the daemon did not answer a new session: {r['after_run']}")
    if r["log_problems"] or r["shm_leftovers"] or r["exit_code"] != 0:
        lines.append(f"  daemon: exit {r['exit_code']}, log problems {r['log_problems'][:3]}, "
                     f"leftovers {r['shm_leftovers']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    return report.settings_main(argv, __doc__, "isolation.json",
                                "5 s baseline, 10 s attacks, 4 s share phases: about 80 s", SETTINGS, measure, render)

