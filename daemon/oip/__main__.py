"""`python -m inferd.daemon.oip`: the OIP front alone, for the daemon whose configuration it reads.

The daemon starts it itself when ``[oip] enabled`` (a supervised child, one systemd unit); run it
alone to serve a daemon started otherwise, or a second front beside the first.
"""
from __future__ import annotations

import argparse
import logging
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
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_override(s) for s in args.set)
        if args.socket:
            overrides["server.socket"] = args.socket
        cfg = load(args.config, overrides)
    except ConfigError as exc:
        print(f"inferd oip: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    logging.basicConfig(level=cfg.server.log_level.upper(), format="%(name)s: %(message)s")
    from .front import run                      # aiohttp and the client library: after the config
    try:
        return run(cfg)
    except ConfigError as exc:
        print(f"inferd oip: {exc}", file=sys.stderr)
        return exitcodes.CONFIG


if __name__ == "__main__":
    sys.exit(main())
