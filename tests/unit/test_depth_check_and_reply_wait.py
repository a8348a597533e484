"""The request path's fast paths keep their contracts: the depth check's shortcut never lets a deep
body through, and a client whose daemon goes silent after hello still gets DaemonUnavailable
within its bound (the kernel's receive timeout, NOTE [ reply wait ] in client/connection.py)."""
from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import threading
import time

import msgpack
import numpy as np
import pytest

from inferd.client import Client, DaemonUnavailable
from inferd.client import client as client_mod
from inferd.shm import wire
from inferd.shm.ring import Ring, RingGeometry

from helpers import short_dir


def _nest(depth: int):
    value = 1
    for _ in range(depth - 1):
        value = [value]
    return {"x": value}


@pytest.mark.parametrize("depth", [1, 2, 4, 5, 31, 32, 33, 200])
def test_depth_limit_holds_whatever_the_shortcut_says(depth):
    """A body nested past the limit is bad_frame, one at the limit decodes: with and without bytes
    that look like container headers (floats), which make the shortcut fall back to the walk."""
    for limit in (wire.MAX_REQUEST_DEPTH, wire.MAX_DEPTH):
        for noise in ([], [0.1] * 40):                  # 0.1 packs to 0x3fb999..: fixarray-like bytes
            message = {**_nest(depth), "noise": noise}
            deepest = max(depth, 2 if noise else 1)
            body = msgpack.packb(message)
            if deepest > limit:
                with pytest.raises(wire.FrameError, match="deeper than"):
                    wire.decode_body(body, limit)
            else:
                assert wire.decode_body(body, limit) == message


def test_depth_shortcut_agrees_with_the_walk_on_random_messages():
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)

    def value(level):
        kind = rng.random()
        if level < 6 and kind < 0.3:
            return [value(level + 1) for _ in range(rng.randrange(4))]
        if level < 6 and kind < 0.45:
            return {str(i): value(level + 1) for i in range(rng.randrange(3))}
        return rng.choice([rng.random(), rng.randrange(-1 << 40, 1 << 40), "s" * rng.randrange(5), None, True])

    for _ in range(2000):
        message = {"id": 1, "v": value(1)}
        body = msgpack.packb(message)
        for limit in (2, 3, 4, 6):
            expect_deep = wire._depth_over(message, limit)
            if wire._surely_shallow(body, limit):
                assert not expect_deep, (seed, message, limit)
            try:
                wire.decode_body(body, limit)
                assert not expect_deep, (seed, message, limit)
            except wire.FrameError:
                assert expect_deep, (seed, message, limit)


class _SilentDaemon:
    """Accepts one client, answers its hello (a real ring, passed as a descriptor), then reads and
    never answers: a daemon that hangs."""

    def __init__(self, path: str):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.received = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            reader = wire.FrameReader(1 << 20)
            while not reader.feed(conn.recv(65536)):
                pass
            ring, fd = Ring.create(RingGeometry(4, 8 * 8 * 3), prefix=f"inferdtt{os.getpid()}")
            hello = wire.encode({"id": 0, "ok": True, "session": 1, "model": {
                "name": "silent", "digest": "d" * 32, "input": [8, 8, 3], "labels": ["a", "b"],
                "top_k": 1, "gen": 1}})
            conn.sendmsg([hello], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
            os.close(fd)
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                self.received += len(data)
            ring.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.timeout(30)
def test_a_silent_daemon_is_reported_within_the_bound(monkeypatch):
    monkeypatch.setattr(client_mod, "READ_GRACE_S", 0.0)     # the bound is the deadline, rounded up
    workdir = short_dir()
    daemon = _SilentDaemon(os.path.join(workdir, "silent.sock"))
    try:
        with Client(daemon.path, cache=False, timeout=0.3) as client:
            t0 = time.monotonic()
            with pytest.raises(DaemonUnavailable, match=r"no reply from the daemon within 1 s"):
                client.classify(np.zeros((8, 8, 3), np.uint8), top_k=1)
            waited = time.monotonic() - t0
        assert daemon.received > 0                          # the request was sent
        assert 0.9 <= waited < 5.0, waited                  # rounded up to a whole second, no more
    finally:
        daemon.close()
        shutil.rmtree(workdir, ignore_errors=True)
