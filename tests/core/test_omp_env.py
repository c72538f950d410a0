"""Results do not depend on the OpenMP settings: the same searches, scores, aggregations and
quantisations run in subprocesses under OMP_THREAD_LIMIT=1, OMP_DYNAMIC=true, nested
OMP_NUM_THREADS=2,1, more threads than cores (OMP_NUM_THREADS=7) and the default environment, and
every array must equal the default run's bit for bit (the core splits work by the team size it obtains
and sums scores in fixed point, so neither the thread count nor the schedule may show)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import d2r

TESTS = Path(__file__).resolve().parents[1]   # tests/: support.py, reference.py

# The check script: small synthetic data (the World helper of tests/support.py), about 2 s a run.
SCRIPT = textwrap.dedent(r"""
    import sys
    import numpy as np
    import d2r
    from d2r.core.aggregate import aggregate_images, aggregate_regions_batch
    from support import World

    out = {}
    w = World(seed=21, dim=32, n_objects=12, words_per_object=8)
    cb = w.codebook
    imgs = [w.image() for _ in range(300)]
    imgs[17] = np.zeros((0, 32), np.float32)                 # an image without descriptors
    queries = [w.image(objects=[o, (o + 3) % 10]) for o in range(10)] + [w.image() for _ in range(6)]
    regions = [[im, im[: max(1, len(im) // 2)], im[len(im) // 3:]] for im in imgs[:120] if len(im)]
    x = np.concatenate(imgs)
    offsets = np.cumsum([0] + [len(a) for a in imgs]).astype(np.int64)

    ids, dist = cb.quantize(x, 3)
    out["quantize_ids"], out["quantize_dist"] = ids, dist

    def put(prefix, s_i):
        out[prefix + "_scores"], out[prefix + "_ids"] = s_i

    for kern in ("asmk*", "asmk", "rasmk*"):
        tag = kern.replace("*", "star")
        # aggregation: one image, and many images in one call (the parallel-over-images path), m = 1, 2
        if kern == "rasmk*":
            a = d2r.aggregate(regions[0], cb, kern)
            for m in (1, 2):
                b = aggregate_regions_batch(cb, regions, kern, m)
                out[f"{tag}_agg{m}_offsets"], out[f"{tag}_agg{m}_words"], out[f"{tag}_agg{m}_codes"] = (
                    b.offsets, b.words, b.codes)
        else:
            a = d2r.aggregate(imgs[0], cb, kern)
            for m in (1, 2):
                b = aggregate_images(cb, x, offsets, kern, m)
                out[f"{tag}_agg{m}_offsets"], out[f"{tag}_agg{m}_words"], out[f"{tag}_agg{m}_codes"] = (
                    b.offsets, b.words, b.codes)
        out[f"{tag}_agg_one_words"], out[f"{tag}_agg_one_codes"] = a.words, a.codes

        idx = d2r.Index(cb, kernel=kern)
        if kern == "rasmk*":
            idx.add_regions_many(regions, image_ids=np.arange(len(regions)) * 3 + 1)
        else:
            idx.add(imgs, image_ids=np.arange(len(imgs)) * 3 + 1)
        for k in (5, None):
            kt = "all" if k is None else str(k)
            put(f"{tag}_one_k{kt}", idx.search(queries[0], k=k))
            put(f"{tag}_many_k{kt}", idx.search(queries, k=k))
        put(f"{tag}_score_all", idx.score_all(queries))
        idx.remove(idx.ids[::7])                              # the compaction path, then search again
        put(f"{tag}_after_remove", idx.search(queries, k=None))

        if kern != "rasmk*":
            for pooling in ("max", "mean"):
                reg = d2r.RegionalSearchIndex(cb, kern, pooling=pooling)
                reg.add_regions_many(regions)
                put(f"{tag}_regional_{pooling}_one", reg.search(queries[1], k=5))
                put(f"{tag}_regional_{pooling}_many", reg.search(queries, k=None))

    out["meta_threads"] = np.array([d2r.get_num_threads()])
    out["meta_openmp"] = np.array([1 if d2r.build_info().get("openmp") else 0])
    np.savez(sys.argv[1], **out)
""")

VARIANTS = {
    "default": {},
    "OMP_THREAD_LIMIT=1": {"OMP_THREAD_LIMIT": "1"},
    "OMP_DYNAMIC=true": {"OMP_DYNAMIC": "true"},
    "OMP_NUM_THREADS=2,1": {"OMP_NUM_THREADS": "2,1"},
    "OMP_NUM_THREADS=7": {"OMP_NUM_THREADS": "7"},
}


def _env(extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "KMP_"))}
    # the d2r this test process imported (the installed one, or python/ of the repository), and
    # tests/ for the World helper
    paths = [os.path.dirname(os.path.dirname(d2r.__file__)), str(TESTS)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("omp_env")
    script = d / "omp_check.py"
    script.write_text(SCRIPT)
    out = {}
    for name, extra in VARIANTS.items():
        path = d / (name.replace("=", "_").replace(",", "_") + ".npz")
        p = subprocess.run([sys.executable, str(script), str(path)], env=_env(extra), capture_output=True,
                           text=True, timeout=120)
        if p.returncode != 0:  # reported by the tests of this variant
            out[name] = (f"{name}: the check script failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n"
                         f"{p.stderr[-5000:]}")
            continue
        with np.load(path) as z:
            out[name] = {k: z[k] for k in z.files}
    return out


def _run(runs, name):
    if isinstance(runs[name], str):
        pytest.fail(runs[name])
    return runs[name]


def test_settings_take_effect(runs):
    if not _run(runs, "default")["meta_openmp"][0]:
        pytest.skip("d2r was built without OpenMP: one thread whatever the settings")
    assert _run(runs, "OMP_NUM_THREADS=7")["meta_threads"][0] == 7
    assert _run(runs, "OMP_NUM_THREADS=2,1")["meta_threads"][0] == 2


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "default"])
def test_results_equal_default_bitwise(runs, variant):
    want, got = _run(runs, "default"), _run(runs, variant)
    keys = sorted(k for k in want if not k.startswith("meta_"))
    assert sorted(k for k in got if not k.startswith("meta_")) == keys
    assert len(keys) > 40
    bad = []
    for k in keys:
        a, b = want[k], got[k]
        if a.dtype != b.dtype or a.shape != b.shape:
            bad.append(f"{k}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
        elif a.tobytes() != b.tobytes():
            bits_a = np.ascontiguousarray(a).view(np.uint8).reshape(a.size, -1)
            bits_b = np.ascontiguousarray(b).view(np.uint8).reshape(b.size, -1)
            n = int(np.count_nonzero((bits_a != bits_b).any(axis=1)))
            bad.append(f"{k}: {n} of {a.size} values differ")
    assert not bad, f"{variant} differs from the default run:\n" + "\n".join(bad)
