"""``python -m inferd.daemon.demo [IMAGE...]``: the quick start in one process tree.

Starts a daemon with the built-in default model on a private socket, waits for its READY=1,
classifies the images given (PNG/JPEG/.npy; with none, eight freshly rendered shapes), shows a
ping, then stops the daemon with SIGTERM and reports its exit status. Nothing is left behind.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np


def _images(paths: list[str]) -> list[tuple[str, np.ndarray]]:
    if paths:
        from ..client.cli import read_image

        return [(p, read_image(p)) for p in paths]
    from .models.zoo import shapes

    rng = np.random.default_rng(2026)
    return [(f"rendered {name}", shapes.render(rng, k)) for k, name in enumerate(shapes.CLASSES)]


def main(argv: list[str] | None = None) -> int:
    from ..client import Client
    from .launch import DaemonProcess

    images = _images(sys.argv[1:] if argv is None else argv)
    workdir = tempfile.mkdtemp(prefix="inferd-demo-")
    socket_path = str(Path(workdir) / "inferd.sock")
    print(f"starting inferd (built-in model 'shapes') on {socket_path} ...", flush=True)
    daemon = DaemonProcess.start(["--model", "shapes", "--set", f'cache.path="{workdir}/results.cache"'],
                                 socket_path=socket_path, workdir=workdir)
    try:
        with Client(socket_path) as client:
            m = client.model
            print(f"ready: model {m.name} ({m.input_shape[0]}x{m.input_shape[1]}, {m.classes} "
                  f"classes, digest {m.digest[:12]}), ping {client.ping() * 1e6:.0f} us")
            results = client.classify_many([img for _, img in images], top_k=3)
            width = max(len(name) for name, _ in images)
            for (name, _), top in zip(images, results):
                print(f"  {name:<{width}}  " + ", ".join(f"{p.label} {p.score:.3f}" for p in top))
        status = daemon.stop()
        print(f"daemon stopped with SIGTERM, exit status {status}")
        return status
    finally:
        daemon.kill()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
