"""The HTML report (d2r.report.write_report) on real pipeline results for the 12-query demo set: one
self-contained file, a legend for every metric / column / method on the page, every query named by
object and path, the per-family table, the sampling note when `max_queries` caps the queries, the Easy
cell of the spatial-verification rows; and the page as a person sees it, rendered by headless Chromium
(selenium + chromedriver): no console errors, every image decoded, a screenshot that is not blank.

Input: d2r.pipeline.run on the demo set at 512 px (two methods, ASMK* and R-ASMK* (gamma on), a
256-word codebook, spatial re-ranking), about 30 s on 2 cores, run once for the module."""
import base64
import dataclasses
import io
import re
import shutil

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2", reason="the pipeline and the report need opencv-python-headless")
pytest.importorskip("skimage", reason="the demo set is built from scikit-image's photos")

from d2r.workflows import report  # noqa: E402

METHODS = ("ASMK*", "R-ASMK* (gamma on)")
FIGURES_PER_QUERY = len(METHODS) + 1  # one ranking strip per shown method + the spatial-verification figure


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from d2r import Codebook
    from d2r.datasets import make_demo_set
    from d2r.extract import RootSIFT
    from d2r.workflows.pipeline import default_methods, run
    from d2r.core.verify import rerank_protocol

    ds = make_demo_set(root=tmp_path_factory.mktemp("data"), size=512)
    assert len(ds.qimlist) == 12
    # a codebook from every 6th database image, so that run() can be given just two methods
    sift = RootSIFT(max_features=1000)
    cb = Codebook.train(np.vstack([sift(p).descriptors for p in ds.imlist[::6]]), 256, niter=10, seed=0)
    methods = [m for m in default_methods(cb) if m[0] in METHODS]
    res = run(ds, extractor=sift, codebook=cb, methods=methods, rerank=True, progress=False, out=io.StringIO())
    results = res["methods"]
    assert [r.name for r in results] == list(METHODS)
    # the Easy protocol's re-ranking: the pipeline computes it (protocols easy, medium, hard); compute it
    # here the same way where it does not, so that the filled Easy cell is tested either way
    a = results[0]
    if "easy" not in a.reranked:
        a.reranked = rerank_protocol(a.ranks, a.scores, res["query_features"], res["db_features"], ds.gnd,
                                     seed=0, max_distance=sift.match_distance,
                                     protocols=("easy", "medium", "hard"))
    # and a copy of the second method's result without it: the "–" cell and its footnote
    b = results[1]
    b = dataclasses.replace(b, reranked={k: v for k, v in b.reranked.items() if k != "easy"})
    return {"ds": ds, "results": [a, b], "q_feat": res["query_features"], "db_feat": res["db_features"],
            "boxes": res["boxes"], "match_distance": sift.match_distance}


def _write(demo, folder, results=None, **kw):
    return report.write_report(folder, demo["ds"], results if results is not None else demo["results"],
                               demo["q_feat"], demo["db_feat"], demo["boxes"], progress=False,
                               match_distance=demo["match_distance"], **kw)


@pytest.fixture(scope="module")
def page(demo, tmp_path_factory):
    path = _write(demo, tmp_path_factory.mktemp("report"))
    return path, path.read_text(encoding="utf-8")


def _query_names(ds, qi):
    return ds.query_groups[qi], f"images/{ds.query_groups[qi]}/query.jpg"


def test_one_self_contained_file(page):
    path, text = page
    assert [p.name for p in path.parent.iterdir()] == ["index.html"]
    srcs = re.findall(r"<img [^>]*src='([^']*)'", text)
    assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    assert "data:image/png" not in text
    for s in srcs[:3]:   # real JPEGs that decode
        img = cv2.imdecode(np.frombuffer(base64.b64decode(s.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
        assert img is not None and img.shape[0] >= 100
    assert path.stat().st_size < 6e6   # 12 queries, 36 figures: about 1.5 MB at 512 px


def test_intro_legend_and_tables(demo, page):
    _, text = page
    ds = demo["ds"]
    assert "12 queries" in text and f"{len(ds.imlist)} database images" in text and "showing all 12 queries" in text
    assert "id='legend'" in text
    legend = text[text.index("id='legend'"):text.index("id='families'")]
    for term in ("Easy", "Medium", "Hard", "mAP", "mP@10", "entries", "bytes / image", "query ms",
                 "+ spatial verification", "hard positives are ignored", "easy positives are ignored",
                 "one per region", "Median search latency", "affine RANSAC"):
        assert term in legend, term
    for name in METHODS:   # every method named and described (HTML-escaped)
        assert f"<dt>{report._e(name)}</dt><dd>{report._e(report.describe_method(name))}</dd>" in legend
    assert report.describe_method("ASMK*") != report.describe_method("R-ASMK* (gamma on)")
    # the per-family table: the demo set's one family, its 12 queries, both methods
    fam = text[text.index("id='family-table'"):]
    fam = fam[:fam.index("</table>")]
    assert ">objects</td><td rowspan='2'>12</td>" in fam and all(report._e(n) in fam for n in METHODS)
    a, b = demo["results"]
    assert report._pct(a.per_family["objects"]["hard"]["map"]) in fam


def test_spatial_verification_easy_cell(demo, page):
    _, text = page
    a, b = demo["results"]
    rows = re.findall(r"<tr class='sv'>(.*?)</tr>", text)
    assert len(rows) == 2
    cells = [re.findall(r"<td>(.*?)</td>", r) for r in rows]
    assert cells[0][0] == report._pct(a.reranked["easy"]["map"])            # shown when computed
    assert cells[0][1] == report._pct(a.reranked["medium"]["map"])
    assert cells[1][0].startswith("\u2013") and "#fn-sv" in cells[1][0]     # else "–" with a footnote
    assert "id='fn-sv'" in text and "Medium and Hard protocols only" in text


def test_every_query_named(demo, page):
    _, text = page
    ds = demo["ds"]
    heads = re.findall(r"<section class='query' id='q(\d+)'><h2>(.*?)</h2>", text)
    assert [int(q) for q, _ in heads] == list(range(12))
    for qi, h in heads:
        group, rel = _query_names(ds, int(qi))
        assert group in h and rel in h, h
    assert len(re.findall(r"<img ", text)) == 12 * FIGURES_PER_QUERY


def test_max_queries_unknown_method_no_families(demo, tmp_path):
    ds = demo["ds"]
    a, b = demo["results"]
    odd = dataclasses.replace(b, name="<my method>", per_family={})
    results = [dataclasses.replace(a, per_family={}), odd]
    path = _write(demo, tmp_path / "r", results=results, max_queries=5, seed=3, show_methods=["ASMK*"])
    text = path.read_text(encoding="utf-8")
    assert "showing 5 of 12 queries (chosen at random with seed 3; max_queries=5)" in text
    chosen = report.select_queries(12, 5, 3)
    heads = [int(q) for q in re.findall(r"<section class='query' id='q(\d+)'>", text)]
    assert heads == chosen.tolist() and len(set(heads)) == 5
    assert len(re.findall(r"<img ", text)) == 5 * 2
    assert "&lt;my method&gt;" in text and "<my method>" not in text           # escaped
    assert report.describe_method("<my method>") == report._UNKNOWN_METHOD
    assert report._e(report._UNKNOWN_METHOD) in text
    assert "id='family-table'" not in text
    assert [p.name for p in path.parent.iterdir()] == ["index.html"]
    # n_queries, the former positional name, still caps
    path2 = report.write_report(tmp_path / "r2", ds, results, demo["q_feat"], demo["db_feat"], demo["boxes"], 2,
                                progress=False)
    assert "showing 2 of 12 queries (chosen at random with seed 0; max_queries=2)" in path2.read_text()


def test_public_figures(demo):
    ds = demo["ds"]
    a = demo["results"][0]
    strip = report.ranking_strip(ds, 0, a.ranks, ds.gnd, demo["boxes"])
    assert strip.ndim == 3 and strip.shape[0] == 140 and strip.shape[1] > 11 * 50
    top = int(a.ranks[0][0])
    fig, inl = report.matches_figure(ds, 0, top, demo["q_feat"][0], demo["db_feat"][top],
                                     max_distance=demo["match_distance"])
    assert fig.shape[0] == 320 and inl >= 0


# ------------------------------------------------------------------------------------------- browser

INSTALL = ("install them with `sudo apt-get install -y chromium chromium-driver` (Debian/Ubuntu) and "
           "`pip install selenium`")


def _browser():
    """(chromium binary, chromedriver) or pytest.skip naming what is missing."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    chrome = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                  None)
    if chrome is None:
        missing.append("a Chromium browser (chromium)")
    driver = shutil.which("chromedriver")
    if driver is None:
        missing.append("chromedriver (Debian package chromium-driver)")
    if missing:
        pytest.skip(f"the browser check of the report needs {', '.join(missing)}: {INSTALL}")
    return chrome, driver


def test_report_as_seen_in_a_browser(demo, page, tmp_path):
    chrome, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    path, _ = page
    ds = demo["ds"]
    opts = Options()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    except Exception as exc:  # e.g. a chromedriver of another version than the browser
        pytest.skip(f"cannot start headless Chromium through chromedriver ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); {INSTALL}")
    try:
        driver.set_page_load_timeout(60)
        driver.get(path.resolve().as_uri())
        driver.execute_script("return document.fonts ? document.fonts.ready : null")
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, "
            "i.getBoundingClientRect().width, i.alt])")
        assert len(images) == 12 * FIGURES_PER_QUERY
        bad = [alt for ok, width, alt in images if not ok or width <= 0]
        assert not bad, f"images that did not decode or have no size: {bad}"
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not severe, severe
        # what a reader sees: the legend and every query's name
        assert driver.find_element(By.ID, "legend").is_displayed()
        seen = driver.execute_script("return document.body.innerText")
        for term in ("Legend", "Easy", "Medium", "Hard", "mP@10", "bytes / image", "query ms", "entries",
                     "mAP per query family", "showing all 12 queries", *METHODS):
            assert term in seen, term
        for qi in range(12):
            group, rel = _query_names(ds, qi)
            assert f"Query {qi}: {group} ({rel})" in seen
        # a full-page screenshot
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        height = driver.execute_script("return document.documentElement.scrollHeight")
    finally:
        driver.quit()
    png = base64.b64decode(shot["data"])
    (tmp_path / "report.png").write_bytes(png)
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[0] >= min(height, 5000) and img.shape[1] >= 1000
    colours = np.unique(img.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 1000, f"the screenshot has {len(colours)} distinct colours: blank?"
    assert (img < 240).any(axis=2).mean() > 0.05   # not an all-white page


def test_top_ten_text_shows_raw_and_normalized_scores(demo, page):
    """Each listed result carries its raw score and the normalised one (1 = the query image itself);
    the legend explains both (issue 26: raw scores are hard to read)."""
    _, text = page
    a, b = demo["results"]
    assert a.normalized is not None and a.normalized.shape == a.scores.shape
    assert np.all((a.normalized >= 0) & (a.normalized <= 1 + 1e-6))
    first = text[text.index("id='q0'"):]
    first = first[first.index("<ol>"):first.index("</ol>")]
    items = re.findall(r"<li>(.*?)</li>", first)
    assert len(items) == 10
    assert f"; score {a.scores[0][0]:.4f}, norm {a.normalized[0][0]:.3f})" in items[0], items[0]
    legend = text[text.index("id='legend'"):]
    assert "<dt>norm</dt>" in legend and "1 = the query image itself" in legend and "<dt>score</dt>" in legend
