"""Every bad configuration value stops start-up with a message naming the key and what is allowed."""
import pytest

from inferd.daemon import config
from inferd.daemon.config import ConfigError


def test_defaults_are_valid():
    cfg = config.from_dict({})
    assert cfg.batching.max_batch == 32 and cfg.ring.backend == "memfd" and cfg.server.socket_mode == 0o660


@pytest.mark.parametrize("data, message", [
    ({"batching": {"max_batch": 0}}, "batching.max_batch: 0 is out of range; allowed 1 to 4096"),
    ({"batching": {"max_delay_ms": -1}}, "batching.max_delay_ms: -1.0 is out of range"),
    ({"batching": {"max_batch": "8"}}, "batching.max_batch: expected an integer, got '8'"),
    ({"batching": {"max_batch": True}}, "batching.max_batch: expected an integer"),
    ({"ring": {"backend": "sysv"}}, "ring.backend: 'sysv' is not one of memfd, posix"),
    ({"server": {"socket_mode": "rw"}}, "server.socket_mode: 'rw' is not an octal mode"),
    ({"server": {"socket_mode": 0o1777}}, "server.socket_mode: 1023 is out of range"),
    ({"server": {"log_level": "loud"}}, "server.log_level: 'loud' is not one of debug"),
    ({"server": {"allow_uids": [-1]}}, "server.allow_uids: expected a list of ids"),
    ({"server": {"bogus": 1}}, "server.bogus: unknown key; [server] takes socket"),
    ({"serverz": {}}, "[serverz]: unknown section"),
    ({"model": {"std": [0.2, 0, 0.2]}}, "model.std: every std must be > 0"),
    ({"model": {"mean": [0.5]}}, "model.mean: expected 3 numbers"),
    ({"model": {"path": __file__}}, "model.input_height / model.input_width: required"),
    ({"model": {"path": "/nonexistent/m.pt"}}, "model.path: /nonexistent/m.pt does not exist"),
    ({"ring": {"default_slots": 64, "max_slots": 8}}, "ring.default_slots: 64 is above ring.max_slots"),
    ({"device": [{"name": "tpu"}]}, "device[0].name: 'tpu' is not cpu or cuda:N"),
    ({"device": [{"name": "cpu", "threads": -2}]}, "device[0].threads: -2 is out of range"),
])
def test_bad_values_name_the_key_and_the_range(data, message):
    with pytest.raises(ConfigError) as err:
        config.from_dict(data)
    assert message in str(err.value)


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "inferd.toml"
    path.write_text('[batching]\nmax_batch = 8\n[server]\nsocket_mode = "0600"\n[[device]]\nname = "cpu"\nthreads = 1\n')
    cfg = config.load(path, dict([config.parse_override("batching.max_delay_ms=0.5")]))
    assert (cfg.batching.max_batch, cfg.batching.max_delay_ms, cfg.server.socket_mode) == (8, 0.5, 0o600)
    assert [(d.name, d.threads) for d in cfg.devices] == [("cpu", 1)]


def test_unreadable_and_invalid_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[batching\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)


def test_override_of_unknown_section_is_refused():
    with pytest.raises(ConfigError, match="overrides take section.key"):
        config.from_dict({}, {"nope.x": 1})
