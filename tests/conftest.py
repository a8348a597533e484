import pytest

from helpers import shm_leftovers, spawn_daemon


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
