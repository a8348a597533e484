"""``inferd``: run the daemon. ``inferd --help`` lists the flags; the TOML keys are in docs/configuration.md.

Exit codes (daemon/exitcodes.py; systemd/inferd.service restarts on 70 only): 0 stopped by
SIGTERM/SIGINT after draining; 64 bad command line; 78 bad configuration (the message names the
key); 69 cannot run here as set up: the client or the admin socket path is taken (another daemon
answers on it, or it is not a socket), systemd passed something else than one listening Unix stream
socket, or this installation lacks the daemon's packages (a client-only install); 70 start-up
failed otherwise (a device could not load or warm the model), which a restart may cure.
"""
from __future__ import annotations

import argparse
import logging
import sys

from . import exitcodes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="inferd", description="inferd: node-local image classification daemon")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--socket", metavar="PATH", help="listening socket (server.socket)")
    p.add_argument("--model", metavar="NAME|PATH",
                   help="built-in model name (shapes, resnet18, resnet50, noop, synthetic) or a model file (model.builtin / model.path)")
    p.add_argument("--device", action="append", metavar="SPEC",
                   help="cpu, cpu:THREADS, cpu:auto (layout measured at start-up) or cuda:N; repeat "
                        "for several devices ([[device]])")
    p.add_argument("--max-batch", type=int, help="batching.max_batch")
    p.add_argument("--max-delay-ms", type=float, help="batching.max_delay_ms")
    p.add_argument("--log-level", help="server.log_level")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any configuration key, value in TOML syntax (repeatable)")
    return p


def _overrides(args) -> dict:
    from .config import parse_override

    out = dict(parse_override(text) for text in args.set)
    if args.socket:
        out["server.socket"] = args.socket
    if args.model:
        key = "model.path" if ("/" in args.model or "." in args.model) else "model.builtin"
        out[key] = args.model
    if args.max_batch is not None:
        out["batching.max_batch"] = args.max_batch
    if args.max_delay_ms is not None:
        out["batching.max_delay_ms"] = args.max_delay_ms
    if args.log_level:
        out["server.log_level"] = args.log_level
    return out


def _devices(cfg, specs: list[str] | None, model=None):
    import torch

    from .dispatch.device import Device
    from .config import ConfigError, DeviceConfig, from_dict

    if specs:
        cfg.devices = []
        for i, spec in enumerate(specs):
            name, _, threads = spec.partition(":") if spec.startswith("cpu") else (spec, "", "")
            if threads == "auto":
                name, threads = "cpu:auto", ""
            elif threads and not threads.isdigit():
                raise ConfigError(f"--device {spec!r}: expected cpu, cpu:THREADS, cpu:auto or cuda:N")
            probe = from_dict({"device": [{"name": name, "threads": int(threads or 0)}]})
            cfg.devices.append(probe.devices[0])
    if not cfg.devices:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        cfg.devices = [DeviceConfig(f"cuda:{i}") for i in range(count)] or [DeviceConfig("cpu")]
    for i, dev in enumerate(cfg.devices):
        if dev.name.startswith("cuda") and int(dev.name[5:]) >= torch.cuda.device_count():
            raise ConfigError(f"device[{i}].name: {dev.name} is not present "
                              f"({torch.cuda.device_count()} CUDA devices)")
    from .pipeline import cpu_layout as layout, thread_pools as threads_mod

    if any(d.name == "cpu:auto" for d in cfg.devices):     # measured here, with the model
        cfg.devices = layout.expand(cfg.devices, model, cfg)
    try:
        shares = threads_mod.plan(cfg.devices, threads_mod.usable_cores(), pin=cfg.threads.pin,
                                  oversubscribe=cfg.threads.oversubscribe)
    except threads_mod.ThreadPlanError as exc:
        raise ConfigError(str(exc)) from None
    return [Device(i, d.name, a.threads if d.name == "cpu" else d.threads)
            for i, (d, a) in enumerate(zip(cfg.devices, shares))]


#: What the daemon needs beyond the client library: `pip install 'inferd[daemon]'` (setup.cfg).
DAEMON_MODULES = ("torch", "uvloop", "psutil", "prometheus_client", "threadpoolctl")


def _missing_modules() -> list[str]:
    import importlib.util

    return [name for name in DAEMON_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:          # argparse: 0 after --help, 2 on a usage error
        return exitcodes.USAGE if exc.code == 2 else exc.code
    missing = _missing_modules()
    if missing:                        # a client-only install (`pip install inferd`)
        print(f"inferd: the daemon needs {', '.join(missing)}, which this installation lacks (the "
              "client library alone was installed); install the daemon with: pip install "
              "'inferd[daemon]'", file=sys.stderr)
        return exitcodes.NOT_INSTALLED
    from . import config as config_mod
    from .ops import logs
    from .front.listener import Listener, ListenerError

    try:
        cfg = config_mod.load(args.config, _overrides(args))
    except config_mod.ConfigError as exc:
        print(f"inferd: configuration error: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    logs.setup(cfg.server.log_level)       # journald priorities when stderr is the journal
    from .pipeline import thread_pools as threads_mod
    threads_mod.prepare_environment(cfg.threads.omp_wait_policy,      # before torch loads libgomp
                                    teams=threads_mod.cpu_teams(args.device, cfg.devices),
                                    spin_count=cfg.threads.omp_spin_count)
    log = logging.getLogger("inferd")
    try:
        # socket activation (inferd.socket) passes the bound socket; else bind it ourselves
        listener = Listener.from_systemd() or Listener.bind(cfg.socket_path, cfg.server.socket_mode)
    except ListenerError as exc:
        log.error("%s", exc)
        return exitcodes.UNAVAILABLE
    if listener.inherited and listener.path != cfg.socket_path:
        log.warning("serving on %s, the socket systemd passed, not on server.socket %s; set them alike "
                    "(the admin socket defaults to the directory of server.socket)",
                    listener.path, cfg.socket_path)
    try:
        return _serve_or_exit_code(cfg, args, listener, log)
    finally:
        listener.close()


def _serve_or_exit_code(cfg, args, listener, log) -> int:
    """Serve until stopped; a start-up failure becomes one log line and the exit code that says
    what a restart can cure (docs/operations.md, exit codes)."""
    from . import config as config_mod
    from .front.listener import ListenerError
    from ..shm.cache import CacheError
    from ..shm.ownedfile import OwnedFileNoSpace

    try:
        return _serve(cfg, args, listener)
    except ListenerError as exc:            # the admin socket (the server binds it): as the client socket
        log.error("admin socket: %s (server.admin_socket; by default admin.sock beside server.socket, "
                  "so daemons whose client sockets share a folder each need their own)", exc)
        return exitcodes.UNAVAILABLE
    except config_mod.ConfigError as exc:
        log.error("configuration error: %s", exc)
        return exitcodes.CONFIG
    except OwnedFileNoSpace as exc:         # the cache or store file cannot have its blocks
        log.error("%s", exc)
        return exitcodes.NO_SPACE
    except CacheError as exc:               # e.g. another daemon holds the cache file
        log.error("cache.path: %s", exc)
        return exitcodes.CONFIG
    except OSError as exc:
        log.error("start-up failed: %s", exc)
        return exitcodes.STARTUP_FAILED
    except Exception:  # anything else at start-up: say so in the log, exit with a named code
        log.exception("start-up failed")
        return exitcodes.STARTUP_FAILED


def _serve(cfg, args, listener) -> int:
    import uvloop

    from . import config as config_mod
    from .models import loading as model_mod
    from .server import Server
    from ..shm.ring import sweep_stale

    removed = sweep_stale(cfg.ring.shm_prefix)
    if removed:
        logging.getLogger("inferd").warning("removed %d ring names left by a dead daemon: %s",
                                            len(removed), ", ".join(removed))
    from .pipeline import thread_pools as threads_mod

    threads_mod.configure_process(cfg.threads.blas, cfg.threads.interop,   # NOTE [ thread pools ]
                                  cfg.threads.switch_interval_ms, cfg.threads.per_batch)
    catalog = _catalog(cfg)                    # first: --device cpu:auto measures its first model
    model = catalog.by_id[0].model
    _remove_stale_stores(cfg, catalog)
    devices = _devices(cfg, args.device, model)
    catalog.check_devices(len(devices))
    # SIGHUP reads the same file with the same flags again (daemon/ops/reload.py)
    reread = lambda: config_mod.load(args.config, _overrides(args))
    return uvloop.run(Server(cfg, catalog, devices, listener, reread_config=reread).run())


def _catalog(cfg):
    """Every configured model loaded (on the CPU; each device puts it on itself at start), as the
    catalog (daemon/models/catalog.py). A [[models]] entry that does not load is named."""
    from .config import ConfigError, entry_name
    from .models import loading as model_mod
    from .models.catalog import Catalog

    if not cfg.models:
        return Catalog.of([(cfg.model, model_mod.load(cfg.model))])
    loaded = []
    for i, entry in enumerate(cfg.models):
        try:
            loaded.append((entry, model_mod.load(entry)))
        except ConfigError as exc:
            raise ConfigError(f"models[{i}] ({entry_name(entry)} version {entry.version}): {exc}") from None
        except MemoryError:
            raise ConfigError(f"models[{i}] ({entry_name(entry)} version {entry.version}): does not "
                              f"fit this host's memory with the models before it") from None
    return Catalog.of(loaded)



def _remove_stale_stores(cfg, catalog) -> None:
    """The embedding stores of models no longer configured go at start-up (with a log line), so the
    cache directory holds one store per model served, not one per model ever served. Only stores
    named by default (embeddings.path empty): a path the operator chose is theirs to manage."""
    import os

    from .caching.embedding_store import default_path, remove_stale
    from .models.catalog import store_digest
    from .models.embedding_pooling import embedding_id

    if cfg.embeddings.path:
        return
    directory = os.path.dirname(cfg.cache_path)
    keep = [default_path(directory, store_digest(s.digest), embedding_id(s.spec)) for s in catalog.by_id]
    remove_stale(directory, keep, logging.getLogger("inferd"))


if __name__ == "__main__":
    sys.exit(main())
