"""Beyond one machine, measured on one: the overhead of d2r.distributed on a local Ray cluster.

1. Fan-out search: a synthetic ASMK* index (``d2r.workflows.synthetic.zipf_images``: 65,536 words, about 990
   words per image, Zipf exponent 0.238 as measured on realmix, see bench_scale.py) searched in this
   process (d2r.Index, memory-mapped) and through ShardedIndex over 1, 2 and 4 shards
   (``d2r.distributed.shard_index`` of the same file; each shard an actor with 0.25 CPU, with Ray's
   one native thread per actor and with the machine's cores shared out, ``threads_per_shard``): single-query
   latency (median, p95, k=100), batched throughput (64 queries per call) and concurrent throughput
   (4 client threads issuing single queries). The results are checked identical to the single index's.
2. Shard builds: ``build_sharded_index`` of a synthetic feature store (random 128-D descriptors, a
   4,096-word codebook) into 4 shards with one task at a time (cpus_per_task=2 on 2 CPUs) and two at
   a time (cpus_per_task=1): wall time and images/s.
3. Extraction: realmix photos (RootSIFT, 1,000 features) by ``d2r.extract_dataset`` in this process and
   by ``d2r.distributed.extract`` with 1 and 2 actors (1 CPU each): images/s, per actor.

Usage:
  python benchmarks/bench_distributed.py --images 20000 --json benchmarks/results/distributed.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_model  # noqa: E402

N_WORDS = 65_536
EXPONENT = 0.238


def _machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}


def _quantiles(ts):
    a = np.asarray(ts) * 1000
    return {"median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95))}


def bench_search(tmp: Path, n_images: int, shard_counts, n_queries: int = 64, reps: int = 60) -> dict:
    import d2r
    from d2r import distributed
    from d2r.workflows.synthetic import zipf_images

    rng = np.random.default_rng(0)
    cb = d2r.Codebook(rng.standard_normal((N_WORDS, 128)).astype(np.float32))
    idx = d2r.Index(cb, kernel="asmk*")
    for s in range(0, n_images, 5000):
        idx.add_aggregated(zipf_images(min(5000, n_images - s), N_WORDS, exponent=EXPONENT, seed=rng,
                                       fingerprint=cb.fingerprint))
    path = tmp / "single.d2r"
    idx.save(path)
    del idx
    single = d2r.Index.load(path, mmap=True)
    queries = zipf_images(n_queries, N_WORDS, exponent=EXPONENT, seed=rng, fingerprint=cb.fingerprint)
    qlist = list(queries)

    def measure(search_one, search_batch, label):
        for q in qlist[:8]:   # warm: pages in the cache, actors started
            search_one(q)
        lat = []
        for r in range(reps):
            q = qlist[r % len(qlist)]
            t = time.perf_counter()
            search_one(q)
            lat.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(3):
            search_batch(queries)
        batched_qps = 3 * len(qlist) / (time.perf_counter() - t)
        n_threads, per_thread = 4, 24
        t = time.perf_counter()

        def client(i):
            for j in range(per_thread):
                search_one(qlist[(i * per_thread + j) % len(qlist)])
        threads = [threading.Thread(target=client, args=(i,)) for i in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        conc_qps = n_threads * per_thread / (time.perf_counter() - t)
        out = {"label": label, **_quantiles(lat), "batched_qps": batched_qps, "concurrent_qps": conc_qps}
        print(f"  {label:>12}: single {out['median_ms']:.2f} ms (p95 {out['p95_ms']:.2f}), batched {batched_qps:.0f} "
              f"q/s, 4 threads {conc_qps:.0f} q/s", flush=True)
        return out

    rows = [measure(lambda q: single.search_aggregated(q, k=100), lambda b: single.search_aggregated(b, k=100),
                    "in-process")]
    rows[0].update(shards=0, threads_per_shard=d2r.get_num_threads())
    want = single.search_aggregated(queries, k=100)
    for n in shard_counts:
        folder = tmp / f"sh{n}"
        distributed.shard_index(path, folder, n, progress=False)
        for threads in (None, max(1, (os.cpu_count() or 1) // n)):
            if threads is not None and threads == 1:
                continue   # the same as Ray's default
            with distributed.ShardedIndex(folder, cpus_per_shard=0.25, max_concurrency=4,
                                          threads_per_shard=threads) as si:
                got = si.search_aggregated(queries, k=100)
                assert np.array_equal(got[1], want[1]) and got[0].tobytes() == want[0].tobytes(), "sharded != single"
                label = f"{n} shard{'s' if n > 1 else ''}" + (f", {threads} thr" if threads else "")
                row = measure(lambda q: si.search_aggregated(q, k=100), lambda b: si.search_aggregated(b, k=100),
                              label)
                row.update(shards=n, threads_per_shard=threads or 1)
                rows.append(row)
        shutil.rmtree(folder)
    base = rows[0]
    for r in rows[1:]:
        r["latency_overhead_ms"] = r["median_ms"] - base["median_ms"]
        r["batched_qps_ratio"] = r["batched_qps"] / base["batched_qps"]
        r["concurrent_qps_ratio"] = r["concurrent_qps"] / base["concurrent_qps"]
    st = single.stats()
    return {"images": n_images, "words_per_image": st["words_per_image"], "file_bytes": path.stat().st_size,
            "queries": n_queries, "k": 100, "rows": rows}


def bench_build(tmp: Path, n_images: int, per_image: int = 300, shards: int = 4) -> dict:
    import d2r
    from d2r import distributed
    from d2r.extract import Features
    from d2r.extract.store import save_features

    rng = np.random.default_rng(1)
    store = tmp / "store"
    store.mkdir()
    ex = {"name": "Synthetic", "params": {}, "fingerprint": "0011223344556677"}
    for s in range(0, n_images, 250):
        m = min(250, n_images - s)
        feats = []
        for _ in range(m):
            x = rng.standard_normal((per_image, 128)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            feats.append(Features(x, np.zeros((per_image, 2), np.float32), np.ones(per_image, np.float32),
                                  np.ones(per_image, np.float32)))
        save_features(store / f"shard-{s // 250:05d}.npz", [f"/img{s + i}" for i in range(m)], feats, extractor=ex)
    cb = d2r.Codebook(rng.standard_normal((4096, 128)).astype(np.float32))
    rows = []
    for cpus, label in ((2.0, "1 task at a time"), (1.0, "2 tasks at a time")):
        out = tmp / f"b{cpus}"
        t = time.perf_counter()
        distributed.build_sharded_index(store, out, cb, shards, cpus_per_task=cpus, progress=False)
        dt = time.perf_counter() - t
        rows.append({"label": label, "cpus_per_task": cpus, "seconds": dt, "images_per_s": n_images / dt})
        print(f"  build {shards} shards, {label}: {dt:.1f} s, {n_images / dt:.0f} images/s", flush=True)
        shutil.rmtree(out)
    rows[1]["speedup"] = rows[0]["seconds"] / rows[1]["seconds"]
    shutil.rmtree(store)
    return {"images": n_images, "descriptors_per_image": per_image, "words": 4096, "shards": shards, "rows": rows}


def bench_extract(tmp: Path, n_images: int) -> dict:
    import d2r
    from d2r import distributed
    from d2r.datasets.realmix import find_realmix
    from d2r.extract import RootSIFT

    root = find_realmix()
    if root is None:
        return {"skipped": "realmix is absent (../shared/data)"}
    images = sorted((Path(root) / "images").rglob("*.jpg"))[:n_images]
    ext = RootSIFT(max_features=1000)
    rows = []
    t = time.perf_counter()
    d2r.extract_dataset(images, tmp / "seq", ext, progress=False)
    dt = time.perf_counter() - t
    rows.append({"label": "extract_dataset, 1 process", "actors": 0, "seconds": dt, "images_per_s": len(images) / dt})
    print(f"  extract_dataset: {len(images) / dt:.2f} images/s", flush=True)
    for actors in (1, 2):
        t = time.perf_counter()
        distributed.extract(images, tmp / f"ray{actors}", ext, actors=actors, cpus_per_actor=1.0, shard_size=16,
                            progress=False)
        dt = time.perf_counter() - t
        rows.append({"label": f"Ray Data, {actors} actor{'s' if actors > 1 else ''}", "actors": actors,
                     "seconds": dt, "images_per_s": len(images) / dt, "images_per_s_per_actor": len(images) / dt / actors})
        print(f"  ray {actors} actors: {len(images) / dt:.2f} images/s ({len(images) / dt / actors:.2f} per actor)",
              flush=True)
    return {"images": len(images), "features": 1000, "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20_000, help="images of the synthetic index (fan-out search)")
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--build-images", type=int, default=2000)
    ap.add_argument("--extract-images", type=int, default=64)
    ap.add_argument("--only", choices=["search", "build", "extract"], nargs="+", default=["search", "build", "extract"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from d2r import distributed
    import d2r

    distributed.connect("local", num_cpus=os.cpu_count())
    import ray

    res = {"machine": _machine(), "ray": ray.__version__, "d2r": d2r.__version__, "threads": d2r.get_num_threads()}
    tmp = Path(tempfile.mkdtemp(prefix="d2r-dist-"))
    try:
        if "search" in args.only:
            print("fan-out search", flush=True)
            res["search"] = bench_search(tmp, args.images, args.shards)
        if "build" in args.only:
            print("shard builds", flush=True)
            res["build"] = bench_build(tmp, args.build_images)
        if "extract" in args.only:
            print("extraction", flush=True)
            res["extract"] = bench_extract(tmp, args.extract_images)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
