"""Near-duplicates with the built-in model: changed copies against different images.

    python -m bench.cache.near [--stored 1000] [--copies 250] [--fresh 1000] [--seed 3] [--out FILE]

Through a real daemon (``--model shapes``, embeddings on), ``--stored`` images of
``inferd.daemon.models.zoo.shapes.make_dataset`` are classified with their index as tag, so the daemon
keeps their embeddings. Then, with ``near_duplicates(k=50, min_similarity=-1)``:

* changed copies of stored images, ``--copies`` per change: **resize** (down or up to 32..128 px
  and back, bilinear), **jpeg** (Pillow, quality 60), **crop** (0..3 px, up to 5 %, off each side,
  resized back), **brightness** (Pillow ImageEnhance, factor 0.8..0.9 or 1.1..1.25), and **all**
  four in turn (reported, not part of the target). A copy succeeds when its top match is its
  original *and* passes the threshold.
* ``--fresh`` different images (another seed: same classes, other position, size, colours), never
  stored. One fails when its best match passes the threshold; "same class" counts those whose best
  match of the same class (in the top 50) passes.

Both for the embedding as configured now (``features.0``, ``grid:4+thumbnail:4``) and, as the
baseline in the same run, the daemon's first embedding (``features``, ``mean``, threshold 0.9).
Targets (what makes a near-duplicate search worth asking): at least 95 % of copies found as top match, at most 2 % of different images passing the
default threshold. The similarity distributions (percentiles) are what the threshold was chosen
from: docs/benchmarks.md, "Near-duplicates". Last, what the embedding costs: one ``Engine`` per
definition in this process (1 torch thread), batches of 1 and 32 with embeddings, interleaved
rounds, median time per batch now against before. Takes about a minute on the 2-core machine.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time

import numpy as np

from ..lib.daemons import cache_daemon, daemon_summary
from ..lib.report import prog
from .embeddings import _parallel

KINDS = ("resize", "jpeg", "crop", "brightness")
EXTRA = ("all",)
NEW = {"label": "now: features.0 grid:4+thumbnail:4", "args": []}
OLD = {"label": "before: features mean", "threshold": 0.9,
       "args": ["--set", 'model.embedding_layer="features"', "--set", 'model.embedding_pool="mean"']}
K = 50


def change(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A changed copy of a uint8 64x64 RGB image, as an upload pipeline might make it."""
    from PIL import Image, ImageEnhance

    im = Image.fromarray(img)
    side = img.shape[0]
    if kind == "resize":
        s = int(rng.choice([32, 40, 48, 80, 96, 128]))
        im = im.resize((s, s), Image.BILINEAR).resize((side, side), Image.BILINEAR)
    elif kind == "jpeg":
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=60)
        im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    elif kind == "crop":
        left, top, right, bottom = (int(v) for v in rng.integers(0, 4, size=4))
        im = im.crop((left, top, side - right, side - bottom)).resize((side, side), Image.BILINEAR)
    elif kind == "brightness":
        factor = float(rng.choice([rng.uniform(0.8, 0.9), rng.uniform(1.1, 1.25)]))
        im = ImageEnhance.Brightness(im).enhance(factor)
    elif kind == "all":
        out = img
        for k in KINDS:
            out = change(out, k, rng)
        return out
    else:
        raise ValueError(kind)
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8))


def percentiles(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {f"p{q}": round(float(np.percentile(a, q)), 4) for q in (1, 2, 5, 50, 95, 98, 99)} | \
        {"min": round(float(a.min()), 4), "max": round(float(a.max()), 4)}


def measure(setup: dict, stored, labels, copies: dict, fresh, fresh_labels, threads: int, log) -> dict:
    """Store, query, and collect the raw similarities of one embedding definition."""
    out: dict = {"label": setup["label"]}
    with cache_daemon(["--model", "shapes", *setup["args"]], embeddings=True) as d:
        t0 = time.perf_counter()
        _parallel(threads, d["socket"], range(len(stored)), lambda c, i: c.classify(stored[i], tag=str(i)))
        out["store_s"] = round(time.perf_counter() - t0, 2)
        near = lambda c, img: [(int(m.tag), m.similarity) for m in c.near_duplicates(img, k=K, min_similarity=-1.0)]
        out["copies"] = {}
        for kind, (idx, imgs) in copies.items():
            found = _parallel(threads, d["socket"], range(len(imgs)), lambda c, j: near(c, imgs[j]))
            out["copies"][kind] = [(m[0][0] == int(i), m[0][1]) for i, m in zip(idx, found)]
        found = _parallel(threads, d["socket"], range(len(fresh)), lambda c, j: near(c, fresh[j]))
        out["fresh_best"] = [m[0][1] for m in found]
        out["fresh_same_class"] = [max((s for t, s in m if labels[t] == fresh_labels[j]), default=m[-1][1])
                                   for j, m in enumerate(found)]
    out["daemon"] = daemon_summary(d)
    log(f"    {setup['label']}: stored {len(stored)} in {out['store_s']} s")
    return out


def summarise(raw: dict, threshold: float) -> dict:
    """Rates at ``threshold`` and the distributions behind them."""
    kinds = {}
    target_ok = []
    for kind, trials in raw["copies"].items():
        top = [t for t, _ in trials]
        passed = [t and s >= threshold for t, s in trials]
        kinds[kind] = {"top1": round(float(np.mean(top)), 4), "found": round(float(np.mean(passed)), 4),
                       "similarity": percentiles([s for t, s in trials if t] or [float("nan")])}
        if kind in KINDS:
            target_ok += passed
    best, same = np.asarray(raw["fresh_best"]), np.asarray(raw["fresh_same_class"])
    return {"threshold": threshold, "copies_found": round(float(np.mean(target_ok)), 4), "kinds": kinds,
            "different_pass": round(float(np.mean(best >= threshold)), 4),
            "same_class_pass": round(float(np.mean(same >= threshold)), 4),
            "different_best": percentiles(best), "same_class_best": percentiles(same)}


def sweep(raw: dict) -> list:
    """Copies found and different images passing, at thresholds 0.80 .. 0.99."""
    rows = []
    for t in np.round(np.arange(0.80, 0.995, 0.01), 2):
        s = summarise(raw, float(t))
        rows.append({"threshold": float(t), "copies_found": s["copies_found"], "different_pass": s["different_pass"]})
    return rows


def pooling_cost(rounds: int = 12) -> dict:
    """Median batch time (ms) of the forward pass with embeddings, now against before, interleaved."""
    import torch

    from inferd.daemon.models import loading as model_mod
    from inferd.daemon.config import ModelConfig
    from inferd.daemon.pipeline.engine import Engine, Staging
    from inferd.daemon.models.zoo.shapes import make_dataset

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    engines = {}
    for name, keys in (("now", {}), ("before", {"embedding_layer": "features", "embedding_pool": "mean"})):
        engines[name] = Engine(cpu, model_mod.load(ModelConfig(**keys)), keep_k=3)
        engines[name].load()
    staging = Staging(cpu, 32, (64, 64, 3))
    staging.arrays[0][:] = make_dataset(32, 1)[0]
    times: dict = {(n, b): [] for n in engines for b in (1, 32)}
    for _ in range(rounds):
        for (name, batch), out in times.items():
            for _ in range(3):
                t0 = time.perf_counter()
                engines[name].launch(staging.tensors[0], batch, 3, want_embedding=True).result()
                out.append(time.perf_counter() - t0)
    out = {}
    for batch in (1, 32):
        now, before = (float(np.median(times[(n, batch)])) * 1e3 for n in ("now", "before"))
        out[f"batch_{batch}"] = {"now_ms": round(now, 3), "before_ms": round(before, 3),
                                 "ratio": round(now / before, 3)}
    return out


def main(argv=None) -> int:
    from inferd.daemon.models.zoo.shapes import make_dataset
    from inferd.shm.limits import DEFAULT_MIN_SIMILARITY

    p = argparse.ArgumentParser(prog=prog(), description=__doc__.split("\n\n")[0])
    p.add_argument("--stored", type=int, default=1000)
    p.add_argument("--copies", type=int, default=250, help="copies per change")
    p.add_argument("--fresh", type=int, default=1000)
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    rng = np.random.default_rng(args.seed)
    stored, labels = make_dataset(args.stored, args.seed)
    fresh, fresh_labels = make_dataset(args.fresh, args.seed + 1)
    copies = {}
    for kind in KINDS + EXTRA:
        idx = rng.choice(args.stored, size=min(args.copies, args.stored), replace=False)
        copies[kind] = (idx, [change(stored[i], kind, rng) for i in idx])
    report = {"stored": args.stored, "copies_per_change": args.copies, "fresh": args.fresh, "seed": args.seed,
              "default_threshold": DEFAULT_MIN_SIMILARITY, "targets": {"copies_found": 0.95, "different_pass": 0.02}}
    for name, setup in (("now", NEW), ("before", OLD)):
        raw = measure(setup, stored, labels.tolist(), copies, fresh, fresh_labels.tolist(), args.threads, log)
        threshold = setup.get("threshold", DEFAULT_MIN_SIMILARITY)
        report[name] = {"label": raw["label"], **summarise(raw, threshold), "sweep": sweep(raw),
                        "daemon": raw["daemon"]}
    report["cost"] = pooling_cost()
    now, before = report["now"], report["before"]
    report["meets_targets"] = now["copies_found"] >= 0.95 and now["different_pass"] <= 0.02
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)
    log(f"copies found: {now['copies_found']:.1%} (before {before['copies_found']:.1%}); different images "
        f"passing: {now['different_pass']:.1%} (before {before['different_pass']:.1%}); "
        f"same class passing {now['same_class_pass']:.1%} (before {before['same_class_pass']:.1%}); "
        f"batch time with embeddings, now / before: {report['cost']['batch_1']['ratio']} at 1, "
        f"{report['cost']['batch_32']['ratio']} at 32")
    return 0 if report["meets_targets"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
