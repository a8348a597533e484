"""Encoded images (JPEG, PNG, WebP): decoding in the client, limits, and repeat uploads answered from
the cache before decoding, with the daemon verifying every encoded-bytes key it writes."""
import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from helpers import RawClient, admin_path, sample_images, wait_until
from inferd.client import AdminClient, Client, InvalidInput
from inferd.client import decode
from inferd.client.images import to_frame
from inferd.shm import cache as cachefile
from inferd.shm import wire

pytestmark = pytest.mark.timeout(120)
H = W = 64


def encode(array, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **options)
    return out.getvalue()


def photo(seed: int, h: int = 48, w: int = 80) -> np.ndarray:
    """A smooth, non-square RGB image (JPEG keeps it close; a resize is needed to reach 64x64)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    img = np.stack([(base[c] + 60 * np.sin(x / (4 + c) + seed) + 40 * np.cos(y / 5)) % 256 for c in range(3)], -1)
    return img.astype(np.uint8)


def large_jpeg(seed: int, h: int = 360, w: int = 480) -> bytes:
    """A noisy photo's JPEG: about 130 KB at 360x480, 11 slots of the default ring's 12,288 bytes
    (an upload spans a run of slots: Runs in inferd.shm.ring), under its bound of 16."""
    rng = np.random.default_rng(seed)
    noisy = photo(seed, h, w) + rng.normal(0, 24, (h, w, 3))
    return encode(noisy.clip(0, 255).astype(np.uint8), "JPEG", quality=90)


#: the files repeat tests upload: one that fits a slot, one of 100 KB+ that spans a run of them
SIZES = {"one_slot": lambda seed: encode(photo(seed, 120, 160), "JPEG", quality=80),
         "run_of_slots": large_jpeg}


def reference(data: bytes) -> np.ndarray:
    """What a reader would do by hand: Pillow's RGB decode, then the array path's resize."""
    with Image.open(io.BytesIO(data)) as im:
        return to_frame(np.asarray(im.convert("RGB")), H, W)


# decoding, in this process --------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,options", [("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {"quality": 90})])
def test_bytes_paths_and_file_objects_decode_like_the_decoded_array(tmp_path, fmt, options):
    data = encode(photo(1), fmt, **options)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    want = reference(data)
    for image in (data, bytearray(data), memoryview(data), str(path), path, open(path, "rb"), io.BytesIO(data)):
        got = decode.prepare(image, H, W)
        assert got.encoded == data and got.encoded_hash == decode.encoded_hash(data)
        frame = got.frame()
        assert frame.dtype == np.uint8 and frame.shape == (H, W, 3) and frame.flags.c_contiguous
        assert np.array_equal(frame, want)
    if fmt == "PNG":                                             # lossless: the array path exactly
        assert np.array_equal(decode.prepare(data, H, W).frame(), to_frame(photo(1), H, W))


def test_an_array_is_not_encoded():
    p = decode.prepare(photo(2), H, W)
    assert p.encoded is None and p.encoded_hash is None
    assert np.array_equal(p.frame(), to_frame(photo(2), H, W))


def test_exif_orientation_is_honoured():
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :32] = (255, 0, 0)                                    # left red, right blue
    img[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6                                             # stored sideways: rotate 90 degrees clockwise
    out = io.BytesIO()
    Image.fromarray(img).save(out, "JPEG", quality=95, exif=exif.tobytes())
    frame = decode.decode(out.getvalue(), H, W).astype(int)
    # upright, the red half is on top
    assert frame[:24, :, 0].mean() > 200 and frame[:24, :, 2].mean() < 50
    assert frame[40:, :, 2].mean() > 200 and frame[40:, :, 0].mean() < 50


def test_other_modes_become_rgb():
    grey = np.arange(H * W, dtype=np.uint32).reshape(H, W) % 256
    f = decode.decode(encode(grey.astype(np.uint8), "PNG"), H, W)
    assert np.array_equal(f, np.repeat(grey.astype(np.uint8)[:, :, None], 3, 2))

    rgba = np.dstack([photo(3, H, W), np.full((H, W), 7, np.uint8)])
    assert np.array_equal(decode.decode(encode(rgba, "PNG"), H, W), photo(3, H, W))    # alpha dropped

    sixteen = (grey * 256 + 255).astype(np.uint16)               # top 8 bits are ``grey``
    out = io.BytesIO()
    im16 = Image.fromarray(sixteen)
    assert im16.mode.startswith("I;16")
    im16.save(out, "PNG")
    assert np.array_equal(decode.decode(out.getvalue(), H, W)[:, :, 1], grey.astype(np.uint8))

    cmyk = Image.fromarray(photo(4, H, W)).convert("CMYK")
    out = io.BytesIO()
    cmyk.save(out, "JPEG", quality=95)
    f = decode.decode(out.getvalue(), H, W)
    assert f.shape == (H, W, 3) and np.abs(f.astype(int) - photo(4, H, W)).mean() < 12

    pal = Image.fromarray(photo(5, H, W)).convert("P", palette=Image.Palette.ADAPTIVE)
    out = io.BytesIO()
    pal.save(out, "PNG")
    assert np.array_equal(decode.decode(out.getvalue(), H, W), np.asarray(pal.convert("RGB")))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height (valid CRC); its data is one tiny zlib stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + \
        struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_naming_the_limit():
    ours = png_claiming(8_500, 8_000)                            # 68 M: over ours, under Pillow's 89 M
    with pytest.raises(InvalidInput, match=f"limit of {decode.MAX_PIXELS} pixels.*MAX_PIXELS"):
        decode.decode(ours, H, W)
    with pytest.raises(InvalidInput, match="MAX_PIXELS"):
        decode.probe(ours)
    with pytest.raises(InvalidInput, match="decompression bomb.*MAX_IMAGE_PIXELS"):    # Pillow's, behind ours
        decode.decode(png_claiming(10_000, 10_000), H, W)


def test_too_many_bytes_are_refused_naming_the_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(decode, "MAX_ENCODED_BYTES", 1000)
    data = encode(photo(6), "PNG")
    assert len(data) > 1000
    (tmp_path / "big.png").write_bytes(data)
    for image in (data, tmp_path / "big.png", io.BytesIO(data)):
        with pytest.raises(InvalidInput, match="limit of 1000 bytes.*MAX_ENCODED_BYTES"):
            decode.prepare(image, H, W)


@pytest.mark.parametrize("data", [b"garbage bytes", b"", encode(photo(7), "JPEG")[:300],
                                  encode(photo(7), "PNG")[:200], encode(photo(7), "GIF")])
def test_garbage_truncated_and_other_formats_are_invalid_input(data):
    with pytest.raises(InvalidInput):
        decode.prepare(data, H, W).frame()


def test_unreadable_inputs_are_invalid_input(tmp_path):
    with pytest.raises(InvalidInput, match="cannot read image file"):
        decode.prepare(tmp_path / "missing.jpg", H, W)
    with pytest.raises(InvalidInput, match="binary mode"):
        decode.prepare(io.StringIO("text"), H, W)
    with pytest.raises(InvalidInput, match="expected a numpy array"):
        decode.prepare(12, H, W)


def test_the_key_names_model_preprocessing_and_decoder():
    h = decode.encoded_hash(b"jpeg bytes")
    key = cachefile.encoded_key("digest", "pre", decode.decoder_id(H, W), h)
    assert key != cachefile.encoded_key("digest2", "pre", decode.decoder_id(H, W), h)
    assert key != cachefile.encoded_key("digest", "pre2", decode.decoder_id(H, W), h)
    assert key != cachefile.encoded_key("digest", "pre", decode.decoder_id(H, W + 1), h)
    assert key != cachefile.cache_key("digest", "pre", h)
    assert "pillow=" in decode.decoder_id(H, W) and "bilinear" in decode.decoder_id(H, W)


# through a daemon -----------------------------------------------------------------------------------
def uploads(client) -> dict:
    cache = client.info()["cache"]
    return {k: cache[k] for k in ("uploads_verified", "uploads_mismatched", "uploads_inserted", "uploads_skipped")}


def test_encoded_images_classify_like_their_decoded_array(daemon, tmp_path):
    _, circle = sample_images()[0]
    with Client(daemon.socket_path, cache=False) as c:
        for fmt in ("JPEG", "PNG", "WEBP"):
            data = encode(circle, fmt, **({"quality": 95} if fmt != "PNG" else {}))
            path = tmp_path / f"c.{fmt.lower()}"
            path.write_bytes(data)
            want = c.classify(reference(data), top_k=3)
            assert c.classify(data, top_k=3) == want
            assert c.classify(str(path), top_k=3) == want
            with open(path, "rb") as f:
                assert c.classify(f, top_k=3) == want
            assert c.classify_many([data, reference(data)], top_k=3) == [want, want]


@pytest.mark.parametrize("size", SIZES)
def test_a_repeat_upload_is_answered_from_the_cache_without_decoding(daemon, monkeypatch, size):
    data = SIZES[size](11)
    assert (len(data) <= H * W * 3) == (size == "one_slot")     # one slot, or a run of them
    assert size == "one_slot" or len(data) > 100_000
    with Client(daemon.socket_path) as c:
        before = uploads(c)["uploads_inserted"]
        first = c.classify(data, top_k=2)
        wait_until(lambda: uploads(c)["uploads_inserted"] > before, what="the upload's entry")
        calls = []

        def no_decode(*args):
            calls.append(args)
            raise AssertionError("a repeat upload was decoded")

        monkeypatch.setattr(decode, "decode", no_decode)
        hits = c.cache_hits
        assert c.classify(data, top_k=2) == first
        assert c.cache_hits == hits + 1 and not calls
        assert c.classify(io.BytesIO(data), top_k=1) == first[:1] and not calls


@pytest.mark.parametrize("size", SIZES)
def test_async_client_takes_files_and_answers_repeats_without_decoding(daemon, tmp_path, monkeypatch, size):
    import asyncio

    from inferd.client import AsyncClient

    data = SIZES[size](41)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)

    async def main():
        async with AsyncClient(daemon.socket_path) as c:
            first = await c.classify(data, top_k=2)
            assert await c.classify(path, top_k=2) == first
            with Client(daemon.socket_path, cache=False) as sync:
                assert sync.classify(decode.decode(data, H, W), top_k=2) == first
                await asyncio.to_thread(wait_until, lambda: _has_entry(daemon.socket_path, data), 10.0,
                                    "the upload's entry")
            monkeypatch.setattr(decode, "decode", lambda *a: pytest.fail("a repeat upload was decoded"))
            hits = c.cache_hits
            many = await asyncio.gather(*(c.classify(io.BytesIO(data), top_k=2) for _ in range(8)))
            assert many == [first] * 8 and c.cache_hits == hits + 8
    asyncio.run(main())


def _has_entry(socket_path: str, data: bytes) -> bool:
    """Whether the daemon stored an answer under ``data``'s encoded key (read-only lookup)."""
    with Client(socket_path) as c:
        key = cachefile.encoded_key(c.model.digest, c.preprocess_id, decode.decoder_id(H, W),
                                    decode.encoded_hash(data))
        return c._conn.cache.lookup(key) is not None


def test_bytes_that_do_not_decode_to_the_frame_make_no_entry(daemon):
    """A's frame sent with B's bytes: A's answer, counted as a mismatch, nothing stored under B's bytes."""
    a = photo(21, H, W)                                          # a frame no test classified before
    _, b = sample_images()[1]
    b_png = encode(b, "PNG")
    raw = RawClient(daemon.socket_path, ring_slots=4)
    try:
        with Client(daemon.socket_path, cache=False) as c:
            before = uploads(c)
            raw.ring.slot(1, len(b_png))[:] = np.frombuffer(b_png, np.uint8)
            raw.classify(1, 0, a, top_k=1, upload_slot=1, upload_nbytes=len(b_png))
            reply = raw.recv()
            assert reply["ok"] and not reply.get("cached")
            assert [reply["top"][0][0]] == [p.index for p in c.classify(a, top_k=1)]    # A's answer
            wait_until(lambda: uploads(c)["uploads_mismatched"] > before["uploads_mismatched"],
                       what="the verdict on the lying upload")
            assert uploads(c)["uploads_inserted"] == before["uploads_inserted"]
            with AdminClient(admin_path(daemon)) as admin:
                text = admin.call("metrics")["text"]
            assert 'inferd_cache_uploads_total{result="mismatched"}' in text
            want_b = c.classify(b, top_k=1)
        with Client(daemon.socket_path) as c:
            key = cachefile.encoded_key(c.model.digest, c.preprocess_id, decode.decoder_id(H, W),
                                        decode.encoded_hash(b_png))
            assert c._conn.cache.lookup(key) is None                                 # nothing under B's bytes
            assert c.classify(b_png, top_k=1) == want_b
    finally:
        raw.close()


def test_an_upload_that_is_not_an_image_makes_no_entry(daemon):
    a = photo(51, H, W)
    raw = RawClient(daemon.socket_path, ring_slots=4)
    try:
        with Client(daemon.socket_path, cache=False) as c:
            before = uploads(c)["uploads_mismatched"]
            raw.ring.slot(2, 11)[:] = np.frombuffer(b"not a jpeg!", np.uint8)
            raw.classify(1, 0, a, top_k=1, upload_slot=2, upload_nbytes=11)
            reply = raw.recv()
            assert reply["ok"] and [reply["top"][0][0]] == [p.index for p in c.classify(a, top_k=1)]
            wait_until(lambda: uploads(c)["uploads_mismatched"] > before, what="the verdict")
    finally:
        raw.close()


@pytest.mark.parametrize("fields,code,match", [
    ({"upload_slot": 1}, wire.E_INVALID_INPUT, "must both be integers"),
    ({"upload_nbytes": 10}, wire.E_INVALID_INPUT, "must both be integers"),
    ({"upload_slot": "1", "upload_nbytes": 10}, wire.E_INVALID_INPUT, "must both be integers"),
    ({"upload_slot": True, "upload_nbytes": 10}, wire.E_INVALID_INPUT, "must both be integers"),
    ({"upload_slot": 4, "upload_nbytes": 10}, wire.E_INVALID_INPUT, "out of range"),
    ({"upload_slot": -1, "upload_nbytes": 10}, wire.E_INVALID_INPUT, "out of range"),
    ({"upload_slot": 0, "upload_nbytes": 10}, wire.E_INVALID_INPUT, "include the frame's slot 0"),
    ({"upload_slot": 1, "upload_nbytes": 0}, wire.E_INVALID_INPUT, "out of range: 1 to"),
    ({"upload_slot": 1, "upload_nbytes": 1 << 40}, wire.E_INVALID_INPUT, "MAX_ENCODED_BYTES"),
    ({"upload_slot": 1, "upload_nbytes": 10, "op": "embed"}, wire.E_INVALID_INPUT, "classify only"),
])
def test_bad_upload_fields_are_refused_with_typed_errors(daemon, fields, code, match):
    _, a = sample_images()[0]
    raw = RawClient(daemon.socket_path, ring_slots=4)
    try:
        raw.classify(1, 0, a, **fields)
        reply = raw.recv()
        assert not reply["ok"] and reply["code"] == code and match in reply["message"], reply
        raw.classify(2, 0, a)                                    # the slots were not taken
        assert raw.recv()["ok"]
    finally:
        raw.close()


def test_an_upload_slot_in_flight_is_busy(daemon):
    """Three requests in one write are admitted in one turn, before any batch can answer the first:
    the second names the first's upload slot, the third its frame slot as an upload slot."""
    a = photo(31, H, W)                                          # not cached: it is not answered at once
    data = encode(a, "JPEG")
    raw = RawClient(daemon.socket_path, ring_slots=4)
    try:
        raw.ring.slot(1, len(data))[:] = np.frombuffer(data, np.uint8)
        raw.ring.slot(0, a.nbytes)[:] = a.reshape(-1)
        base = {"op": "classify", "shape": list(a.shape), "dtype": "uint8", "nbytes": a.nbytes}
        raw.send_raw(wire.encode({**base, "id": 1, "slot": 0, "upload_slot": 1, "upload_nbytes": len(data)})
                     + wire.encode({**base, "id": 2, "slot": 1})
                     + wire.encode({**base, "id": 3, "slot": 2, "upload_slot": 0, "upload_nbytes": 10}))
        replies = {r["id"]: r for r in (raw.recv(), raw.recv(), raw.recv())}
        assert replies[1]["ok"]
        assert replies[2]["code"] == wire.E_SLOT_BUSY and "slot 1" in replies[2]["message"]
        assert replies[3]["code"] == wire.E_SLOT_BUSY and "upload_slot 0" in replies[3]["message"]
        raw.classify(4, 1, a)                                    # both free again after the reply
        assert raw.recv()["ok"]
    finally:
        raw.close()


def test_inferctl_classifies_files(daemon, tmp_path):
    _, circle = sample_images()[0]
    files = []
    for fmt in ("JPEG", "PNG", "WEBP"):
        path = tmp_path / f"c.{fmt.lower()}"
        path.write_bytes(encode(circle, fmt, **({"quality": 95} if fmt != "PNG" else {})))
        files.append(str(path))
    out = subprocess.run([sys.executable, "-m", "inferd.client.cli", "--socket", daemon.socket_path,
                          "classify", "--json", "-k", "1", *files], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"circle"' in out.stdout and all(f in out.stdout for f in files)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    bad = subprocess.run([sys.executable, "-m", "inferd.client.cli", "--socket", daemon.socket_path,
                          "classify", str(tmp_path / "bad.jpg")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "bad.jpg" in bad.stderr and "not a JPEG, PNG or WebP" in bad.stderr
