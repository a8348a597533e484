"""Every command and snippet of README.md runs, against real daemons, so the README cannot drift.

The README's fenced blocks are read by language:
- ``sh``: run as one bash script each (``set -eo pipefail``) from the repository root, with the
  daemon's socket and cache in a folder of the test's own ($INFERD_SOCKET, $CACHE_DIRECTORY) and
  the interpreter's bin folder first on PATH. A block starts the daemon it needs (``inferd &``).
  Lines that install (``make demo``, ``make test``, ``sudo make install``, ``pip install``) are
  not run: they build a venv from the network, which CI does once with ``make test`` itself. Their
  Makefile targets are checked to exist instead, and the ``demo`` recipe runs without its install
  step, its output compared with what the README shows.
- ``python``: run as a script with the module's daemon (conftest.py's ``daemon``) on $INFERD_SOCKET.
- ``text`` right after a block: what that block prints. After ``python``, compared as doctest
  compares (``...`` matches anything); after ``sh``, each JSON line must have the same shape (keys,
  and the types of values) as a JSON line the block printed, so the README shows what the service
  answers.
- ``toml``: parsed. Any other language, or none, fails: a block nobody runs is a block that drifts.
"""
from __future__ import annotations

import doctest
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import short_dir

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RUN_TIMEOUT = 180           # one block: a daemon start (model load and warm-up) and a few requests

#: Lines that install rather than use: not run here (see the module docstring).
INSTALLS = re.compile(r"^\s*(sudo\s+)?(make\s+(demo|test|install\S*)|pip3?\s+install)\b")
MAKE_TARGET = re.compile(r"^\s*(?:sudo\s+)?make\s+([\w-]+)")


@dataclass
class Block:
    lang: str
    text: str
    line: int                       # of the opening fence, for messages
    output: "Block | None" = None   # the text block that follows it, if any

    @property
    def where(self) -> str:
        return f"README.md:{self.line}"


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"README.md:{start}: fence never closed"
        block = Block(fence.group(1), "\n".join(body) + "\n", start)
        between = lines[blocks[-1].line + len(blocks[-1].text.splitlines()) + 1:start - 1] if blocks else []
        if block.lang == "text" and blocks and blocks[-1].lang in ("sh", "python") \
                and not any(line.strip() for line in between if not line.endswith(":")):
            blocks[-1].output = block
        blocks.append(block)
        i += 1
    return blocks


BLOCKS = readme_blocks()
SHELL = [b for b in BLOCKS if b.lang == "sh"]
PYTHON = [b for b in BLOCKS if b.lang == "python"]


def runnable(block: Block) -> str:
    """The block without the lines that install."""
    return "".join(line + "\n" for line in block.text.splitlines() if not INSTALLS.match(line))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def workdir():
    return short_dir()          # removed when the test ends, and checked for at the end of the run


def run(script: list[str], *, cwd: Path, env: dict, workdir: str) -> subprocess.CompletedProcess:
    """Run in a process group of its own, its output in files: a daemon started with ``&`` by a
    block that then failed keeps no pipe open, and is killed with the group."""
    out_path, err_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(script, cwd=cwd, env=env, stdout=out, stderr=err,
                                start_new_session=True)
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        rc = "timed out"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(script, rc, Path(out_path).read_text(), Path(err_path).read_text())


def environment(workdir: str, socket_path: str) -> dict:
    return {**os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "INFERD_SOCKET": socket_path,
            "CACHE_DIRECTORY": workdir,        # the result cache and embedding store go here
            "PYTHONUNBUFFERED": "1"}


def json_shape(value):
    """The shape of a JSON value: keys and value types, recursively (lists by their first item)."""
    if isinstance(value, dict):
        return {k: json_shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_shape(value[0])] if value else []
    if isinstance(value, bool) or value is None:
        return type(value).__name__
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def json_lines(text: str) -> list:
    found = []
    for line in text.splitlines():
        if line.startswith(("{", "[")):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return found


def test_every_block_has_a_language_this_test_runs():
    assert BLOCKS, "README.md has no code blocks"
    unknown = [f"{b.where}: ```{b.lang}" for b in BLOCKS if b.lang not in ("sh", "python", "text", "toml")]
    assert not unknown, f"blocks this test cannot run (use sh, python, text or toml): {unknown}"


def test_toml_blocks_parse():
    for block in (b for b in BLOCKS if b.lang == "toml"):
        tomllib.loads(block.text)


def test_install_commands_name_makefile_targets():
    """``make demo``/``make test``/``sudo make install`` are not run here (they install a venv
    from the network; CI runs ``make test`` itself), but the targets they name must exist."""
    targets = set(re.findall(r"^([\w-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))
    named = [(b.where, m.group(1)) for b in SHELL for line in b.text.splitlines()
             if (m := MAKE_TARGET.match(line))]
    assert {"demo", "test"} <= {target for _, target in named}, "the quick start's two commands"
    missing = [f"{where}: make {target}" for where, target in named if target not in targets]
    assert not missing, f"README names Makefile targets that do not exist: {missing}"


@pytest.mark.timeout(RUN_TIMEOUT + 60)
@pytest.mark.parametrize("block", SHELL, ids=[b.where for b in SHELL])
def test_shell_block_runs(block: Block, workdir: str):
    script = runnable(block)
    if not script.strip():
        pytest.skip(f"{block.where}: only install commands (checked by "
                    f"test_install_commands_name_makefile_targets)")
    if "curl " in script and shutil.which("curl") is None:
        pytest.skip("curl is not installed (apt-get install curl)")
    # A fixed port in the README may be taken on a test machine: the same command on a free one
    # (8080: the upload service; 8000, 8001: the OIP front's HTTP and gRPC doors, Triton's ports).
    for port in (8080, 8000, 8001):
        script = re.sub(rf"\b{port}\b", str(free_port()), script)
    socket_path = os.path.join(workdir, "inferd.sock")
    result = run(["bash", "-c", "set -eo pipefail\n" + script], cwd=ROOT,
                 env=environment(workdir, socket_path), workdir=workdir)
    assert result.returncode == 0, (f"{block.where} failed ({result.returncode}):\n{script}\n"
                                    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    assert not os.path.exists(socket_path), f"{block.where}: a daemon it started is still serving"
    if block.output:
        printed = {json.dumps(json_shape(v)) for v in json_lines(result.stdout)}
        for shown in json_lines(block.output.text):
            assert json.dumps(json_shape(shown)) in printed, (
                f"{block.output.where} shows {shown}, but {block.where} printed:\n{result.stdout}")


@pytest.mark.timeout(RUN_TIMEOUT + 30)
@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_python_block_runs(block: Block, daemon, workdir: str):
    script = os.path.join(workdir, "snippet.py")
    Path(script).write_text(block.text)
    result = run([sys.executable, script], cwd=ROOT, env=environment(workdir, daemon.socket_path),
                 workdir=workdir)
    assert result.returncode == 0, (f"{block.where} failed ({result.returncode}):\n{block.text}\n"
                                    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    if block.output:
        checker = doctest.OutputChecker()
        flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        assert checker.check_output(block.output.text, result.stdout, flags), (
            f"{block.output.where} shows what {block.where} no longer prints:\n"
            + checker.output_difference(doctest.Example("", block.output.text), result.stdout, flags))


def make_recipe(target: str) -> list[str]:
    """The command lines of a Makefile target, ``$(BIN)/python`` as this interpreter."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{target}\s*:(?!=)", line))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line[1:].replace("$(BIN)/python", sys.executable))
    assert recipe and "$(" not in "".join(recipe), f"make {target}: a recipe this test cannot run: {recipe}"
    return recipe


@pytest.mark.timeout(RUN_TIMEOUT + 30)
def test_make_demo_prints_what_the_readme_shows(workdir: str):
    """``make demo`` is the venv install (not run here) and then its recipe, which is run."""
    block = next(b for b in SHELL if re.search(r"^\s*make\s+demo\b", b.text, re.M))
    assert block.output, f"{block.where}: the README shows no output of make demo"
    script = "set -eo pipefail\n" + "\n".join(make_recipe("demo"))
    env = environment(workdir, os.path.join(workdir, "unused.sock"))     # the demo names its own
    result = run(["bash", "-c", script], cwd=ROOT, env=env, workdir=workdir)
    assert result.returncode == 0, (f"make demo's recipe failed ({result.returncode}):\n"
                                    f"{result.stdout}\n{result.stderr}")
    checker = doctest.OutputChecker()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    assert checker.check_output(block.output.text, result.stdout, flags), (
        f"{block.output.where} shows what make demo no longer prints:\n"
        + checker.output_difference(doctest.Example("", block.output.text), result.stdout, flags))
