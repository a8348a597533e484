"""The printed report and the target summary of ``python -m bench.cache`` (plain text, from cache.json's dict)."""
from __future__ import annotations

CLIENT_HIT_US = 20.0        # client-side hit p50
REPEAT_RATIO = 1.35         # 30 %-repeat workload, img/s cache on / off
UNIQUE_RATIO = 0.97         # unique images, img/s cache on / off
HASH_SHARE = 0.05           # hashing / per-image inference, resnet50 @ 224
TOP1_RATE = 0.95            # lightly changed copy finds its original as top-1

CHANGED = ("resize", "noise", "jpeg", "combined")


def targets(r: dict) -> list[dict]:
    """Each target with the measured value, the bound and whether it is met (None: not measured)."""
    out = []
    if "latency" in r:
        v = r["latency"]["client_hit"]["p50_us"]
        out.append({"name": "client-side hit p50 <= 20 us (resnet18 @ 64x64 frame)", "value": v,
                    "bound": CLIENT_HIT_US, "unit": "us", "met": v <= CLIENT_HIT_US})
    if "throughput" in r:
        rat = r["throughput"]["ratios"]
        v = rat["repeats"]["mean_ratio"]
        per = ", ".join(f"{x:.2f}" for x in rat["repeats"]["per_round"])
        out.append({"name": f"30%-repeat workload, img/s cache on / off >= 1.35 (rounds: {per})",
                    "value": v, "bound": REPEAT_RATIO, "unit": "x", "met": v >= REPEAT_RATIO})
        v = rat["unique"]["mean_ratio"]
        per = ", ".join(f"{x:.3f}" for x in rat["unique"]["per_round"])
        out.append({"name": f"unique images, img/s cache on / off >= 0.97 (rounds: {per})",
                    "value": v, "bound": UNIQUE_RATIO, "unit": "x", "met": v >= UNIQUE_RATIO})
    if "hashing" in r:
        ratios = r["hashing"]["ratios"]
        v = max(x["both_sides"] for x in ratios.values())
        out.append({"name": "hashing (client + daemon side) <= 5% of per-image inference, resnet50 @ 224 "
                            "(worst of batch 1 and 8)", "value": v, "bound": HASH_SHARE, "unit": "share",
                    "met": v <= HASH_SHARE})
    if "near" in r:
        for name, res in r["near"]["robustness"]["daemon"].items():
            worst = min(CHANGED, key=lambda k: res["kinds"][k]["top1"])
            v = res["kinds"][worst]["top1"]
            out.append({"name": f"--model {name}: changed copy finds its original as top-1 >= 95% "
                                f"(worst perturbation: {worst})", "value": v, "bound": TOP1_RATE,
                        "unit": "rate", "met": v >= TOP1_RATE})
    return out


def _lat(s: dict) -> str:
    return f"{s['p50_us']:>9.1f}  {s['p99_us']:>9.1f}"


def _latency(l: dict) -> list[str]:
    miss = l["miss"]["p50_us"]
    rows = [("client-side hit: classify(), Client(cache=True)", l["client_hit"]),
            ("  content_hash (12 KiB frame)", l["content_hash"]),
            ("  cache_key", l["cache_key"]),
            ("  lookup (read-only mapping)", l["lookup"]),
            ("  the three together", l["hash_key_lookup"]),
            ("daemon-side hit: classify(), Client(cache=False)", l["daemon_hit"]),
            ("  ping round trip (no request work)", l["ping"]),
            ("miss: fresh frame, Client(cache=False)", l["miss"]),
            ("miss: fresh frame, Client(cache=True)", l["miss_local_client"])]
    out = ["(1) Hit latency: resnet18 @ 64x64, --device cpu:2, embeddings off; one call at a time",
           f"    {'':<50}  {'p50 us':>9}  {'p99 us':>9}  {'p50 / miss p50':>14}"]
    for name, s in rows:
        out.append(f"    {name:<50}  {_lat(s)}  {s['p50_us'] / miss:>14.4f}")
    w = l["writer"]
    c = l["daemon_cache"]
    out.append(f"    daemon-side work per request (its counters): copy + hash + key {c['hash_us_mean']:.1f} us "
               f"mean; writer alone (p50): insert {w['insert']['p50_us']:.1f} us, lookup hit "
               f"{w['lookup_hit']['p50_us']:.1f} us, lookup miss {w['lookup_miss']['p50_us']:.1f} us")
    out.append(f"    ratios: client hit / miss p50 {l['ratios']['client_hit_over_miss_p50']:.4f} "
               f"(1/{1 / l['ratios']['client_hit_over_miss_p50']:.0f}), daemon hit / miss p50 "
               f"{l['ratios']['daemon_hit_over_miss_p50']:.4f} (1/{1 / l['ratios']['daemon_hit_over_miss_p50']:.0f}); "
               f"daemon hit / ping p50 {l['ratios']['daemon_hit_over_ping_p50']:.2f}x; daemon model time "
               f"per batch-1 miss {l['daemon_model_ms_per_batch']:.2f} ms")
    if "miss_other_cpu_cores" in l:
        out.append(f"    while the misses ran, other processes used {l['miss_other_cpu_cores']:.2f} cores "
                   f"(steal {l['miss_steal_cores']:.2f})")
    return out


def _throughput(t: dict) -> list[str]:
    out = [f"(2, 3) Throughput: {t['clients']} client processes, 1 frame in flight each, resnet18 @ 64x64, "
           f"--device cpu:2, embeddings off; warm-up {t['warmup_s']:g} s, window {t['seconds']:g} s",
           f"    {'round':>5}  {'repeats':>7}  {'cache':>5}  {'img/s':>8}  {'computed/s':>10}  "
           f"{'local hits':>10}  {'daemon hits':>11}  {'fresh p50 ms':>12}  {'mean batch':>10}  "
           f"{'model ms/batch':>14}  {'model busy':>10}  {'CPU daemon':>10}  {'CPU clients':>11}  {'CPU other':>9}"]
    for r in t["rows"]:
        out.append(f"    {r['round']:>5}  {r['repeat_frac']:>7.0%}  {'on' if r['cache'] else 'off':>5}  "
                   f"{r['img_s']:>8.1f}  {r['computed_img_s']:>10.1f}  {r['local_hits']:>10.1%}  "
                   f"{r['daemon']['daemon_hits']:>11}  {r['latency_fresh_ms']['p50_us']:>12.2f}  "
                   f"{r.get('mean_batch', 0):>10.2f}  {r.get('model_ms_per_batch', 0):>14.2f}  {r['model_busy']:>10.0%}  {r['daemon_cpu_cores']:>10.2f}  "
                   f"{r['clients_cpu_cores']:>11.2f}  {r.get('other_cpu_cores', 0):>9.2f}")
    out.append("    (CPU: cores used over the window; other = whole machine minus the daemon and its clients, i.e. "
               "this benchmark's parent (two info() calls) and anything else running)")
    rat = t["ratios"]
    for name, label in (("repeats", f"{t['repeat_frac']:.0%} repeats"), ("unique", "unique")):
        x = rat[name]
        out.append(f"    {label}: cache on / off = "
                   + ", ".join(f"{a:.1f} / {b:.1f} = {a / b:.3f}" for a, b in zip(x["on_img_s"], x["off_img_s"]))
                   + f"; mean {x['mean_ratio']:.3f}")
    on_rows = [r for r in t["rows"] if r["cache"] and r["repeat_frac"] == 0]
    if on_rows:
        d = on_rows[-1]["daemon"]
        out.append(f"    unique, cache on (last round): daemon inserted {d['inserts']} and skipped "
                   f"{d['inserts_skipped']} of {d['misses']} misses (insert sampling at low hit rate); "
                   f"daemon copy+hash+key {on_rows[-1]['daemon_hash_us'] or 0:.1f} us per request")
    return out


def _hashing(h: dict) -> list[str]:
    hs, inf, dm = h["hash"], h["inference"], h["daemon"]
    out = [f"(4) Hashing against inference: resnet50 @ 224x224 (frame {hs['frame_bytes']} B), "
           f"{inf['threads']} threads, torch {inf['torch']}",
           f"    content_hash p50 {hs['content_hash']['p50_us']:.1f} us; cache_key {hs['cache_key']['p50_us']:.1f} us; "
           f"client-side hash + key + lookup (miss) {hs['client_lookup_miss']['p50_us']:.1f} us; "
           f"frame copy {hs['frame_copy']['p50_us']:.1f} us",
           f"    daemon: copy + hash + key {dm['hash_us_mean']:.1f} us mean over {dm['requests']} requests; "
           f"its model time {dm['model_ms_per_frame']:.1f} ms per frame ({dm['frames']} frames in "
           f"{dm['batches']} batches)"]
    for r in inf["rows"]:
        rat = h["ratios"][f"batch{r['batch']}"]
        out.append(f"    in-process batch {r['batch']}: {r['ms_per_image_p50']:.1f} ms per image "
                   f"({r['batches']} batches) -> content_hash {rat['content_hash']:.3%}, client side "
                   f"{rat['client_hash_key_lookup']:.3%}, daemon side {rat['daemon_copy_hash_key']:.3%}, "
                   f"both {rat['both_sides']:.3%} of it")
    return out


def _search(s: dict) -> list[str]:
    out = ["(5) Near-duplicate search: EmbeddingStore.search(k=5), random unit vectors, dim 512",
           f"    {'rows':>7}  {'store p50 us':>12}  {'store p99 us':>12}  {'bare p50 us':>11}  "
           f"{'store / bare':>12}  {'add us':>7}  {'same as exact':>13}"]
    for r in s["rows"]:
        out.append(f"    {r['rows']:>7}  {r['store']['p50_us']:>12.1f}  {r['store']['p99_us']:>12.1f}  "
                   f"{r['bare']['p50_us']:>11.1f}  {r['ratio_p50']:>12.2f}  {r['add_us_mean']:>7.1f}  "
                   f"{str(r['same_answer_as_exact']):>13}")
    out.append("    (bare: the same float32 matrix-vector product + argpartition over an in-memory array)")
    return out


def _near(n: dict) -> list[str]:
    kinds = ("none", "resize", "noise", "jpeg", "combined")
    out = [f"(6) Near-duplicate robustness: {n['images']} shapes images stored through the daemon, "
           f"{n['samples']} copies per perturbation; top-1 (top-5) rate",
           "    perturbations: resize x[0.9,1.1] and back (bilinear), noise sigma 3, JPEG q 75-90, combined = all "
           "three; none = the unchanged original (control)",
           "    mean |pixel change|: " + ", ".join(f"{k} {n['mean_abs_pixel_change'][k]:.2f}" for k in kinds),
           f"    {'through the daemon':<58}  " + "  ".join(f"{k:>13}" for k in kinds)]
    for name, res in n["daemon"].items():
        cells = "  ".join(f"{res['kinds'][k]['top1']:>6.1%} ({res['kinds'][k]['top5']:>4.0%})" for k in kinds)
        out.append(f"    {'--model ' + name:<58}  {cells}")
    for name, res in n["daemon"].items():
        agree = ", ".join(f"{k} {res['agreement_with_inprocess'][k]:.1%}" for k in kinds)
        sims = ", ".join(f"{k} {res['kinds'][k]['top1_similarity_p50']:.4f}" for k in kinds)
        out.append(f"    {name}: stored {res['stored']} in {res['store_s']:.1f} s, queries {res['query_s']:.1f} s; "
                   f"top-1 similarity p50: {sims}")
        out.append(f"    {name}: top-1 agrees with the in-process recomputation of the daemon's layer: {agree}")
    out.append(f"    {'in-process, other embeddings (same copies)':<58}  " + "  ".join(f"{k:>13}" for k in kinds))
    for model, group in n["inprocess"].items():
        for label, res in group["variants"].items():
            cells = "  ".join(f"{res[k]['top1']:>6.1%} ({res[k]['top5']:>4.0%})" for k in kinds)
            name = label if model == "pixels" else f"{model}: {label}"
            out.append(f"    {name[:58]:<58}  {cells}")
    return out


def render(r: dict) -> str:
    m = r["machine"]
    lines = [f"inferd result cache and embeddings benchmark, {m['date']}"
             f"{' (quick)' if r.get('quick') else ''}", ""]
    for key, fn in (("latency", _latency), ("throughput", _throughput), ("hashing", _hashing)):
        if key in r:
            lines += fn(r[key]) + [""]
    if "near" in r:
        lines += _search(r["near"]["search"]) + [""] + _near(r["near"]["robustness"]) + [""]
    lines.append("Targets:")
    for t in r.get("targets", []):
        v = t["value"]
        shown = f"{v:.1%}" if t["unit"] in ("rate", "share") else f"{v:.3f} {t['unit']}" if t["unit"] == "x" \
            else f"{v:.1f} {t['unit']}"
        bound = f"{t['bound']:.0%}" if t["unit"] in ("rate", "share") else f"{t['bound']:g}"
        lines.append(f"  [{'MET ' if t['met'] else 'MISS'}] {t['name']}: {shown} (bound {bound})")
    lines.append(f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, torch {m.get('torch', '?')}"
                 f"{', commit ' + m['git'] if m.get('git') else ''}; "
                 f"load average at start {m['loadavg_start'][0]:.2f}, at end {m.get('loadavg_end', [0])[0]:.2f}; "
                 f"{'quick' if r.get('quick') else 'full'} run, {r.get('wall_s', 0):.0f} s")
    daemons = r.get("daemons", [])
    codes = ", ".join(str(d.get("exit_code")) for d in daemons)
    left = sorted({x for d in daemons for x in d.get("shm_leftovers") or []})
    lines.append(f"Cleanup: {len(daemons)} daemons exited with {codes} after SIGTERM; /dev/shm leftovers: "
                 f"{', '.join(left) or 'none'}")
    problems = r.get("problems", [])
    lines.append("Problems found: " + ("none" if not problems else ""))
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)
