"""Distributed extraction: any d2r extractor (and region source) over images with Ray Data, into
the same resumable feature store as ``d2r extract`` (:func:`extract`)."""
from __future__ import annotations

import logging
import os
import uuid
import warnings
from pathlib import Path

import numpy as np

from d2r.core.checks import check_positive_int
from d2r.core.progress import bar as _bar
from d2r.distributed.cluster import _require_connected, _route_ray_loggers


class _ExtractActor:
    """A Ray Data map_batches callable: extracts a batch of image paths and writes them as one shard
    of its own (shard-WRITER-NNNNN.npz) plus its error list (errors-WRITER.json)."""

    def __init__(self, store, extractor, detector, max_regions, region_source=None):
        from d2r.extract import describe
        from d2r.extract.store import next_shard_number, shard_files

        self.store = Path(store)
        self.extractor = extractor() if isinstance(extractor, _Factory) else extractor
        self.detector = detector() if isinstance(detector, _Factory) else detector
        self.max_regions = max_regions
        self.region_source = region_source
        self.info = describe(self.extractor)
        self.writer = uuid.uuid4().hex[:12]
        self.next = next_shard_number(shard_files(self.store), self.writer)
        self.errors = []

    def __call__(self, batch):
        from d2r.extract import ImageLoadError
        from d2r.extract.store import WRITER_SHARD, write_errors, save_features
        from d2r.workflows.collection import extract_one

        names, feats, regs, ok, why = [], [], [], [], []
        for path in batch["path"]:
            path = str(path)
            try:
                f, r = extract_one(self.extractor, self.detector, self.max_regions, path)
            except ImageLoadError as exc:
                self.errors.append((path, str(exc)))
                ok.append(False)
                why.append(str(exc))
                continue
            names.append(path)
            feats.append(f)
            regs.append(r)
            ok.append(True)
            why.append("")
        if names:
            save_features(self.store / WRITER_SHARD.format(self.writer, self.next), names, feats,
                          regs if self.detector is not None else None, extractor=self.info,
                          region_source=self.region_source)
            self.next += 1
        if self.errors:
            write_errors(self.store / f"errors-{self.writer}.json", self.errors)
        return {"path": np.asarray([str(p) for p in batch["path"]]), "ok": np.asarray(ok, bool),
                "error": np.asarray(why, dtype=str)}


class _Factory:
    """A zero-argument constructor run inside each actor (for extractors that should not be pickled
    whole, e.g. DELF with its weights): ``_Factory(DELF, weights, max_features=1000)``."""

    def __init__(self, fn, *args, **kwargs):
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __call__(self):
        return self.fn(*self.args, **self.kwargs)


def extract(images, store, extractor=None, *, actors: int | None = None, shard_size: int = 64, detector=None,
            max_regions: int = 5, num_gpus: float | None = None, cpus_per_actor: float = 1.0,
            region_source: str | None = None, progress: bool = True):
    """Extract `images` (paths) into the feature-store folder `store` on the Ray cluster, resumably:
    the store's images are skipped, the rest go through Ray Data ``map_batches`` on a pool of `actors`
    extractor actors (default: one per CPU of the cluster, or per GPU where it has GPUs), `shard_size`
    images per shard. Each actor writes its own shards, so any number run at once; unreadable images
    are listed (``errors.json``, merged at the end), never fatal.

    extractor: a d2r extractor (default RootSIFT(1000)), pickled to every actor. detector: a region
    source as in :func:`d2r.extract_dataset` (the kept boxes are re-extracted and stored as regions).
    num_gpus: GPUs per actor (default: 1 where the cluster has GPUs, else 0). region_source: the
    detector's name, recorded in the store (as extract_dataset does).

    Returns (the names stored by this run, errors of this run as (name, reason))."""
    ray = _require_connected()
    from d2r.extract import NoUsableImagesError, RootSIFT, UnreadableImagesWarning, describe
    from d2r.extract.store import scan_store, check_extractor, drop_duplicate_images, merge_store_errors

    if isinstance(images, (str, bytes, os.PathLike)):
        raise TypeError(f"images must be a list of image paths, got one path {images!r}")
    shard_size = check_positive_int(shard_size, "shard_size")
    store = Path(store).resolve()
    if store.exists() and not store.is_dir():
        raise ValueError(f"{store}: exists and is not a folder (a distributed extraction writes a store folder)")
    extractor = extractor if extractor is not None else RootSIFT(max_features=1000)
    info = describe(extractor() if isinstance(extractor, _Factory) else extractor)
    stored = set()
    if store.exists() and any(store.glob("shard-*.npz")):
        stored_info, names = scan_store(store)
        check_extractor(stored_info["extractor"], info, store)
        stored = set(names)
    store.mkdir(parents=True, exist_ok=True)
    todo = [p for p in dict.fromkeys(os.path.abspath(os.fspath(p)) for p in images) if p not in stored]
    errors, done = [], []
    if todo:
        res = ray.cluster_resources()
        if num_gpus is None:
            num_gpus = 1.0 if res.get("GPU", 0) >= 1 else 0.0
        if actors is None:
            actors = int(res.get("GPU", 0) // max(num_gpus, 1e-9)) if num_gpus else int(res.get("CPU", 1)
                                                                                            // cpus_per_actor)
        actors = max(1, min(check_positive_int(actors, "actors"), -(-len(todo) // shard_size)))
        quiet = warnings.catch_warnings()   # Ray Data's own deprecation notices about its settings
        quiet.__enter__()
        warnings.filterwarnings("ignore", message=".*deprecated", module=r"ray(\.|$)")
        logging.getLogger("ray.data").setLevel(logging.ERROR)   # its per-run notices; errors still show
        ctx = ray.data.DataContext.get_current()   # d2r's own bar shows the progress, once
        _route_ray_loggers()   # Ray Data's loggers (set up as it is imported) into the log file, if any
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=-(-len(todo) // shard_size))
        out = ds.map_batches(_ExtractActor, batch_size=shard_size,
                             compute=ray.data.ActorPoolStrategy(size=actors),
                             fn_constructor_args=(str(store), extractor, detector, max_regions,
                                                  region_source if detector is not None else None),
                             num_cpus=cpus_per_actor, num_gpus=num_gpus or None)
        bar = _bar(len(todo), "extract (ray)", progress, leave=True)
        try:
            for b in out.iter_batches(batch_size=None, batch_format="numpy"):
                for p, ok, why in zip(b["path"], b["ok"], b["error"]):
                    (done.append(str(p)) if ok else errors.append((str(p), str(why))))
                if bar is not None:
                    bar.update(len(b["path"]))
        finally:
            quiet.__exit__(None, None, None)
            if bar is not None:
                bar.close()
    dropped = drop_duplicate_images(store)   # a batch run again after its actor died, its shard already written
    if dropped:
        done = sorted(set(done))
    merge_store_errors(store)
    if errors:
        if not done and not stored:
            raise NoUsableImagesError(f"none of the {len(todo)} images could be read (first: {errors[0][1]}); all "
                                      f"are listed in {store / 'errors.json'}")
        kept = f"; {len(stored)} already stored were kept" if stored else ""
        warnings.warn(f"{len(errors)} of the {len(todo)} images to extract could not be read and were skipped, "
                      f"{len(set(done))} were added{kept} (first: "
                      f"{errors[0][1]}); all are listed in {store / 'errors.json'}", UnreadableImagesWarning,
                      stacklevel=2)
    return done, errors
