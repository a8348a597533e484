"""``inferctl``: the command line of inferd, for applications' checks and for operators.

Client socket (any allowed user)::

    inferctl ping                       round-trip time and the daemon's pid
    inferctl info                       model, devices, cache, counters (JSON)
    inferctl classify FILE... [-k N]    JPEG/PNG/WebP files (decoded as Client.classify does) or .npy arrays;
                                        --model NAME [--version N]: which of the daemon's models

Admin socket (root, the daemon's user, members of server.admin_group)::

    inferctl health [--wait]            exit 0 when ready; --wait blocks until it is; says why
                                        not, the capacity (frames/s) and the agent-check's line
    inferctl stats                      a readable table (--json: everything, structured)
    inferctl top                        live per-device (and per-model) view, refreshed every second
    inferctl metrics                    Prometheus text
    inferctl reload [NAME] [MODEL] [--set model.KEY=VALUE]... [--model-config FILE]
                                        swap a model without failing a request; the [model]
                                        keys as in the configuration (input, input_height, ...);
                                        NAME (or --name NAME) [--version N]: which of several
    inferctl models                     the models served: versions, routes, devices, state
    inferctl load NAME PATH [--version N] [--devices 0,1] [--share W] [--set KEY=VALUE]...
                                        load a model beside the others, failing no request
    inferctl unload NAME [--version N]  stop routing to it, answer its admitted requests, free it
    inferctl promote NAME [VERSION]     VERSION (default: the canary) takes the requests naming none
    inferctl drain                      finish in-flight work, then exit
    inferctl flush-cache                empty the result cache
    inferctl device disable|enable N    take device N out of rotation, or put it back

Sockets: --socket or $INFERD_SOCKET (client), --admin-socket or $INFERD_ADMIN_SOCKET (admin;
default: admin.sock beside the client socket). --json after any command prints JSON.

Exit codes: 0 success (health: ready); 1 the daemon answered with an error (health: not ready);
2 bad usage or an unreadable file; 69 no daemon answers on the socket; 77 permission denied: the
daemon runs but does not admit this user (the socket's mode and group, server.socket_mode, or
server.allow_uids / allow_gids; the admin socket: root, the daemon's user, server.admin_group).
A closed pipe (``inferctl metrics | head``) ends quietly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import cli_models
from .admin import AdminClient, default_admin_path
from .errors import DaemonUnavailable, InferdError, PermissionDenied

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69
EXIT_NOPERM = 77

HEALTH_WAIT_S = 120.0


class UsageError(Exception):
    """A bad argument or file; the message names the flag."""


def read_image(path: str):
    """A .npy array, or the encoded bytes of a JPEG/PNG/WebP file (Client.classify decodes them:
    inferd.client.decode), checked here so a bad file is a usage error naming it."""
    import numpy as np

    from .decode import probe, read_encoded
    from .errors import InvalidInput

    if path.endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: {exc}") from None
    try:
        data = read_encoded(path)
        probe(data)
    except InvalidInput as exc:
        raise UsageError(f"{path}: {exc}") from None
    return data


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
        return value
    return parse


def _model_setting(text: str) -> tuple[str, object]:
    """``model.KEY=VALUE`` with VALUE read as TOML (a bare word such as uint8_nhwc or /srv/m.pt2
    is a string), as ``inferd --set`` reads it."""
    import tomllib

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key.startswith("model.") or key == "model.":
        raise argparse.ArgumentTypeError(f"{text!r}: expected model.KEY=VALUE (a reload changes the "
                                         "[model] section only; other keys need a restart)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if not raw or any(c in raw for c in " []{}\"',=#"):
            raise argparse.ArgumentTypeError(f"{text!r}: {raw!r} is not a TOML value; quote a string "
                                             "(\"...\"), write a list as [1, 2]") from None
        value = raw
    return key, value


def _model_section(path: str) -> dict:
    """The [model] table of a TOML file, or its top-level keys when it has no such table."""
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{path}: not valid TOML: {exc}") from None
    section = data.get("model", data)
    if not isinstance(section, dict) or any(isinstance(v, dict) for v in section.values()):
        raise argparse.ArgumentTypeError(f"{path}: expected a [model] table or the [model] keys alone")
    return section


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON instead of text")
    p = argparse.ArgumentParser(prog="inferctl", description="command line of the inferd daemon",
                                parents=[common])
    p.add_argument("--socket", metavar="PATH", help="client socket (default: $INFERD_SOCKET or inferd's default)")
    p.add_argument("--admin-socket", metavar="PATH",
                   help="admin socket (default: $INFERD_ADMIN_SOCKET, or admin.sock beside the client socket)")
    p.add_argument("--timeout", type=_positive(float), default=30.0, metavar="SECONDS",
                   help="request deadline (default 30)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("ping", parents=[common], help="round trip to the daemon (client socket)")
    sub.add_parser("info", parents=[common], help="model, devices and counters (client socket)")
    c = sub.add_parser("classify", parents=[common], help="classify image files (client socket)")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.add_argument("-k", "--top-k", type=_positive(int), default=3, metavar="N")
    c.add_argument("--model", metavar="NAME", default=None,
                   help="which of the daemon's models answers (default: its default model)")
    c.add_argument("--version", type=_positive(int), default=None, metavar="N",
                   help="which version of that model (default: the daemon's route)")
    h = sub.add_parser("health", parents=[common], help="exit 0 when the daemon is ready")
    h.add_argument("--wait", action="store_true", help="block until the daemon is ready")
    h.add_argument("--wait-timeout", type=_positive(float), default=HEALTH_WAIT_S, metavar="SECONDS",
                   help=f"give up waiting after this long (default {HEALTH_WAIT_S:.0f})")
    sub.add_parser("stats", parents=[common], help="statistics as a table")
    t = sub.add_parser("top", parents=[common], help="live per-device and per-model view")
    t.add_argument("--interval", type=_positive(float), default=1.0, metavar="SECONDS")
    t.add_argument("--iterations", type=_positive(int), default=None, metavar="N",
                   help="stop after N refreshes (default: until Ctrl-C)")
    sub.add_parser("metrics", parents=[common], help="Prometheus text")
    r = sub.add_parser("reload", parents=[common], help="swap a model (default: its configuration read again)",
                       description="Swap a served model without failing a request. The new [model] "
                                   "section is the configured one (or --model-config FILE's), with MODEL "
                                   "and --set on top, checked as start-up checks it. A model of another "
                                   "input size needs a restart. With several models served, NAME says "
                                   "which (inferctl models lists them).")
    r.add_argument("model", nargs="?", metavar="NAME", help="with several models served: the one to swap; "
                   "else, as MODEL below, the source")
    r.add_argument("source", nargs="?", metavar="MODEL", help="built-in model name or model file path "
                   "(default: the model's configuration, read again)")
    r.add_argument("--name", default=None, metavar="NAME",
                   help="which served model it swaps (required when the daemon serves several)")
    r.add_argument("--version", type=_positive(int), default=None, metavar="N",
                   help="which version of --name (default: the one requests naming none get)")
    r.add_argument("--set", dest="settings", action="append", default=[], type=_model_setting,
                   metavar="model.KEY=VALUE",
                   help="a [model] key, value in TOML syntax (repeatable), e.g. --set model.input=uint8_nhwc")
    r.add_argument("--model-config", metavar="FILE", type=_model_section,
                   help="a TOML file whose [model] table (or top-level keys) replaces the configured section")
    cli_models.add_parsers(sub, common, _positive, _model_setting)
    sub.add_parser("drain", parents=[common], help="finish in-flight work, then exit")
    sub.add_parser("flush-cache", parents=[common], help="empty the result cache")
    d = sub.add_parser("device", parents=[common], help="take a device out of rotation or put it back")
    d.add_argument("action", choices=("disable", "enable"))
    d.add_argument("index", type=int, metavar="N", help="device index (inferctl stats lists them)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    try:
        return _run(args)
    except BrokenPipeError:
        # the reader went away (| head): nothing more to say; keep Python from complaining at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK
    except UsageError as exc:
        print(f"inferctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PermissionDenied as exc:         # the daemon runs: it is not "unavailable" (69)
        print(f"inferctl: permission denied: {exc}", file=sys.stderr)
        return EXIT_NOPERM
    except DaemonUnavailable as exc:
        print(f"inferctl: {exc}\n  start the daemon with `inferd`, or point {_where(args)} at it",
              file=sys.stderr)
        return EXIT_UNAVAILABLE
    except InferdError as exc:
        print(f"inferctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


def _where(args) -> str:
    if args.command in ("ping", "info", "classify"):
        return "--socket / $INFERD_SOCKET"
    return "--admin-socket / $INFERD_ADMIN_SOCKET (or --socket / $INFERD_SOCKET, beside which it lies)"


def _out(args, data, text: str | None = None) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json or text is None else text, flush=True)


def _admin(args) -> AdminClient:
    return AdminClient(args.admin_socket or default_admin_path(args.socket), timeout=max(args.timeout, 60.0))


def _run(args) -> int:
    cmd = args.command
    if cmd in ("ping", "info", "classify"):
        return _client_command(args)
    if cmd == "health":
        return _health(args)
    if cmd == "top":
        return _top(args)
    with _admin(args) as admin:
        if cmd == "stats":
            snap = admin.call("stats")
            _out(args, snap, render_stats(snap))
        elif cmd == "metrics":
            text = admin.call("metrics")["text"]
            if args.json:
                _out(args, {"text": text})
            else:
                sys.stdout.write(text)
                sys.stdout.flush()
        elif cli_models.run(args, admin, _out):
            pass
        elif cmd == "reload":
            fields = cli_models.reload_fields(args, admin)
            if args.model_config is not None:
                fields["section"] = args.model_config
            if args.settings:
                fields["set"] = dict(args.settings)
            reply = admin.call("reload", **fields)
            m = reply["model"]
            text = (f"model unchanged: {m['name']} (digest {m['digest']})" if not reply.get("changed") else
                    f"now serving {m['name']} (digest {m['digest']}, generation {m['gen']}), "
                    f"swapped in {reply['seconds']:.2f} s")
            _out(args, reply, text)
        elif cmd == "drain":
            reply = admin.call("drain")
            _out(args, reply, f"draining: {reply['outstanding']} requests in flight; the daemon exits when done")
        elif cmd == "flush-cache":
            reply = admin.call("flush_cache")
            _out(args, reply, f"result cache flushed: {reply['dropped']} entries dropped")
        elif cmd == "device":
            reply = admin.call("device", index=args.index, action=args.action)
            dev = reply["device"]
            _out(args, reply, f"device {dev['index']} ({dev['name']}): {dev['state']}; "
                              f"{reply['in_rotation']} device(s) in rotation")
    return EXIT_OK


def _client_command(args) -> int:
    from . import Client

    images = [read_image(f) for f in args.files] if args.command == "classify" else []
    with Client(args.socket, timeout=args.timeout) as client:
        if args.command == "ping":
            rtt = client.ping()
            _out(args, {"socket": client.socket_path, "rtt_us": round(rtt * 1e6, 1), "model": client.model.name},
                 f"pong from {client.socket_path} in {rtt * 1e6:.0f} us (model {client.model.name})")
        elif args.command == "info":
            _out(args, {k: v for k, v in client.info().items() if k not in ("id", "ok")})
        else:
            tops = client.classify_many(images, args.top_k, model=args.model, version=args.version)
            data = {path: [{"index": p.index, "label": p.label, "score": p.score} for p in top]
                    for path, top in zip(args.files, tops)}
            _out(args, data, "\n".join(f"{path}: " + ", ".join(f"{p.label} {p.score:.3f}" for p in top)
                                       for path, top in zip(args.files, tops)))
    return EXIT_OK


def _health(args) -> int:
    path = args.admin_socket or default_admin_path(args.socket)
    deadline = time.monotonic() + args.wait_timeout
    delay = 0.05
    while True:
        try:
            with AdminClient(path, timeout=10.0) as admin:
                reply = admin.call("health")
            if reply["ready"] or not args.wait:
                break
            last = f"daemon is {reply['state']} ({reply['in_rotation']} device(s) in rotation)"
        except DaemonUnavailable as exc:
            if not args.wait:
                raise
            last = str(exc)
        if time.monotonic() + delay > deadline:
            print(f"inferctl: not ready within {args.wait_timeout:.0f} s (--wait-timeout): {last}",
                  file=sys.stderr)
            return EXIT_ERROR
        time.sleep(delay)  # noqa: sleep-ok: polling a daemon that is starting, with a deadline
        delay = min(delay * 2, 0.5)
    devices = ", ".join(f"{d['name']} {d['state']}" for d in reply["devices"])
    m = reply["model"]
    # "ready" alone only when it is: a daemon whose devices are all out says so, and why
    state = reply["state"] if reply["ready"] else f"not ready ({reply.get('reason') or _not_ready_reason(reply)})"
    # capacity: frames/s the devices in rotation deliver; agent: what a balancer's agent-check reads
    fleet = f"; capacity {reply['capacity_fps']:.0f} frames/s" if "capacity_fps" in reply else ""
    if reply.get("agent"):
        fleet += f"; agent-check {reply['agent']['address']}: {reply['agent']['line']}"
    _out(args, reply, f"{state}: {m['name']} (digest {m['digest'][:12]}, generation {m['gen']}); "
                      f"devices: {devices}{fleet}{_oip_line(reply.get('oip'))}")
    return EXIT_OK if reply["ready"] else EXIT_ERROR


def _oip_line(oip: dict | None) -> str:
    """The OIP front's doors, when the daemon runs one (``[oip] enabled``): its process, or the
    daemon's own loop (``oip.placement``)."""
    if not oip:
        return ""
    running = f"pid {oip['pid']}" if oip.get("pid") else "not running"
    if oip.get("placement") == "daemon" and oip.get("pid"):
        running = "on the daemon's event loop"
    elif oip.get("placement") == "http-daemon":
        running = f"HTTP on the daemon's event loop, gRPC {running}"
    restarts = f", restarted {oip['restarts']} times" if oip.get("restarts") else ""
    return f"\nOIP front: HTTP {oip.get('http')}, gRPC {oip.get('grpc')} ({running}{restarts})"


def _not_ready_reason(reply: dict) -> str:
    if reply["state"] != "ready":
        return f"the daemon is {reply['state']}"
    if reply.get("door"):              # new clients are turned away (daemon/front/door.py)
        return f"new connections are refused: {reply['door']}"
    states = [d["state"] for d in reply["devices"]]
    if states and all(s == "disabled" for s in states):
        return "no device in rotation: every device was disabled by an operator; inferctl device enable N"
    return (f"no device in rotation: {', '.join(sorted(set(states)))}; a device out after failing its "
            "health checks comes back after a canary batch")


def _top(args) -> int:
    with _admin(args) as admin:
        n = 0
        while True:
            snap = admin.call("stats")
            if args.json:
                _out(args, snap)
            else:
                sys.stdout.write("\x1b[H\x1b[2J" if sys.stdout.isatty() else "")
                sys.stdout.write(render_top(snap) + "\n")
                sys.stdout.flush()
            n += 1
            if args.iterations is not None and n >= args.iterations:
                return EXIT_OK
            time.sleep(args.interval)  # noqa: sleep-ok: the refresh period of a live view


# rendering -------------------------------------------------------------------------------------
def _ms(v) -> str:
    return "-" if v is None else (f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}")


def _table(rows: list[list], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in cells)


def _sizes(pairs: list) -> str:
    """A batch-size distribution in a few characters: the top sizes by share."""
    total = sum(n for _, n in pairs) or 1
    top = sorted(pairs, key=lambda p: -p[1])[:3]
    return " ".join(f"{size}:{100 * n / total:.0f}%" for size, n in top) or "-"


def _device_rows(snap: dict) -> list[list]:
    rows = []
    for d in snap.get("devices", []):
        fps, busy = d.get("frames_per_s", {}), d.get("busy_ratio", {})
        lat = d.get("latency", {})
        rows.append([f"{d['index']} {d.get('label', d.get('name'))}", d["state"],
                     f"{fps.get('1s', 0):.0f}/{fps.get('10s', 0):.0f}/{fps.get('60s', 0):.0f}",
                     f"{100 * busy.get('10s', 0):.0f}%", d.get("queued", 0), f"{d.get('batch_mean', 0):.1f}",
                     _sizes(d.get("batch_sizes", [])), _ms(lat.get("p50_ms")), _ms(lat.get("p99_ms"))])
    return rows


_DEVICE_HEADER = ["device", "state", "frames/s 1s/10s/60s", "busy", "queue", "batch", "sizes",
                  "p50 ms", "p99 ms"]


def _model_rows(snap: dict) -> list[list]:
    """A row per model served (the admin stats' ``models``): its frames per second, its share of
    the devices' time over the last 10 s against its configured share, requests and errors, batch
    sizes, and the latency split (queue wait, compute, total)."""
    models = [m for m in snap.get("models", []) if m.get("served", True)]
    spent = sum(m.get("device_seconds_per_s", {}).get("10s", 0) for m in models)
    rows = []
    for m in models:
        fps, lat = m.get("frames_per_s", {}), m.get("latency", {})
        mine = m.get("device_seconds_per_s", {}).get("10s", 0)
        configured = [d["share_configured"] for d in m.get("devices", []) if d.get("share_configured") is not None]
        want = f"{100 * sum(configured) / len(configured):.0f}%" if configured else "-"
        rows.append([f"{m['name']} v{m['version']}{' *' if m.get('default') else ''}",
                     f"{fps.get('1s', 0):.0f}/{fps.get('10s', 0):.0f}/{fps.get('60s', 0):.0f}",
                     f"{100 * mine / spent:.0f}%" if spent else "-", want, m.get("requests", 0),
                     m.get("errors", 0), f"{m.get('batch_mean', 0):.1f}",
                     _ms(lat.get("queue", {}).get("p50_ms")), _ms(lat.get("compute", {}).get("p50_ms")),
                     _ms(lat.get("total", {}).get("p50_ms")), _ms(lat.get("total", {}).get("p99_ms"))])
    return rows


_MODEL_HEADER = ["model", "frames/s 1s/10s/60s", "share 10s", "configured", "requests", "errors", "batch",
                 "queue p50", "compute p50", "p50 ms", "p99 ms"]


def _cache_line(snap: dict) -> str:
    c = snap.get("cache") or {}
    if not c.get("enabled"):
        return "cache: off"
    file = c.get("file") or {}          # the cache file's own counts (inferd.shm.cache stats)
    entries = f"{file['used']} of {file['entries']}" if "used" in file and "entries" in file else "-"
    return (f"cache: hit rate {100 * c.get('hit_rate', 0):.1f}% (daemon {c.get('daemon_hits', 0)}, "
            f"client {c.get('client_hits', 0)}, misses {c.get('misses', 0)}), inserts {c.get('inserts', 0)}, "
            f"evictions {c.get('evictions', 0)}, entries {entries}")


def render_top(snap: dict) -> str:
    m = snap.get("model", {})
    lat = snap.get("latency", {}).get("total", {})
    sessions = snap.get("sessions", 0)
    sessions = sessions.get("open", 0) if isinstance(sessions, dict) else sessions
    head = (f"inferd {m.get('name', '?')} gen {m.get('gen', '?')}  up {snap.get('uptime_s', 0):.0f} s  "
            f"sessions {sessions}  in flight {snap.get('in_flight', 0)}  "
            f"p50 {_ms(lat.get('p50_ms'))} ms  p99 {_ms(lat.get('p99_ms'))} ms")
    parts = [head, _table(_device_rows(snap), _DEVICE_HEADER)]
    models = _model_rows(snap)
    if len(models) > 1:                 # several models: a row each (one model: the head names it)
        parts.append(_table(models, _MODEL_HEADER))
    return "\n".join([*parts, _cache_line(snap)])


def render_stats(snap: dict) -> str:
    parts = [render_top(snap), ""]
    lat = snap.get("latency", {})
    parts.append(_table([[phase, h.get("count", 0), _ms(h.get("p50_ms")), _ms(h.get("p90_ms")),
                          _ms(h.get("p99_ms"))] for phase, h in lat.items()],
                        ["latency", "count", "p50 ms", "p90 ms", "p99 ms"]))
    outcomes = snap.get("requests", {}).get("outcomes", {})
    if outcomes:
        parts += ["", "requests: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))]
    uids = snap.get("uids", [])
    if uids:
        parts += ["", _table([[u["uid"], u["sessions"], u["in_flight"], u.get("requests", 0)] for u in uids],
                             ["uid", "sessions", "in flight", "requests"])]
    reloads = snap.get("reloads", {})
    parts += ["", f"reloads: {reloads.get('ok', 0)} ok, {reloads.get('failed', 0)} failed"]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
