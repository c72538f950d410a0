"""GPU benchmark (run by device_check.sh on the lent machine; figures go to BENCHMARKS.md).

1. Quantisation: images of 1,000 descriptors (D = 128) against C = 65,536 words, images/s, against
   cuBLAS SGEMM's own time for the same product (torch.matmul, TF32 off) and the CPU quantizer.
2. Aggregation + insertion given the assignments (ASMK*, 1,000 descriptors per image), images/s, and
   the same on the CPU.
3. A synthetic 1,000,000-image ASMK* index generated on the GPU (600 words per image, uniform over
   C = 65,536, so ~9,155 entries per posting list): build images/s, single-query latency and batched
   queries/s (k = 100), against the bytes-scanned / memory-bandwidth bound measured on the same card;
   the CPU path on a 100,000-image slice for the ratio.
"""
import argparse
import json
import time

import numpy as np

import d2r  # the installed package (the device check builds it)
from d2r import cuda


def timeit(fn, reps=3, sync=None):
    fn()
    if sync:
        sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t)
    return best


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def bench_quantize(res, torch):
    rng = np.random.default_rng(0)
    C, D, per_img, n_img = 65536, 128, 1000, 64
    cb = d2r.Codebook(unit(rng.standard_normal((C, D)).astype(np.float32)))
    x = unit(rng.standard_normal((per_img * n_img, D)).astype(np.float32))
    xd = torch.as_tensor(x, device="cuda")
    sync = torch.cuda.synchronize
    q = cuda._quantizer(cb)
    t_batch = timeit(lambda: cb.quantize(xd, 1, device="cuda", output="device"), 3, sync)
    fb = q.last_fallback_rows
    t_one = timeit(lambda: cb.quantize(xd[:per_img], 1, device="cuda", output="device"), 5, sync)
    cd = torch.as_tensor(np.array(cb.centroids), device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    t_sgemm = timeit(lambda: torch.matmul(xd, cd.T), 5, sync)
    torch.backends.cuda.matmul.allow_tf32 = True
    t_tf32 = timeit(lambda: torch.matmul(xd, cd.T), 5, sync)
    n_cpu = 4000
    t_cpu = timeit(lambda: cb.quantize(x[:n_cpu], 1), 1)
    flop = 2.0 * x.shape[0] * C * D
    res["quantize"] = {
        "C": C, "D": D, "descriptors_per_image": per_img, "images_per_call": n_img,
        "gpu_images_per_s": n_img / t_batch, "gpu_tflops_useful": flop / t_batch / 1e12,
        "gpu_single_image_ms": t_one * 1e3, "fallback_rows_fraction": fb / x.shape[0],
        "cublas_sgemm_s": t_sgemm, "cublas_tf32_s": t_tf32, "d2r_s": t_batch,
        "d2r_vs_sgemm_time_ratio": t_sgemm / t_batch,
        "cpu_images_per_s": (n_cpu / per_img) / t_cpu, "cpu_threads": d2r.get_num_threads(),
        "target_images_per_s": 3000,
    }
    print("quantize", json.dumps(res["quantize"], indent=1), flush=True)


def bench_aggregate_insert(res, torch):
    rng = np.random.default_rng(1)
    C, D, per_img, n_img = 65536, 128, 1000, 200
    cb = d2r.Codebook(unit(rng.standard_normal((C, D)).astype(np.float32)))
    x = unit(rng.standard_normal((per_img * n_img, D)).astype(np.float32))
    xd = torch.as_tensor(x, device="cuda")
    ids, _ = cb.quantize(xd, 1, device="cuda", output="device")
    offs = np.arange(n_img + 1, dtype=np.int64) * per_img
    sync = torch.cuda.synchronize

    def gpu_run():
        idx = d2r.Index(cb, device="cuda")
        idx.add(xd, offsets=offs, assignments=ids)
        return idx

    t_gpu = timeit(gpu_run, 3, sync)
    a_host = ids.cpu().numpy()
    n_cpu = 50

    def cpu_run():
        idx = d2r.Index(cb)
        idx.add(x[:n_cpu * per_img], offsets=offs[:n_cpu + 1], assignments=a_host[:n_cpu * per_img])

    t_cpu = timeit(cpu_run, 1)
    res["aggregate_insert"] = {"images": n_img, "gpu_images_per_s": n_img / t_gpu,
                               "cpu_images_per_s": n_cpu / t_cpu, "target_images_per_s": 20000}
    print("aggregate+insert", json.dumps(res["aggregate_insert"], indent=1), flush=True)


def synthetic_batch(torch, gen, n, words_per_image, C, cb_bytes):
    step = C // words_per_image
    base = torch.arange(words_per_image, device="cuda", dtype=torch.int32) * step
    w = base[None, :] + torch.randint(0, step, (n, words_per_image), device="cuda", dtype=torch.int32, generator=gen)
    codes = torch.randint(0, 256, (n * words_per_image, cb_bytes), device="cuda", dtype=torch.uint8, generator=gen)
    offs = np.arange(n + 1, dtype=np.int64) * words_per_image
    return offs, w.reshape(-1).contiguous(), codes


def bench_search(res, torch, n_images):
    C, D, W = 65536, 128, 600
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    sync = torch.cuda.synchronize
    f = cuda.GpuInvertedFile(C, D, True)
    chunk = 100_000
    t0 = time.perf_counter()
    keep_cpu = None
    for s in range(0, n_images, chunk):
        n = min(chunk, n_images - s)
        offs, w, codes = synthetic_batch(torch, gen, n, W, C, 16)
        f.add(offs, w, codes, np.arange(s, s + n, dtype=np.int64))
        if s == 0:
            keep_cpu = (offs, w.cpu().numpy(), codes.cpu().numpy())
        del w, codes
    sync()
    t_build = time.perf_counter() - t0
    nq = 100
    qoffs, qw, qc = synthetic_batch(torch, gen, nq, W, C, 16)
    k = 100
    alpha, tau = 3.0, 0.0
    t_batch = timeit(lambda: f.search(qoffs, qw, qc, k, alpha, tau, True), 2)
    lat = []
    for i in range(20):
        o = np.array([0, W], np.int64)
        t = time.perf_counter()
        f.search(o, qw[i * W:(i + 1) * W], qc[i * W:(i + 1) * W], k, alpha, tau, True)
        lat.append(time.perf_counter() - t)
    lat_ms = float(np.median(lat) * 1e3)
    # bandwidth bound: bytes of the posting entries a query scans (slot 4 B + code 16 B) / copy bandwidth
    entries_per_query = W * (n_images * W / C)
    bytes_q = entries_per_query * 20
    big = torch.empty(int(2e9), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(big)
    t_copy = timeit(lambda: dst.copy_(big), 3, sync)
    bw = 2 * big.numel() / t_copy
    big = dst = None  # free the 4 GB before the CPU comparison
    bound_ms = bytes_q / bw * 1e3
    out = {"images": n_images, "words_per_image": W, "C": C, "k": k, "build_s": t_build,
           "build_images_per_s": n_images / t_build, "gpu_memory_bytes": f.memory_bytes,
           "batched_queries_per_s": nq / t_batch, "batched_ms_per_query": t_batch / nq * 1e3,
           "single_query_latency_ms": lat_ms, "bytes_scanned_per_query": bytes_q,
           "copy_bandwidth_GBps": bw / 1e9, "bandwidth_bound_ms_per_query": bound_ms,
           "batched_vs_bound": (t_batch / nq * 1e3) / bound_ms, "target_vs_bound": 10}
    # CPU on the first 100k images vs the GPU on the same slice
    offs, w, codes = keep_cpu
    cpu = d2r._native.InvertedFile(C, D, True)
    cpu.add(offs, w, codes, np.arange(offs.shape[0] - 1, dtype=np.int64))
    g2 = cuda.GpuInvertedFile(C, D, True)
    g2.add(offs, w, codes, np.arange(offs.shape[0] - 1, dtype=np.int64))
    qo, qwn, qcn = qoffs[:11], qw[:10 * W].cpu().numpy(), qc[:10 * W].cpu().numpy()
    t_cpu = timeit(lambda: cpu.search(qo, qwn, qcn, k, alpha, tau, True), 1)
    t_g = timeit(lambda: g2.search(qo, qwn, qcn, k, alpha, tau, True), 2)
    s_c, i_c = cpu.search(qo, qwn, qcn, k, alpha, tau, True)
    s_g, i_g = g2.search(qo, qwn, qcn, k, alpha, tau, True)
    out["slice_100k"] = {"cpu_ms_per_query": t_cpu / 10 * 1e3, "gpu_ms_per_query": t_g / 10 * 1e3,
                         "speedup": t_cpu / t_g, "same_ids": bool(np.array_equal(i_c, i_g)),
                         "same_scores": bool(np.array_equal(s_c, s_g))}
    res["search_1m"] = out
    print("search", json.dumps(out, indent=1), flush=True)


def bench_kmeans(res, torch):
    rng = np.random.default_rng(2)
    x = unit(rng.standard_normal((1_000_000, 128)).astype(np.float32))
    xd = torch.as_tensor(x, device="cuda")
    t = time.perf_counter()
    c, obj = cuda.kmeans(xd, 65536, niter=5, seed=0)
    dt = time.perf_counter() - t
    res["kmeans"] = {"points": 1_000_000, "k": 65536, "iterations": 5, "seconds": dt, "s_per_iteration": dt / 5,
                     "objective": obj}
    print("kmeans", json.dumps(res["kmeans"]), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_bench.json")
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--only", default="quantize,aggregate,search,kmeans")
    args = ap.parse_args()
    import torch

    res = {"device": cuda.device_name(), "runtime": d2r._native.cuda_runtime_info(), "build": d2r.build_info()}
    stages = {"quantize": lambda: bench_quantize(res, torch), "aggregate": lambda: bench_aggregate_insert(res, torch),
              "search": lambda: bench_search(res, torch, args.images), "kmeans": lambda: bench_kmeans(res, torch)}
    for name in args.only.split(","):
        try:
            stages[name]()
        except Exception as exc:  # keep the other figures
            import traceback

            traceback.print_exc()
            res[name + "_error"] = repr(exc)
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
