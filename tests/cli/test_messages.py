"""The messages of issue 26: what a resumed extraction kept, added and could not read; the score
header's kernel named as the docs name it; the files of an image folder that are not images named;
descriptor dimensions written as numbers; pytest's skip reasons shown with -q."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from d2r.cli import main

cv2 = pytest.importorskip("cv2", reason="extraction needs opencv-python-headless")
ROOT = Path(__file__).resolve().parents[2]


def _images(folder: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    base = np.full((200, 260, 3), 128, np.uint8)
    for _ in range(60):   # shapes with corners and blobs: a few hundred SIFT features
        x, y = int(rng.integers(0, 240)), int(rng.integers(0, 180))
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            cv2.rectangle(base, (x, y), (x + int(rng.integers(5, 30)), y + int(rng.integers(5, 30))), c, -1)
        else:
            cv2.circle(base, (x, y), int(rng.integers(3, 15)), c, -1)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"img{i:02d}.png"
        cv2.imwrite(str(p), np.roll(base, 11 * i, axis=1))
        out.append(str(p))
    return out


def test_resumed_extraction_says_what_it_kept_added_and_skipped(tmp_path, capsys):
    from d2r.extract import RootSIFT, UnreadableImagesWarning
    from d2r.workflows.collection import extract_dataset

    good = _images(tmp_path / "imgs", 6)
    bad = [tmp_path / "empty.jpg", tmp_path / "text.jpg"]
    bad[0].write_bytes(b"")
    bad[1].write_text("not an image")
    store = tmp_path / "store"
    sift = RootSIFT(max_features=200)
    stored, errors = extract_dataset(good[:4], store, sift, progress=False)
    assert (stored.kept, stored.added, len(stored)) == (0, 4, 4)
    # the case: the images already stored are not "of" the unreadable ones
    with pytest.warns(UnreadableImagesWarning) as rec:
        stored, errors = extract_dataset(good + [str(b) for b in bad], store, sift, progress=False)
    msg = str(rec[0].message)
    assert "2 of the 4 images to extract could not be read and were skipped, 2 were added; 4 already stored " \
           "were kept" in msg, msg
    assert (stored.kept, stored.added, len(stored), len(errors)) == (4, 2, 6, 2)
    assert stored.summary() == "4 kept from an earlier run, 2 added"
    assert sorted(stored) == sorted(stored)   # still a sorted list of names
    # the command says it too, in text and JSON
    more = _images(tmp_path / "more", 8)[6:]
    assert main(["extract", *good, *more, "--out", str(store), "-q"]) == 0
    assert f"8 images stored in {store} (6 kept from an earlier run, 2 added)" in capsys.readouterr().out
    assert main(["extract", *good, "--out", str(store), "-q", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["images_stored"], out["kept"], out["added"]) == (8, 8, 0)


def test_text_file_in_an_image_folder_is_named(tmp_path, capsys):
    folder = tmp_path / "photos"
    _images(folder, 3)
    (folder / "notes.txt").write_text("a note")
    (folder / "sub").mkdir()
    (folder / "sub" / "meta.json").write_text("{}")
    assert main(["extract", str(folder), "--out", str(tmp_path / "s"), "-q"]) == 0
    err = capsys.readouterr().err
    assert f"d2r extract: warning: {folder}: skipped 2 files that are not an image" in err, err
    assert "notes.txt" in err and "sub/meta.json" in err and "a .txt list of paths is read when given" in err
    # a folder of images only: no warning
    only = tmp_path / "only"
    _images(only, 2)
    assert main(["extract", str(only), "--out", str(tmp_path / "t"), "-q"]) == 0
    assert "skipped" not in capsys.readouterr().err


def test_score_header_names_the_kernel_as_the_docs_do(tmp_path, capsys):
    from d2r.core.kernels import KERNELS, kernel_label

    assert {k: kernel_label(k) for k in KERNELS} == {"asmk": "ASMK", "asmk*": "ASMK*", "rasmk": "R-ASMK",
                                                     "rasmk*": "R-ASMK*", "naive-rasmk": "Naive-R-ASMK"}
    imgs = _images(tmp_path / "imgs", 4)
    store, cb, idx = tmp_path / "store", tmp_path / "cb.npy", tmp_path / "db.d2r"
    assert main(["extract", *imgs, "--out", str(store), "--regions", "grid:2", "--max-features", "200", "-q"]) == 0
    assert main(["train-codebook", str(store), "--words", "16", "--out", str(cb), "-q"]) == 0
    assert main(["index", str(store), "--codebook", str(cb), "--out", str(idx), "--regions", "grid:2", "--kernel",
                 "rasmk*", "-q"]) == 0
    capsys.readouterr()
    assert main(["search", str(idx), imgs[0], "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "# score: R-ASMK* similarity" in out and "RASMK*" not in out, out


def test_descriptor_dimensions_are_numbers(tmp_path):
    from d2r.core.codebook import Codebook
    from d2r.extract import RootSIFT
    from d2r.workflows.build import build_index
    from d2r.workflows.collection import extract_dataset

    imgs = _images(tmp_path / "imgs", 2)
    extract_dataset(imgs, tmp_path / "store", RootSIFT(max_features=100), progress=False)
    cb = Codebook(np.eye(64, dtype=np.float32)[:8])
    with pytest.raises(ValueError) as err:
        build_index(tmp_path / "store", tmp_path / "x.d2r", cb, progress=False)
    msg = str(err.value)
    assert "holds 128-D descriptors but the codebook has 64-D words" in msg and "[" not in msg, msg


def test_pytest_quiet_still_says_why_tests_skip(tmp_path):
    """The README's test command uses -q; the project's pytest settings list the skip reasons anyway."""
    t = tmp_path / "test_skips.py"
    t.write_text("import pytest\n\ndef test_x():\n    pytest.skip('needs the shared photos: set D2R_SHARED_DATA')\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-c", str(ROOT / "pyproject.toml"), "--rootdir",
                        str(tmp_path), "-p", "no:cacheprovider", str(t)], capture_output=True, text=True, timeout=120)
    assert "SKIPPED" in r.stdout and "needs the shared photos: set D2R_SHARED_DATA" in r.stdout, r.stdout
    readme = (ROOT / "README.md").read_text()
    assert "python -m pytest -q tests" in readme and "`-rs`" in readme
