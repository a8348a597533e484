"""The suite's own cleanup rule (tests/conftest.py): what leftovers() reports is what fails a run."""
import os
import tempfile

import helpers
from helpers import RUN, leftovers, remove_dirs_made_since, short_dir


def test_leftovers_name_this_runs_files_in_tmp_and_dev_shm():
    path = tempfile.mkdtemp(prefix=f"inferd-t{RUN}-", dir="/tmp")
    shm = f"/dev/shm/inferdt{RUN}probe.1.2.3"
    open(shm, "wb").close()
    try:
        assert path in leftovers() and shm in leftovers()
    finally:
        os.rmdir(path)
        os.unlink(shm)
    assert path not in leftovers() and shm not in leftovers()


def test_short_dirs_made_since_a_mark_are_removed():
    mark = len(helpers.made_dirs)
    path = short_dir()
    open(os.path.join(path, "f"), "w").close()
    remove_dirs_made_since(mark)
    assert not os.path.exists(path) and len(helpers.made_dirs) == mark
