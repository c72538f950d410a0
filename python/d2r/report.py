"""A self-contained HTML report (with PNG figures) of a pipeline run: for a sample of queries, the
query with its box and the top-10 results of each shown method with their regions, positives and
negatives marked, and the matched keypoints of spatial verification. Opens in a browser with no
server (images are embedded as base64; the PNG files are written beside it too)."""
from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

GREEN, RED, GREY, BLUE, YELLOW = (40, 170, 40), (210, 40, 40), (150, 150, 150), (40, 90, 220), (230, 190, 0)


def _cv2():
    import cv2

    return cv2


def _load(path):
    from .regions import _load_image_rgb

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


def _png(img, path):
    cv2 = _cv2()
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    Path(path).write_bytes(buf.tobytes())
    return base64.b64encode(buf.tobytes()).decode("ascii")


def ranking_strip(dataset, qi, ranks, gnd, boxes, height=140, top=10):
    """The query (with its bbx) followed by the top results: green = positive, red = negative,
    grey = junk; detected regions in blue."""
    q = _load(dataset.qimlist[qi])
    qt, s = _thumb(q, height)
    bbx = gnd[qi].get("bbx") if isinstance(gnd[qi], dict) else None
    if bbx is not None:
        _draw_boxes(qt, [bbx], s, YELLOW, 3)
    pos = set(gnd[qi].get("easy", [])) | set(gnd[qi].get("hard", []))
    junk = set(gnd[qi].get("junk", []))
    tiles = [_frame(qt, YELLOW)]
    for j in ranks[qi][:top]:
        im = _load(dataset.imlist[j])
        t, s = _thumb(im, height)
        if boxes is not None and len(boxes[j]):
            _draw_boxes(t, boxes[j], s, BLUE, 2)
        color = GREEN if j in pos else (GREY if j in junk else RED)
        tiles.append(_frame(t, color))
    return _hstack(tiles)


def matches_figure(dataset, qi, dbi, q_feat, db_feat, height=320, seed=0):
    """Side by side query / database image with the inlier matches of spatial verification."""
    cv2 = _cv2()
    from .verify import verify_pair

    qa, da = _load(dataset.qimlist[qi]), _load(dataset.imlist[dbi])
    qt, sq = _thumb(qa, height)
    dt, sd = _thumb(da, height)
    canvas = _hstack([qt, dt], gap=10)
    res = verify_pair(q_feat, db_feat, seed=seed)
    off = qt.shape[1] + 10
    for (a, b), good in zip(res.matches, res.inlier_mask):
        if not good:
            continue
        ya, xa = q_feat.locations[a]
        yb, xb = db_feat.locations[b]
        cv2.line(canvas, (int(xa * sq), int(ya * sq)), (int(xb * sd) + off, int(yb * sd)), GREEN, 1, cv2.LINE_AA)
    inliers = res.inliers
    return canvas, int(inliers)


def write_report(report_dir, dataset, results, q_feat, db_feat, boxes, n_queries=6, seed=0):
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    nq = len(dataset.qimlist)
    sample = np.sort(rng.choice(nq, size=min(n_queries, nq), replace=False))
    shown = [r for r in results if r.name.startswith(("ASMK*", "R-ASMK* (gamma on)"))] or results[:2]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>d2r report</title>",
             "<style>body{font-family:sans-serif;margin:24px} img{max-width:100%;border:1px solid #ddd}"
             "table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "</style></head><body><h1>d2r retrieval report</h1>",
             "<p>Frames: <b style='color:#28aa28'>green</b> positive, <b style='color:#d22828'>red</b> negative, "
             "<b style='color:#969696'>grey</b> junk; yellow: the query and its box; blue: database regions.</p>",
             "<h2>Results</h2><table><tr><th>method</th><th>mAP Easy</th><th>mAP Medium</th><th>mAP Hard</th>"
             "<th>mP@10 Medium</th><th>entries</th><th>bytes / image</th><th>query ms</th></tr>"]
    for r in results:
        parts.append(f"<tr><td style='text-align:left'>{html.escape(r.name)}</td>" + "".join(
            f"<td>{100 * r.results[p]['map']:.1f}</td>" for p in ("easy", "medium", "hard")) +
            f"<td>{100 * r.results['medium']['mp'][-1]:.1f}</td><td>{r.entries}</td>"
            f"<td>{r.bytes_per_image:.0f}</td><td>{r.query_ms:.2f}</td></tr>")
        if r.reranked is not None:
            parts.append(f"<tr><td style='text-align:left'>&nbsp;&nbsp;+ spatial verification</td><td></td>"
                         f"<td>{100 * r.reranked['medium']['map']:.1f}</td><td>{100 * r.reranked['hard']['map']:.1f}</td>"
                         f"<td>{100 * r.reranked['medium']['mp'][-1]:.1f}</td><td></td><td></td><td></td></tr>")
    parts.append("</table>")
    for qi in sample:
        parts.append(f"<h2>Query {qi}: {html.escape(str(Path(dataset.qimlist[qi]).name))}</h2>")
        for r in shown:
            strip = ranking_strip(dataset, qi, r.ranks, dataset.gnd, boxes)
            name = f"q{qi:03d}_{''.join(c for c in r.name if c.isalnum())}.png"
            b64 = _png(strip, out / name)
            ap = r.results["medium"]["aps"][qi]
            parts.append(f"<h3>{html.escape(r.name)} (AP Medium {100 * ap:.1f})</h3>"
                         f"<img src='data:image/png;base64,{b64}' alt='{name}'>")
        try:
            top = int(shown[-1].ranks[qi][0])
            fig, inl = matches_figure(dataset, qi, top, q_feat[qi], db_feat[top], seed=seed)
            name = f"q{qi:03d}_matches.png"
            b64 = _png(fig, out / name)
            parts.append(f"<h3>Spatial verification with the top result: {inl} inliers</h3>"
                         f"<img src='data:image/png;base64,{b64}' alt='{name}'>")
        except ImportError:
            pass
    parts.append("</body></html>")
    path = out / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
