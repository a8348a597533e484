"""The system install as an operator stages it: `make install-systemd` into a DESTDIR, a venv made
the way `make install-venv` makes it, and the service user running what the unit starts.

- every relative link in the installed documents resolves inside the staged DOCDIR;
- `make install-venv` refuses an interpreter the service user cannot run (a Python under a private
  home, as pyenv's is), before it installs anything, and says what to do;
- from the default interpreter, `systemd-analyze verify` passes on the installed unit and the
  service user (nobody here) runs its ExecStart=.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import short_dir

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
ANALYZE = shutil.which("systemd-analyze")
SYSTEM_PYTHON = "/usr/bin/python3"
# [text](target) or ![alt](target): the target up to '#', ')' or whitespace
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s#>]*)")


def _make(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True,
                          timeout=120, **kwargs)


@pytest.fixture
def workdir():
    work = Path(short_dir())
    os.chmod(work, 0o755)                  # the service user walks into the venv below it
    yield work
    shutil.rmtree(work, ignore_errors=True)


def test_every_relative_link_of_the_installed_docs_resolves(workdir):
    stage = workdir / "stage"
    out = _make("install-systemd", f"DESTDIR={stage}", f"INFERD_HOME={workdir}/home")
    assert out.returncode == 0, out.stderr
    docdir = stage / "usr/local/share/doc/inferd"
    docs = sorted(docdir.rglob("*.md"))
    assert {"README.md", "docs/operations.md", "docs/fleet.md", "docs/benchmarks.md"} <= \
        {str(p.relative_to(docdir)) for p in docs}
    checked = 0
    for doc in docs:
        for target in LINK.findall(doc.read_text()):
            if not target or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                continue                   # an in-page anchor or a URL
            assert (doc.parent / target).resolve().is_file(), f"{doc.relative_to(docdir)} -> {target}"
            checked += 1
    assert checked > 10                    # the links were found, not skipped
    service = (stage / "usr/local/lib/systemd/system/inferd.service").read_text()
    doc, = re.findall(r"^Documentation=file://(\S+)$", service, re.M)
    assert (stage / doc.lstrip("/")).is_file(), doc


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as the service user")
def test_install_venv_refuses_an_interpreter_the_service_user_cannot_run(workdir):
    private = workdir / "private"
    private.mkdir(mode=0o700)
    python = private / "python3"           # a Python the service user cannot reach, as pyenv's in /root
    shutil.copy2(os.path.realpath(sys.executable), python)
    home = workdir / "home"
    out = _make("install-venv", f"INSTALL_PYTHON={python}", f"INFERD_HOME={home}", "SERVICE_USER=nobody")
    assert out.returncode != 0
    assert f"{private} is mode 0700" in out.stderr and "INSTALL_PYTHON=/usr/bin/python3" in out.stderr, out.stderr
    assert not home.exists()               # nothing installed


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)")
@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason=f"no {SYSTEM_PYTHON}")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as the service user")
def test_the_default_interpreter_gives_a_unit_that_verifies_and_runs_as_the_service_user(workdir):
    assert _make("check-install-python", "SERVICE_USER=nobody").returncode == 0
    home, stage = workdir / "home", workdir / "stage"
    # what install-venv does with its default INSTALL_PYTHON, less the torch download
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(home)], check=True, timeout=60)
    pip = [sys.executable, "-m", "pip", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(workdir / "wheel"),
                    str(ROOT)], check=True, capture_output=True, timeout=120)
    wheel, = (workdir / "wheel").glob("inferd-*.whl")
    subprocess.run([*pip, "--python", str(home / "bin/python"), "install", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=120)
    assert _make("install-systemd", f"DESTDIR={stage}", f"INFERD_HOME={home}").returncode == 0
    units = stage / "usr/local/lib/systemd/system"
    out = subprocess.run([ANALYZE, "verify", str(units / "inferd.service"), str(units / "inferd.socket")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    exec_start, = re.findall(r"^ExecStart=(\S+)", (units / "inferd.service").read_text(), re.M)
    run = subprocess.run([exec_start, "--help"], user=65534, group=65534, extra_groups=[], cwd="/",
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "usage: inferd" in run.stdout, run.stderr
