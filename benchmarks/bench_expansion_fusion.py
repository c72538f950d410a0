"""Query expansion that never lowers mAP? The expanded search's scores fused with the first search's.

For every set x region source x method of `bench_expansion.py` (the demo set, realmix and the
composites; cached features, regions and inliers from `bench_expansion.py prepare`), each image's
final score is ``s_first / top_first + w * s_expanded / top_expanded`` (each search's scores divided
by its best score: R-ASMK* without gamma normalisation scores on no fixed scale, and an expanded
query holds more words; ``w = inf``: the expanded search alone, what ``Index.search(expand=)``
returns), ranked by score then id, for HQE and alpha-QE and several w.
Prints, per variant, the worst and mean change of mAP (Easy, Medium, Hard) against the same
configuration without expansion, and writes every figure as JSON.

    python benchmarks/bench_expansion_fusion.py --json benchmarks/results/expansion_fusion.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_expansion import SETS, configs, load, make_index, maps  # noqa: E402

WEIGHTS = (0.1, 0.25, 0.5, 1.0, float("inf"))


def score_matrix(idx, queries, n_db, expand=None):
    """(n_queries, n_db) scores by image id (every image ranked: k=None)."""
    s, i = idx.search(queries, k=None, expand=expand)
    s, i = np.asarray(s, np.float64), np.asarray(i)
    out = np.full((len(queries), n_db), -np.inf)
    np.put_along_axis(out, i, s, axis=1)
    return out


def _unit(scores):
    """Each row divided by its largest score (rows without a positive score left as they are)."""
    top = scores.max(axis=1, keepdims=True)
    return np.where(top > 0, scores / np.where(top > 0, top, 1.0), scores)


def ranks_of(scores):
    """Ids by score descending, ties by id ascending (the index's order)."""
    n = scores.shape[1]
    return np.stack([np.lexsort((np.arange(n), -row)) for row in scores])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    datas = {s: load(s) for s in args.sets}
    variants = [(e, w) for e in ("hqe", "aqe") for w in WEIGHTS]
    deltas: dict = {f"{e} w={w}": [] for e, w in variants}
    rows = []
    for name, src, method in configs(datas):
        data = datas[name]
        idx = make_index(data, method, src)
        queries = [d for d, _ in data["query"]]
        n_db = len(data["db"])
        s0 = score_matrix(idx, queries, n_db)
        base = maps(ranks_of(s0), data["gnd"])
        row = {"set": name, "source": src, "method": method, "base": base, "variants": {}}
        line = f"{name:10s} {src:10s} {method:22s} M {base['medium']:5.1f} |"
        for e in ("hqe", "aqe"):
            s1 = score_matrix(idx, queries, n_db, e)
            for w in WEIGHTS:
                fused = s1 if np.isinf(w) else _unit(s0) + w * _unit(s1)
                m = maps(ranks_of(fused), data["gnd"])
                key = f"{e} w={w}"
                row["variants"][key] = m
                deltas[key].append([m[p] - base[p] for p in ("easy", "medium", "hard") if base[p] is not None])
                line += f" {m['medium'] - base['medium']:+5.1f}"
        print(line, flush=True)
        rows.append(row)
    summary = {}
    print(f"{'variant':18s} {'worst':>6s} {'mean':>6s} {'mean dM':>8s}")
    for key, d in deltas.items():
        flat = [x for r in d for x in r]
        summary[key] = {"worst": float(min(flat)), "mean": float(np.mean(flat)),
                        "mean_medium": float(np.mean([r[1] for r in d]))}
        print(f"{key:18s} {min(flat):6.2f} {np.mean(flat):6.2f} {summary[key]['mean_medium']:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"weights": [str(w) for w in WEIGHTS], "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
