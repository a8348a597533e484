"""Parts 5 and 6 of the cache benchmark: near-duplicate search time, and whether a lightly changed
copy finds its original.

Part 5: ``inferd.daemon.caching.embedding_store.EmbeddingStore`` (a file in a temp dir, capacity = rows) holding
N random unit vectors of dim 512, N = 10k and 100k; p50 of ``search(q, k=5)`` against the bare
computation it does (one float32 matrix-vector product over an in-memory array + argpartition).

Part 6: 10k images from ``inferd.daemon.models.zoo.shapes.make_dataset`` are classified through a real
daemon (each with ``tag=str(i)``), so the daemon stores their embeddings; then a random sample of
them, lightly changed (resize by a factor in [0.9, 1.1] and back, Gaussian noise sigma 3, JPEG
quality 75-90; each alone and all three in turn), is sent to ``near_duplicates``; a trial succeeds
when the best match carries the original's tag. The unchanged originals are queried too (control:
must be 100 %). Both ``--model shapes`` (embedding: ``features.0`` pooled ``grid:4+thumbnail:4``,
daemon/models/embedding_pooling.py; bench/cache/near.py measures it against different images) and
``--model resnet18`` (``avgpool``). In a child process, the same copies are scored in-process
against other layers and poolings of the same two models (and against downsampled pixels), to say
which embedding would do better; the daemon's own layer is recomputed there as a cross-check.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
import time
import traceback

import numpy as np

from ..lib.daemons import cache_daemon, daemon_summary
from ..lib.measure import time_calls, us_stats
from ..lib.procs import run_in_child

PERTURBATIONS = ("none", "resize", "noise", "jpeg", "combined")
MODELS = ("shapes", "resnet18")
NOISE_SIGMA = 3.0
JPEG_QUALITY = (75, 90)
RESIZE = (0.9, 1.1)
SIZE = 64


# ---------------------------------------------------------------------------------------------
# Part 5: search time
# ---------------------------------------------------------------------------------------------
def search_time(sizes, dim: int, queries: int, k: int = 5) -> dict:
    """Search p50 per store size, against a bare numpy product + argpartition over the same rows."""
    from inferd.daemon.caching.embedding_store import EmbeddingStore

    rows = []
    rng = np.random.default_rng(9)
    for n in sizes:
        tmp = tempfile.mkdtemp(prefix="inferd-cbe", dir="/tmp")
        try:
            vecs = rng.standard_normal((n, dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            store = EmbeddingStore.open(os.path.join(tmp, "e.store"), n, dim)
            try:
                t0 = time.perf_counter()
                for i in range(n):
                    store.add(i.to_bytes(32, "little"), vecs[i], str(i), uid=0)
                add_s = time.perf_counter() - t0
                qs = rng.standard_normal((queries + 20, dim)).astype(np.float32)
                qs /= np.linalg.norm(qs, axis=1, keepdims=True)
                it = iter(qs)
                got = store.search(qs[0], k, -1.0, uid=0)
                exact = np.argsort(-(vecs @ qs[0]), kind="stable")[:k]
                ok = [t for _, t, _ in got] == [str(i) for i in exact]
                t_store = time_calls(lambda: store.search(next(it), k, -1.0, uid=0), queries, warmup=10)
            finally:
                store.close()

            def bare(q):
                sims = vecs @ q
                best = np.argpartition(-sims, k - 1)[:k]
                return best[np.argsort(-sims[best])]

            it = iter(qs)
            t_bare = time_calls(lambda: bare(next(it)), queries, warmup=10)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        s, b = us_stats(t_store), us_stats(t_bare)
        rows.append({"rows": n, "dim": dim, "k": k, "store": s, "bare": b, "ratio_p50": s["p50_us"] / b["p50_us"],
                     "add_us_mean": 1e6 * add_s / n, "same_answer_as_exact": ok})
    return {"rows": rows}


# ---------------------------------------------------------------------------------------------
# Part 6: robustness; dataset, copies and the in-process comparison run in a child (torch)
# ---------------------------------------------------------------------------------------------
def perturb(img: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A lightly changed copy of a 64x64 RGB uint8 image, and what was done to it."""
    from PIL import Image

    out, what = img, {}
    if kind in ("resize", "combined"):
        while True:                                   # a factor that rounds to 64 would change nothing
            f = rng.uniform(*RESIZE)
            side = int(round(SIZE * f))
            if side != SIZE:
                break
        out = np.asarray(Image.fromarray(out).resize((side, side), Image.BILINEAR)
                         .resize((SIZE, SIZE), Image.BILINEAR))
        what["resize"] = side
    if kind in ("noise", "combined"):
        out = np.clip(np.rint(out.astype(np.float64) + rng.normal(0.0, NOISE_SIGMA, out.shape)), 0, 255)
        out = out.astype(np.uint8)
    if kind in ("jpeg", "combined"):
        q = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=q)
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        what["jpeg"] = q
    return np.ascontiguousarray(out, dtype=np.uint8), what


def _variants(name: str):
    """(hooked module names, {variant label: function(captured dict) -> (N, D) tensor}) per model.
    The first variant is what the daemon uses."""
    import torch.nn.functional as F

    def flat(t):
        return t.flatten(1)

    def mean(t):
        return t.mean(dim=(2, 3))

    def pool4(t):
        return F.adaptive_avg_pool2d(t, 4).flatten(1)

    if name == "shapes":
        from inferd.daemon.models.embedding_pooling import Pool
        from inferd.daemon.models.zoo import shapes

        pool = Pool.parse(shapes.EMBEDDING_POOL)
        return [shapes.EMBEDDING_LAYER, "features", "features.6", "features.4"], {
            f"{shapes.EMBEDDING_LAYER} {pool} (daemon; {pool.width(16 * pool.grid ** 2)}-d)":
                lambda c: pool(c[shapes.EMBEDDING_LAYER], c["_frames"]),
            "features, mean over HxW (the daemon's first embedding; 96-d)": lambda c: mean(c["features"]),
            "features, flattened 96x4x4 (1536-d)": lambda c: flat(c["features"]),
            "features.6 (8x8) pooled to 4x4 (1024-d)": lambda c: pool4(c["features.6"]),
            "features.6 flattened 64x8x8 (4096-d)": lambda c: flat(c["features.6"]),
            "features.4 (16x16) pooled to 4x4 (768-d)": lambda c: pool4(c["features.4"]),
        }
    return ["avgpool", "layer4", "layer3", "layer2"], {
        "avgpool (daemon; 512-d)": lambda c: flat(c["avgpool"]),
        "layer4 flattened 512x2x2 (2048-d)": lambda c: flat(c["layer4"]),
        "layer3, mean over HxW (256-d)": lambda c: mean(c["layer3"]),
        "layer3 flattened 256x4x4 (4096-d)": lambda c: flat(c["layer3"]),
        "layer2 (8x8) pooled to 4x4 (2048-d)": lambda c: pool4(c["layer2"]),
    }


def _embed_all(model, spec, hooks, fns, images: np.ndarray, batch: int = 250) -> dict:
    """{variant: float32 (N, D) unit rows} for ``images``, one forward pass per batch."""
    import torch

    from inferd.daemon.pipeline.preprocess import to_input

    captured: dict = {}
    modules = dict(model.named_modules())
    handles = [modules[h].register_forward_hook(lambda m, i, o, h=h: captured.__setitem__(h, o))
               for h in hooks]
    out = {k: [] for k in fns}
    try:
        with torch.inference_mode():
            for s in range(0, len(images), batch):
                captured["_frames"] = torch.from_numpy(np.ascontiguousarray(images[s:s + batch]))
                model(to_input(captured["_frames"], spec.mean, spec.std))
                for k, fn in fns.items():
                    out[k].append(torch.nn.functional.normalize(fn(captured).float(), dim=1).numpy())
    finally:
        for h in handles:
            h.remove()
    return {k: np.concatenate(v) for k, v in out.items()}


def _pixels(images: np.ndarray, centred: bool) -> np.ndarray:
    """Images averaged down to 16x16 (4x4 blocks), flattened, optionally minus each image's mean."""
    x = images.astype(np.float32).reshape(len(images), 16, 4, 16, 4, 3).mean(axis=(2, 4)).reshape(len(images), -1)
    if centred:
        x -= x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _score(orig: np.ndarray, copies: dict, sample: np.ndarray) -> dict:
    """Top-1 and top-5 rates of each perturbation's copies against all originals (cosine), plus
    the top-1 index per trial."""
    out = {}
    for kind, q in copies.items():
        sims = q @ orig.T
        top5 = np.argpartition(-sims, 5, axis=1)[:, :5]
        top1 = sims.argmax(axis=1)
        out[kind] = {"top1": float(np.mean(top1 == sample)),
                     "top5": float(np.mean((top5 == sample[:, None]).any(axis=1))),
                     "top1_index": top1.tolist()}
    return out


def _prepare_child(q, workdir: str, n: int, samples: int, seed: int, threads: int) -> None:
    """Child: dataset, sample, copies (saved to ``workdir`` for the parent), then the in-process
    scores of every embedding variant of both models."""
    try:
        import torch

        torch.set_num_threads(threads)
        from inferd.daemon.models import zoo
        from inferd.daemon.models.zoo.shapes import make_dataset

        t0 = time.perf_counter()
        images, labels = make_dataset(n, seed=seed)
        rng = np.random.default_rng(seed + 1)
        sample = np.sort(rng.choice(n, size=samples, replace=False))
        copies, changes = {}, {}
        for kind in PERTURBATIONS:
            krng = np.random.default_rng([seed, PERTURBATIONS.index(kind)])
            made = [perturb(images[i], kind, krng) for i in sample]
            copies[kind] = np.stack([m[0] for m in made])
            changes[kind] = [m[1] for m in made]
        np.save(os.path.join(workdir, "originals.npy"), images)
        np.save(os.path.join(workdir, "sample.npy"), sample)
        for kind, arr in copies.items():
            np.save(os.path.join(workdir, f"copy-{kind}.npy"), arr)
        prep_s = time.perf_counter() - t0
        diffs = {kind: float(np.abs(copies[kind].astype(np.int16) - images[sample].astype(np.int16)).mean())
                 for kind in PERTURBATIONS}

        t0 = time.perf_counter()
        results = {}
        for name in MODELS:
            model, spec = zoo.build(name, input_size=SIZE)
            hooks, fns = _variants(name)
            orig = _embed_all(model, spec, hooks, fns, images)
            qs = {kind: _embed_all(model, spec, hooks, fns, copies[kind]) for kind in PERTURBATIONS}
            first = next(iter(fns))
            res = {v: _score(orig[v], {kind: qs[kind][v] for kind in PERTURBATIONS}, sample) for v in fns}
            # The daemon's layer with the stored set's mean subtracted (ReLU features are all >= 0,
            # so raw cosines crowd near 1): not what the store does, shown as a cheap alternative.
            mu = orig[first].mean(axis=0)
            unit = lambda x: (x - mu) / np.linalg.norm(x - mu, axis=1, keepdims=True)
            res[first.split(" (")[0] + ", minus stored mean"] = _score(
                unit(orig[first]), {kind: unit(qs[kind][first]) for kind in PERTURBATIONS}, sample)
            results[name] = {"daemon_variant": first, "variants": res}
        pix = {}
        for centred in (False, True):
            label = f"pixels 16x16{' minus image mean' if centred else ''} (768-d)"
            pix[label] = _score(_pixels(images, centred),
                                {kind: _pixels(copies[kind], centred) for kind in PERTURBATIONS}, sample)
        results["pixels"] = {"daemon_variant": None, "variants": pix}
        q.put(("ok", {"inprocess": results, "prep_s": prep_s, "inprocess_s": time.perf_counter() - t0,
                      "mean_abs_pixel_change": diffs, "changes": changes,
                      "label_counts": np.bincount(labels).tolist()}))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def _parallel(n_threads: int, socket_path: str, items, work) -> list:
    """Run ``work(client, item)`` for every item on ``n_threads`` threads, one Client each; results
    in item order. The first exception is raised after all threads stop."""
    from inferd.client import Client

    items = list(items)
    results: list = [None] * len(items)
    errors: list = []
    lock = threading.Lock()
    nxt = iter(range(len(items)))

    def body():
        try:
            with Client(socket_path, cache=False) as client:
                while not errors:
                    with lock:
                        i = next(nxt, None)
                    if i is None:
                        return
                    results[i] = work(client, items[i])
        except BaseException as exc:                   # noqa: BLE001 - reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=body, daemon=True) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _daemon_model(name: str, workdir: str, n_threads: int, log) -> dict:
    """Classify every original with its tag through a ``--model name`` daemon, then query every copy."""
    from inferd.shm.cache import content_hash

    images = np.load(os.path.join(workdir, "originals.npy"), mmap_mode="r")
    sample = np.load(os.path.join(workdir, "sample.npy"))
    out: dict = {"problems": []}
    with cache_daemon(["--model", name], embeddings=True) as d:
        t0 = time.perf_counter()
        _parallel(n_threads, d["socket"], range(len(images)),
                  lambda c, i: c.classify(np.ascontiguousarray(images[i]), tag=str(i)))
        out["store_s"] = time.perf_counter() - t0
        from inferd.client import Client
        with Client(d["socket"], cache=False) as probe:
            info = probe.info()
        out["stored"] = info["cache"].get("embeddings")
        if out["stored"] != len(images):
            out["problems"].append(f"{name}: the store holds {out['stored']} embeddings after "
                                   f"{len(images)} unique images were classified")
        log(f"    {name}: {len(images)} originals stored in {out['store_s']:.1f} s; querying copies ...")
        out["kinds"] = {}
        t0 = time.perf_counter()
        for kind in PERTURBATIONS:
            copies = np.load(os.path.join(workdir, f"copy-{kind}.npy"))
            matches = _parallel(n_threads, d["socket"], range(len(copies)),
                                lambda c, j: c.near_duplicates(copies[j], k=5, min_similarity=-1.0))
            top1, top5, wrong_hash, sims, top1_index = 0, 0, 0, [], []
            for idx, found in zip(sample.tolist(), matches):
                tags = [m.tag for m in found]
                top1 += bool(tags) and tags[0] == str(idx)
                top5 += str(idx) in tags
                sims.append(found[0].similarity if found else float("nan"))
                top1_index.append(int(tags[0]) if tags and tags[0] is not None else -1)
                for m in found:                       # the tag and the hash must name the same image
                    if m.tag is None or m.content_hash != content_hash(np.ascontiguousarray(images[int(m.tag)])):
                        wrong_hash += 1
            n = len(sample)
            out["kinds"][kind] = {"top1": top1 / n, "top5": top5 / n, "trials": n,
                                  "top1_similarity_p50": float(np.nanmedian(sims)),
                                  "tag_hash_mismatches": wrong_hash, "top1_index": top1_index}
            if wrong_hash:
                out["problems"].append(f"{name}/{kind}: {wrong_hash} matches whose content hash is not "
                                       f"that of the image their tag names")
        out["query_s"] = time.perf_counter() - t0
        with Client(d["socket"], cache=False) as probe:
            out["stored_after_queries"] = probe.info()["cache"].get("embeddings")
        if out["stored_after_queries"] != out["stored"]:
            out["problems"].append(f"{name}: the store grew from {out['stored']} to "
                                   f"{out['stored_after_queries']} embeddings during near_duplicates "
                                   f"queries (documented: the query itself is not stored)")
        if out["kinds"]["none"]["top1"] < 1.0:
            out["problems"].append(f"{name}: an unchanged original did not find itself as top-1 "
                                   f"({out['kinds']['none']['top1']:.1%})")
    out["daemon"] = daemon_summary(d)
    return out


def robustness(n: int, samples: int, seed: int, n_threads: int, log=print) -> dict:
    """Part 6."""
    workdir = tempfile.mkdtemp(prefix="inferd-cbn", dir="/tmp")
    try:
        log(f"    dataset of {n}, {samples} copies per perturbation, in-process embeddings ...")
        out = run_in_child(_prepare_child, (workdir, n, samples, seed, 2), 900, "bench-cache-near")
        out.update(images=n, samples=samples, seed=seed, threads=n_threads, daemon={})
        for name in MODELS:
            res = _daemon_model(name, workdir, n_threads, log)
            inproc = out["inprocess"][name]
            mine = inproc["variants"][inproc["daemon_variant"]]
            res["agreement_with_inprocess"] = {
                kind: float(np.mean(np.asarray(res["kinds"][kind]["top1_index"]) == np.asarray(mine[kind]["top1_index"])))
                for kind in PERTURBATIONS}
            out["daemon"][name] = res
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for group in out["inprocess"].values():            # the per-trial indices served their purpose
        for v in group["variants"].values():
            for r in v.values():
                r.pop("top1_index", None)
    for res in out["daemon"].values():
        for r in res["kinds"].values():
            r.pop("top1_index", None)
    out.pop("changes", None)
    return out
