"""Who may import whom, read from the files: the daemon never imports the client (what both need is
in shm/), shm/ imports neither side nor torch, and the configuration and the fleet cache's codec
load in either order (no cycle hidden behind a late import). Static checks plus one fresh
interpreter each; no daemon."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"daemon": "inferd.daemon", "client": "inferd.client", "shm": "inferd.shm"}


def _imports(folder: str):
    """(file, imported module) for every import in ``folder``, relative ones resolved."""
    base = ROOT / folder
    for path in sorted(base.rglob("*.py")):
        package = [*FOLDERS[folder].split("."), *path.relative_to(base).parent.parts]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield path, alias.name
            elif isinstance(node, ast.ImportFrom):
                parent = package[:len(package) - node.level + 1] if node.level else []
                module = ".".join([*parent, *([node.module] if node.module else [])])
                yield path, module
                for alias in node.names:            # a name may be a submodule: from ..shm import wire
                    yield path, f"{module}.{alias.name}"


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_resolver_sees_relative_imports():
    found = {m for p, m in _imports("daemon") if p.name == "scheduler.py"}
    assert "inferd.shm.wire" in found and "inferd.daemon.front.admission" in found


#: daemon/demo.py is a client program (`make demo`): it starts a daemon as a child process and
#: classifies through the client library; the daemon's own process never imports it.
CLIENT_PROGRAMS = {"daemon/demo.py"}
#: daemon/oip/ is the OIP front, a process of its own that is a trusted client of the daemon
#: (daemon/oip/backend.py); the daemon's process starts it as a child and never imports it.
CLIENT_FOLDERS = ("daemon/oip/",)


def test_the_daemon_imports_nothing_from_the_client():
    bad = [(str(p.relative_to(ROOT)), m) for p, m in _imports("daemon")
           if _under(m, "inferd.client") and str(p.relative_to(ROOT)) not in CLIENT_PROGRAMS
           and not str(p.relative_to(ROOT)).startswith(CLIENT_FOLDERS)]
    assert not bad, f"the daemon imports the client (move what both need to shm/): {bad}"


def test_shm_imports_neither_side_nor_torch():
    bad = [(str(p.relative_to(ROOT)), m) for p, m in _imports("shm")
           if _under(m, "inferd.client") or _under(m, "inferd.daemon") or _under(m, "torch")]
    assert not bad, bad


def _fresh(code: str) -> str:
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


@pytest.mark.timeout(120)
def test_shm_loads_without_torch_or_either_side():
    out = _fresh("import sys\n"
                 "from inferd.shm import cache, limits, paths, ring, uploads, wire\n"
                 "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'"
                 " or m.startswith(('inferd.client', 'inferd.daemon'))))")
    assert out == "[]"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("first", ["inferd.daemon.caching.fleet.codec", "inferd.daemon.config"])
def test_config_and_the_fleet_codec_load_in_either_order_and_raise_one_error(first):
    out = _fresh(f"import importlib; importlib.import_module({first!r})\n"
                 "from inferd.daemon import config\n"
                 "from inferd.daemon.caching.fleet import codec\n"
                 "try:\n"
                 "    codec.check_secret_file('l2.key_file', '')\n"
                 "except config.ConfigError as exc:\n"
                 "    print('ConfigError', exc)\n")
    assert out.startswith("ConfigError l2.key_file: required")
