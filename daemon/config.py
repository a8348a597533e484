"""The daemon's configuration: one home, documented defaults, every value checked at start-up.

A TOML file (``inferd --config FILE``) gives sections ``[server]``, ``[ring]``, ``[batching]``,
``[model]``, ``[dispatch]``, ``[health]``, ``[cache]``, ``[embeddings]``, ``[metrics]``, ``[l2]``,
``[fleet]``, ``[threads]`` and a list ``[[device]]`` (their keys, defaults and ranges: daemon/config_sections.py);
command-line flags override single keys (``--set batching.max_batch=16``, or the shortcuts
``--socket``, ``--model``, ...). An unknown key, a wrong type or a value out of range stops start-up
with a :class:`ConfigError` whose message names the key and what is allowed. The
configuration reference, docs/configuration.md, is generated from the same table
(``python -m inferd.daemon.config docs/configuration.md``).

This module loads and checks (``load``, ``from_dict``, ``parse_override``) and prints the reference;
the section dataclasses are re-exported from it, so ``from .config import ModelConfig`` works.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from .caching.fleet.codec import check_l2_config
from .ops.agent_check import parse_agent
from .ops.metrics_listener import check_config as check_metrics_config
from .config_sections import (COMPILE_MODES, PER_SIZE_MODES, INPUT_FORMS, LOG_LEVELS, MODEL_FORMATS, PRECISIONS, SECTIONS,
                              BatchingConfig, CacheConfig, Config, DeviceConfig, DispatchConfig,
                              EmbeddingsConfig, FleetConfig, HealthConfig, L2Config, MetricsConfig, ModelConfig,
                              ModelEntryConfig,
                              RingConfig, ServerConfig, ThreadsConfig, default_cache_path)
from .errors import ConfigError
from .front.listener import SUN_PATH_MAX

__all__ = ["ConfigError", "Config", "load", "from_dict", "parse_override", "reference", "check_input_form",
           "SECTIONS", "default_cache_path", "ServerConfig", "RingConfig", "BatchingConfig", "ModelConfig",
           "DispatchConfig", "HealthConfig", "CacheConfig", "EmbeddingsConfig", "MetricsConfig", "L2Config",
           "FleetConfig", "ThreadsConfig", "DeviceConfig", "ModelEntryConfig", "LOG_LEVELS", "MODEL_FORMATS", "PRECISIONS", "COMPILE_MODES", "PER_SIZE_MODES",
           "INPUT_FORMS"]


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Check one value against its field's type and range; return it in the field's type."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    meta = f.metadata
    if kind == "int":
        if isinstance(value, str) and key.endswith("socket_mode"):
            try:
                value = int(value, 8)
            except ValueError:
                raise ConfigError(f"{key}: {value!r} is not an octal mode such as \"0660\"") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        if key.endswith("log_level"):
            value = value.lower()
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif kind == "list":
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
    elif kind == "dict":
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if lo is not None and not lo <= value <= hi:
        raise ConfigError(f"{key}: {value!r} is out of range; allowed {lo} to {hi}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")
    return value


def _apply(obj, section: str, values: dict) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"[{section}] must be a table, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in fields:
            raise ConfigError(f"{key}: unknown key; [{section}] takes {', '.join(fields)}")
        setattr(obj, name, _coerce(key, fields[name], value))


def _check_cross(cfg: Config) -> None:
    """Checks that involve more than one key."""
    for key in ("server.allow_uids", "server.allow_gids"):
        ids = getattr(cfg.server, key.split(".")[1]) or []
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**32 for i in ids):
            raise ConfigError(f"{key}: expected a list of ids 0 to {2**32 - 1}, got {ids!r}")
    for who, weight in (cfg.dispatch.weights or {}).items():
        if not (who.isdigit() or (who.startswith("@") and len(who) > 1)):
            raise ConfigError(f"dispatch.weights: key {who!r} is not a uid or @group")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1000:
            raise ConfigError(f"dispatch.weights.{who}: {weight!r} is not a weight above 0, at most 1000")
    if cfg.server.max_sessions_per_uid >= cfg.server.max_clients:
        raise ConfigError(f"server.max_sessions_per_uid: {cfg.server.max_sessions_per_uid} must be below "
                          f"server.max_clients ({cfg.server.max_clients}), so a new uid can always connect")
    if cfg.health.backoff_s > cfg.health.backoff_max_s:
        raise ConfigError(f"health.backoff_s: {cfg.health.backoff_s} is above health.backoff_max_s "
                          f"({cfg.health.backoff_max_s})")
    if cfg.ring.default_slots > cfg.ring.max_slots:
        raise ConfigError(f"ring.default_slots: {cfg.ring.default_slots} is above ring.max_slots "
                          f"({cfg.ring.max_slots})")
    _check_socket_paths(cfg)
    if cfg.models:
        _check_models(cfg)
    else:
        _check_model(cfg.model, "model")
    if cfg.metrics.listen or cfg.metrics.socket or cfg.metrics.token_file:
        check_metrics_config(cfg.metrics)   # who can reach the listener, and its token file
    if cfg.l2.enabled:
        check_l2_config(cfg.l2, cfg.cache.enabled)    # key file private, one topology named
    if cfg.fleet.agent:
        parse_agent(cfg.fleet.agent)        # HOST:PORT (bound at start: daemon/ops/agent_check.py)
    _check_devices(cfg)


def _check_model(m: ModelConfig, key: str) -> None:
    """One model's keys: ``[model]`` (``key`` "model") or a ``[[models]]`` entry ("models[i]")."""
    for name in ("mean", "std"):
        vals = getattr(m, name)
        if vals is None:
            continue
        if len(vals) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            raise ConfigError(f"{key}.{name}: expected 3 numbers (one per RGB channel), got {vals!r}")
        if name == "std" and not all(v > 0 for v in vals):
            raise ConfigError(f"{key}.{name}: every std must be > 0, got {vals!r}")
    if m.path:
        # first, so `--model /typo.pt2` says the file is missing, not that its input size is
        if not os.path.exists(m.path):
            raise ConfigError(f"{key}.path: {m.path} does not exist")
        if not os.path.isfile(m.path):
            raise ConfigError(f"{key}.path: {m.path} is not a file")
        if not m.input_height or not m.input_width:
            raise ConfigError(f"{key}.input_height / {key}.input_width: required (> 0) with {key}.path")
    check_input_form(m, key)
    if m.compile in PER_SIZE_MODES and m.warmup_batches < 1:
        raise ConfigError(f"{key}.compile: {m.compile} prepares every batch size during the "
                          f"warm-up; set {key}.warmup_batches >= 1")


def _check_models(cfg: Config) -> None:
    """The ``[[models]]`` list: each entry as ``[model]`` is checked, a name for each (a file's stem
    or the built-in's name when empty: daemon/models/catalog.py), one (name, version) once, at most
    one default, devices that exist."""
    defaults = [i for i, m in enumerate(cfg.models) if m.default]
    if len(defaults) > 1:
        raise ConfigError(f"models[{defaults[1]}].default: models[{defaults[0]}] is the default "
                          f"already; mark one entry only")
    seen: dict = {}
    for i, m in enumerate(cfg.models):
        key = f"models[{i}]"
        _check_model(m, key)
        name = entry_name(m)
        if not name or name == "default" or not all(c.isalnum() or c in "-_." for c in name):
            raise ConfigError(f"{key}.name: {name!r} is not a model name (letters, digits, - _ . and "
                              f"not \"default\", which names the default model)")
        if (name, m.version) in seen:
            raise ConfigError(f"{key}: {name} version {m.version} is models[{seen[name, m.version]}] "
                              f"already; give it another version or name")
        seen[name, m.version] = i
        for d in m.devices or ():
            if isinstance(d, bool) or not isinstance(d, int) or d < 0:
                raise ConfigError(f"{key}.devices: expected device indices (0, 1, ...), got {d!r}")
        for u in m.canary_uids or ():
            if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < 2**32:
                raise ConfigError(f"{key}.canary_uids: expected uids, got {u!r}")


def entry_name(m: ModelConfig) -> str:
    """A configured model's name: ``name``, else the file's stem, else the built-in's name."""
    return m.name or (Path(m.path).stem if m.path else m.builtin)


def _check_socket_paths(cfg: Config) -> None:
    for key, path in (("server.socket / --socket", cfg.socket_path),
                      ("server.admin_socket", cfg.admin_socket_path)):
        size = len(os.fsencode(path))
        if size > SUN_PATH_MAX:            # bind() would fail with a bare EINVAL
            raise ConfigError(f"socket path is {size} bytes; AF_UNIX allows at most {SUN_PATH_MAX}: "
                              f"choose a shorter {key} ({path})")


def _check_devices(cfg: Config) -> None:
    seen = set()
    for i, dev in enumerate(cfg.devices):
        if dev.name not in ("cpu", "cpu:auto") and not (dev.name.startswith("cuda:") and dev.name[5:].isdigit()):
            raise ConfigError(f"device[{i}].name: {dev.name!r} is not cpu or cuda:N (nor cpu:auto)")
        if dev.name == "cpu:auto" and (dev.threads or len([d for d in cfg.devices if d.name.startswith("cpu")]) > 1):
            raise ConfigError(f"device[{i}]: cpu:auto chooses every CPU device and its threads; list "
                              f"no other cpu device and no threads beside it")
        if dev.name.startswith("cuda") and dev.name in seen:
            raise ConfigError(f"device[{i}].name: {dev.name} is listed twice")
        seen.add(dev.name)


def check_input_form(m: "ModelConfig", key: str = "model") -> None:
    """A file model's normalisation is explicit: float_nchw needs model.mean and model.std (no
    silent ImageNet default), uint8_nhwc takes neither; built-ins take float_nchw only."""
    given = [k for k in ("mean", "std") if getattr(m, k) is not None]
    if m.input == "uint8_nhwc":
        if not m.path:
            raise ConfigError(f"{key}.input: uint8_nhwc is for file models that normalise inside; the "
                              f"built-in {m.builtin} takes float_nchw")
        if given:
            raise ConfigError(f"{key}.{given[0]}: a uint8_nhwc model normalises inside and is given the "
                              f"frames as they are; remove model.mean / model.std, or set "
                              f"model.input = \"float_nchw\"")
    elif m.path and len(given) < 2:
        raise ConfigError(f"{key}.mean / {key}.std: required for a float_nchw file model (the daemon "
                          "normalises (x / 255 - mean) / std and will not guess); e.g. ImageNet's "
                          "mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225], or set "
                          "model.input = \"uint8_nhwc\" if the model normalises inside")


#: The sections written as lists of tables: ``[[device]]`` and ``[[models]]``, their entries' class
#: and the Config field that lists them.
TABLE_LISTS = {"device": (DeviceConfig, "devices"), "models": (ModelEntryConfig, "models")}


def from_dict(data: dict, overrides: dict | None = None) -> Config:
    """Build and check a Config from parsed TOML plus ``{"section.key": value}`` overrides."""
    cfg = Config()
    for section, values in data.items():
        if section in TABLE_LISTS:
            make, field = TABLE_LISTS[section]
            if not isinstance(values, list):
                raise ConfigError(f"{section}: expected a list of tables ([[{section}]])")
            for i, entry in enumerate(values):
                item = make()
                _apply(item, f"{section}[{i}]", entry)
                getattr(cfg, field).append(item)
        elif section in SECTIONS:
            _apply(getattr(cfg, section), section, values)
        else:
            raise ConfigError(f"[{section}]: unknown section; allowed: "
                              f"{', '.join([*SECTIONS, 'device', 'models'])}")
    for dotted, value in (overrides or {}).items():
        section, _, name = dotted.partition(".")
        if section not in SECTIONS or not name:
            raise ConfigError(f"{dotted}: overrides take section.key with section one of {', '.join(SECTIONS)}")
        _apply(getattr(cfg, section), section, {name: value})
    _check_cross(cfg)
    return cfg


def load(path: str | os.PathLike | None, overrides: dict | None = None) -> Config:
    """Read a TOML file (or nothing) and apply overrides. Raises ConfigError."""
    data = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    return from_dict(data, overrides)


# a value that is no TOML but plainly meant as a string: resnet18, /srv/m.pt2, cuda:0
_BARE_WORD = re.compile(r"""[^\s\[\]{}"',=#]+""")


def parse_override(text: str) -> tuple[str, Any]:
    """``section.key=value`` with value read as TOML (so 16, 2.5, "x", [1, 2] all work; a bare word
    such as resnet18 or /srv/model.pt2 is taken as a string). ConfigError for anything else that is
    not TOML, such as ``[1,``."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as exc:
        if not _BARE_WORD.fullmatch(raw):
            raise ConfigError(f"--set {text}: not a TOML value: {exc}; quote a string "
                              f'("..."), write a list as [1, 2]') from None
        value = raw
    return key.strip(), value


def reference() -> str:
    """The configuration reference as a Markdown table (for docs/configuration.md)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for section, cls in [*SECTIONS.items(), *((name, make) for name, (make, _) in TABLE_LISTS.items())]:
        for f in dataclasses.fields(cls):
            if cls is ModelEntryConfig and f.name in _MODEL_KEYS:
                continue                    # [model]'s keys, listed there
            default = f.default
            shown = "(see meaning)" if default in ("", None) else f"`{default!r}`"
            if f.name == "socket_mode":
                shown = f"`{oct(default)}`"
            rows.append(f"| `{section}.{f.name}` | {shown} | {f.metadata['doc']} |")
    return "\n".join(rows)


_MODEL_KEYS = {f.name for f in dataclasses.fields(ModelConfig)}


#: docs/configuration.md holds the table between these two lines; the prose around it is written by hand.
REFERENCE_BEGIN = ("<!-- generated by `python -m inferd.daemon.config docs/configuration.md` "
                   "from daemon/config.py: edit the docs there, not here -->")
REFERENCE_END = "<!-- end of the generated reference -->"


def write_reference(page: Path) -> bool:
    """Replace the generated table in ``page`` with :func:`reference`; True if the page changed.
    Raises ValueError when the page lacks the two marker lines."""
    text = page.read_text()
    head, begin, rest = text.partition(REFERENCE_BEGIN + "\n")
    _, end, tail = rest.partition(REFERENCE_END)
    if not begin or not end:
        raise ValueError(f"{page}: no {REFERENCE_BEGIN!r} ... {REFERENCE_END!r} block to fill")
    new = f"{head}{begin}{reference()}\n{end}{tail}"
    if new != text:
        page.write_text(new)
    return new != text


if __name__ == "__main__":
    import sys
    if len(sys.argv) > 1:                  # python -m inferd.daemon.config docs/configuration.md
        print(f"{sys.argv[1]}: {'rewritten' if write_reference(Path(sys.argv[1])) else 'up to date'}")
    else:
        print(reference())
