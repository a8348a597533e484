"""examples/upload_service.py as an application runs it: a real daemon, the service as its own
process on a free TCP port (it prints the address once it listens), and real JPEG bytes posted
over HTTP, raw and as a multipart form."""
import asyncio
import io
import os
import subprocess
import sys

import aiohttp
import numpy as np
import pytest
from PIL import Image

from helpers import ROOT, sample_images, spawn_daemon

pytestmark = pytest.mark.timeout(120)


def _jpeg(image: np.ndarray, quality: int = 95, size: int | None = None) -> bytes:
    im = Image.fromarray(image)
    if size:
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture
def service():
    d = spawn_daemon()
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "upload_service.py"),
                             "--socket", d.socket_path, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()               # the readiness handshake: it listens
        assert line.startswith("listening on "), proc.stderr.read()
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(30)
        assert d.stop() == 0
        d.cleanup()


def test_uploads_are_classified_and_changed_copies_flagged(service):
    samples = sample_images()
    (label_a, a), (label_b, b) = samples[0], samples[5]

    async def main():
        async with aiohttp.ClientSession() as http:
            async def post(data: bytes, form: bool = False):
                if form:
                    body = aiohttp.FormData()
                    body.add_field("image", data, filename="x.jpg", content_type="image/jpeg")
                    kw = {"data": body}
                else:
                    kw = {"data": data, "headers": {"Content-Type": "image/jpeg"}}
                async with http.post(f"{service}/uploads", **kw) as r:
                    return r.status, await r.json()

            first = await post(_jpeg(a))
            copy = await post(_jpeg(a, quality=60, size=96), form=True)   # re-encoded and resized
            other = await post(_jpeg(b))
            again = await post(_jpeg(a))                                  # the very same bytes
            together = await asyncio.gather(*(post(_jpeg(img, quality=90)) for _, img in samples))
            bad = await post(b"this is not an image")
            return first, copy, other, again, together, bad

    first, copy, other, again, together, bad = asyncio.run(main())
    assert first[0] == 201 and first[1]["labels"][0]["label"] == label_a
    assert first[1]["duplicate_of"] == []
    assert copy[0] == 201 and copy[1]["labels"][0]["label"] == label_a
    assert [m["id"] for m in copy[1]["duplicate_of"]][:1] == [first[1]["id"]]
    assert other[0] == 201 and other[1]["labels"][0]["label"] == label_b
    assert first[1]["id"] not in [m["id"] for m in other[1]["duplicate_of"]]
    assert again[1]["id"] == first[1]["id"] and again[1]["labels"] == first[1]["labels"]
    assert [r[1]["labels"][0]["label"] for r in together] == [label for label, _ in samples]
    assert bad[0] == 400 and "JPEG" in bad[1]["error"]
