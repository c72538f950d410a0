"""Progress that suits a log (issue 26): with stderr not a terminal, a plain line every
D2R_PROGRESS_INTERVAL seconds (none with 0), never a redrawn bar; counts and units right (k-means shows
its elapsed time, discovery counts images, the two extraction passes of --regions discovered are told
apart)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import d2r

# The subprocesses import the d2r this test imported (the installed wheel in CI, whose source tree has
# no built extension; the source tree in a developer's editable install).
PACKAGE_PARENT = Path(d2r.__file__).resolve().parents[1]


def _run(code: str, interval: str | None, tmp_path: Path) -> list[str]:
    """Runs `code` in a fresh interpreter with stderr redirected to a file; its lines."""
    env = dict(os.environ)
    env.pop("D2R_PROGRESS_INTERVAL", None)
    if interval is not None:
        env["D2R_PROGRESS_INTERVAL"] = interval
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_PARENT), env.get("PYTHONPATH", "")])
    err = tmp_path / "stderr.log"
    with open(err, "w") as f:
        subprocess.run([sys.executable, "-c", textwrap.dedent(code)], stderr=f, stdout=subprocess.DEVNULL,
                       env=env, timeout=300, check=True)
    text = err.read_text()
    assert "\r" not in text and "\x1b[" not in text   # no redrawn bar, no cursor movement
    return text.splitlines()


BAR = """
    import time
    from d2r.core.progress import bar
    b = bar(400, "extract")
    for _ in range(400):
        time.sleep(0.003)
        b.update(1)
    b.close()
"""


def test_bar_in_a_log_is_one_line_per_interval(tmp_path):
    # 400 updates over about 1.2 s (more on a loaded machine) with a line every 0.25 s: at most
    # elapsed / 0.25 + 1 lines (the last one), never one per update
    lines = _run("import time; t0 = time.monotonic()\n" + textwrap.dedent(BAR)
                 + "import sys; print(f'ELAPSED {time.monotonic() - t0}', file=sys.stderr)", "0.25", tmp_path)
    elapsed = float(lines[-1].split()[1])
    lines = lines[:-1]
    assert 2 <= len(lines) <= elapsed / 0.25 + 2, lines
    assert all(re.fullmatch(r"d2r: extract: \d+/400 img \(\d+ %\), .*", ln) for ln in lines), lines
    assert lines[-1].startswith("d2r: extract: 400/400 img (100 %), ") and lines[-1].endswith("(done)"), lines


def test_default_interval_writes_nothing_for_a_short_step(tmp_path):
    assert _run(BAR, None, tmp_path) == []          # 10 s by default: a 1 s step writes nothing


@pytest.mark.parametrize("off", ["0", "off"])
def test_interval_zero_turns_progress_lines_off(tmp_path, off):
    assert _run("""
        from d2r.core.progress import bar, busy
        assert bar(400, "extract") is None
        with busy("k-means"):
            pass
    """, off, tmp_path) == []


def test_bad_interval_is_named():
    from d2r.core import progress

    os.environ["D2R_PROGRESS_INTERVAL"] = "soon"
    try:
        with pytest.raises(ValueError, match="D2R_PROGRESS_INTERVAL='soon'"):
            progress.log_interval()
    finally:
        del os.environ["D2R_PROGRESS_INTERVAL"]


def test_busy_shows_elapsed_seconds_not_a_rate(tmp_path):
    # the k-means sign of life once read "0s [00:28, ?s/s, 28 s]"
    lines = _run("""
        import time
        from d2r.core.progress import busy
        with busy("k-means (64 words)"):
            time.sleep(1.3)
    """, "0.3", tmp_path)
    assert 2 <= len(lines) <= 1.3 / 0.3 + 3, lines
    for ln in lines:
        assert re.fullmatch(r"d2r: k-means \(64 words\): \d+ s( in all)?( \(done\))?", ln), ln
        assert "?" not in ln and "s/s" not in ln


def test_busy_on_a_terminal_shows_elapsed_time(monkeypatch, capsys):
    from d2r.core import progress

    monkeypatch.setattr(progress, "_to_terminal", lambda: True)
    with progress.busy("k-means"):
        pass
    err = capsys.readouterr().err
    assert "elapsed" in err and "?" not in err and "s/s" not in err


def test_discover_regions_counts_images_not_searches(monkeypatch):
    """Three search rounds over n images once counted 3n 'img'; each round now counts its images."""
    from d2r.core import progress
    from d2r.core.codebook import Codebook
    from d2r.extract import Features
    from d2r.regions.discover import discover_regions

    made = []

    class Recorder(progress.LogProgress):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.seen = []
            made.append(self)

        def update(self, n=1):
            super().update(n)
            self.seen.append((self.desc, self.n, self.total))

    monkeypatch.setattr(progress, "_to_terminal", lambda: False)
    monkeypatch.setattr(progress, "LogProgress", Recorder)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 16)).astype(np.float32)
    feats = []
    for i in range(5):
        d = base + 0.01 * rng.standard_normal(base.shape).astype(np.float32)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        loc = rng.random((300, 2)) * 200
        feats.append(Features(d, loc, np.ones(300, np.float32), np.ones(300, np.float32)))
    cb = Codebook(base[:32] / np.linalg.norm(base[:32], axis=1, keepdims=True))
    discover_regions(feats, codebook=cb, rounds=3, min_features=1, min_inliers=1000, progress=True)
    (rec,) = made
    assert rec.seen and all(n <= total <= 5 for _, n, total in rec.seen), rec.seen
    assert {d for d, _, _ in rec.seen} >= {"discover regions (round 1 of at most 3)",
                                          "discover regions (round 3 of at most 3)"}


def test_discovered_extraction_passes_are_labelled_apart(tmp_path):
    cv2 = pytest.importorskip("cv2", reason="image extraction needs opencv-python-headless")
    rng = np.random.default_rng(0)
    base = cv2.GaussianBlur((rng.random((200, 260, 3)) * 255).astype(np.uint8), (0, 0), 2)
    for i in range(6):
        cv2.imwrite(str(tmp_path / f"img{i}.png"), np.roll(base, 9 * i, axis=1))
    lines = _run(f"""
        import time
        from d2r.cli import main
        import d2r.workflows.collection as c
        one = c.extract_one
        def slow(*a, **k):   # long enough for one progress line per pass
            time.sleep(0.05)
            return one(*a, **k)
        c.extract_one = slow
        assert main(["extract", {str(tmp_path)!r}, "--out", {str(tmp_path / 'store')!r}, "--regions",
                     "discovered", "--words", "32", "--max-features", "300"]) == 0
    """, "0.01", tmp_path)
    progress = [ln for ln in lines if ln.startswith("d2r: ")]
    assert any(ln.startswith("d2r: extract whole images (pass 1 of 3): 6/6 img") for ln in progress), lines
    assert any(ln.startswith("d2r: extract the regions' crops (pass 3 of 3): 6/6 img") for ln in progress), lines
    for ln in progress:
        m = re.match(r"d2r: discover regions[^:]*: (\d+)/(\d+) img", ln)
        if m:
            assert int(m.group(1)) <= int(m.group(2)) <= 6, ln
