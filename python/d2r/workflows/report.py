"""A one-file HTML report of a pipeline run (`index.html`, nothing else is written): a short intro, the
results table, a legend explaining every metric, column, colour and method on the page, the mAP per
query family when the dataset has families, and for every query (or a random sample of them, see
`max_queries`) the query with its box and the top-10 results of the shown methods with their regions,
positives and negatives marked, plus the matched keypoints of spatial verification with the top result.
The figures are embedded as base64 JPEG, so the page opens in a browser with no server and can be
mailed or archived as a single file.
"""
from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path

import numpy as np

from d2r.core.progress import iterate

GREEN, RED, GREY, BLUE, YELLOW = (40, 170, 40), (210, 40, 40), (150, 150, 150), (40, 90, 220), (230, 190, 0)
PROTOCOLS = ("easy", "medium", "hard")
DASH = "\u2013"

# What each method of d2r.pipeline.default_methods is; other names get _UNKNOWN_METHOD.
METHOD_DESCRIPTIONS = {
    "ASMK*": "Binarised aggregated selective match kernel over whole images: each image's local "
             "descriptors are assigned to visual words, their residuals aggregated per word and binarised; "
             "one index entry per image.",
    "R-ASMK* (gamma on)": "Regional ASMK*: region 0 is the whole image, the others the detected (or the "
                          "dataset's) boxes, whose features are re-extracted on the crops; all the regions' "
                          "features are aggregated into one index entry per image, with gamma (self-similarity) "
                          "normalisation.",
    "R-ASMK* (gamma off, official)": "The same regional aggregation as R-ASMK* (gamma on) without the gamma "
                                     "normalisation, as in the official Detect-to-Retrieve (D2R) run.",
    "Regional search, max": "One index entry per region (region 0 the whole image plus the boxes' re-extracted "
                            "features, ASMK* each); an image's score is the maximum over its regions.",
    "Regional search, mean": "One index entry per region (region 0 the whole image plus the boxes' re-extracted "
                             "features, ASMK* each); an image's score is the mean over its regions.",
}
for _name in ("R-ASMK* (gamma off, official)", "Regional search, max"):
    METHOD_DESCRIPTIONS[_name + ", oracle boxes"] = (
        "An oracle, not a result a user gets: the same method over the dataset's own (ground-truth) "
        "boxes instead of the region source, i.e. what a perfect detector would give.")
_UNKNOWN_METHOD = ("No description: a method not among d2r.pipeline.default_methods (passed to "
                   "d2r.pipeline.run(methods=...)); see the index factory it was given.")


def describe_method(name: str) -> str:
    """The legend's description of a method, by its name in the results table."""
    return METHOD_DESCRIPTIONS.get(name, _UNKNOWN_METHOD)


def _cv2():
    import cv2

    return cv2


def _load(path):
    from d2r.extract.image import open_image_rgb as _load_image_rgb

    return _load_image_rgb(path)


def _thumb(img, height):
    cv2 = _cv2()
    s = height / img.shape[0]
    return cv2.resize(img, (max(1, int(round(img.shape[1] * s))), height), interpolation=cv2.INTER_AREA), s


def _frame(img, color, width=6):
    out = img.copy()
    out[:width], out[-width:], out[:, :width], out[:, -width:] = color, color, color, color
    return out


def _draw_boxes(img, boxes, scale, color, thickness=2):
    cv2 = _cv2()
    for b in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        p1 = (int(b[0] * scale), int(b[1] * scale))
        p2 = (int(b[2] * scale), int(b[3] * scale))
        cv2.rectangle(img, p1, p2, color, thickness)
    return img


def _hstack(images, gap=6):
    h = max(i.shape[0] for i in images)
    parts = []
    for i in images:
        pad = np.full((h, i.shape[1], 3), 255, np.uint8)
        pad[: i.shape[0]] = i
        parts.append(pad)
        parts.append(np.full((h, gap, 3), 255, np.uint8))
    return np.hstack(parts[:-1])


def _jpeg_b64(img, quality=85):
    """An RGB uint8 image as base64 JPEG text (for a data: URL)."""
    cv2 = _cv2()
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR),
                           [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def _gnd_sets(g):
    g = g if isinstance(g, dict) else {}
    easy, hard, junk = (set(int(i) for i in g.get(k, []) or []) for k in ("easy", "hard", "junk"))
    return easy, hard, junk


def ranking_strip(dataset, qi, ranks, gnd, boxes, height=140, top=10):
    """The query (with its bbx) followed by the top results: green = positive, red = negative,
    grey = junk; detected regions in blue."""
    q = _load(dataset.qimlist[qi])
    qt, s = _thumb(q, height)
    bbx = gnd[qi].get("bbx") if isinstance(gnd[qi], dict) else None
    if bbx is not None:
        _draw_boxes(qt, [bbx], s, YELLOW, 3)
    easy, hard, junk = _gnd_sets(gnd[qi])
    pos = easy | hard
    tiles = [_frame(qt, YELLOW)]
    for j in ranks[qi][:top]:
        im = _load(dataset.imlist[j])
        t, s = _thumb(im, height)
        if boxes is not None and len(boxes[j]):
            _draw_boxes(t, boxes[j], s, BLUE, 2)
        color = GREEN if j in pos else (GREY if j in junk else RED)
        tiles.append(_frame(t, color))
    return _hstack(tiles)


def matches_figure(dataset, qi, dbi, q_feat, db_feat, height=320, seed=0, **verify_kw):
    """Side by side query / database image with the inlier matches of spatial verification.
    `verify_kw` go to d2r.verify.verify_pair (e.g. max_distance, the descriptor-match distance)."""
    cv2 = _cv2()
    from d2r.core.verify import verify_pair

    qa, da = _load(dataset.qimlist[qi]), _load(dataset.imlist[dbi])
    qt, sq = _thumb(qa, height)
    dt, sd = _thumb(da, height)
    canvas = _hstack([qt, dt], gap=10)
    res = verify_pair(q_feat, db_feat, seed=seed, **verify_kw)
    off = qt.shape[1] + 10
    for (a, b), good in zip(res.matches, res.inlier_mask):
        if not good:
            continue
        ya, xa = q_feat.locations[a]
        yb, xb = db_feat.locations[b]
        cv2.line(canvas, (int(xa * sq), int(ya * sq)), (int(xb * sd) + off, int(yb * sd)), GREEN, 1, cv2.LINE_AA)
    inliers = res.inliers
    return canvas, int(inliers)


# ---------------------------------------------------------------------------------------------- page


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _pct(x) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return DASH
    return DASH if math.isnan(x) else f"{100 * x:.1f}"


def _rel(path, root) -> str:
    """`path` relative to the dataset root when it lies under it, else as given."""
    p = str(path)
    if root is not None:
        try:
            rel = os.path.relpath(p, str(root))
        except ValueError:  # another drive (Windows)
            return p
        if rel != os.curdir and not rel.startswith(os.pardir):
            return rel.replace(os.sep, "/")
    return p


def _query_label(dataset, qi) -> tuple[str, str]:
    """(object / group name or "", path relative to the dataset root)."""
    groups = getattr(dataset, "query_groups", None)
    group = str(groups[qi]) if groups is not None and len(groups) == len(dataset.qimlist) else ""
    return group, _rel(dataset.qimlist[qi], getattr(dataset, "root", None))


def _mp_at(res, k=10):
    """mP@k from a revisited() result (NaN when k is not among its kappas)."""
    kappas = list(res.get("kappas", (1, 5, 10)))
    if k not in kappas:
        return float("nan")
    return res["mp"][kappas.index(k)]


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222;line-height:1.4}
img{max-width:100%;height:auto;border:1px solid #ddd;display:block}
table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}
td.l,th.l{text-align:left}
tr.sv td{color:#444;background:#fafafa}
dl.legend{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:8px 0}
dl.legend dt{font-weight:bold}
dl.legend dd{margin:0}
.note{font-size:90%;color:#555}
section.query{border-top:1px solid #ccc;margin-top:24px}
.sw{display:inline-block;width:12px;height:12px;border:1px solid #999;vertical-align:middle}
"""


def _swatch(rgb) -> str:
    return f"<span class='sw' style='background:rgb{tuple(rgb)}'></span>"


def _results_table(results, parts):
    footnote = False
    parts.append("<table id='results'><tr><th class='l'>method</th><th>mAP Easy</th><th>mAP Medium</th>"
                 "<th>mAP Hard</th><th>mP@10 Medium</th><th>entries</th><th>bytes / image</th>"
                 "<th>query ms</th></tr>")
    for r in results:
        parts.append(f"<tr><td class='l'>{_e(r.name)}</td>"
                     + "".join(f"<td>{_pct(r.results[p]['map'])}</td>" for p in PROTOCOLS)
                     + f"<td>{_pct(_mp_at(r.results['medium']))}</td><td>{int(r.entries)}</td>"
                     f"<td>{float(r.bytes_per_image):.0f}</td><td>{float(r.query_ms):.2f}</td></tr>")
        rr = getattr(r, "reranked", None)
        if rr is not None:
            cells = []
            for p in PROTOCOLS:
                if p in rr:
                    cells.append(f"<td>{_pct(rr[p]['map'])}</td>")
                else:
                    footnote = True
                    cells.append(f"<td>{DASH}<sup><a href='#fn-sv'>a</a></sup></td>")
            mp = _pct(_mp_at(rr["medium"])) if "medium" in rr else DASH
            sec = rr.get("seconds_per_query")
            ms = f"+{1e3 * float(sec):.1f}" if sec is not None else DASH
            parts.append(f"<tr class='sv'><td class='l'>&nbsp;&nbsp;+ spatial verification</td>{''.join(cells)}"
                         f"<td>{mp}</td><td></td><td></td><td>{ms}</td></tr>")
    parts.append("</table>")
    if footnote:
        parts.append("<p class='note' id='fn-sv'><sup>a</sup> Not computed: the spatial re-ranking of this run "
                     "was evaluated for the Medium and Hard protocols only (d2r.verify.rerank_protocol's default "
                     "<code>protocols=(\"medium\", \"hard\")</code>); the re-ranking depends on the protocol, "
                     "since each protocol ignores different images, so Easy needs its own re-ranked ranking "
                     "(<code>protocols=(\"easy\", \"medium\", \"hard\")</code>).</p>")
    any_sv = any(getattr(r, "reranked", None) is not None for r in results)
    return any_sv


def _legend(results, any_sv, rerank_top, have_families, parts):
    def item(term, text):
        parts.append(f"<dt>{term}</dt><dd>{text}</dd>")

    parts.append("<h2 id='legend'>Legend</h2><h3>Protocols and metrics</h3><dl class='legend'>")
    item("Easy", "Revisited Oxford / Paris protocol: the easy positives count as positives; the hard positives "
                 "are ignored (removed from the ranking before scoring); junk is always ignored.")
    item("Medium", "Easy and hard positives both count as positives; junk ignored.")
    item("Hard", "Only the hard positives count; the easy positives are ignored, as is junk.")
    item("mAP", "Mean average precision, in %: the average precision of each query's ranking (ignored images "
                "removed), averaged over the queries that have at least one positive under the protocol. "
                "100 = every positive ranked above every negative.")
    item("mP@10", "Mean precision at 10, in %, under Medium: the share of positives among the first 10 "
                  "(non-ignored) results, averaged over the queries.")
    item("AP", "(figure captions) that query's average precision under each protocol, in %.")
    item(DASH, "No value: no query has a positive under that protocol, or the value was not computed "
               "(see the table's footnote).")
    parts.append("</dl><h3>Columns of the results table</h3><dl class='legend'>")
    item("method", "The compared index / scoring method (described below).")
    item("mAP Easy / Medium / Hard", "mAP under each protocol.")
    item("mP@10 Medium", "mP@10 under the Medium protocol.")
    item("entries", "Index entries: one per database image (ASMK*, R-ASMK*), or one per region for regional "
                    "search.")
    item("bytes / image", "Index memory divided by the number of database images.")
    item("query ms", "Median search latency per query, in milliseconds: the aggregation of the query's "
                     "descriptors plus the scoring against the index (feature extraction not included).")
    if any_sv:
        item("+ spatial verification", f"The ranking of the method above with its top {int(rerank_top)} results "
             "(per protocol, ignored images left out) re-ranked with the inliers of an affine RANSAC "
             "fit between matched local features: by default the results with enough inliers move up, "
             "sorted by inliers, and the others keep their initial order (d2r.core.verify.DEFAULT_RULE; "
             "the official rule sorts every verified result by inliers); its query ms cell is the "
             "mean time per query added by the verification (+ms).")
    if have_families:
        item("per family", "The mAP of each method over the queries of one query family only; "
                           "'queries' is the family's number of queries, 'with positives' how many of them "
                           "have a positive under Easy / Medium / Hard (the mAP averages over those).")
    parts.append("</dl><h3>Scores (the top 10 as text)</h3><dl class='legend'>")
    item("score", "The method's raw similarity (R-ASMK*, ASMK*: the selective matches of the shared visual words, "
                  "divided by sqrt(|W_query| |W_image|) with gamma on); it shrinks with the number of words of the "
                  "database image, so true matches of another view often score 0.01 to 0.1.")
    item("norm", "The same sum as a share of the query's similarity to itself, without gamma: 1 = the query image "
                 "itself, 0 = no visual word in common; it does not shrink with the database image's size "
                 "(d2r.Index.normalized_scores; not given for regional search).")
    parts.append("</dl><h3>Methods</h3><dl class='legend'>")
    for r in results:
        item(_e(r.name), _e(describe_method(r.name)))
    parts.append("</dl><h3>Figures</h3><dl class='legend'>")
    item(f"{_swatch(YELLOW)} yellow", "The query (first tile of each strip) and its bounding box (the query is "
                                      "cropped to it for the search).")
    item(f"{_swatch(GREEN)} green frame", "A positive result (an easy or a hard positive).")
    item(f"{_swatch(RED)} red frame", "A negative result.")
    item(f"{_swatch(GREY)} grey frame", "A junk result (ignored by every protocol).")
    item(f"{_swatch(BLUE)} blue boxes", "The database image's regions (detected or the dataset's boxes) used by "
                                        "the regional methods.")
    item(f"{_swatch(GREEN)} green lines", "In the spatial-verification figures: the inlier matches of the affine "
                                          "RANSAC fit between the query and that database image.")
    parts.append("</dl>")


def _family_table(dataset, results, parts):
    fams = sorted(results[0].per_family, key=str)
    qfam = getattr(dataset, "query_families", None)
    counts = {}
    if qfam is not None and len(qfam) == len(dataset.qimlist):
        for f in qfam:
            counts[str(f)] = counts.get(str(f), 0) + 1
    parts.append("<h2 id='families'>mAP per query family</h2>"
                 "<table id='family-table'><tr><th class='l'>family</th><th>queries</th>"
                 "<th>with positives<br>E / M / H</th><th class='l'>method</th><th>mAP Easy</th>"
                 "<th>mAP Medium</th><th>mAP Hard</th></tr>")
    rows = [r for r in results if all(f in (getattr(r, "per_family", None) or {}) for f in fams)]
    for f in fams:
        first = results[0].per_family[f]
        n_pos = " / ".join(str(int(first[p].get("n_queries", 0))) for p in PROTOCOLS)
        n = counts.get(str(f), int(first["medium"].get("n_queries", 0)))
        span = len(rows)
        for k, r in enumerate(rows):
            pf = r.per_family[f]
            head = (f"<td class='l' rowspan='{span}'>{_e(f)}</td><td rowspan='{span}'>{n}</td>"
                    f"<td rowspan='{span}'>{n_pos}</td>") if k == 0 else ""
            parts.append(f"<tr>{head}<td class='l'>{_e(r.name)}</td>"
                         + "".join(f"<td>{_pct(pf[p]['map'])}</td>" for p in PROTOCOLS) + "</tr>")
    parts.append("</table>")


def _score_text(r, qi, pos) -> str:
    """'; score 0.1362, norm 0.412' for the result at `pos` of query `qi` (what the method gives)."""
    out = ""
    scores = getattr(r, "scores", None)
    if scores is not None and np.ndim(scores) == 2:
        out += f"; score {float(scores[qi][pos]):.4f}"
    norm = getattr(r, "normalized", None)
    if norm is not None and np.isfinite(norm[qi][pos]):
        out += f", norm {float(norm[qi][pos]):.3f}"
    return out


def _query_section(dataset, qi, shown, q_feat, db_feat, boxes, seed, quality, verify_kw, parts):
    group, rel = _query_label(dataset, qi)
    title = f"Query {qi}: {_e(group)} ({_e(rel)})" if group else f"Query {qi}: {_e(rel)}"
    parts.append(f"<section class='query' id='q{qi}'><h2>{title}</h2>")
    easy, hard, junk = _gnd_sets(dataset.gnd[qi])
    root = getattr(dataset, "root", None)
    n_img = 0
    for r in shown:
        strip = ranking_strip(dataset, qi, r.ranks, dataset.gnd, boxes)
        aps = " / ".join(_pct(r.results[p]["aps"][qi]) for p in PROTOCOLS)
        parts.append(f"<h3>{_e(r.name)}: top 10 (AP Easy / Medium / Hard {aps})</h3>"
                     f"<img src='data:image/jpeg;base64,{_jpeg_b64(strip, quality)}' width='{strip.shape[1]}' "
                     f"height='{strip.shape[0]}' alt='{_e(f'{rel}: top 10 of {r.name}')}'>")
        n_img += 1
        items = []
        for pos, j in enumerate(r.ranks[qi][:10]):
            j = int(j)
            kind = "easy positive" if j in easy else "hard positive" if j in hard else "junk" if j in junk \
                else "negative"
            items.append(f"<li>{_e(_rel(dataset.imlist[j], root))} ({kind}{_score_text(r, qi, pos)})</li>")
        parts.append(f"<details><summary class='note'>the top 10 as text</summary><ol>{''.join(items)}</ol>"
                     "</details>")
    if q_feat is not None and db_feat is not None and shown:
        try:
            top = int(shown[-1].ranks[qi][0])
            fig, inl = matches_figure(dataset, qi, top, q_feat[qi], db_feat[top], seed=seed, **verify_kw)
        except ImportError:
            pass
        else:
            kind = "positive" if top in (easy | hard) else "junk" if top in junk else "negative"
            top_rel = _rel(dataset.imlist[top], root)
            parts.append(f"<h3>Spatial verification with the top result of {_e(shown[-1].name)} "
                         f"({_e(top_rel)}, {kind}): {inl} inliers</h3>"
                         "<p class='note'>Affine RANSAC between the query's and the image's whole-image features; "
                         "green lines join the inlier matches.</p>"
                         f"<img src='data:image/jpeg;base64,{_jpeg_b64(fig, quality)}' width='{fig.shape[1]}' "
                         f"height='{fig.shape[0]}' alt='{_e(f'{rel}: matches with {top_rel}')}'>")
            n_img += 1
    parts.append("</section>")
    return n_img


def select_queries(n_total, max_queries=None, seed=0):
    """The query indices the report shows: all of them, or `max_queries` chosen at random with `seed`
    (sorted)."""
    if max_queries is None or int(max_queries) >= n_total:
        return np.arange(n_total)
    if int(max_queries) < 0:
        raise ValueError(f"max_queries must be >= 0, got {max_queries}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_total, size=int(max_queries), replace=False))


def _default_shown(results):
    return [r for r in results if r.name.startswith(("ASMK*", "R-ASMK* (gamma on)"))] or list(results[:2])


def write_report(report_dir, dataset, results, q_feat, db_feat, boxes, n_queries=None, seed=0, *,
                 max_queries=None, progress=True, jpeg_quality=85, show_methods=None, rerank_top=100,
                 match_distance=None, title="d2r retrieval report"):
    """Writes `report_dir/index.html`, one self-contained file (figures embedded as JPEG), and returns
    its path. Nothing else is written to `report_dir`.

    results: d2r.pipeline.MethodResult list; q_feat / db_feat: the query / database Features (for the
    spatial-verification figures; None leaves them out); boxes: per database image its (n, 4) regions.
    max_queries: show at most that many queries, chosen at random with `seed` (the page says so);
    default every query. `n_queries` is the former name of `max_queries` (positional, kept for
    compatibility). show_methods: the method names whose rankings are drawn (default ASMK* and
    R-ASMK* (gamma on), else the first two). rerank_top: the re-ranked depth, for the legend.
    match_distance: the descriptor-match distance of the spatial verification (as the pipeline's
    re-ranking used; default d2r.verify's). progress: a progress bar over the queries.
    """
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = list(results)
    if max_queries is None:
        max_queries = n_queries
    nq = len(dataset.qimlist)
    sample = select_queries(nq, max_queries, seed)
    if show_methods is None:
        shown = _default_shown(results)
    else:
        by_name = {r.name: r for r in results}
        missing = [n for n in show_methods if n not in by_name]
        if missing:
            raise ValueError(f"show_methods: no result named {missing}; have {list(by_name)}")
        shown = [by_name[n] for n in show_methods]
    verify_kw = {} if match_distance is None else {"max_distance": float(match_distance)}

    root = getattr(dataset, "root", None)
    ds_name = getattr(dataset, "name", None) or type(dataset).__name__
    n_db = len(dataset.imlist)
    have_families = bool(results) and bool(getattr(results[0], "per_family", None))

    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             "<meta name='viewport' content='width=device-width, initial-scale=1'><link rel='icon' href='data:,'>"
             f"<title>{_e(title)}: {_e(ds_name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>"]
    where = f" at <code>{_e(root)}</code>" if root is not None else ""
    if len(sample) == nq:
        showing = f"showing all {nq} queries"
    else:
        showing = (f"showing {len(sample)} of {nq} queries (chosen at random with seed {int(seed)}; "
                   f"max_queries={int(max_queries)})")
    drawn = ", ".join(_e(r.name) for r in shown) or "none"
    parts.append(
        f"<p>Dataset: <b>{_e(ds_name)}</b>{where}: {nq} queries, {n_db} database images. "
        f"{len(results)} method{'s' if len(results) != 1 else ''} compared on the Revisited Oxford / Paris "
        "protocols (Easy, Medium, Hard: see the <a href='#legend'>legend</a>).</p>"
        f"<p>This page shows the results table{', the mAP per query family' if have_families else ''}, "
        f"then, per query ({showing}), the query and the top 10 database images of {drawn} "
        "with positives, negatives, junk and regions marked, and the matched keypoints of spatial "
        "verification between the query and the top result.</p>")

    parts.append("<h2>Results</h2>")
    any_sv = _results_table(results, parts)
    _legend(results, any_sv, rerank_top, have_families, parts)
    if have_families:
        _family_table(dataset, results, parts)

    parts.append(f"<h2 id='queries'>Queries</h2><p>{showing[0].upper() + showing[1:]}.</p><ul>")
    for qi in sample:
        group, rel = _query_label(dataset, int(qi))
        label = f"{_e(group)} ({_e(rel)})" if group else _e(rel)
        parts.append(f"<li><a href='#q{int(qi)}'>Query {int(qi)}: {label}</a></li>")
    parts.append("</ul>")

    n_img = 0
    for qi in iterate(sample, len(sample), "report", progress, unit="query"):
        n_img += _query_section(dataset, int(qi), shown, q_feat, db_feat, boxes, seed, jpeg_quality, verify_kw,
                                parts)
    parts.append(f"<p class='note'>{n_img} figures.</p></body></html>")

    from d2r.core.atomic import atomic_write

    path = out / "index.html"
    with atomic_write(path) as f:
        f.write("\n".join(parts).encode("utf-8"))
    return path
