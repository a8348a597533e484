"""``inferctl``: talk to a running daemon from the shell.

    inferctl ping                       round-trip time and the daemon's pid
    inferctl info                       model, devices, cache, counters (JSON)
    inferctl flush-cache                empty the result cache (root or the daemon's user)
    inferctl classify FILE... [-k N]    .npy arrays (uint8 HxWx3), and PNG/JPEG when Pillow is installed

Exit codes: 0 success, 1 the daemon answered with an error, 2 bad usage or unreadable file,
69 no daemon answers on the socket.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from inferd.client import Client, DaemonUnavailable, InferdError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69


def read_image(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit(f"inferctl: {path}: reading PNG/JPEG needs Pillow (pip install pillow)") from None
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inferctl", description="command-line client of inferd")
    p.add_argument("--socket", metavar="PATH", help="daemon socket (default: $INFERD_SOCKET or inferd's default)")
    p.add_argument("--timeout", type=float, default=30.0, help="request deadline in seconds")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("ping", help="round trip to the daemon")
    sub.add_parser("info", help="model, devices and counters as JSON")
    sub.add_parser("flush-cache", help="empty the daemon's result cache (root or the daemon's user)")
    c = sub.add_parser("classify", help="classify image files")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("-k", "--top-k", type=int, default=3)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        images = [read_image(f) for f in args.files] if args.command == "classify" else []
    except (OSError, ValueError) as exc:
        print(f"inferctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with Client(args.socket, timeout=args.timeout) as client:
            if args.command == "ping":
                rtt = client.ping()
                print(f"pong from {client.socket_path} in {rtt * 1e6:.0f} us (model {client.model.name})")
            elif args.command == "flush-cache":
                print(f"result cache flushed: {client.flush_cache()} entries dropped")
            elif args.command == "info":
                print(json.dumps({k: v for k, v in client.info().items() if k not in ("id", "ok")}, indent=2))
            else:
                for path, top in zip(args.files, client.classify_many(images, args.top_k)):
                    shown = ", ".join(f"{p.label} {p.score:.3f}" for p in top)
                    print(f"{path}: {shown}")
    except DaemonUnavailable as exc:
        print(f"inferctl: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except InferdError as exc:
        print(f"inferctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
