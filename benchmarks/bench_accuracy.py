"""Retrieval accuracy of the whole pipeline (RootSIFT, regions re-extracted on boxes, 1,024-word
codebook) on the built-in demo set and on realmix: ASMK*, R-ASMK* (gamma on / off), regional search
(max, mean), each with and without spatial verification; mAP Easy / Medium / Hard, mP@10, entries,
bytes per image, query latency; realmix per family too.

    python benchmarks/bench_accuracy.py [--datasets demo realmix] [--proposals dataset|grid] [--json out.json]

realmix has no boxes: its database regions come from the weight-free R-MAC grid (--proposals grid is
forced there). The data differ from Revisited Oxford / Paris: compare with METHOD.md section 7 in
words only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ivf import machine  # noqa: E402

import d2r  # noqa: E402
from d2r.pipeline import run  # noqa: E402


def summary(result):
    rows = []
    for m in result["methods"]:
        row = {"method": m.name, "entries": m.entries, "bytes_per_image": m.bytes_per_image,
               "query_ms": m.query_ms}
        for p in ("easy", "medium", "hard"):
            row[f"map_{p}"] = 100 * m.results[p]["map"]
        row["mp10_medium"] = 100 * float(m.results["medium"]["mp"][-1])
        if m.reranked is not None:
            row["sv_map_medium"] = 100 * m.reranked["medium"]["map"]
            row["sv_map_hard"] = 100 * m.reranked["hard"]["map"]
            row["sv_seconds_per_query"] = m.reranked["seconds_per_query"]
        row["per_family_map_medium"] = {f: 100 * r["medium"]["map"] for f, r in m.per_family.items()}
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["demo", "realmix"])
    ap.add_argument("--words", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(json.dumps({"machine": machine(), "d2r": d2r.build_info(), "args": vars(args)}), flush=True)
    out = {}
    for name in args.datasets:
        print(f"\n=== {name}", flush=True)
        if name == "demo":
            from d2r.datasets import make_demo_set

            ds, proposals = make_demo_set(seed=args.seed), "dataset"   # the oracle boxes (section 4)
        else:
            from d2r.datasets import load_realmix

            ds, proposals = load_realmix(), "grid:1"
        res = run(ds, n_words=args.words, regions=proposals, rerank=True, seed=args.seed, progress=False)
        out[name] = summary(res)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
