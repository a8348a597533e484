"""``inferctl``'s model commands: what is served, and loading, unloading, reloading and promoting
models while the daemon serves (the admin socket's ``models``, ``load``, ``unload``, ``reload``,
``promote``; NOTE [ live models ] in the daemon's ops/model_ops.py)::

    inferctl models                              the catalog: name, version, route, devices, share, state
    inferctl load NAME PATH|BUILTIN [--version N] [--devices 0,1] [--share W]
                  [--canary-percent P] [--canary-uids U,...] [--set KEY=VALUE]...
    inferctl unload NAME [--version N]           every version of NAME unless --version
    inferctl reload NAME [SOURCE] [--version N]  swap a served model (several served: name it)
    inferctl promote NAME [VERSION]              VERSION (default: the canary) takes every request
                                                 naming no version
"""
from __future__ import annotations

import argparse

from .errors import InferdError


def add_parsers(sub, common, positive, setting) -> None:
    """The model commands' sub-parsers (``positive``, ``setting``: cli.py's argument types)."""
    sub.add_parser("models", parents=[common], help="the models served: versions, routes, devices, state")
    ld = sub.add_parser("load", parents=[common], help="load a model beside the others, without failing a request",
                        description="Load a model while the daemon serves: checked as a [[models]] entry, "
                                    "warmed on each device between batches, then routed in one step. "
                                    "A SIGHUP later applies the configuration's [[models]] list, which "
                                    "unloads a model loaded here unless the list has it too.")
    ld.add_argument("name", metavar="NAME", help="the model's name (requests name it)")
    ld.add_argument("model", metavar="PATH", help="a model file (TorchScript / torch.export), or a built-in's name")
    ld.add_argument("--version", type=positive(int), default=None, metavar="N", help="its version (default 1)")
    ld.add_argument("--devices", type=_indices, default=None, metavar="0,1",
                    help="the devices that may run it (default: all)")
    ld.add_argument("--share", type=positive(float), default=None, metavar="W",
                    help="its weight of a device's time beside the other models (default 1)")
    ld.add_argument("--canary-percent", type=float, default=None, metavar="P",
                    help="a newer version: this percent of the name's requests naming no version go to it")
    ld.add_argument("--canary-uids", type=_indices, default=None, metavar="U,...",
                    help="a newer version: these uids' requests naming no version go to it")
    entry_setting = lambda text: setting(text if text.startswith("model.") else f"model.{text}")
    ld.add_argument("--set", dest="settings", action="append", default=[], type=entry_setting,
                    metavar="KEY=VALUE", help="any other [[models]] key, value in TOML syntax (repeatable), "
                                              "e.g. --set input=uint8_nhwc --set input_height=224")
    un = sub.add_parser("unload", parents=[common], help="unload a model: its requests admitted are answered first",
                        description="Stop routing requests to a model at once (a request naming it gets "
                                    "unknown_model), answer the ones admitted before, then free it on "
                                    "every device. The daemon's first model stays until a restart.")
    un.add_argument("name", metavar="NAME")
    un.add_argument("--version", type=positive(int), default=None, metavar="N",
                    help="only this version (default: every version of NAME)")
    pr = sub.add_parser("promote", parents=[common], help="make a version take every request naming none")
    pr.add_argument("name", metavar="NAME")
    pr.add_argument("version", nargs="?", type=positive(int), default=None, metavar="VERSION",
                    help="the version (default: the canary)")


def _indices(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas, e.g. 0,1") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: numbers must be 0 or more")
    return values


def reload_fields(args, admin) -> dict:
    """``inferctl reload [NAME] [SOURCE]``'s fields: with several models served, a first argument
    that names one of them is NAME (reloaded from its configuration, or from SOURCE); else it is
    the SOURCE of the one model, as before."""
    first, source, name = args.model, args.source, args.name
    if first is not None and source is None and name is None:
        served = {m["name"] for m in admin.call("health").get("models", [])}
        if len(served) > 1 and first in served:
            first, name = None, first
    elif first is not None and source is not None:
        if name is not None:
            raise InferdError("name the model once: inferctl reload NAME [SOURCE] (or --name NAME [SOURCE])")
        first, name = source, first
    fields = {"model": first} if first else {}
    fields.update({k: v for k, v in (("name", name), ("version", args.version)) if v is not None})
    return fields


def run(args, admin, out) -> bool:
    """Run a model command (False: not one of them); ``out(args, data, text)`` prints."""
    cmd = args.command
    if cmd == "models":
        reply = admin.call("models")
        out(args, reply, render_models(reply))
    elif cmd == "load":
        fields = {"name": args.name, "model": args.model}
        for key in ("version", "devices", "share", "canary_percent", "canary_uids"):
            if getattr(args, key) is not None:
                fields[key] = getattr(args, key)
        if args.settings:
            fields["set"] = {k.removeprefix("model."): v for k, v in args.settings}
        reply = admin.call("load", **fields)
        m = reply["loaded"]
        out(args, reply, f"loaded {m['name']} version {m['version']} (digest {m['digest']}) in "
                         f"{reply['seconds']:.2f} s; {_route_text(reply['route'])}")
    elif cmd == "unload":
        fields = {"name": args.name, **({"version": args.version} if args.version is not None else {})}
        reply = admin.call("unload", **fields)
        gone = ", ".join(f"{m['name']} version {m['version']}" for m in reply["unloaded"])
        out(args, reply, f"unloaded {gone}: {reply['answered']} requests admitted before were answered; "
                         f"freed in {reply['seconds']:.2f} s")
    elif cmd == "promote":
        fields = {"model": args.name, **({"version": args.version} if args.version is not None else {})}
        reply = admin.call("promote", **fields)
        p = reply["promoted"]
        out(args, reply, f"{p['name']} version {p['version']} takes every request naming no version")
    else:
        return False
    return True


def _route_text(route: dict) -> str:
    text = f"{route['name']}: stable version {route['stable']}"
    if route.get("canary") is not None:
        text += (f", canary version {route['canary']} ({route['canary_percent']:g} % of requests"
                 f"{', uids ' + ','.join(map(str, route['canary_uids'])) if route['canary_uids'] else ''})")
    return text


def render_models(reply: dict) -> str:
    """``inferctl models``: one row per (name, version), then the routes."""
    from .cli import _table

    rows = [[m["name"], m["version"], (m.get("route") or "-") + (" (default)" if m.get("default") else ""),
             ",".join(map(str, m["devices"])) if m.get("devices") is not None else "all",
             f"{m.get('share', 1.0):g}", m.get("gen", "-"), m.get("inflight", 0), m.get("state", "serving"),
             str(m.get("digest", ""))[:12]]
            for m in reply.get("models", [])]
    lines = [_table(rows, ["model", "version", "route", "devices", "share", "gen", "in flight", "state", "digest"])]
    lines += [""] + [_route_text(r) for r in reply.get("routes", [])]
    return "\n".join(lines)
