"""A million images on one machine: build, memory, bytes per image, load and query latency of d2r's
compressed, memory-mapped ASMK* index at 10k, 100k and 1M images (65,536 words), against the
memory-bandwidth bound, and the `asmk` package at the largest size it fits.

Images are synthetic aggregated ASMK* images (``d2r.workflows.synthetic.zipf_images``): 1,000 descriptors per
image whose words follow a Zipf law, about 980 distinct words, random 16-byte codes. The Zipf
exponent is measured on real photos (``--measure-exponent``: realmix RootSIFT quantised with an
8,192-word k-means codebook, least-squares slope of log frequency against log rank over the
words of rank 10 to 4,000) or given (``--exponent``).

Each size runs in its own process (peak RSS is per process):

  1. build: batches of 10,000 images aggregated into part files (d2r.Index.add_aggregated +
     save, the streaming build's unit of work), then merged by streaming (d2r.workflows.build.merge_index_files);
  2. file size minus the codebook, per image and per posting;
  3. load (mmap) cold (file dropped from the page cache) and warm;
  4. queries (synthetic aggregated images of the same law, k = 100): single-query latency
     (median, p95) warm, and cold (the first queries after eviction), and batched (64 queries in
     one call, per query);
  5. the bound: the bytes of the posting lists a query scans (sum over its words of the list
     lengths in the file) divided by the read bandwidth measured here (numpy sum over a 2 GiB
     array with as many threads as d2r uses).

Usage:
  python benchmarks/bench_scale.py --sizes 10000 100000 1000000 --measure-exponent \
      --dir /tmp/d2r-scale --json benchmarks/results/scale.json --plot benchmarks/results/scale.png
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import bandwidth  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

N_WORDS = 65_536
DIM = 128
PER_IMAGE = 1000
BATCH = 10_000


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure_exponent(seed=0) -> dict:
    """The Zipf exponent of realmix RootSIFT word frequencies with an 8,192-word codebook."""
    import d2r
    from d2r.datasets.realmix import load_realmix
    from d2r.extract import RootSIFT

    ds = load_realmix()
    ex = RootSIFT(max_features=1000)
    feats = [ex(str(Path(ds.root) / n)) for n in ds.imnames]
    x = np.concatenate([f.descriptors for f in feats if f.descriptors.size])
    cb = d2r.Codebook.train(x, n_words=8192, seed=seed, niter=10)
    words = cb.quantize(x, 1)[0].reshape(-1)
    freq = np.sort(np.bincount(words, minlength=8192))[::-1].astype(np.float64)
    ranks = np.arange(1, freq.size + 1)
    sel = (ranks >= 10) & (ranks <= 4000) & (freq > 0)
    slope = np.polyfit(np.log(ranks[sel]), np.log(freq[sel]), 1)[0]
    return {"exponent": float(-slope), "descriptors": int(x.shape[0]), "images": len(feats),
            "words_used": int((freq > 0).sum())}




class MemorySampler:
    """Peak anonymous memory (RssAnon: the process's own allocations) and peak resident file pages
    (RssFile: mapped index files, reclaimable page cache) of this process, sampled every 20 ms."""

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            with open("/proc/self/status") as f:
                for line in f:
                    key = line.split(":")[0]
                    if key in self.peak:
                        self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {k: v / 2**20 for k, v in self.peak.items()}


def measure_queries(out: Path, cb, exponent: float, n_queries: int, seed: int, res: dict) -> None:
    """Load (cold, warm) and query figures of the index file `out` into `res`."""
    import d2r
    from d2r.core import index_io
    from d2r.workflows.synthetic import zipf_images

    _evict(out)
    t = time.perf_counter()
    idx = d2r.Index.load(out, mmap=True)
    res["load_cold_s"] = time.perf_counter() - t
    t = time.perf_counter()
    d2r.Index.load(out, mmap=True)
    res["load_warm_s"] = time.perf_counter() - t
    _, sec, _ = index_io.read_index_file(out, mmap=True, verify=False)
    wo = np.asarray(sec["word_offsets"], np.int64)
    q = zipf_images(n_queries, N_WORDS, PER_IMAGE, exponent, seed=seed + 7, fingerprint=cb.fingerprint)
    qs = list(q)
    scanned = np.array([int((wo[a.words + 1] - wo[a.words]).sum()) for a in qs])
    res["scanned_bytes_per_query_median"] = float(np.median(scanned))
    cold = []
    _evict(out)
    idx = d2r.Index.load(out, mmap=True)
    for a in qs[:5]:
        t = time.perf_counter()
        idx.search_aggregated(a, k=100)
        cold.append(time.perf_counter() - t)
    res["query_cold_ms_median"] = float(np.median(cold) * 1e3)
    for a in qs:                      # warm the page cache (and verify the pages)
        idx.search_aggregated(a, k=100)
    lat = []
    for _ in range(2):
        for a in qs:
            t = time.perf_counter()
            idx.search_aggregated(a, k=100)
            lat.append(time.perf_counter() - t)
    lat = np.array(lat)
    res["query_ms_median"] = float(np.median(lat) * 1e3)
    res["query_ms_p95"] = float(np.percentile(lat, 95) * 1e3)
    bt = []
    for _ in range(3):
        t = time.perf_counter()
        idx.search_aggregated(qs, k=100)
        bt.append((time.perf_counter() - t) / len(qs))
    res["batched_ms_per_query"] = float(np.median(bt) * 1e3)
    res["batched_speedup"] = res["query_ms_median"] / res["batched_ms_per_query"]
    bw = bandwidth(d2r.get_num_threads())
    res["read_bandwidth_gb_s"] = bw / 1e9
    res["bound_ms"] = res["scanned_bytes_per_query_median"] / bw * 1e3
    res["latency_over_bound"] = res["query_ms_median"] / res["bound_ms"]


def run_one(n: int, exponent: float, folder: Path, n_queries: int, seed: int) -> dict:
    import d2r
    from d2r.workflows.build import merge_index_files
    from d2r.workflows.synthetic import zipf_images
    from _machine import cpu_model

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cb = d2r.Codebook(rng.standard_normal((N_WORDS, DIM)).astype(np.float32))
    res = {"images": n, "words": N_WORDS, "exponent": exponent, "cpu": cpu_model(), "threads": d2r.get_num_threads()}
    t_gen = t_add = t_part = 0.0
    parts = []
    sampler = MemorySampler()
    for b, start in enumerate(range(0, n, BATCH)):
        m = min(BATCH, n - start)
        t = time.perf_counter()
        batch = zipf_images(m, N_WORDS, PER_IMAGE, exponent, seed=seed * 100_003 + b, fingerprint=cb.fingerprint)
        t_gen += time.perf_counter() - t
        t = time.perf_counter()
        part = d2r.Index(cb, "asmk*")
        part.add_aggregated(batch, image_ids=np.arange(start, start + m))
        t_add += time.perf_counter() - t
        t = time.perf_counter()
        parts.append(folder / f"part-{b:05d}.d2r")
        part.save(parts[-1])
        t_part += time.perf_counter() - t
        del part, batch
    out = folder / "index.d2r"
    t = time.perf_counter()
    merged = merge_index_files(parts, out)
    t_merge = time.perf_counter() - t
    postings = int(merged.stats()["postings"])
    del merged
    for p in parts:
        p.unlink()
    size = out.stat().st_size
    peaks = sampler.stop()
    res.update(generate_s=t_gen, aggregate_add_s=t_add, part_save_s=t_part, merge_s=t_merge,
               build_images_per_s=n / (t_add + t_part + t_merge), postings=postings,
               words_per_image=postings / n, file_bytes=size,
               bytes_per_image=(size - N_WORDS * DIM * 4) / n,
               bytes_per_posting=(size - N_WORDS * DIM * 4) / postings,
               peak_rss_build_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               peak_anon_build_mb=peaks["RssAnon"], peak_file_pages_build_mb=peaks["RssFile"])
    measure_queries(out, cb, exponent, n_queries, seed, res)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if os.environ.get("D2R_SCALE_KEEP") != "1":
        out.unlink()
    return res


def run_asmk(n: int, exponent: float, n_queries: int, seed: int) -> dict:
    """The asmk package's inverted file (asmk.inverted_file.IVF, binary kernel) on the same kind of
    synthetic aggregated images: build time, peak RSS growth, query latency."""
    from asmk import inverted_file as asmk_ivf
    from d2r.workflows.synthetic import zipf_images

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ivf = asmk_ivf.IVF.initialize_empty(use_idf=False, codebook_size=N_WORDS)
    t_build = 0.0
    for b, start in enumerate(range(0, n, BATCH)):
        m = min(BATCH, n - start)
        batch = zipf_images(m, N_WORDS, PER_IMAGE, exponent, seed=seed * 100_003 + b)
        imids = np.repeat(np.arange(start, start + m), np.diff(batch.offsets))
        t = time.perf_counter()
        ivf.add(batch.codes.view(np.uint32).copy(), batch.words.astype(np.int64), imids)  # asmk: writable uint32 words
        t_build += time.perf_counter() - t
    q = zipf_images(n_queries, N_WORDS, PER_IMAGE, exponent, seed=seed + 7)

    from asmk import kernel as asmk_kernel

    kern = object.__new__(asmk_kernel.ASMKKernel)    # only its similarity (binary Hamming + selectivity)
    kern.binary = True

    def sim(qvec, vecs, image_ids):
        return kern.similarity(qvec, vecs, image_ids, alpha=3.0, similarity_threshold=0.0)

    lat = []
    for i in range(n_queries):
        a = q[i]
        t = time.perf_counter()
        ivf.search(a.codes.view(np.uint32).copy(), a.words.astype(np.int64), topk=100, similarity_func=sim)
        lat.append(time.perf_counter() - t)
    return {"images": n, "build_s": t_build, "build_images_per_s": n / t_build,
            "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
            "query_ms_median": float(np.median(lat) * 1e3), "query_ms_p95": float(np.percentile(lat, 95) * 1e3)}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["d2r"]
    n = [r["images"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].loglog(n, [r["query_ms_median"] for r in rows], "o-", label="d2r single query (median)")
    ax[0].loglog(n, [r["batched_ms_per_query"] for r in rows], "s-", label="d2r batched, per query")
    ax[0].loglog(n, [r["bound_ms"] for r in rows], "k--", label="bandwidth bound")
    if results.get("asmk"):
        a = results["asmk"]
        ax[0].loglog([a["images"]], [a["query_ms_median"]], "r^", label="asmk package")
    ax[0].set_xlabel("images")
    ax[0].set_ylabel("ms per query (after quantisation)")
    ax[0].legend()
    ax[1].loglog(n, [r["file_bytes"] / 1e9 for r in rows], "o-", label="index file, GB")
    ax[1].loglog(n, [r["peak_rss_mb"] / 1e3 for r in rows], "s-",
                 label="peak RSS, GB (mapped file pages and the 2 GiB bandwidth test included)")
    anon = [(r["images"], r["peak_anon_build_mb"] / 1e3) for r in rows if "peak_anon_build_mb" in r]
    if anon:
        ax[1].loglog(*zip(*anon), "^-", label="build: peak anonymous memory, GB")
    ax[1].set_xlabel("images")
    ax[1].legend(fontsize=8)
    fig.suptitle(f"d2r ASMK*, 65,536 words, {rows[0]['cpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--exponent", type=float, default=None)
    ap.add_argument("--measure-exponent", action="store_true")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--asmk-size", type=int, default=10_000, help="images for the asmk package (0: skip)")
    ap.add_argument("--dir", default="/tmp/d2r-scale")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--asmk-one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--requery", default=None, metavar="INDEX",
                    help="measure load and queries again on an index file this benchmark built (kept with "
                         "D2R_SCALE_KEEP=1), updating its entry in --json")
    args = ap.parse_args()
    if args.requery is not None:
        import d2r

        rng = np.random.default_rng(args.seed)
        cb = d2r.Codebook(rng.standard_normal((N_WORDS, DIM)).astype(np.float32))
        res = {}
        measure_queries(Path(args.requery), cb, args.exponent, args.queries, args.seed, res)
        res["requeried"] = True
        print(json.dumps(res))
        if args.json:
            results = json.loads(Path(args.json).read_text())
            n = len(d2r.Index.load(args.requery, mmap=True))
            for r in results["d2r"]:
                if r["images"] == n:
                    r.update(res)
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.exponent, Path(args.dir) / f"n{args.one}", args.queries, args.seed)))
        return
    if args.asmk_one is not None:
        print(json.dumps(run_asmk(args.asmk_one, args.exponent, args.queries, args.seed)))
        return
    results = {"d2r": []}
    if args.measure_exponent:
        results["exponent_measurement"] = measure_exponent(args.seed)
        args.exponent = results["exponent_measurement"]["exponent"]
        print("measured exponent", results["exponent_measurement"], flush=True)
    if args.exponent is None:
        ap.error("give --exponent or --measure-exponent")
    results["exponent"] = args.exponent
    cmd = [sys.executable, __file__, "--exponent", str(args.exponent), "--queries", str(args.queries), "--dir",
           args.dir, "--seed", str(args.seed)]
    for n in args.sizes:
        p = subprocess.run(cmd + ["--one", str(n)], capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr[-3000:], file=sys.stderr)
            results["d2r"].append({"images": n, "error": p.stderr[-500:]})
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        results["d2r"].append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    if args.asmk_size:
        p = subprocess.run(cmd + ["--asmk-one", str(args.asmk_size)], capture_output=True, text=True)
        results["asmk"] = (json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0
                           else {"images": args.asmk_size, "error": p.stderr[-500:]})
        print("asmk", json.dumps(results["asmk"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot and all("error" not in r for r in results["d2r"]):
        plot(results, args.plot)


if __name__ == "__main__":
    main()
