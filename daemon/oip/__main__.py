"""`python -m inferd.daemon.oip`: the OIP front alone, for the daemon whose configuration it reads.

The daemon starts it itself when ``[oip] enabled`` (a supervised child, one systemd unit); run it
alone to serve a daemon started otherwise, or a second front beside the first.
"""
from __future__ import annotations

import argparse
import os
import sys

from .. import exitcodes
from ..config import load, parse_override
from ..errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inferd.daemon.oip",
                                     description="The Open Inference Protocol front (HTTP, gRPC) of an inferd daemon.")
    parser.add_argument("--config", help="the daemon's TOML configuration (its [oip] and [server] sections)")
    parser.add_argument("--socket", help="the daemon's client socket (server.socket)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one key, as the daemon's --set")
    parser.add_argument("--parent-pid", type=int, default=0, help=argparse.SUPPRESS)   # the supervising daemon
    args = parser.parse_args(argv)
    if args.parent_pid:
        _die_with_parent(args.parent_pid)
    try:
        overrides = dict(parse_override(s) for s in args.set)
        if args.socket:
            overrides["server.socket"] = args.socket
        cfg = load(args.config, overrides)
    except ConfigError as exc:
        print(f"inferd oip: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    from ..ops import logs
    logs.setup(cfg.server.log_level)           # journald priorities, as the daemon's lines
    from .front import run                      # the doors' stacks and the client library: after the config
    from ...client.errors import InferdError
    try:
        return run(cfg)
    except ConfigError as exc:
        print(f"inferd oip: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    except InferdError as exc:                  # no daemon to serve (within 30 s), or it refused us
        print(f"inferd oip: cannot serve the daemon on {cfg.socket_path}: {exc}", file=sys.stderr)
        return exitcodes.UNAVAILABLE


def _die_with_parent(parent: int) -> None:
    """Started by the daemon (daemon/oip/supervisor.py): a SIGKILLed daemon takes its front along
    (PR_SET_PDEATHSIG), and a front whose daemon is already gone does not start."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)        # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        sys.exit(exitcodes.UNAVAILABLE)


if __name__ == "__main__":
    sys.exit(main())
