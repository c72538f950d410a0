"""d2r.distributed on a local Ray cluster of 2 CPUs (actors get fractions of a CPU): a sharded index
gives exactly the single index's scores and ids (ASMK*, R-ASMK*, regional search; synthetic data and
real photos); shard actors killed during a batch of queries come back with nothing acknowledged
lost, and with restarts exhausted the error names the shard; the Ray extraction pipeline writes the
same store as `d2r extract`, skipping a corrupt file; the command line drives it all. The shard log
and the store's parallel writers are also tested without Ray (the actor class is plain Python)."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import d2r
from d2r.workflows.build import build_index, build_regional_search_index
from d2r.extract import Features
from d2r.extract.store import save_features

from support import World, start_local_ray

DIM = 32


def _features(x):
    n = x.shape[0]
    return Features(x, np.zeros((n, 2), np.float32), np.ones(n, np.float32), np.ones(n, np.float32))


@pytest.fixture(scope="module")
def world():
    return World(seed=5, dim=DIM, n_objects=12, words_per_object=6)


@pytest.fixture(scope="module")
def store(world, tmp_path_factory):
    """A feature-store folder of 7 shards (53 images, one without features), with 2 regions each."""
    folder = tmp_path_factory.mktemp("dist") / "store"
    folder.mkdir()
    rng = np.random.default_rng(7)
    k = 0
    for shard, size in enumerate([8, 8, 8, 5, 8, 8, 8]):
        xs = [world.image() for _ in range(size)]
        if shard == 2:
            xs[1] = np.zeros((0, DIM), np.float32)
        regs = []
        for x in xs:
            m = x.shape[0]
            crops = [_features(x[rng.permutation(m)[:max(1, m // 2)]]) for _ in range(2)] if m else []
            regs.append((np.tile([[0, 0, 10, 10]], (len(crops), 1)).astype(np.float64), crops))
        save_features(folder / f"shard-{shard:05d}.npz", [f"/photos/img{k + i:03d}.jpg" for i in range(size)],
                      [_features(x) for x in xs], regs,
                      extractor={"name": "Synthetic", "params": {}, "fingerprint": "00112233aabbccdd"})
        k += size
    return folder


def _same(a, b):
    """Two (scores, ids) results are identical: ids equal, scores bit for bit."""
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].tobytes() == b[0].tobytes()


# ---- without Ray: the shard log, routing and the store's parallel writers -----------------------------
def test_shard_log_replay_is_durable_and_idempotent(world, store, tmp_path):
    from d2r.distributed import _ShardActor, _log_record, _ADD

    cb = d2r.Codebook(world.centroids)
    path = tmp_path / "shard.d2r"
    build_index(store, path, cb, progress=False)
    ref = d2r.Index.load(path)
    actor = _ShardActor(0, str(path), "lazy")
    new = [world.image() for _ in range(3)]
    b = AggregatedBatch_of(ref, new)
    ids = np.array([100, 101, 102], np.int64)
    assert actor.add(b.offsets, b.words, b.codes, b.fingerprint, ids, False) == 3
    ref.add(new, image_ids=ids)
    assert actor.remove(np.array([5, 101]), False) == 2
    ref.remove([5, 101])
    with pytest.raises(ValueError, match="already indexed"):
        actor.add(b.offsets, b.words, b.codes, b.fingerprint, ids[:1], False)
    with pytest.raises(KeyError, match="not indexed"):
        actor.remove(np.array([101]), False)
    queries = [world.image() for _ in range(4)]
    _same(actor.index.search(queries, k=None), ref.search(queries, k=None))
    # a restart: the file as it was built, the log replayed
    again = _ShardActor(0, str(path), "lazy")
    assert again.replayed == 2
    _same(again.index.search(queries, k=None), ref.search(queries, k=None))
    # a crash between a checkpoint's save and the log's truncation: the file holds the log's effects
    # already, and replaying them again changes nothing
    log = Path(str(path) + ".log").read_bytes()
    again.checkpoint()
    Path(str(path) + ".log").write_bytes(log)
    third = _ShardActor(0, str(path), "lazy")
    assert third.replayed == 2
    _same(third.index.search(queries, k=None), ref.search(queries, k=None))
    # a torn tail (a record cut short by a crash, never acknowledged) is dropped with a warning
    rec = _log_record(_ADD, offsets=b.offsets[:2], words=b.words[:int(b.offsets[1])],
                      codes=b.codes[:int(b.offsets[1])], ids=np.array([200], np.int64))
    with open(str(path) + ".log", "ab") as f:
        f.write(rec[:len(rec) // 2])
    with pytest.warns(RuntimeWarning, match="torn record"):
        fourth = _ShardActor(0, str(path), "lazy")
    assert 200 not in fourth.index
    assert Path(str(path) + ".log").stat().st_size == len(log)
    _same(fourth.index.search(queries, k=None), ref.search(queries, k=None))


def AggregatedBatch_of(index, images):
    batches, _ = index._db_batches(images)
    return d2r.AggregatedBatch.concat(batches)


def test_failed_add_leaves_the_log_as_it_was(world, store, tmp_path):
    from d2r.distributed import _ShardActor

    cb = d2r.Codebook(world.centroids)
    path = tmp_path / "shard.d2r"
    build_index(store, path, cb, progress=False)
    actor = _ShardActor(0, str(path), "lazy")
    b = AggregatedBatch_of(actor.index, [world.image()])
    bad_words = b.words.copy()
    bad_words[0] = cb.n_words   # out of range: refused before anything is logged
    with pytest.raises(ValueError, match="out of range"):
        actor.add(b.offsets, bad_words, b.codes, b.fingerprint, np.array([90], np.int64), False)
    assert Path(str(path) + ".log").stat().st_size == 0
    assert 90 not in actor.index


def test_route_and_manifest_errors(tmp_path):
    from d2r.distributed import read_manifest, route

    m = {"routing": {"bounds": [0, 24, 24, 53], "modulo": 3}}
    np.testing.assert_array_equal(route(m, [0, 23, 24, 52, 53, 54, 55, 56]), [0, 0, 2, 2, 53 % 3, 0, 1, 2])
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt or foreign manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a d2r sharded-index manifest"):
        read_manifest(tmp_path / "manifest.json")
    with pytest.raises(FileNotFoundError, match="no such sharded-index manifest"):
        read_manifest(tmp_path / "nowhere")


def test_store_parallel_writers_and_merged_errors(world, tmp_path):
    from d2r.extract.store import (next_shard_number, shard_files, drop_duplicate_images, load_features,
                              merge_store_errors, store_info)

    folder = tmp_path / "store"
    folder.mkdir()
    ex = {"name": "Synthetic", "params": {}, "fingerprint": "00112233aabbccdd"}
    xs = [world.image() for _ in range(6)]
    save_features(folder / "shard-00000.npz", ["/a0", "/a1"], [_features(x) for x in xs[:2]], extractor=ex)
    save_features(folder / "shard-w1-00000.npz", ["/b0", "/b1"], [_features(x) for x in xs[2:4]], extractor=ex)
    save_features(folder / "shard-w2-00000.npz", ["/b1", "/c0"], [_features(x) for x in xs[3:5]], extractor=ex)
    save_features(folder / "shard-w2-00001.npz", ["/b0"], [_features(xs[2])], extractor=ex)
    (folder / "errors.json").write_text(json.dumps([{"image": "/old", "error": "bad"},
                                                    {"image": "/c0", "error": "was bad once"}]))
    (folder / "errors-w1.json").write_text(json.dumps([{"image": "/x", "error": "not an image"}]))
    (folder / "errors-w2.json").write_text(json.dumps([{"image": "/y", "error": "empty"}]))
    shards = shard_files(folder)
    assert next_shard_number(shards) == 1 and next_shard_number(shards, "w2") == 2
    assert next_shard_number(shards, "w9") == 0
    # every error list merged, the images stored since (/c0) left out
    assert sorted(store_info(folder)["errors"]) == [("/old", "bad"), ("/x", "not an image"), ("/y", "empty")]
    assert drop_duplicate_images(folder) == 2   # /b1 in shard-w2-00000, /b0 (the whole of shard-w2-00001)
    assert not (folder / "shard-w2-00001.npz").exists()
    names, feats = load_features(folder)
    assert sorted(names) == ["/a0", "/a1", "/b0", "/b1", "/c0"] and len(set(names)) == 5
    got = dict(zip(names, feats))
    np.testing.assert_array_equal(got["/c0"].descriptors, xs[4])
    np.testing.assert_array_equal(got["/b1"].descriptors, xs[3])
    merged = merge_store_errors(folder)
    assert sorted(merged) == sorted(store_info(folder)["errors"])
    assert sorted(p.name for p in folder.glob("errors*.json")) == ["errors.json"]
    # a sequential writer goes on after its own numbers, whatever the parallel writers wrote
    assert next_shard_number(shard_files(folder)) == 1


# ---- on Ray -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs; the Ray module."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'd2r[ray]'); the distributed tests "
                                            "need it")
    start_local_ray(ray)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("kernel,pooling,shards", [("asmk*", None, 3), ("rasmk*", None, 4), ("asmk*", "max", 2),
                                                   ("asmk", "mean", 3)])
def test_sharded_equals_single_synthetic(cluster, world, store, tmp_path, kernel, pooling, shards):
    from d2r import distributed

    cb = d2r.Codebook(world.centroids)
    if pooling:
        single = build_regional_search_index(store, tmp_path / "one.d2r", cb, pooling, kernel, progress=False)
    else:
        single = build_index(store, tmp_path / "one.d2r", cb, kernel, progress=False)
    m = distributed.build_sharded_index(store, tmp_path / "sh", cb, shards, kernel, regional_search=pooling,
                                        progress=False)
    assert len(m["shards"]) == shards and sum(s["images"] for s in m["shards"]) == 53
    for p in m["paths"]:   # each shard opens alone as a normal index file
        alone = d2r.Index.load(p, mmap=True)
        assert type(alone) is type(single) and alone.kernel == single.kernel
    names = (tmp_path / "sh" / "names.txt").read_text().splitlines()
    assert names == (tmp_path / "one.d2r.names.txt").read_text().splitlines()
    si = distributed.ShardedIndex(tmp_path / "sh")
    try:
        queries = [world.image() for _ in range(6)]
        for k in (None, 1, 7, 200):
            _same(si.search(queries, k=k), single.search(queries, k=k))
        _same(si.search(queries[0], k=5), single.search(queries[0], k=5))
        assert len(si) == len(single) == 53
        # query expansion: the top results' codes fetched from the shards holding them; the single
        # index's expanded answer, bit for bit (and expansion changes some answer here)
        for expand in ("aqe", d2r.HQE(top=5, hamming=12, min_matches=1, min_images=1),
                       d2r.HQE(top=5, hamming=12, min_matches=1, min_images=1, fuse=0.5)):
            got = si.search(queries, k=10, expand=expand)
            _same(got, single.search(queries, k=10, expand=expand))
            assert not np.array_equal(got[0], single.search(queries, k=10)[0])
            if not pooling:
                _same(si.search_aggregated(single.aggregate(queries[1], query=True), k=10, expand=expand),
                      single.search(queries[1], k=10, expand=expand))
        # adds route to their shards (default ids after the build's), removes too; still identical
        new = [world.image() for _ in range(5)]
        if pooling:
            ids = si.add(new)
            single.add(new, image_ids=ids)
        elif kernel == "rasmk*":
            regions = [[x, x[: max(1, len(x) // 2)]] for x in new]
            ids = si.add_regions_many(regions)
            single.add_regions_many(regions, image_ids=ids)
        else:
            ids = si.add(new)
            single.add(new, image_ids=ids)
        np.testing.assert_array_equal(ids, np.arange(53, 58))
        assert sorted(set(distributed.route(si.manifest, ids).tolist())) == sorted({int(i) % shards for i in ids})
        si.remove([3, int(ids[1])])
        single.remove([3, int(ids[1])])
        _same(si.search(queries, k=None), single.search(queries, k=None))
        # the same folder searched in this process, without Ray: the shard files memory-mapped, their
        # logs (the adds and removes above) replayed read-only; the same answer, bit for bit
        logs = {p: Path(p + ".log").read_bytes() for p in m["paths"]}
        with distributed.LocalShardedIndex(tmp_path / "sh") as local:
            for k in (None, 1, 7):
                _same(local.search(queries, k=k), single.search(queries, k=k))
            _same(local.search(queries[0], k=5), single.search(queries[0], k=5))
            for expand in ("aqe", "hqe", "hqe-fused"):
                _same(local.search(queries, k=10, expand=expand), single.search(queries, k=10, expand=expand))
            assert len(local) == len(single) and local.n_shards == shards
            assert local.stats()["images"] == si.stats()["images"]
        assert {p: Path(p + ".log").read_bytes() for p in m["paths"]} == logs   # read, never written
        with pytest.raises(ValueError, match="already indexed"):
            si.add(new[:1], image_ids=[int(ids[0])])
        with pytest.raises(KeyError, match="not indexed"):
            si.remove([int(ids[1])])
    finally:
        si.close()


@pytest.fixture(scope="module")
def realmix_stores(cluster, tmp_path_factory):
    """40 realmix photos and one corrupt file, extracted by the Ray pipeline (3 actors sharing the 2
    CPUs, shards of 6 images) and by extract_dataset."""
    from d2r.datasets.realmix import find_realmix
    from d2r.extract import RootSIFT
    from d2r import distributed

    root = find_realmix()
    if root is None:
        pytest.skip("../shared/data/realmix is absent (real-photo tests need the shared data)")
    images = sorted((Path(root) / "images").rglob("*.jpg"))[::5][:40]
    tmp = tmp_path_factory.mktemp("realmix")
    bad = tmp / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths = [str(p) for p in images] + [str(bad)]
    ext = RootSIFT(max_features=300)
    with pytest.warns(d2r.extract.UnreadableImagesWarning):
        done, errors = distributed.extract(paths, tmp / "ray-store", ext, actors=3, cpus_per_actor=0.5, shard_size=6,
                                           progress=False)
    with pytest.warns(d2r.extract.UnreadableImagesWarning):
        d2r.extract_dataset(paths, tmp / "seq-store", ext, progress=False)
    return tmp, paths, done, errors


def test_ray_extraction_writes_the_same_store(realmix_stores):
    tmp, paths, done, errors = realmix_stores
    assert len(done) == 40 and [e[0] for e in errors] == [paths[-1]]
    ray_info, seq_info = d2r.store_info(tmp / "ray-store"), d2r.store_info(tmp / "seq-store")
    assert ray_info["images"] == seq_info["images"] == 40
    assert ray_info["extractor"] == seq_info["extractor"]
    assert [e[0] for e in ray_info["errors"]] == [e[0] for e in seq_info["errors"]] == [paths[-1]]
    assert ray_info["shards"] >= 7   # each actor wrote its own shards
    n1, f1 = d2r.load_features(tmp / "ray-store")
    n2, f2 = d2r.load_features(tmp / "seq-store")
    a, b = dict(zip(n1, f1)), dict(zip(n2, f2))
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name].descriptors, b[name].descriptors)
        np.testing.assert_array_equal(a[name].locations, b[name].locations)
    # resumable: a second run stores nothing new and keeps the one error list
    from d2r import distributed
    from d2r.extract import RootSIFT

    with pytest.warns(d2r.extract.UnreadableImagesWarning):
        again, _ = distributed.extract(paths, tmp / "ray-store", RootSIFT(max_features=300), actors=2,
                                       cpus_per_actor=0.5, progress=False)
    assert again == [] and d2r.store_info(tmp / "ray-store")["images"] == 40
    assert sorted(p.name for p in (tmp / "ray-store").glob("errors*.json")) == ["errors.json"]


@pytest.fixture(scope="module")
def realmix_index(realmix_stores):
    from d2r import distributed
    from d2r.workflows.pipeline import train_codebook

    tmp = realmix_stores[0]
    names, feats = d2r.load_features(tmp / "ray-store")
    cb = train_codebook(feats, 128, seed=0, progress=False)
    single = build_index(tmp / "ray-store", tmp / "one.d2r", cb, progress=False)
    distributed.build_sharded_index(tmp / "ray-store", tmp / "sh", cb, 2, progress=False)
    return tmp, cb, single, feats


def test_sharded_equals_single_realmix(realmix_index):
    from d2r import distributed

    tmp, cb, single, feats = realmix_index
    with distributed.ShardedIndex(tmp / "sh") as si:
        queries = [f.descriptors for f in feats[::3]]
        for k in (None, 10):
            _same(si.search(queries, k=k), single.search(queries, k=k))
        # the image finds itself first
        s, i = si.search(feats[4].descriptors, k=3)
        assert si.name(int(i[0])) == (tmp / "sh" / "names.txt").read_text().splitlines()[4]


def test_kill_during_a_batch_and_durable_adds(cluster, realmix_index):
    from d2r import distributed

    ray = cluster
    tmp, cb, single, feats = realmix_index
    import shutil

    shutil.copytree(tmp / "sh", tmp / "sh-kill")
    ref = d2r.Index.load(tmp / "one.d2r")
    si = distributed.ShardedIndex(tmp / "sh-kill", max_restarts=2, retries=4, retry_wait=0.5, max_concurrency=1)
    try:
        added = [f.descriptors[::-1][:200] for f in feats[:3]]
        ids = si.add(added)   # acknowledged: in the shards' logs on disk
        ref.add(added, image_ids=ids)
        owner = int(distributed.route(si.manifest, ids[:1])[0])
        before = ray.get(si.actors[owner].ping.remote())["pid"]
        queries = [f.descriptors for f in feats[::2]]
        si.actors[owner].hold.remote(3.0)   # the shard is busy: the batch's call to it waits in its queue
        out = {}
        t = threading.Thread(target=lambda: out.update(r=si.search(queries, k=None)))
        t.start()
        time.sleep(1.0)
        ray.kill(si.actors[owner], no_restart=False)   # killed with the batch's call in flight
        t.join(120)
        assert "r" in out, "the batch did not complete"
        _same(out["r"], ref.search(queries, k=None))   # the full answer, the acknowledged adds included
        after = ray.get(si.actors[owner].ping.remote())
        assert after["pid"] != before and after["replayed"] >= 1
        s, i = si.search(added[1], k=1)
        assert int(i[0]) == int(ids[1])
    finally:
        si.close()


def test_restarts_exhausted_names_the_shard(cluster, realmix_index):
    from d2r import distributed

    ray = cluster
    tmp, cb, single, feats = realmix_index
    si = distributed.ShardedIndex(tmp / "sh", max_restarts=0, retries=1, retry_wait=0.2)
    try:
        queries = [f.descriptors for f in feats[:4]]
        ray.kill(si.actors[1], no_restart=False)
        with pytest.raises(distributed.ShardUnavailableError, match=r"shard 1 \(.*shard-00001\.d2r\)") as exc:
            si.search(queries, k=5)
        assert exc.value.shards == [1]
        s, i, info = si.search(queries, k=None, allow_partial=True)
        assert info == {"answered": [0], "missing": [1]}
        full_s, full_i = single.search(queries, k=None)
        lo, hi = si.manifest["shards"][0]["ids"]
        for r in range(len(queries)):   # shard 0's images, in the single index's order
            keep = (full_i[r] >= lo) & (full_i[r] < hi)
            np.testing.assert_array_equal(i[r], full_i[r][keep])
    finally:
        si.close()


def test_cli_ray_extract_index_search(realmix_stores, tmp_path, capsys):
    from d2r.cli import main

    tmp, paths, _, _ = realmix_stores
    images = tmp_path / "images.txt"
    images.write_text("\n".join(paths[:12]) + "\n")
    assert main(["extract", str(images), "--out", str(tmp_path / "store"), "--ray", "local", "--max-features", "300",
                 "-q"]) == 0
    assert d2r.store_info(tmp_path / "store")["images"] == 12
    assert main(["train-codebook", str(tmp_path / "store"), "--words", "64", "--out", str(tmp_path / "cb.npy"),
                 "-q"]) == 0
    capsys.readouterr()
    assert main(["index", str(tmp_path / "store"), "--codebook", str(tmp_path / "cb.npy"), "--out",
                 str(tmp_path / "sh"), "--shards", "2", "--json", "-q"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["shards"] == 2 and doc["images"] == 12
    assert main(["index", str(tmp_path / "store"), "--codebook", str(tmp_path / "cb.npy"), "--out",
                 str(tmp_path / "one.d2r"), "-q"]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "sh"), paths[3], "-k", "5", "--json", "--ray", "local"]) == 0
    sharded = json.loads(capsys.readouterr().out)
    assert main(["search", str(tmp_path / "sh"), paths[3], "-k", "5", "--json"]) == 0   # in process, no Ray
    in_process = json.loads(capsys.readouterr().out)
    assert main(["search", str(tmp_path / "one.d2r"), paths[3], "-k", "5", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    # the same results; normalised scores come from a single index only (README: Reading scores)
    assert all(r.pop("normalized") is None for r in sharded["queries"][0]["results"])
    assert all(r.pop("normalized") is None for r in in_process["queries"][0]["results"])
    assert [r.pop("normalized") for r in one["queries"][0]["results"]][0] == pytest.approx(1.0, abs=1e-5)
    assert sharded["queries"][0]["results"] == one["queries"][0]["results"] == in_process["queries"][0]["results"]
    assert sharded["queries"][0]["results"][0]["name"] == paths[3]
    assert main(["index", str(tmp_path / "store"), "--codebook", str(tmp_path / "cb.npy"), "--out",
                 str(tmp_path / "bad"), "--shards", "0"]) == 2
    assert "--shards must be at least 1" in capsys.readouterr().err


def test_service_answers_over_http(realmix_index):
    """`d2r serve` (Ray Serve) in front of the sharded index: a real photo posted as bytes, as a multipart
    form, descriptors as JSON and as .npy give the Python API's ranking; health, stats and errors."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'd2r[ray]')")
    import io
    import socket
    import urllib.error
    import urllib.request

    from ray import serve

    from d2r import distributed
    from d2r.distributed import serve as d2r_serve
    from d2r.extract import RootSIFT

    tmp, cb, single, feats = realmix_index
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d2r_serve.run(tmp / "sh", port=port, k=5, blocking=False)
    base = f"http://127.0.0.1:{port}"

    def call(path, data=None, ctype=None):
        req = urllib.request.Request(base + path, data=data, headers={"Content-Type": ctype} if ctype else {},
                                     method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        names = (tmp / "sh" / "names.txt").read_text().splitlines()
        photo = names[7]
        with distributed.ShardedIndex(tmp / "sh") as si:
            q = RootSIFT(max_features=300)(photo).descriptors
            want_s, want_i = si.search(q, k=5)
        status, health = call("/health")
        assert status == 200 and health == {"status": "ok", "images": 40, "shards": 2}
        status, doc = call("/search", Path(photo).read_bytes(), "image/jpeg")
        assert status == 200, doc
        assert [r["id"] for r in doc["results"]] == want_i.tolist()
        np.testing.assert_allclose([r["score"] for r in doc["results"]], want_s, rtol=0, atol=1e-6)
        assert doc["results"][0]["name"] == photo and doc["descriptors"] == len(q)
        boundary = "d2rtestboundary"
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode() + Path(photo).read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        status, doc2 = call("/search?k=5", form, f"multipart/form-data; boundary={boundary}")
        assert status == 200 and doc2["results"] == doc["results"]
        status, doc3 = call("/search", json.dumps({"descriptors": q.tolist(), "k": 5}).encode(), "application/json")
        assert status == 200 and [r["id"] for r in doc3["results"]] == want_i.tolist()
        buf = io.BytesIO()
        np.save(buf, q)
        status, doc4 = call("/search?k=3", buf.getvalue(), "application/x-npy")
        assert status == 200 and [r["id"] for r in doc4["results"]] == want_i[:3].tolist()
        status, err = call("/search", b"garbage bytes", "image/jpeg")
        assert status == 400 and "cannot decode" in err["error"]
        status, err = call("/search", json.dumps({"descriptors": [[1.0, 2.0]]}).encode(), "application/json")
        assert status == 400 and "(n, 128)" in err["error"]
        status, err = call("/search", b"<a/>", "text/xml")
        assert status == 415
        status, st = call("/stats")
        assert status == 200 and st["images"] == 40 and len(st["shards"]) == 2
    finally:
        serve.shutdown()


def test_shard_index_splits_a_single_file(cluster, world, store, tmp_path):
    """An existing index file split into shards (d2r.distributed.shard_index) answers as the file does,
    after removals too (ids not contiguous)."""
    from d2r import distributed

    cb = d2r.Codebook(world.centroids)
    single = build_index(store, tmp_path / "one.d2r", cb, progress=False)
    single.remove([0, 1, 30])
    single.save(tmp_path / "holes.d2r")
    m = distributed.shard_index(tmp_path / "holes.d2r", tmp_path / "sh", 4, progress=False)
    sizes = [s["images"] for s in m["shards"]]
    assert sum(sizes) == 50 and max(sizes) - min(sizes) <= 1   # balanced by images
    with distributed.ShardedIndex(tmp_path / "sh") as si:
        queries = [world.image() for _ in range(5)]
        _same(si.search(queries, k=None), single.search(queries, k=None))
        _same(si.search(queries, k=3), single.search(queries, k=3))
