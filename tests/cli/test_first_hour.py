"""What a new user meets in the first hour (issue: tutorial, command line, report and errors): one
policy for unreadable images, command-line conventions (help with defaults, one-line errors, --quiet,
--json, exit codes), codebook and extractor fingerprints, old files still loading with a warning."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import d2r
from d2r import cli

cv2 = pytest.importorskip("cv2")
skdata = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three real photographs (scikit-image's), as JPEG files, plus a truncated, an empty and a
    non-image file."""
    d = tmp_path_factory.mktemp("photos")
    good = []
    for name in ("astronaut", "coffee", "chelsea"):
        p = d / f"{name}.jpg"
        cv2.imwrite(str(p), getattr(skdata, name)()[:, :, ::-1])
        good.append(p)
    data = good[0].read_bytes()
    (d / "bad").mkdir()
    truncated = d / "bad" / "truncated.jpg"
    truncated.write_bytes(data[: int(len(data) * 0.9)])   # cut to 90 %: decodable
    empty = d / "bad" / "empty.jpg"
    empty.write_bytes(b"")
    text = d / "bad" / "notes.jpg"
    text.write_text("not an image\n")
    return {"good": good, "truncated": truncated, "empty": empty, "text": text, "dir": d}


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _error_lines(err):
    return [line for line in err.splitlines() if ": error:" in line or "internal error" in line]


# ---- unreadable images: one policy --------------------------------------------------------------------
def test_truncated_jpeg_is_decoded_with_a_warning(photos):
    from d2r.extract import RootSIFT, TruncatedImageWarning, load_image_rgb

    with pytest.warns(TruncatedImageWarning, match="truncated"):
        img = load_image_rgb(photos["truncated"])
    full = load_image_rgb(photos["good"][0])
    assert img.shape == full.shape
    # the rows that were in the file decode as before (JPEG blocks: compare the top half)
    top = img.shape[0] // 2
    assert np.abs(img[:top].astype(int) - full[:top].astype(int)).max() <= 2
    with pytest.warns(TruncatedImageWarning):
        f = RootSIFT(max_features=300)(photos["truncated"])
    assert len(f.descriptors) == 300


def test_extract_many_skips_lists_and_warns(photos):
    from d2r.extract import (ImageLoadError, NoUsableImagesError, RootSIFT, UnreadableImagesWarning,
                             extract_many)

    sift = RootSIFT(max_features=200)
    images = [photos["good"][0], photos["empty"], photos["good"][1], photos["text"], photos["truncated"]]
    with pytest.warns(UnreadableImagesWarning, match="2 of 5 images could not be read"):
        out = extract_many(sift, images, progress=False)
    assert out.kept == [0, 2, 4] and out.images == [images[0], images[2], images[4]]
    assert [e[0] for e in out.errors] == [str(photos["empty"]), str(photos["text"])]
    assert "empty" in out.errors[0][1] and "decode" in out.errors[1][1]
    np.testing.assert_array_equal(out[1].descriptors, sift(photos["good"][1]).descriptors)
    with pytest.raises(ImageLoadError, match="empty"):
        extract_many(sift, images, progress=False, on_error="raise")
    with pytest.raises(NoUsableImagesError, match="none of the 2 images"):
        extract_many(sift, [photos["empty"], photos["text"]], progress=False)
    with pytest.raises(ValueError, match="on_error"):
        extract_many(sift, images, on_error="ignore")


def test_extract_many_policy_is_the_same_in_worker_processes(photos):
    from d2r.extract import RootSIFT, extract_many

    sift = RootSIFT(max_features=100)
    images = [photos["good"][0], photos["empty"], photos["truncated"]]
    with pytest.warns(UserWarning) as caught:
        out = extract_many(sift, images, workers=2, progress=False)
    names = {type(w.message).__name__ for w in caught}
    assert {"TruncatedImageWarning", "UnreadableImagesWarning"} <= names
    assert out.kept == [0, 2] and [e[0] for e in out.errors] == [str(photos["empty"])]


@pytest.mark.parametrize("out_name", ["store", "features.npz"])
def test_cli_extract_policy(photos, tmp_path, capsys, out_name):
    out = tmp_path / out_name
    rc, stdout, err = _run(capsys, "extract", photos["dir"], "--out", out, "-q", "--max-features", "100")
    assert rc == 0
    # both unreadable files are named on stderr, the truncated one is used with a one-line warning
    assert f"skipped {photos['empty']}" in err and f"skipped {photos['text']}" in err
    assert any("warning:" in line and "truncated" in line for line in err.splitlines())
    assert "4 images stored" in stdout and "2 unreadable" in stdout
    info = d2r.store_info(out)
    assert info["images"] == 4 and sorted(e[0] for e in info["errors"]) == sorted(
        [str(photos["empty"]), str(photos["text"])])
    assert info["extractor"]["name"] == "RootSIFT"
    # names are absolute: the store works from any folder
    names, _ = d2r.load_features(out)
    assert all(n.startswith("/") for n in names)
    # nothing usable: exit status 1, one error line
    rc, _, err = _run(capsys, "extract", photos["empty"], photos["text"], "--out", tmp_path / ("b" + out_name), "-q")
    assert rc == 1 and len(_error_lines(err)) == 1 and "none of the 2 images could be read" in err
    # --strict stops at the first unreadable image
    rc, _, err = _run(capsys, "extract", photos["good"][0], photos["empty"], "--strict", "--out",
                      tmp_path / ("s" + out_name), "-q")
    assert rc == 1 and "--strict" in err and str(photos["empty"]) in err


def test_cli_extract_json(photos, tmp_path, capsys):
    rc, stdout, err = _run(capsys, "extract", photos["good"][0], photos["empty"], "--out", tmp_path / "s", "--json")
    assert rc == 0
    doc = json.loads(stdout)
    assert doc["images_stored"] == 1 and doc["skipped"][0]["image"] == str(photos["empty"])
    assert "extract" in err     # progress bars and warnings go to stderr: stdout is only the JSON document


# ---- the four steps, search output, errors ------------------------------------------------------------
@pytest.fixture(scope="module")
def built(photos, tmp_path_factory):
    d = tmp_path_factory.mktemp("built")
    assert cli.main(["extract", *map(str, photos["good"]), "--out", str(d / "store"), "-q", "--max-features",
                     "300"]) == 0
    assert cli.main(["train-codebook", str(d / "store"), "--words", "32", "--out", str(d / "cb.npy"), "-q"]) == 0
    assert cli.main(["index", str(d / "store"), "--codebook", str(d / "cb.npy"), "--out", str(d / "db.d2r"),
                     "-q"]) == 0
    return d


def test_search_explains_its_output_and_skips_bad_queries(built, photos, capsys):
    rc, out, err = _run(capsys, "search", built / "db.d2r", photos["good"][1], photos["text"], "-k", "3", "-q")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("# score: ASMK* similarity") and "1 = the same image" in lines[0]
    assert lines[1].startswith("# norm: ") and "1 = the query image itself" in lines[1]
    assert lines[2] == f"query: {photos['good'][1]} (300 features)"
    assert lines[3].split() == ["rank", "score", "norm", "image"]
    assert lines[4].split() == ["1", "1.0000", "1.000", str(photos["good"][1])]       # itself first, by name
    assert f"skipped {photos['text']}" in err
    rc, out, err = _run(capsys, "search", built / "db.d2r", photos["text"])
    assert rc == 1 and _error_lines(err) == ["d2r search: error: no query image could be read"]


def test_search_json_and_rerank(built, photos, capsys):
    rc, out, _ = _run(capsys, "search", built / "db.d2r", photos["good"][2], "-k", "2", "--json", "--rerank",
                      "--features", built / "store")
    assert rc == 0
    doc = json.loads(out)
    res = doc["queries"][0]["results"]
    assert doc["reranked"] and [r["rank"] for r in res] == [1, 2]
    assert res[0]["name"] == str(photos["good"][2]) and res[0]["inliers"] >= 100 > res[1]["inliers"]
    assert abs(res[0]["score"] - 1.0) < 1e-5 and abs(res[0]["normalized"] - 1.0) < 1e-5
    assert 0 <= res[1]["normalized"] < 1
    rc, _, err = _run(capsys, "search", built / "db.d2r", photos["good"][2], "--rerank")
    assert rc == 2 and "--features STORE" in err


def test_search_expand_and_rerank_rule(built, photos, capsys):
    """--expand runs the expanded search (the query itself stays first); --rerank-rule official and the
    fused default agree where the verified match has by far the most inliers."""
    for e in ("hqe", "aqe"):
        rc, out, _ = _run(capsys, "search", built / "db.d2r", photos["good"][2], "-k", "3", "--json", "--expand", e)
        assert rc == 0
        doc = json.loads(out)
        assert doc["expand"] == e and doc["queries"][0]["results"][0]["name"] == str(photos["good"][2])
    firsts = []
    for rule in ("official", "fused"):
        rc, out, _ = _run(capsys, "search", built / "db.d2r", photos["good"][2], "-k", "2", "--json", "--rerank",
                          "--features", built / "store", "--rerank-rule", rule)
        assert rc == 0
        firsts.append(json.loads(out)["queries"][0]["results"][0]["name"])
    assert firsts == [str(photos["good"][2])] * 2


def test_search_warns_about_missing_or_foreign_names(built, photos, capsys, tmp_path):
    import shutil

    shutil.copy(built / "db.d2r", tmp_path / "db.d2r")
    rc, out, err = _run(capsys, "search", tmp_path / "db.d2r", photos["good"][0], "-k", "1", "-q")
    assert rc == 0 and "names.txt is missing" in err and "id 0" in out
    (tmp_path / "db.d2r.names.txt").write_text("only-one-name.jpg\n")
    rc, out, err = _run(capsys, "search", tmp_path / "db.d2r", photos["good"][0], "-k", "3", "-q")
    assert rc == 0 and "does not belong to this index" in err


@pytest.mark.parametrize("case", ["empty-store", "text-npy", "missing-folder", "zero-words", "foreign-index",
                                  "missing-image"])
def test_cli_errors_are_one_line_naming_problem_and_fix(built, photos, tmp_path, capsys, case):
    if case == "empty-store":
        _run(capsys, "extract", photos["empty"], "--out", tmp_path / "st", "-q")
        argv, want = ["train-codebook", tmp_path / "st", "--out", tmp_path / "cb.npy"], "holds no images"
    elif case == "text-npy":
        (tmp_path / "cb.npy").write_text("1 2 3\n")
        argv, want = (["index", built / "store", "--codebook", tmp_path / "cb.npy", "--out", tmp_path / "x.d2r"],
                      "not a codebook (.npy) file")
    elif case == "missing-folder":
        argv, want = (["index", built / "store", "--codebook", built / "cb.npy", "--out", tmp_path / "no" / "x.d2r"],
                      "does not exist; create it first")
    elif case == "zero-words":
        argv, want = ["train-codebook", built / "store", "--words", "0", "--out", tmp_path / "c.npy"], "at least 1"
    elif case == "foreign-index":
        (tmp_path / "x.d2r").write_bytes(b"PK\x03\x04 a zip file")
        argv, want = ["search", tmp_path / "x.d2r", photos["good"][0]], "not a d2r index file"
    else:
        argv, want = ["search", built / "db.d2r", tmp_path / "nope.jpg"], "no such image"
    rc, out, err = _run(capsys, *argv, "-q")
    lines = _error_lines(err)
    assert rc == 2 and len(lines) == 1 and want in lines[0], err
    for leak in ("allow_pickle", "concatenate", "Traceback", ".tmp"):
        assert leak not in err


def test_third_party_errors_are_explained(built, capsys, monkeypatch):
    """An exception raised inside another package (a bug on d2r's side) is reported as an internal error
    naming that package, with the way to get the traceback, not passed through as if it were advice."""
    import d2r.workflows.pipeline

    def broken(*a, **k):
        np.vstack([])

    monkeypatch.setattr(d2r.workflows.pipeline, "train_codebook", broken)
    rc, _, err = _run(capsys, "train-codebook", built / "store", "--words", "8", "--out", built / "c8.npy", "-q")
    assert rc == 3 and "internal error in numpy" in err and "D2R_DEBUG=1" in err


def test_help_states_defaults_and_describes_every_option():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        text = p.format_help()
        for action in p._actions:
            if action.dest == "help":
                continue
            assert action.help, (name, action.dest)
            if action.default not in (None, False) and action.option_strings:
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)
    assert "folder:ROOT:PAIRS.csv" in " ".join(sub.choices["demo"].format_help().split())
    assert "CSV of query,positive" in " ".join(sub.choices["demo"].format_help().split())


def test_quiet_silences_progress(photos, tmp_path, capsys, monkeypatch):
    # stderr is not a terminal here: progress is a plain line per D2R_PROGRESS_INTERVAL seconds
    monkeypatch.setenv("D2R_PROGRESS_INTERVAL", "0.001")
    rc, out, err = _run(capsys, "extract", *photos["good"][:2], "--out", tmp_path / "s", "-q")
    assert rc == 0 and err == ""
    rc, out, err = _run(capsys, "extract", *photos["good"][2:], "--out", tmp_path / "s")
    assert rc == 0 and "d2r: extract: " in err and "%" in err     # progress without --quiet


# ---- fingerprints -------------------------------------------------------------------------------------
def _two_codebooks(dim=16, words=8):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((words, dim)).astype(np.float32)
    b = a.copy()
    b[0, 0] += 1e-3          # same shape, one value differs
    return d2r.Codebook(a), d2r.Codebook(b)


def test_codebook_fingerprint_is_content_based(tmp_path):
    ca, cb = _two_codebooks()
    assert ca.fingerprint != cb.fingerprint and len(ca.fingerprint) == 16
    ca.save(tmp_path / "a.npy")
    assert d2r.Codebook.load(tmp_path / "a.npy").fingerprint == ca.fingerprint
    assert d2r.Codebook(ca.centroids.astype(np.float64)).fingerprint == ca.fingerprint


def test_aggregated_data_of_another_codebook_is_refused():
    ca, cb = _two_codebooks()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 16)).astype(np.float32)
    index = d2r.Index(ca, "asmk*")
    index.add([x, x[:20]])
    agg_other = d2r.aggregate(x, cb, "asmk*")
    assert agg_other.fingerprint == cb.fingerprint
    with pytest.raises(ValueError, match=f"codebook {cb.fingerprint}.*codebook {ca.fingerprint}"):
        index.search_aggregated(agg_other)
    with pytest.raises(ValueError, match=cb.fingerprint):
        index.add_aggregated([agg_other])
    assert len(index) == 2
    s, i = index.search_aggregated(d2r.aggregate(x, ca, "asmk*"), k=1)
    assert i[0] == 0 and abs(s[0] - 1) < 1e-5
    # assignments: the optional fingerprint is checked
    a_other, _ = cb.quantize(x)
    with pytest.raises(ValueError, match=f"{cb.fingerprint}.*{ca.fingerprint}"):
        index.search(x, assignments=a_other, fingerprint=cb.fingerprint)
    with pytest.raises(ValueError, match=cb.fingerprint):
        index.add(x, assignments=a_other, fingerprint=cb.fingerprint)
    a_same, _ = ca.quantize(x)
    np.testing.assert_array_equal(index.search(x, assignments=a_same, fingerprint=ca.fingerprint)[1],
                                  index.search(x)[1])
    # mixing codebooks in one batch
    with pytest.raises(ValueError, match="different codebooks"):
        d2r.AggregatedBatch.from_list([agg_other, d2r.aggregate(x, ca, "asmk*")])


def _rewrite_as_version_1(path):
    """The index file as d2r format 1 wrote it: plain posting arrays, no codebook fingerprint, version 1
    in the prefix."""
    from d2r.core import index_io

    idx = d2r.Index.load(path)
    ex = idx._ivf.export()
    meta = dict(idx._meta(), next_id=int(ex["next_id"]), d2r_format=1)
    meta.pop("codebook_fingerprint")
    index_io.write_index_file(path, meta, {"centroids": idx.codebook.centroids, "image_ids": ex["image_ids"],
                                           "word_counts": ex["word_counts"], "offsets": ex["offsets"],
                                           "slots": ex["slots"], "codes": ex["codes"]}, version=1)


def test_index_file_carries_the_codebook_fingerprint_and_old_files_load(tmp_path):
    ca, _ = _two_codebooks()
    x = np.random.default_rng(2).standard_normal((40, 16)).astype(np.float32)
    index = d2r.Index(ca, "asmk*")
    index.add([x, x[:10]])
    index.extractor = {"name": "RootSIFT", "params": {"max_features": 5}, "fingerprint": "0123456789abcdef"}
    index.save(tmp_path / "db.d2r")
    raw = (tmp_path / "db.d2r").read_bytes()
    assert struct.unpack_from("<I", raw, 8)[0] == d2r.core.index_io.FORMAT_VERSION and ca.fingerprint.encode() in raw
    back = d2r.Index.load(tmp_path / "db.d2r")
    assert back.codebook.fingerprint == ca.fingerprint and back.extractor == index.extractor
    _rewrite_as_version_1(tmp_path / "db.d2r")
    with pytest.warns(d2r.FormatWarning, match="older d2r"):
        old = d2r.Index.load(tmp_path / "db.d2r")
    np.testing.assert_array_equal(old.search(x, k=2)[1], index.search(x, k=2)[1])
    old.save(tmp_path / "again.d2r")                      # saving upgrades it
    import warnings as w
    with w.catch_warnings():
        w.simplefilter("error")
        d2r.Index.load(tmp_path / "again.d2r")


def test_feature_store_fingerprint_and_old_stores(photos, tmp_path):
    from d2r.extract import RootSIFT, describe
    from d2r.extract.store import StoreMismatchError
    from d2r.workflows.collection import extract_dataset

    a, b = RootSIFT(max_features=50), RootSIFT(max_features=80)
    assert describe(a)["fingerprint"] == describe(b)["fingerprint"]     # only the count differs: comparable
    c = RootSIFT(max_features=50, sigma=2.0)
    assert describe(c)["fingerprint"] != describe(a)["fingerprint"]
    extract_dataset(photos["good"][:1], tmp_path / "s", a, progress=False)
    extract_dataset(photos["good"][1:2], tmp_path / "s", b, progress=False)
    with pytest.raises(StoreMismatchError, match="sigma=1.6.*not of RootSIFT.*sigma=2.0"):
        extract_dataset(photos["good"][2:], tmp_path / "s", c, progress=False)
    # a store of an older d2r (no extractor record) loads, with a warning
    old = tmp_path / "old.npz"
    with np.load(next((tmp_path / "s").glob("shard-*.npz"))) as z:
        arrays = {k: z[k] for k in z.files if k != "extractor"}
    np.savez(old, **arrays)
    with pytest.warns(d2r.FormatWarning, match="older d2r"):
        names, feats = d2r.load_features(old)
    assert len(names) == 1
    # an older store extended by this d2r: the new shards record the extractor, the store stays usable
    # and keeps checking new extractions against that record
    store = tmp_path / "old-store"
    store.mkdir()
    np.savez(store / "shard-00000.npz", **arrays)
    with pytest.warns(d2r.FormatWarning, match="new shards will record"):
        extract_dataset(photos["good"][1:2], store, a, progress=False)
    info = d2r.store_info(store)
    assert info["images"] == 2 and not info["recorded"] and info["extractor"]["fingerprint"] == describe(a)["fingerprint"]
    with pytest.warns(d2r.FormatWarning, match="older d2r"):
        assert len(d2r.load_features(store)[0]) == 2
    with pytest.raises(StoreMismatchError, match="sigma=2.0"), pytest.warns(d2r.FormatWarning):
        extract_dataset(photos["good"][2:], store, c, progress=False)


def test_search_refuses_queries_of_another_extractor(built, photos, capsys, tmp_path):
    import shutil

    index = d2r.Index.load(built / "db.d2r")
    assert index.extractor["name"] == "RootSIFT"
    index.extractor = {**index.extractor, "fingerprint": "ffffffffffffffff"}   # say: another extractor
    index.save(tmp_path / "db.d2r")
    shutil.copy(built / "db.d2r.names.txt", tmp_path / "db.d2r.names.txt")
    rc, _, err = _run(capsys, "search", tmp_path / "db.d2r", photos["good"][0], "-q")
    assert rc == 2 and "ffffffffffffffff" in err and "use the same extractor" in err


def test_unpickled_arrays_are_accepted():
    """An unpickled float32 array has its own (equal) dtype object; the native checks compare dtypes by
    equivalence, not identity."""
    import pickle

    ca, _ = _two_codebooks()
    x = np.random.default_rng(3).standard_normal((30, 16)).astype(np.float32)
    y = pickle.loads(pickle.dumps(x))
    index = d2r.Index(ca, "asmk*")
    index.add([y])
    np.testing.assert_array_equal(ca.quantize(y)[0], ca.quantize(x)[0])
    s, i = index.search(y, k=1)
    assert i[0] == 0 and abs(s[0] - 1) < 1e-5
