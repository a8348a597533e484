"""inferd.client and inferctl in an environment without torch: a real venv made in the test,
offline, holding only what `pip install inferd` gives an application (the client library alone,
setup.cfg's install_requires: numpy, msgpack, blake3, posix-ipc, pillow), classifies against a
real daemon.

The venv is built in seconds without pip: ``python -m venv --without-pip``, then the client's
dependencies linked from the project venv's site-packages and the package's client and shm folders
mapped as ``inferd.client`` / ``inferd.shm`` (the layout setup.cfg's package_dir installs). No
inferd.daemon there: the client must never import it.
"""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers import ROOT, sample_images

pytestmark = pytest.mark.timeout(120)

#: What the client imports, as importable names and the folders their wheels bring along.
CLIENT_DEPS = ("numpy", "numpy.libs", "msgpack", "blake3", "PIL", "pillow.libs", "posix_ipc")


def _make_venv(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=60)
    python = where / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        if entry.name.split(".cpython")[0] in CLIENT_DEPS or entry.name in CLIENT_DEPS:
            (site / entry.name).symlink_to(entry)
    src = where / "src" / "inferd"
    src.mkdir(parents=True)
    for folder in ("client", "shm"):
        (src / folder).symlink_to(ROOT / folder)
    (site / "inferd_client_only.pth").write_text(str(where / "src") + "\n")
    return python


SCRIPT = r"""
import asyncio, json, sys
import numpy as np
from PIL import Image
from inferd.client import AsyncClient, Client

path, image_path = sys.argv[1], sys.argv[2]
frame = np.array(Image.open(image_path).convert("RGB"))
with Client(path) as c:
    sync = c.classify(frame, top_k=1)[0].label

async def main():
    async with AsyncClient(path) as c:
        return (await c.classify(frame, top_k=1))[0].label

out = {"sync": sync, "async": asyncio.run(main()),
       "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "uvloop")
                        or m.startswith("inferd.daemon"))}
try:
    import torch
    out["torch"] = "importable"
except ImportError:
    out["torch"] = "missing"
print(json.dumps(out))
"""


def test_client_and_inferctl_work_without_torch(tmp_path, daemon):
    python = _make_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONNOUSERSITE"] = "1"
    label, _ = sample_images()[0]
    png = sorted((ROOT / "samples").glob("*.png"))[0]
    run = subprocess.run([str(python), "-c", SCRIPT, daemon.socket_path, str(png)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out == {"sync": label, "async": label, "loaded": [], "torch": "missing"}

    cli = subprocess.run([str(python), "-c", "import sys; from inferd.client.cli import main; "
                          "sys.exit(main(sys.argv[1:]))", "--socket", daemon.socket_path,
                          "classify", str(png), "-k", "1"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith(f"{png}: {label} ")
    no_daemon = subprocess.run([str(python), "-c", "import inferd.daemon"], env=env, capture_output=True,
                               text=True, timeout=60)
    assert no_daemon.returncode != 0 and "ModuleNotFoundError" in no_daemon.stderr


def test_the_daemon_on_a_client_only_install_says_what_to_install(tmp_path):
    python = _make_venv(tmp_path / "venv")
    (tmp_path / "venv" / "src" / "inferd" / "daemon").symlink_to(ROOT / "daemon")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONNOUSERSITE"] = "1"
    run = subprocess.run([str(python), "-m", "inferd.daemon"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 69, run.stderr                  # exitcodes.NOT_INSTALLED, no traceback
    assert "pip install 'inferd[daemon]'" in run.stderr and "torch" in run.stderr
    assert "Traceback" not in run.stderr
