"""inferd daemons for the benchmarks: each in a fresh work directory of its own, always stopped.

Every daemon gets its own socket, ring prefix and cache file ``<workdir>/results.cache`` (never the
system default). Unless the arguments set ``cache.*`` themselves, the result cache and the embedding
store are off: a benchmark's frames repeat, and a cache would answer them without the model.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile

from .measure import cpu_seconds, machine_cpu

#: Directory of the ring name prefix check: the daemons here use the memfd backend, so nothing
#: should ever appear there; the benchmark checks it anyway.
SHM_DIR = "/dev/shm"


def short_workdir() -> str:
    """A fresh directory under /tmp with a short path (AF_UNIX socket paths are limited to 107 bytes)."""
    return tempfile.mkdtemp(prefix="inferd-b", dir="/tmp")


def shm_leftovers(prefix: str) -> list[str]:
    """Names in /dev/shm that start with ``prefix`` (there should never be any)."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def daemon(args: list[str], env: dict | None = None, *, keep_log: str | None = None):
    """Start an inferd daemon with ``args`` (and ``env`` added to its environment) in a fresh work
    directory and yield it; always stop it (SIGTERM, then SIGKILL if it overstays 30 s).

    Yields a dict with ``proc`` (the DaemonProcess), ``socket``, ``prefix``, ``workdir``,
    ``cache_path`` and ``args``; after the block ``exit_code``, ``log`` (its whole log, also written
    to ``keep_log`` when given), ``log_problems`` (ERROR and traceback lines) and ``shm_leftovers``.
    """
    from inferd.daemon.launch import DaemonProcess

    workdir = short_workdir()
    prefix = f"inferdbench{secrets.token_hex(3)}"
    info = {"socket": os.path.join(workdir, "d.sock"), "prefix": prefix, "workdir": workdir,
            "cache_path": os.path.join(workdir, "results.cache"), "args": list(args)}
    memory = [] if any(a.startswith("cache.") for a in args) else [
        "--set", "cache.enabled=false", "--set", "embeddings.enabled=false"]
    proc = None
    try:
        proc = DaemonProcess.start([*args, "--set", f'ring.shm_prefix="{prefix}"',
                                    "--set", f'cache.path="{info["cache_path"]}"', *memory],
                                   socket_path=info["socket"], workdir=workdir, env=env)
        info["proc"] = proc
        yield info
    finally:
        try:
            if proc is not None:
                try:
                    info["exit_code"] = proc.stop(timeout=30.0)
                finally:
                    proc.kill()
                info["log"] = proc.log()
                info["log_problems"] = [ln for ln in info["log"].splitlines()
                                        if " ERROR " in ln or ln.startswith("Traceback")]
                if keep_log:
                    os.makedirs(os.path.dirname(keep_log) or ".", exist_ok=True)
                    with open(keep_log, "w") as fh:
                        fh.write(info["log"])
        finally:
            info["shm_leftovers"] = shm_leftovers(prefix)
            shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def cache_daemon(args: list[str], *, cache: bool = True, embeddings: bool = False, device: str = "cpu:2",
                 env: dict | None = None):
    """``daemon`` with the result cache (and the embedding store) on or off as asked; yields its
    dict; afterwards also ``log_warnings`` and, on a non-zero exit or logged errors, ``log_tail``."""
    full = [*args, "--device", device, "--set", f"cache.enabled={'true' if cache else 'false'}",
            "--set", f"embeddings.enabled={'true' if embeddings else 'false'}"]
    info = {}
    try:
        with daemon(full, env) as info:
            info.update(cache=cache, embeddings=embeddings)
            yield info
    finally:
        warned = [ln for ln in info.get("log", "").splitlines() if " WARNING " in ln]
        if warned:
            info["log_warnings"] = warned[:20]
        if info.get("exit_code") != 0 or info.get("log_problems"):
            info["log_tail"] = info.get("log", "")[-4000:]


def daemon_summary(d: dict) -> dict:
    """What the report keeps of a finished daemon: its command line and how it ended."""
    return {k: d.get(k) for k in ("args", "exit_code", "shm_leftovers", "log_tail", "log_warnings")
            if k in d}


def counters(client) -> dict:
    """The daemon's cumulative counters (frames, batches, model_seconds, ...), through ``client``."""
    return dict(client.info()["counters"])


def snapshot(probe, pid: int) -> dict:
    """The daemon's counters (``c_`` + name) and cache counters (cumulative), its CPU seconds and
    the machine's busy and steal seconds, now."""
    info = probe.info()
    cache = info.get("cache") or {}
    out = {f"c_{k}": v for k, v in info["counters"].items() if isinstance(v, (int, float))}
    out.update({k: cache.get(k, 0) for k in ("daemon_hits", "client_hits", "misses", "inserts",
                                             "inserts_skipped", "evictions", "coalesced")})
    out["cpu_s"] = cpu_seconds(pid)
    out.update(machine_cpu())
    return out
