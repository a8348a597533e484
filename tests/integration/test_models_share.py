"""Two models on one CPU device under a steady mixed load get the device's time in their configured
shares (NOTE [ model share ] in daemon/dispatch/model_share.py), and no batch mixes them."""
import json
import os
import threading
import time

import numpy as np
import pytest

from helpers import short_dir, spawn_daemon, wait_until
from inferd.client import Client

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow, pytest.mark.timing]

SHARES = {"heavy": 2.0, "light": 1.0}
MAX_BATCH = 16


def test_two_models_share_one_device_by_their_weights():
    """The synthetic model sleeps base + per-frame ms a batch, so frames are device time: each
    model's frames over a window, while clients keep both backlogged, within 10 % of its share."""
    work = short_dir()
    config = os.path.join(work, "models.toml")
    with open(config, "w") as fh:
        for name, share in SHARES.items():
            fh.write(f'[[models]]\nbuiltin = "synthetic"\nname = "{name}"\nshare = {share}\nwarmup_batches = 1\n\n')
    control = os.path.join(work, "synthetic.json")
    with open(control, "w") as fh:
        json.dump({"base_ms": 2.0, "per_frame_ms": 0.5}, fh)
    os.environ["INFERD_SYNTHETIC"] = control        # read by the forked daemon's synthetic models
    try:
        d = spawn_daemon("--config", config, "--set", f"batching.max_batch={MAX_BATCH}",
                         "--set", "cache.enabled=false", model="")     # every frame computed
    finally:
        del os.environ["INFERD_SYNTHETIC"]
    stop = threading.Event()
    answered = {name: 0 for name in SHARES}
    errors = []

    def load(name: str) -> None:
        frames = [np.full((16, 16, 3), 9 * i, np.uint8) for i in range(MAX_BATCH)]
        try:
            with Client(d.socket_path, ring_slots=MAX_BATCH, model=name, cache=False) as c:
                while not stop.is_set():
                    tops = c.classify_many(frames, top_k=1)
                    assert [t[0].index for t in tops] == [round(9 * 9 * i / 255) for i in range(MAX_BATCH)]
                    answered[name] += len(tops)
        except Exception as exc:  # noqa: BLE001  reported below
            errors.append(f"{name}: {exc!r}")

    threads = [threading.Thread(target=load, args=(name,)) for name in SHARES for _ in range(2)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: all(answered.values()), 30, "both models answering")
        with Client(d.socket_path) as c:
            before = c.info()["counters"]
            time.sleep(6.0)  # noqa: sleep-ok  the measured window of a steady load
            after = c.info()["counters"]
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        rc = d.stop()
        d.cleanup()
    assert not errors and rc == 0, (errors, rc)
    frames = [after[f"frames_model_{i}"] - before.get(f"frames_model_{i}", 0) for i in range(2)]
    total = sum(frames)
    print(f"frames in the window: {dict(zip(SHARES, frames))}")
    for (name, share), n in zip(SHARES.items(), frames):
        want = share / sum(SHARES.values())
        assert abs(n / total - want) <= 0.10 * want, (name, n / total, want, frames)
    assert after["mixed_batches"] == 0
