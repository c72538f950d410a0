"""Runtime CPU dispatch (csrc/simd.h): one fixed workload (quantisation with and without the pruning
structure, aggregation, ASMK / ASMK* scoring, matching and RANSAC) runs in a fresh interpreter under
every SIMD level this machine supports (D2R_SIMD=scalar|avx2|avx512), and every level's outputs must
equal the scalar level's bit for bit (the index scoring there runs the scan's kernels of the level).
(Quantisation, aggregation and scoring are bit-identical across levels by construction; spatial
verification keeps the FMA contraction, so its scalar level could differ for points within float
rounding of the threshold: this workload has none.) Also: build_info() and the posting scan's kernels
follow D2R_SIMD, and a bad value fails the import with a message naming the valid ones."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import d2r


WORKLOAD = textwrap.dedent("""
    import sys
    import numpy as np
    import d2r
    import d2r.core.verify

    out = {}
    rng = np.random.default_rng(0)
    # a clustered codebook large enough for the quantiser's pruning structure, and a small one
    D = 64
    centres = rng.standard_normal((96, D)).astype(np.float32)
    big = (centres[np.arange(4096) % 96] + 0.15 * rng.standard_normal((4096, D))).astype(np.float32)
    x = (centres[rng.integers(0, 96, 3000)] + 0.15 * rng.standard_normal((3000, D))).astype(np.float32)
    cb = d2r.Codebook(big)
    for m in (1, 3):
        ids, dist = cb.quantize(x, m)
        out[f"q_big_ids_{m}"], out[f"q_big_dist_{m}"] = ids, dist
    out["q_big_pruning"] = np.array([cb._quantizer.pruning_enabled])
    small = rng.standard_normal((300, 32)).astype(np.float32)
    xs = rng.standard_normal((500, 32)).astype(np.float32)
    out["q_small_ids"], out["q_small_dist"] = d2r.Codebook(small).quantize(xs, 2)
    # aggregation and scoring over the big codebook
    imgs = [x[i * 100:(i + 1) * 100] for i in range(25)]
    queries = [x[2500 + i * 100:2500 + (i + 1) * 100] for i in range(5)]
    for kernel in ("asmk*", "asmk"):
        a = d2r.aggregate(imgs[0], cb, kernel=kernel)
        out[f"agg_words_{kernel}"], out[f"agg_codes_{kernel}"] = a.words, a.codes
        idx = d2r.Index(cb, kernel=kernel)
        idx.add(imgs)
        scores, ids = idx.search(queries, k=None)
        out[f"scores_{kernel}"], out[f"ids_{kernel}"] = scores, ids
    # matching and RANSAC
    qd = rng.standard_normal((400, 40)).astype(np.float32)
    qd /= np.linalg.norm(qd, axis=1, keepdims=True)
    dd = (qd[:300] + 0.05 * rng.standard_normal((300, 40))).astype(np.float32)
    dd /= np.linalg.norm(dd, axis=1, keepdims=True)
    qxy = (rng.random((400, 2)) * 500).astype(np.float32)
    A = np.array([[1.1, -0.2], [0.1, 0.9]], np.float32)
    dxy = ((qxy[:300] - [5, -7]) @ np.linalg.inv(A).T).astype(np.float32)
    dxy[::4] = rng.random((75, 2)) * 500
    v = d2r.core.verify.verify_pair((qd, qxy), (dd, dxy), seed=3)
    out["verify_inliers"] = np.array([v.inliers])
    out["verify_model"] = v.model
    out["verify_mask"] = v.inlier_mask
    out["verify_matches"] = v.matches
    out["build_simd"] = np.array([d2r.build_info()["simd"]])
    np.savez(sys.argv[1], **out)
""")


def _env(level):
    env = dict(os.environ)
    # the d2r this test imported (an installed package in CI, the source tree's python/ in a checkout)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(d2r.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "2"
    if level is None:
        env.pop("D2R_SIMD", None)
    else:
        env["D2R_SIMD"] = level
    return env


def _run(level, code, *args):
    return subprocess.run([sys.executable, "-c", code, *args], env=_env(level), capture_output=True, text=True,
                          timeout=600)


LEVELS = d2r.build_info()["simd_levels"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    res = {}
    for level in LEVELS:
        path = tmp_path_factory.mktemp("simd") / f"{level}.npz"
        r = _run(level, WORKLOAD, str(path))
        assert r.returncode == 0, f"D2R_SIMD={level}: {r.stderr[-3000:]}"
        with np.load(path, allow_pickle=False) as z:
            res[level] = {k: z[k] for k in z.files}
    return res


def test_levels_listed():
    info = d2r.build_info()
    assert "scalar" in LEVELS and LEVELS == sorted(LEVELS, key=["scalar", "avx2", "avx512"].index)
    assert info["simd"] in LEVELS
    assert "march=native" not in info["flags"] or os.environ.get("D2R_NATIVE_ARCH")


@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
def test_every_level_bit_identical_to_scalar(outputs, level):
    if level not in outputs:
        pytest.skip(f"this CPU or build has no {level} level (available: {', '.join(LEVELS)})")
    ref, got = outputs["scalar"], outputs[level]
    assert got["build_simd"][0] == level
    assert bool(ref["q_big_pruning"][0])  # the pruned quantiser is part of the comparison
    assert ref["verify_inliers"][0] >= 50  # RANSAC found the affine map
    assert sorted(ref) == sorted(got)
    for key in ref:
        if key == "build_simd":
            continue
        a, b = ref[key], got[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert a.tobytes() == b.tobytes(), f"{key}: D2R_SIMD={level} differs from scalar"


def test_build_info_follows_env():
    code = "import d2r, json; i = d2r.build_info(); print(json.dumps([i['simd'], i['simd_levels']]))"
    for level in LEVELS:
        r = _run(level, code)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f'["{level}", {list(LEVELS)!r}]'.replace("'", '"')
    r = _run(None, code)  # unset: the best level available
    assert r.returncode == 0 and r.stdout.startswith(f'["{LEVELS[-1]}"'), r.stderr
    r = _run("", code)  # empty counts as unset
    assert r.returncode == 0 and r.stdout.startswith(f'["{LEVELS[-1]}"'), r.stderr


def test_scan_kernels_follow_the_level():
    """The posting scan (csrc/scan.h) has one kernel variant per level and starts at the active one."""
    code = ("import json, d2r; from d2r import _native; "
            "print(json.dumps([_native.scan_variant(), _native.scan_variants()]))")
    for level in LEVELS:
        r = _run(level, code)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f'["{level}", {list(LEVELS)!r}]'.replace("'", '"')
    r = _run("sse9", "from d2r import _native; print(_native.scan_variant())")  # no silent fallback
    assert r.returncode != 0 and "D2R_SIMD=sse9" in r.stderr


def test_bad_level_fails_the_import():
    r = _run("sse9", "import d2r")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "D2R_SIMD=sse9" in r.stderr
    assert "scalar, avx2 or avx512" in r.stderr
    missing = [lv for lv in ("avx2", "avx512") if lv not in LEVELS]
    if missing:  # a level this CPU lacks: an error, not a silent fallback
        r = _run(missing[-1], "import d2r")
        assert r.returncode != 0 and f"D2R_SIMD={missing[-1]}" in r.stderr and "lacks" in r.stderr
