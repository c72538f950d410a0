"""Starting or joining the Ray cluster every other part of :mod:`d2r.distributed` runs on."""
from __future__ import annotations

import logging


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("d2r.distributed needs Ray: pip install 'd2r[ray]' (or pip install 'ray[data,serve]')") \
            from None
    return ray


def connect(address: str | None = "local", num_cpus: int | None = None, **init_kwargs):
    """Start or join a Ray cluster (once per process; a process already connected keeps its cluster).

    address: "local" (or None) starts one on this machine with `num_cpus` CPUs (default: all);
    "auto" joins the cluster running on this machine (``ray start --head``); anything else is a Ray
    address (``HOST:6379`` or ``ray://HOST:10001``). Returns the cluster's resources."""
    ray = _ray()
    if not ray.is_initialized():
        init_kwargs.setdefault("logging_level", logging.WARNING)   # not Ray's start-up notices
        if address in (None, "local"):
            ray.init(num_cpus=num_cpus, include_dashboard=False, **init_kwargs)
        else:
            if num_cpus is not None:
                raise ValueError("num_cpus is for a local cluster; a running cluster has its own")
            ray.init(address=address, **init_kwargs)
    return ray.cluster_resources()


def _require_connected():
    ray = _ray()
    if not ray.is_initialized():
        raise RuntimeError("not connected to a Ray cluster: call d2r.distributed.connect('local' | 'auto' | ADDRESS) "
                           "first (the command line's --ray)")
    return ray
