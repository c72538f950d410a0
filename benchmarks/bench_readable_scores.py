"""Raw against normalised scores (Index.normalized_scores) on realmix, real photos (issue 26): for each
query, the score of its best-ranked positive (easy or hard) and of its best-ranked negative (junk
left out), as 10th / 50th / 90th percentiles over the queries; RootSIFT 1000, 1024 words (seed 0),
ASMK* (gamma on), R-ASMK* over discovered regions with gamma on and off (the official run's).

    PYTHONPATH=python python benchmarks/bench_readable_scores.py > benchmarks/results/readable_scores_realmix.json
"""
import json
import sys

import numpy as np

import d2r
from d2r.datasets import load_realmix
from d2r.extract import RootSIFT
from d2r.regions.discover import discover_regions
from d2r.workflows.pipeline import database_regions, extract_queries, train_codebook


def pct(v):
    return [round(float(x), 4) for x in np.percentile(v, [10, 50, 90])]


def main():
    ds = load_realmix()
    sift = RootSIFT(max_features=1000)
    db = [sift(p) for p in ds.imlist]
    qs = extract_queries(ds, sift, progress=False)
    cb = train_codebook(db, 1024, seed=0, progress=False)
    found = discover_regions(db, cb, max_regions=5, seed=0, progress=False)
    regions, _, _ = database_regions(ds, sift, db, [b for b, _ in found], progress=False)
    out = {"dataset": "realmix", "database_images": len(db), "queries": len(qs), "words": cb.n_words}
    for name, idx, form in (("ASMK* (gamma on)", d2r.Index(cb, "asmk*"), "whole"),
                            ("R-ASMK* (gamma on), discovered regions", d2r.Index(cb, "rasmk*"), "regions"),
                            ("R-ASMK* (gamma off, official), discovered regions",
                             d2r.Index(cb, "rasmk*", normalize=False), "regions")):
        if form == "whole":
            idx.add([f.descriptors for f in db])
        else:
            idx.add_regions_many(regions)
        best = {"positive": ([], []), "negative": ([], [])}
        for qi, q in enumerate(qs):
            s, i = idx.search(q.descriptors, k=None)
            n = idx.normalized_scores(q.descriptors, s, i)
            g = ds.gnd[qi]
            pos, junk = set(g["easy"]) | set(g["hard"]), set(g["junk"])
            for kind, keep in (("positive", lambda j: j in pos), ("negative", lambda j: j not in pos and j not in junk)):
                at = next((r for r, j in enumerate(i.tolist()) if keep(j)), None)
                if at is not None:
                    best[kind][0].append(s[at])
                    best[kind][1].append(n[at])
        out[name] = {f"best_{k}_{w}_p10_50_90": pct(v[c]) for k, v in best.items() for c, w in ((0, "raw"), (1, "norm"))}
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
