"""Feature stores whose database regions are discovered from the collection itself (``d2r extract
--regions discovered``): a resumable three-pass job."""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["extract_with_discovered_regions"]


def extract_with_discovered_regions(paths, out, extractor, *, workers: int = 1, codebook=None, words: int = 1024,
                                    max_regions: int = 5, strict: bool = False, progress: bool = True) -> dict:
    """Extract `paths` into the feature-store folder `out` with regions discovered from the collection
    itself, in three passes, each resumable:

    1. the whole images into OUT/discover/whole (a store of its own);
    2. a codebook (the file `codebook`, or k-means with `words` words, saved as
       OUT/discover/codebook.npy) and d2r.discover.discover_regions over an ASMK* index of all those
       images, for the images not in OUT yet (so images added by a later run get their regions from
       the collection as it is then), written to OUT/discover/boxes.json;
    3. OUT: each image's stored whole-image features (not extracted again) and its regions
       re-extracted on their crops.

    Returns {"stored": the names stored in OUT by this run, "errors": the unreadable images of the
    first pass as (name, reason), "errors_file": where they are listed, "boxes_file",
    "regions_per_image" and "images_without_regions" (over the new images), "codebook_words"}.

    `d2r extract --regions discovered` is its command."""
    from d2r.regions import detect
    from d2r.core.codebook import Codebook
    from d2r.regions.discover import discover_regions
    from d2r.extract.store import load_features, store_info
    from d2r.workflows.collection import extract_dataset
    from d2r.workflows.pipeline import train_codebook

    sift = extractor
    out = Path(out)
    work = out / "discover"
    stored1, errors = extract_dataset(paths, work / "whole", sift, workers=workers, progress=progress,
                                      strict=strict, desc="extract whole images (pass 1 of 3)")
    names, feats = load_features(work / "whole")
    if codebook:
        cb = Codebook.load(codebook)
    elif (work / "codebook.npy").exists():
        cb = Codebook.load(work / "codebook.npy")
    else:
        n = sum(len(f.descriptors) for f in feats)
        cb = train_codebook(feats, min(words, max(1, n // 10)), progress=progress)
        cb.save(work / "codebook.npy")
    if cb.dim != feats[0].descriptors.shape[1]:
        raise ValueError(f"--codebook {codebook}: {cb.dim}-D words for {feats[0].descriptors.shape[1]}-D features")
    done = set()
    if out.is_dir() and any(out.glob("shard-*.npz")):
        info = store_info(out)
        if info.get("region_source") not in (None, "discovered"):
            from d2r.extract.store import StoreMismatchError

            raise StoreMismatchError(f"{out} holds regions from {info['region_source']}, not from discovered; "
                                     "use the same --regions or another store")
        done = set(load_features(out)[0])
    wanted = {os.path.abspath(p) for p in paths}
    new = [i for i, nm in enumerate(names) if nm not in done and nm in wanted]
    boxes_file = work / "boxes.json"
    boxes = json.loads(boxes_file.read_text()) if boxes_file.exists() else {}
    todo = [i for i in new if names[i] not in boxes]
    if todo:
        found = discover_regions([feats[i] for i in todo], index=_whole_index(cb, feats), db_features=feats,
                                 ids=todo, max_regions=max_regions, progress=progress)
        for i, (b, sc) in zip(todo, found):
            boxes[names[i]] = [[*map(float, bb), float(s)] for bb, s in zip(b, sc)]
        from d2r.core.atomic import atomic_write

        with atomic_write(boxes_file) as f:
            f.write(json.dumps(boxes).encode())
    n_regions = [len(boxes.get(names[i], [])) for i in new]
    stored, errors2 = extract_dataset([names[i] for i in new], out, sift, detector=detect.BoxesFromFile(boxes_file),
                                      max_regions=max_regions, region_source="discovered",
                                      progress=progress, strict=strict,
                                      whole_features={names[i]: feats[i] for i in new},
                                      desc="extract the regions' crops (pass 3 of 3)")
    return {"stored": stored, "errors": errors, "errors_file": work / "whole" / "errors.json",
            "boxes_file": boxes_file,
            "regions_per_image": sum(n_regions) / len(n_regions) if n_regions else 0.0,
            "images_without_regions": int(sum(r == 0 for r in n_regions)),
            "codebook_words": cb.n_words}


def _whole_index(codebook, feats):
    """An ASMK* index of whole-image features, ids 0..n-1 (discovery's first index)."""
    from d2r.core.index import Index

    index = Index(codebook, "asmk*")
    index.add([f.descriptors for f in feats], progress=False)
    return index
