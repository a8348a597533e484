"""The docs say what the code is: the configuration reference is current, every file they name
exists, every module appears in the architecture's layout, and they speak of the project, not of
a tracker. (README.md's commands are run by tests/integration/test_readme.py.)

docs/benchmarks.md is left out: it is the benchmark report, with its own history of runs.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from inferd.daemon import config

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "benchmarks.md")
CONFIGURATION = ROOT / "docs" / "configuration.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
SOURCES = ("daemon", "client", "shm")

#: Modules being moved into place, drawn in docs/architecture.md as "(planned)". Remove a name
#: here once its module exists (nothing fails meanwhile: an existing file is always fine).
PLANNED: set = set()   # modules the docs name before they exist (none now)

#: A file or folder of the repository named in prose: daemon/..., tests/..., bench/... and so on.
PATH = re.compile(r"(?<![\w./-])((?:daemon|client|shm|tests|bench|examples|systemd|samples|docs)/[\w./-]*\w)")
#: A bare module file name: batcher.py, l2_codec.py, ...
MODULE_FILE = re.compile(r"(?<![\w/.-])(\w+\.py)\b")
#: A dotted module: inferd.daemon.models.zoo.shapes
MODULE = re.compile(r"\binferd\.(?:daemon|client|shm)(?:\.\w+)*")
TRACKER = re.compile(r"\b(issues?|items?)\s+#?\d+", re.I)


def repo_files() -> set[str]:
    return {str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if ".git" not in p.parts and ".pkg" not in p.parts and ".venv" not in p.parts}


def mentions(pattern: re.Pattern, group: int = 0):
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for m in pattern.finditer(line):
                yield f"{page.relative_to(ROOT)}:{number}", m.group(group)


def test_configuration_reference_is_current():
    text = CONFIGURATION.read_text()
    assert config.REFERENCE_BEGIN in text and config.REFERENCE_END in text
    table = text.split(config.REFERENCE_BEGIN + "\n", 1)[1].split(config.REFERENCE_END, 1)[0]
    assert table.strip() == config.reference().strip(), (
        "docs/configuration.md's key table differs from daemon/config.py: run "
        "`python -m inferd.daemon.config docs/configuration.md`")


def test_configuration_reference_is_written_in_place(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{config.REFERENCE_BEGIN}\nold table\n{config.REFERENCE_END}\noutro\n")
    assert config.write_reference(page)
    assert page.read_text() == (f"intro\n{config.REFERENCE_BEGIN}\n{config.reference()}\n"
                                f"{config.REFERENCE_END}\noutro\n")
    assert not config.write_reference(page)                 # a second run changes nothing
    page.write_text("no markers\n")
    with pytest.raises(ValueError):
        config.write_reference(page)


def test_named_files_exist():
    files = repo_files()
    missing = [f"{where}: {path}" for where, path in mentions(PATH, 1)
               if path.rstrip(".") not in files and path.rstrip(".") not in PLANNED]
    assert not missing, "files named in the docs that do not exist (moved? renamed?):\n" + "\n".join(missing)


def test_named_module_files_exist():
    """Bare names such as ``batcher.py`` or ``l2.py``: some file of that name exists."""
    names = {Path(f).name for f in repo_files()} | {Path(f).name for f in PLANNED}
    missing = [f"{where}: {name}" for where, name in mentions(MODULE_FILE, 1) if name not in names]
    assert not missing, "module files named in the docs that do not exist:\n" + "\n".join(missing)


def module_file(parts: list[str]) -> Path | None:
    for suffix in (".py", "/__init__.py"):
        if (ROOT / ("/".join(parts) + suffix)).is_file():
            return ROOT / ("/".join(parts) + suffix)
    return None


def test_named_modules_exist():
    """``inferd.daemon.models.zoo.shapes`` is a module; ``inferd.client.Client`` is a name the
    module ``inferd.client`` holds; ``inferd.daemon.modes`` is neither."""
    missing = []
    for where, dotted in mentions(MODULE):
        parts = dotted.split(".")[1:]
        n = next(n for n in range(len(parts), -1, -1) if n == 0 or module_file(parts[:n]))
        if n == len(parts):
            continue                                            # a module
        if n > 0 and re.search(rf"\b{parts[n]}\b", module_file(parts[:n]).read_text()):
            continue                                            # a name its module holds
        missing.append(f"{where}: {dotted}")
    assert not missing, "modules named in the docs that do not exist:\n" + "\n".join(missing)


def test_links_resolve():
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for where, target in mentions(link, 1):
        if "://" in target:
            continue
        page = ROOT / where.split(":")[0]
        if not (page.parent / target).exists():
            broken.append(f"{where}: {target}")
    assert not broken, "links to nowhere:\n" + "\n".join(broken)


def test_no_tracker_references():
    """Readers of the project cannot see the tracker: say what the thing is and why."""
    found = [f"{where}: {text!r}" for where, text in mentions(TRACKER)]
    assert not found, "tracker references in the docs:\n" + "\n".join(found)


def test_architecture_layout_lists_every_module():
    layout = ARCHITECTURE.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"\b(\w+)\.py\b", layout)) | set(re.findall(r"\b(\w+)\b", layout))
    missing = sorted(str(p.relative_to(ROOT)) for folder in SOURCES for p in (ROOT / folder).rglob("*.py")
                     if p.name != "__init__.py" and p.stem not in listed)
    assert not missing, "modules missing from docs/architecture.md's layout:\n" + "\n".join(missing)


def test_cited_notes_exist():
    """``NOTE [ name ]`` blocks cited by the docs are in the code, in the file named beside them."""
    note = re.compile(r"NOTE \[ ([^\]]+?) \](?: in `?((?:daemon|client|shm)/[\w/]+\.py))?")
    sources = {p: p.read_text() for folder in SOURCES for p in (ROOT / folder).rglob("*.py")}
    missing = []
    for page in PAGES:
        text = " ".join(page.read_text().split())          # a citation may break across lines
        for m in note.finditer(text):
            name, path = m.groups()
            block = f"NOTE [ {name} ]"
            where = [sources[ROOT / path]] if path and (ROOT / path) in sources else sources.values()
            if not any(block in source for source in where):
                missing.append(f"{page.relative_to(ROOT)}: {block}" + (f" in {path}" if path else ""))
    assert not missing, "NOTE blocks cited by the docs that the code does not hold:\n" + "\n".join(missing)
