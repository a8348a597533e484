"""A real HAProxy for a test (bench/fleet/haproxy.py: the configuration docs/fleet.md recommends, the
stats socket's view), in a directory the test's cleanup removes; without Debian's haproxy the tests
that need it skip, saying how to install it (``.ci/run`` installs it)."""
from __future__ import annotations

import os
import sys

import pytest

from helpers import short_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:                # bench/ is a package at the repository root, not installed
    sys.path.insert(0, ROOT)
from bench.fleet import haproxy  # noqa: E402
from bench.fleet.haproxy import Backend, free_port  # noqa: E402,F401
from bench.fleet.oip_load import Load  # noqa: E402,F401


__all__ = ["Backend", "HAProxy", "Load", "free_port"]


def HAProxy() -> haproxy.HAProxy:
    if haproxy.binary() is None:
        pytest.skip(haproxy.INSTALL_HINT)
    return haproxy.HAProxy(short_dir())
