"""The whole Detect-to-Retrieve pipeline on a dataset: features, regions, codebook, ASMK* / R-ASMK* /
regional-search indexes, search, optional spatial re-ranking, Revisited evaluation, a visual report.

    from d2r.workflows.pipeline import run
    from d2r.datasets import load_realmix
    result = run(load_realmix(), n_words=1024, rerank=True, report_dir="report")

A dataset is any object with `imlist` (database image paths), `qimlist` (query paths), `gnd` (per
query: easy / hard / junk database indices, optional bbx x1, y1, x2, y2 that the query is cropped to)
and, optionally, `db_boxes` (per database image an (n, 4) array of detected boxes, x1, y1, x2, y2
pixels) and `query_families` (a label per query, for per-family results).
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from d2r.core.progress import iterate
from d2r.core.codebook import Codebook
from d2r.core.evaluate import revisited
from d2r.core.index import Index, RegionalSearchIndex


@dataclass
class MethodResult:
    name: str
    results: dict                      # d2r.evaluate.revisited output
    ranks: np.ndarray                  # (n_queries, n_database) full rankings
    scores: np.ndarray                 # matching scores
    entries: int
    bytes_per_image: float
    build_s: float
    query_ms: float                    # median search latency per query (aggregation + scoring)
    per_family: dict = field(default_factory=dict)
    reranked: dict | None = None       # protocol-aware re-ranked results, when asked
    #: the scores as Index.normalized_scores gives them (1 = the query image itself), aligned with
    #: `scores`; None for methods without them (regional search)
    normalized: np.ndarray | None = None


def _crop(image, box):
    from d2r.regions.select import crop_bounds

    x1, y1, x2, y2 = crop_bounds(box)
    h, w = image.shape[:2]
    x1, y1, x2, y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    return image[y1:y2, x1:x2], (y1, x1)


def extract_queries(dataset, extractor, progress=True):
    """Query features; a query with a bbx is cropped to it (the Revisited protocol), its locations
    mapped back to the full image."""
    from d2r.extract.image import open_image_rgb as _load_image_rgb
    from d2r.regions.select import _shift_features

    out = []
    for i, path in iterate(enumerate(dataset.qimlist), len(dataset.qimlist), "query features", progress):
        bbx = dataset.gnd[i].get("bbx") if isinstance(dataset.gnd[i], dict) else None
        if bbx is None:
            out.append(extractor(path))
        else:
            img = _load_image_rgb(path)
            crop, (dy, dx) = _crop(img, bbx)
            out.append(_shift_features(extractor(crop), dy, dx))
    return out


def database_regions(dataset, extractor, db_features, proposals="dataset", max_boxes=8, progress=True):
    """Per database image: (region descriptor list with region 0 the whole image, boxes used, all
    the image's features: the whole image's and the crops' with locations in whole-image pixels).

    proposals: "dataset" (the dataset's boxes: the oracle), "none", "grid" (a 1-level grid), a region
    source name (``d2r.detect.region_source``: "grid:3", "mser", "keypoints", "ssd-coco", ...), a
    callable ``image -> (boxes, scores)``, or a list of per-image (n, 4) boxes (e.g. discovered)."""
    from d2r.extract import Features
    from d2r.extract.image import open_image_rgb as _load_image_rgb
    from d2r.regions.select import grid_proposals, regions_by_reextraction

    if isinstance(proposals, str) and proposals not in ("dataset", "none", "grid"):
        from d2r.regions.detect import DISCOVERED, region_source

        src = region_source(proposals, max_boxes=max_boxes)
        if src is DISCOVERED:
            raise ValueError("discovered regions need the collection: compute them with d2r.discover.discover_regions "
                             "and pass the list of boxes (d2r.pipeline.run does)")
        if isinstance(src, str) and src == "attention":
            raise ValueError("attention regions need the collection: compute them with "
                             "d2r.regions.attention.collection_attention and pass the list of boxes (d2r.pipeline.run "
                             "does), or give a trained model as 'attention:MODEL.npz'")
        proposals = "none" if src is None else src
    listed = isinstance(proposals, (list, tuple))
    if listed and len(proposals) != len(dataset.imlist):
        raise ValueError(f"{len(proposals)} box arrays given for {len(dataset.imlist)} database images")
    regions, boxes_used, region_feats = [], [], []
    for i, path in iterate(enumerate(dataset.imlist), len(dataset.imlist), "region features", progress):
        if listed and len(proposals[i]) == 0:
            regions.append([db_features[i].descriptors])
            boxes_used.append(np.zeros((0, 4)))
            region_feats.append(db_features[i])
            continue
        if proposals == "none":
            regions.append([db_features[i].descriptors])
            boxes_used.append(np.zeros((0, 4)))
            region_feats.append(db_features[i])
            continue
        img = _load_image_rgb(path)
        if proposals == "dataset":
            boxes = np.asarray(getattr(dataset, "db_boxes")[i], dtype=np.float64).reshape(-1, 4)
        elif listed:
            boxes = np.asarray(proposals[i], np.float64).reshape(-1, 4)
        elif isinstance(proposals, str) and proposals == "grid":
            boxes = grid_proposals(img.shape[:2], levels=1)
        elif getattr(proposals, "needs_path", False):
            boxes, scores = proposals(path)
        elif callable(proposals):
            boxes, scores = proposals(img)
        else:
            raise ValueError(f"unknown proposals {proposals!r}: 'dataset', 'grid', 'none' or a callable")
        regs, _, crops = regions_by_reextraction(img, extractor, boxes, None, whole_features=db_features[i],
                                                 max_boxes=max_boxes)
        regions.append(regs)
        boxes_used.append(boxes[:max_boxes])
        parts = [db_features[i]] + list(crops)
        region_feats.append(Features(*(np.concatenate([np.asarray(getattr(f, a)) for f in parts])
                                       for a in ("descriptors", "locations", "scales", "scores"))))
    return regions, boxes_used, region_feats


def train_codebook(db_features, n_words=1024, seed=0, sample=200_000, niter=10, progress=True, out=None):
    """The pipeline's codebook: faiss k-means (`niter` iterations, seeded) on at most `sample`
    descriptors drawn at random (seeded) from the database features (a list of Features or arrays);
    n_words is capped at the number of descriptors."""
    rng = np.random.default_rng(seed)
    x = np.vstack([getattr(f, "descriptors", f) for f in db_features])
    if len(x) == 0:
        raise ValueError("no descriptors to train a codebook on (every image has zero features)")
    if len(x) > sample:
        x = x[rng.choice(len(x), sample, replace=False)]
    n_words = min(int(n_words), len(x))
    t = time.perf_counter()
    codebook = Codebook.train(x, n_words, niter=niter, seed=seed, progress=progress)
    if out is not None:
        print(f"codebook: {n_words} words, k-means on {len(x)} descriptors ({time.perf_counter() - t:.1f} s)",
              file=out)
    return codebook


def default_methods(codebook):
    """The compared methods: (name, index factory, "whole" or "regions" database input)."""
    return [
        ("ASMK*", lambda: Index(codebook, "asmk*"), "whole"),
        ("R-ASMK* (gamma on)", lambda: Index(codebook, "rasmk*"), "regions"),
        ("R-ASMK* (gamma off, official)", lambda: Index(codebook, "rasmk*", normalize=False), "regions"),
        ("Regional search, max", lambda: RegionalSearchIndex(codebook, "asmk*", pooling="max"), "regions"),
        ("Regional search, mean", lambda: RegionalSearchIndex(codebook, "asmk*", pooling="mean"), "regions"),
    ]


def _evaluate(ranks, gnd, families=None):
    res = revisited(ranks, gnd)
    per_family = {}
    if families is not None:
        fam = np.asarray(families)
        for f in sorted(set(fam.tolist())):
            sel = np.flatnonzero(fam == f)
            per_family[f] = revisited(ranks[sel], [gnd[i] for i in sel])
    return res, per_family


#: The regional methods also run over the dataset's own boxes (when it has them and another region
#: source is used), as separate rows named "NAME, oracle boxes": what a perfect detector would give.
ORACLE_METHODS = ("R-ASMK* (gamma off, official)", "Regional search, max")
ORACLE_SUFFIX = ", oracle boxes"


def _resolve_regions(regions, proposals, dataset):
    if proposals is not None:
        if regions is not None:
            raise ValueError("give regions= (proposals= is its old name), not both")
        warnings.warn("proposals= is deprecated: use regions= (dataset, none, grid:L, mser, keypoints, discovered, "
                      "ssd-coco, detector:MODEL_DIR, boxes:FILE)", DeprecationWarning, stacklevel=3)
        regions = {"grid": "grid:1"}.get(proposals, proposals) if isinstance(proposals, str) else proposals
    if regions is None:
        regions = DEFAULT_REGIONS
    if isinstance(regions, str) and regions == "dataset" and getattr(dataset, "db_boxes", None) is None:
        raise ValueError("regions='dataset' needs a dataset with database boxes (the demo set has them); use a "
                         "region source such as 'discovered'")
    return regions


#: The pipeline's default region source: regions discovered from the database (d2r.discover), the
#: source that recovers the most of the oracle's gain on clutter composites (BENCHMARKS.md section 13).
DEFAULT_REGIONS = "discovered"


def run(dataset, extractor=None, n_words=1024, proposals=None, max_boxes=8, rerank=False,
        rerank_top=100, report_dir=None, seed=0, progress=True, out=sys.stdout, methods=None,
        codebook_sample=200_000, match_distance=None, codebook=None, regions=None, expand=None,
        rerank_rule=None):
    """Runs the pipeline and prints one table; returns {"methods": [MethodResult], ...}.
    regions: the database regions' source: "discovered" (the default, d2r.discover), a name of
    ``d2r.detect.region_source`` ("none", "grid:L", "mser", "keypoints", "ssd-coco",
    "detector:MODEL_DIR", "boxes:FILE"), "dataset" (the dataset's boxes: an oracle), or a callable
    detector. With another source than "dataset" on a dataset that has boxes, ORACLE_METHODS also run
    over its boxes, as separate rows named "..., oracle boxes". proposals: the old name of regions
    ("grid" was a 1-level grid), deprecated.
    Spatial verification uses the official settings (top 100, affine RANSAC, 1,000 trials, 10 px)
    with the descriptor-match distance `match_distance` (default: the extractor's `match_distance`
    attribute, else the official 0.9 for DELF). `codebook`: a d2r.Codebook to use instead of training
    one on the database (e.g. the Paris codebook for Oxford, as the Revisited convention has it).
    expand: query expansion of every search ("hqe", "hqe-fused", "aqe", d2r.HQE / d2r.AlphaQE; d2r.core.expand);
    None: none. With rerank=True the expansion images are the verified ones (`verified_expansion`). rerank_rule: how spatial verification re-orders the results (d2r.core.verify.RerankRule;
    None: DEFAULT_RULE, the fused rule; OFFICIAL_RULE: the official inlier order)."""
    from d2r.core.expand import as_expansion

    expansion = as_expansion(expand)
    t_start = time.perf_counter()
    if extractor is None:
        from d2r.extract import RootSIFT

        extractor = RootSIFT(max_features=1000)
    regions_spec = _resolve_regions(regions, proposals, dataset)
    db_paths = list(dataset.imlist)
    t = time.perf_counter()
    db_feat = [extractor(p) for p in iterate(db_paths, len(db_paths), "database features", progress)]
    q_feat = extract_queries(dataset, extractor, progress)
    t_extract = time.perf_counter() - t
    print(f"features: {len(db_paths)} database images, {len(q_feat)} queries, "
          f"{np.mean([len(f.descriptors) for f in db_feat]):.0f} descriptors/image ({t_extract:.1f} s)", file=out)
    if codebook is None:
        codebook = train_codebook(db_feat, n_words, seed, codebook_sample, progress=progress, out=out)
    else:
        print(f"codebook: given, {codebook.n_words} words", file=out)

    t = time.perf_counter()
    source = regions_spec
    label = regions_spec if isinstance(regions_spec, str) else type(regions_spec).__name__
    if isinstance(regions_spec, str) and regions_spec == "discovered":
        from d2r.regions.discover import discover_regions

        found = discover_regions(db_feat, codebook, max_regions=min(5, max_boxes), seed=seed, progress=progress)
        source = [b for b, _ in found]
    attention_model = None
    if isinstance(regions_spec, str) and regions_spec == "attention":
        from d2r.extract.image import open_image_rgb
        from d2r.regions.attention import collection_attention

        sizes = [open_image_rgb(p).shape[:2] for p in db_paths]
        attention_model, found = collection_attention(db_feat, codebook, image_sizes=sizes,
                                                      max_boxes=min(5, max_boxes), seed=seed)
        source = [b for b, _ in found]
        if report_dir is not None:
            os.makedirs(report_dir, exist_ok=True)
            attention_model.save(os.path.join(report_dir, "attention.npz"))
    regions, boxes, region_feat = database_regions(dataset, extractor, db_feat, source, max_boxes, progress)
    t_regions = time.perf_counter() - t
    print(f"regions ({label}): {np.mean([len(r) - 1 for r in regions]):.1f} boxes/image ({t_regions:.1f} s, "
          "re-extraction on the crops included)", file=out)
    oracle = None
    if (not (isinstance(regions_spec, str) and regions_spec == "dataset")
            and getattr(dataset, "db_boxes", None) is not None and methods is None):
        oracle = database_regions(dataset, extractor, db_feat, "dataset", max_boxes, progress)

    if methods is None:
        methods = default_methods(codebook)
        if oracle is not None:
            methods += [(name + ORACLE_SUFFIX, make, "oracle") for name, make, form in methods
                        if name in ORACLE_METHODS]
    families = getattr(dataset, "query_families", None)
    md = match_distance if match_distance is not None else getattr(extractor, "match_distance", 0.9)
    results = []
    n_db = len(db_paths)
    for name, make, form in methods:
        index = make()
        t = time.perf_counter()
        if form == "whole":
            index.add([f.descriptors for f in db_feat], progress=progress)
        else:
            index.add_regions_many(oracle[0] if form == "oracle" else regions, progress=progress)
        build = time.perf_counter() - t
        ranks = np.empty((len(q_feat), n_db), np.int64)
        scores = np.empty((len(q_feat), n_db), np.float32)
        readable = hasattr(index, "normalized_scores")
        normalized = np.empty((len(q_feat), n_db), np.float32) if readable else None
        lat = []
        feats = {"whole": db_feat, "oracle": oracle[2] if oracle is not None else None}.get(form, region_feat)
        for qi, f in iterate(enumerate(q_feat), len(q_feat), f"search: {name}", progress):
            t = time.perf_counter()
            if expansion is None:
                s, ids = index.search(f.descriptors, k=None)
            elif rerank:
                s, ids = verified_expansion(index, f, feats, expansion, rerank_top, rerank_rule, seed, md)
            else:
                s, ids = index.search(f.descriptors, k=None, expand=expansion)
            lat.append(time.perf_counter() - t)
            ranks[qi], scores[qi] = ids, s
            if normalized is not None:
                normalized[qi] = index.normalized_scores(f.descriptors, s, ids)
        res, per_family = _evaluate(ranks, dataset.gnd, families)
        st = index.stats()
        mr = MethodResult(name, res, ranks, scores, st["entries"], st["bytes_per_image"], build,
                          1e3 * float(np.median(lat)), per_family, normalized=normalized)
        if rerank:
            from d2r.core.verify import rerank_protocol

            # regional methods verify against all the image's features (whole image + re-extracted crops)
            mr.reranked = rerank_protocol(ranks, scores, q_feat, feats,
                                          dataset.gnd, top=rerank_top, seed=seed, max_distance=md,
                                          protocols=("easy", "medium", "hard"), progress=progress,
                                          desc=f"spatial verification: {name}", rule=rerank_rule)
        results.append(mr)

    if expansion is not None:
        over = "the spatially verified top results" if rerank else "the top results (no geometry)"
        print(f"query expansion: {expansion}, over {over}", file=out)
    _print_table(results, out, rerank)
    if families is not None:
        _print_families(results, out)
    report = None
    if report_dir is not None:
        from d2r.workflows.report import write_report

        report = write_report(report_dir, dataset, results, q_feat, db_feat, boxes, seed=seed, progress=progress,
                              match_distance=md, rerank_top=rerank_top)
        print(f"report: {report}", file=out)
    print(f"total {time.perf_counter() - t_start:.1f} s", file=out)
    return {"methods": results, "codebook": codebook, "query_features": q_feat, "db_features": db_feat,
            "expand": None if expansion is None else str(expansion),
            "boxes": boxes, "report": report, "regions": label, "attention": attention_model,
            "oracle_boxes": oracle[1] if oracle is not None else None}


def verified_expansion(index, query_features, db_features, expansion, top=100, rule=None, seed=0, max_distance=0.9):
    """Query expansion over spatially verified results (what `run` does with rerank=True and expand):
    the first search's top `top` results are verified, those with at least ``rule.min_inliers``
    inliers (DEFAULT_RULE's by default) are the expansion images, best ASMK score first, and the
    expanded query ranks the whole database. Returns the second search's (scores, ids), k=None."""
    from d2r.core.aggregate import aggregate
    from d2r.core.expand import as_expansion, expand_query, fuse_rankings
    from d2r.core.verify import DEFAULT_RULE, rerank

    expansion = as_expansion(expansion)
    rule = DEFAULT_RULE if rule is None else rule
    qa = aggregate(query_features.descriptors, index.codebook, index.spec.query_kernel)
    scores, ids = index.search_aggregated(qa, k=top)
    _, inl = rerank(query_features, [db_features[int(i)] for i in ids], scores, top=None, seed=seed,
                    max_distance=max_distance)
    chosen = ids[np.maximum(inl, 0) >= max(rule.min_inliers, 1)]
    expanded = expand_query(index, qa, chosen, expansion) if chosen.size else qa
    second = index.search_aggregated(expanded, k=None)
    if expansion.fuse is None:
        return second
    first = index.search_aggregated(qa, k=None)   # fused with the first search's full ranking
    s, i = fuse_rankings((first[0][None], first[1][None]), (second[0][None], second[1][None]), float(expansion.fuse), -1)
    return s[0], i[0]


def evaluate_index(index, names, dataset, extractor=None, progress=True) -> dict:
    """Evaluate a prebuilt index (e.g. a database plus the R1M distractors, from ``d2r index --base``)
    on a dataset's queries with the Revisited protocol: the queries are extracted (cropped to their
    box) with `extractor` (default: the one the index records, else RootSIFT), every indexed image
    is ranked, and images that are not in the dataset's database count as distractors (never
    positive). `names`: the image name (path) of each id, as ``d2r index`` writes them beside the
    index (``d2r.build.names_file``). Every database image of the dataset must be in the index.
    Returns ``{"protocols": revisited's dict, "distractors": count, "images": count, "query_ms": median
    search time}``."""
    import os

    from d2r.extract import RootSIFT

    if extractor is None:
        rec = getattr(index, "extractor", None) or {}
        if rec.get("name") not in (None, "RootSIFT"):
            raise ValueError(f"the index was built from {rec.get('name')} features: pass the same extractor")
        extractor = RootSIFT(max_features=int(rec.get("params", {}).get("max_features") or 1000))
    where = {os.path.abspath(str(p)): i for i, p in enumerate(dataset.imlist)}
    n_db = len(dataset.imlist)
    ids = np.asarray(index.ids)
    column = np.empty(int(ids.max()) + 1 if ids.size else 0, np.int64)
    found = np.zeros(n_db, bool)
    n_distractors = 0
    for i in ids:
        name = os.path.abspath(names[i]) if i < len(names) else None
        j = where.get(name) if name is not None else None
        if j is None:
            column[i] = n_db + n_distractors
            n_distractors += 1
        else:
            column[i] = j
            found[j] = True
    if not found.all():
        missing = [str(dataset.imlist[j]) for j in np.flatnonzero(~found)[:3]]
        raise ValueError(f"{int((~found).sum())} of the dataset's {n_db} database images are not in the index "
                         f"(e.g. {', '.join(missing)}); index them (d2r index ... --base DISTRACTORS)")
    queries = extract_queries(dataset, extractor, progress=progress)
    ranks, times = [], []
    for q in iterate(queries, len(queries), "search", progress):
        t = time.perf_counter()
        _, got = index.search(q.descriptors, k=None)
        times.append(time.perf_counter() - t)
        ranks.append(column[got])
    return {"protocols": revisited(np.vstack(ranks), dataset.gnd), "distractors": n_distractors,
            "images": int(ids.size), "query_ms": float(np.median(times) * 1e3)}


def summary(result) -> dict:
    """A JSON-ready summary of `run`'s result (what `d2r demo --json` prints): per method, mAP and
    mP@10 (in percent) for Easy / Medium / Hard, entries, bytes per image, median query ms, and the
    same after spatial verification when it ran."""
    def protocols(res):
        return {p: {"map": round(100 * res[p]["map"], 2), "mp@10": round(100 * float(res[p]["mp"][-1]), 2)}
                for p in ("easy", "medium", "hard") if p in res}

    out: dict = {"methods": []}
    for r in result["methods"]:
        m = {"name": r.name, **protocols(r.results), "entries": int(r.entries),
             "bytes_per_image": round(float(r.bytes_per_image), 1), "query_ms": round(float(r.query_ms), 3)}
        if r.reranked is not None:
            m["spatial_verification"] = protocols(r.reranked)
        if r.per_family:
            m["per_family"] = {f: protocols(v) for f, v in r.per_family.items()}
        out["methods"].append(m)
    out["report"] = None if result.get("report") is None else str(result["report"])
    out["expand"] = result.get("expand")
    return out


def _print_table(results, out, rerank):
    w = max([31] + [len(r.name) for r in results])
    head = (f"{'method':{w}s} {'mAP E':>6s} {'mAP M':>6s} {'mAP H':>6s} {'mP@10 M':>8s} {'entries':>8s} "
            f"{'bytes/img':>10s} {'query ms':>9s}")
    print("\n" + head, file=out)
    for r in results:
        e, m, h = (100 * r.results[p]["map"] for p in ("easy", "medium", "hard"))
        print(f"{r.name:{w}s} {e:6.1f} {m:6.1f} {h:6.1f} {100 * r.results['medium']['mp'][-1]:8.1f} "
              f"{r.entries:8d} {r.bytes_per_image:10.0f} {r.query_ms:9.2f}", file=out)
        if rerank and r.reranked is not None:
            rr = r.reranked
            print(f"{'  + spatial verification':{w}s} {100 * rr['easy']['map']:6.1f} {100 * rr['medium']['map']:6.1f} "
                  f"{100 * rr['hard']['map']:6.1f} {100 * rr['medium']['mp'][-1]:8.1f} {'':8s} {'':10s} "
                  f"{1e3 * rr['seconds_per_query']:9.1f}", file=out)
    if any(r.name.endswith(ORACLE_SUFFIX) for r in results):
        print("(rows ending in \"oracle boxes\": the dataset's own ground-truth boxes instead of the region source, "
              "what a perfect detector would give; not a result without those boxes)", file=out)


def _print_families(results, out):
    fams = sorted(results[0].per_family)
    w = max([31] + [len(r.name) for r in results])
    print("\nmAP Medium per query family: " + ", ".join(
        f"{f} ({results[0].per_family[f]['medium']['n_queries']} q)" for f in fams), file=out)
    for r in results:
        print(f"{r.name:{w}s} " + " ".join(f"{100 * r.per_family[f]['medium']['map']:7.1f}" for f in fams), file=out)
