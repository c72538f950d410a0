"""Regional indexing costs on the same data: ASMK* (whole image), R-ASMK* (one entry per image,
gamma on and off), regional search (one entry per region; max and mean pooling).

    python benchmarks/bench_regional.py [--images 1000] [--boxes 2] [--words 8192] [--json out.json]

Each database image: its whole-image descriptors (--desc) plus --boxes regions described by their own
(re-extracted) descriptors (--box-desc each), all drawn from clustered random descriptors of one
scene. Reported: aggregation + insertion time per image and per region and query latency (median,
p95 over --queries queries, k = 100), both with the word assignments computed beforehand (quantisation
is timed apart), and inverted-file entries and bytes per image.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import d2r  # noqa: E402
from bench_ivf import clustered, machine  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--desc", type=int, default=1000)
    ap.add_argument("--boxes", type=int, default=2)
    ap.add_argument("--box-desc", type=int, default=500)
    ap.add_argument("--words", type=int, default=8192)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print(json.dumps({"machine": machine(), "d2r": d2r.build_info(), "args": vars(args)}), flush=True)

    centers = np.abs(rng.standard_normal((4 * args.words, 128))).astype(np.float32)
    scenes = rng.integers(0, len(centers) - 1024, args.images + args.queries)

    def scene(i, n):
        return clustered(rng, n, centers[scenes[i]:scenes[i] + 1024])

    db = [[scene(i, args.desc)] + [scene(i, args.box_desc) for _ in range(args.boxes)] for i in range(args.images)]
    queries = [scene(args.images + q, args.desc) if q % 2 else scene(int(rng.integers(args.images)), args.desc)
               for q in range(args.queries)]
    cb = d2r.Codebook(clustered(rng, args.words, centers))
    n_regions = args.images * (1 + args.boxes)

    # quantisation, timed apart; the index stages below get these assignments
    all_desc = np.vstack([r for img in db for r in img])
    _, t_quant = _timed(cb.quantize, all_desc, 1)
    db_assign = [cb.quantize(np.vstack(img), 1)[0] for img in db]
    whole_assign = np.vstack([cb.quantize(img[0], 1)[0] for img in db])
    q_assign = [cb.quantize(q, 1)[0] for q in queries]

    configs = [
        ("ASMK*", lambda: d2r.Index(cb, "asmk*"), "whole"),
        ("R-ASMK* gamma on", lambda: d2r.Index(cb, "rasmk*"), "regions"),
        ("R-ASMK* gamma off (official)", lambda: d2r.Index(cb, "rasmk*", normalize=False), "regions"),
        ("regional search max", lambda: d2r.RegionalSearchIndex(cb, "asmk*", pooling="max"), "regions"),
        ("regional search mean", lambda: d2r.RegionalSearchIndex(cb, "asmk*", pooling="mean"), "regions"),
    ]
    rows = []
    for name, make, form in configs:
        times = []
        for _ in range(3):  # best of 3 builds (allocation noise on a shared VM)
            index = make()
            if form == "whole":
                _, t = _timed(index.add, [img[0] for img in db], progress=False, assignments=whole_assign)
            else:
                _, t = _timed(index.add_regions_many, db, progress=False, assignments=db_assign)
            times.append(t)
        t_agg = min(times)
        per_region = t_agg / (args.images if form == "whole" else n_regions)
        lat = []
        for q, qa in zip(queries, q_assign):
            index.search(q, k=100, assignments=qa)
            t = time.perf_counter()
            index.search(q, k=100, assignments=qa)
            lat.append(time.perf_counter() - t)
        st = index.stats()
        lat = np.asarray(lat) * 1e3
        rows.append({"method": name, "entries": st["entries"], "bytes_per_image": st["bytes_per_image"],
                     "words_per_image": st["words_per_image"],
                     "aggregate_build_ms_per_image": 1e3 * t_agg / args.images,
                     "aggregate_build_ms_per_region": 1e3 * per_region,
                     "query_median_ms": float(np.median(lat)), "query_p95_ms": float(np.percentile(lat, 95))})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nquantisation (timed apart): {1e3 * t_quant / n_regions:.3f} ms per region "
          f"({args.desc}/{args.box_desc} descriptors, C={args.words})")
    print(f"{'method':30s} {'entries':>8s} {'words/img':>10s} {'bytes/img':>10s} {'agg ms/img':>11s} "
          f"{'agg ms/reg':>11s} {'q med ms':>9s} {'q p95 ms':>9s}")
    for r in rows:
        print(f"{r['method']:30s} {r['entries']:8d} {r['words_per_image']:10.0f} {r['bytes_per_image']:10.0f} "
              f"{r['aggregate_build_ms_per_image']:11.3f} {r['aggregate_build_ms_per_region']:11.3f} "
              f"{r['query_median_ms']:9.2f} {r['query_p95_ms']:9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _timed(f, *a, **k):
    t = time.perf_counter()
    r = f(*a, **k)
    return r, time.perf_counter() - t


if __name__ == "__main__":
    main()
