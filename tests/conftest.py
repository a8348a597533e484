"""Fixtures shared by tests/unit, tests/integration and tests/system, and the suite's cleanup rules.

Cleanup: every directory a test makes with helpers.short_dir is removed when the test ends, pass or
fail (a module's or the session's fixtures: when the module or the session ends). At the end of the
run the controlling process (under pytest-xdist: not the workers) fails the session if /tmp or
/dev/shm still holds a name carrying this run's token (helpers.leftovers): whatever a test left,
a daemon that outlived its test included.
"""
import pytest

import helpers
from helpers import leftovers, remove_dirs_made_since, shm_leftovers, spawn_daemon


def _timeout_of(item) -> float:
    mark = item.get_closest_marker("timeout")
    return float(mark.args[0]) if mark and mark.args else 0.0


def pytest_collection_modifyitems(config, items):
    """The slow tests first, the longest bound first: a worker starts on the longest at once, and
    work stealing (which takes from the end of a busy worker's queue) spreads the rest. Every
    process sorts alike, as pytest-xdist requires."""
    slow = [item for item in items if item.get_closest_marker("slow")]
    slow.sort(key=_timeout_of, reverse=True)
    items[:] = slow + [item for item in items if not item.get_closest_marker("slow")]


def _is_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionfinish(session, exitstatus):
    if _is_worker(session.config):
        return
    left = leftovers()
    if left:
        message = (f"\nthe suite left {len(left)} name(s) in /tmp or /dev/shm (run token {helpers.RUN}): "
                   f"{', '.join(left[:20])}")
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(message, red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True, scope="session")
def _remove_session_dirs():
    mark = len(helpers.made_dirs)
    yield
    helpers.close_fork_server()
    remove_dirs_made_since(mark)


@pytest.fixture(autouse=True, scope="module")
def _remove_module_dirs():
    mark = len(helpers.made_dirs)
    yield
    remove_dirs_made_since(mark)


@pytest.fixture(autouse=True)
def _remove_test_dirs():
    """Runs before the fixtures a test asks for and ends after them, so a test's daemons are
    stopped by their own fixtures before their directories go."""
    mark = len(helpers.made_dirs)
    yield
    remove_dirs_made_since(mark)


@pytest.fixture(scope="module")
def daemon():
    """One daemon serving the built-in shapes model, shared by a module's tests."""
    d = spawn_daemon()
    yield d
    rc = d.stop()
    d.cleanup()
    assert rc == 0, f"daemon exited with {rc}:\n{d.log()}"
    assert not shm_leftovers(d.prefix)


@pytest.fixture
def fresh_daemon():
    """A daemon of a test's own, for tests that kill or stop it. Call with spawn_daemon's args."""
    started = []

    def start(*args, **kwargs):
        d = spawn_daemon(*args, **kwargs)
        started.append(d)
        return d

    yield start
    for d in started:
        d.cleanup()
