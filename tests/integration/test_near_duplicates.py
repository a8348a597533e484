"""Near-duplicates through a real daemon with the built-in model: changed copies (resized, JPEG,
cropped, brighter) find their original, different images of the same class stay under the default
threshold, and an embed retags (the store itself: tests/unit/test_embedding_store.py)."""
import io
import os

import numpy as np
import pytest

from inferd.client import Client
from inferd.shm.limits import DEFAULT_MIN_SIMILARITY
from inferd.daemon.models.zoo.shapes import make_dataset


def _changed(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A copy as an upload pipeline makes it (bench/cache/near.py measures the same four changes)."""
    from PIL import Image, ImageEnhance

    im, side = Image.fromarray(img), img.shape[0]
    if kind == "resize":
        s = int(rng.choice([32, 48, 96, 128]))
        im = im.resize((s, s), Image.BILINEAR).resize((side, side), Image.BILINEAR)
    elif kind == "jpeg":
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=60)
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    elif kind == "crop":
        left, top, right, bottom = (int(v) for v in rng.integers(0, 4, size=4))
        im = im.crop((left, top, side - right, side - bottom)).resize((side, side), Image.BILINEAR)
    else:
        im = ImageEnhance.Brightness(im).enhance(float(rng.choice([0.85, 1.2])))
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


@pytest.mark.timeout(120)
def test_changed_copies_find_their_original_and_other_images_stay_under_the_threshold(daemon):
    seed = int.from_bytes(os.urandom(2), "little")
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    stored, labels = make_dataset(48, seed)
    tags = [f"near-{seed}-{i}" for i in range(len(stored))]
    with Client(daemon.socket_path) as c:
        for image, tag in zip(stored, tags):
            c.classify(image, tag=tag)
        found = trials = 0
        for kind in ("resize", "jpeg", "crop", "brightness"):
            for i in rng.choice(len(stored), size=8, replace=False):
                near = c.near_duplicates(_changed(stored[i], kind, rng), k=1, min_similarity=DEFAULT_MIN_SIMILARITY)
                found += bool(near) and near[0].tag == tags[i]
                trials += 1
        # different images of the same classes: other position, size, colours (another seed)
        others, other_labels = make_dataset(32, seed + 1)
        passing = same_class = 0
        for image, label in zip(others, other_labels):
            near = [m for m in c.near_duplicates(image, k=5, min_similarity=DEFAULT_MIN_SIMILARITY)
                    if m.tag in tags]
            passing += bool(near)
            same_class += any(labels[tags.index(m.tag)] == label for m in near)
        before = c.near_duplicates(stored[0], k=1, min_similarity=-1.0)
    assert before[0].tag == tags[0] and before[0].similarity > 0.9999
    # bench/cache/near.py: 100 % found, about 1 % of different images passing; the bounds are generous
    assert found >= 0.85 * trials, f"{found} of {trials} changed copies found their original"
    assert passing <= 3 and same_class <= 2, f"{passing} of 32 different images passed ({same_class} same class)"


@pytest.mark.timeout(60)
def test_an_embed_with_a_new_tag_retags_the_stored_frame(daemon):
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    frame = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    flat = np.full((64, 64, 3), 90, dtype=np.uint8)
    with Client(daemon.socket_path) as c:
        first = c.embed(frame, tag="A")
        assert c.near_duplicates(frame, k=1)[0].tag == "A"
        again = c.embed(frame, tag="B")                     # answered from the store: retagged
        assert np.array_equal(first, again)
        assert c.near_duplicates(frame, k=1)[0].tag == "B"
        c.embed(frame)                                      # no tag: the tag stays
        assert c.near_duplicates(frame, k=1)[0].tag == "B"
        c.classify(frame, tag="C")                          # classify retags too, as before
        assert c.near_duplicates(frame, k=1)[0].tag == "C"
        blank = c.embed(flat, tag="flat")                   # a featureless frame: still a unit vector
        assert abs(float(np.linalg.norm(blank)) - 1.0) < 1e-5
