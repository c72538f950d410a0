"""Beyond one machine, on Ray: distributed extraction, sharded indexes and fan-out search.

Needs Ray (``pip install 'd2r[ray]'``); d2r must be installed on every node of the cluster, and the
feature store and the index shards must live on storage every node sees under the same path (a
shared POSIX file system: NFS, Lustre, CephFS, a local disk on one machine). Object-store URIs
(``s3://``, ``gs://``) are not supported: a shard is memory-mapped, which needs a file.

* :func:`connect` starts or joins a cluster (``"local"``: always a new one on this machine, whatever
  ``RAY_ADDRESS`` says; ``"auto"``: the running one; or an address, probed first: one that does not
  answer raises :class:`ClusterUnreachableError` within ``timeout`` seconds); ``log_file=`` sends
  Ray's own output there instead of stderr; :func:`disconnect` leaves (a local cluster stops).
* :func:`extract` runs any d2r extractor (and region source) over images with Ray Data
  (``map_batches`` on a pool of extractor actors, ``num_gpus=1`` per actor where the cluster has
  GPUs) and writes the same resumable feature store as ``d2r extract``; each actor writes its own
  shards (``shard-WRITER-NNNNN.npz``) and error list, merged into ``errors.json`` at the end.
* :func:`build_sharded_index` builds N shards in parallel (one Ray task per shard, each streaming
  its part of the store like :func:`d2r.build.build_index`) into a folder: ``shard-NNNNN.d2r``
  (each a normal index file: ``d2r.Index.load`` opens any of them alone), ``names.txt`` (image names
  by id) and ``manifest.json`` (written last, atomically).
* :class:`ShardedIndex` opens a manifest: one actor per shard memory-maps its file; a query is
  quantised and aggregated once, sent to every shard, and the shards' top-k are merged with the
  single index's tie rule (score descending, id ascending); :class:`LocalShardedIndex` searches the
  same folder in this process, without Ray (every shard memory-mapped), with the same merge. ASMK
  scores are per-image sums with per-image normalisation and d2r keeps no global statistics, so the
  merged ranking is exactly the single index's.

Routing: a shard owns a contiguous block of the ids the build gave (the images of consecutive store
shards); an id at or after the build's last one (an image added later) belongs to shard
``id % n_shards``. The manifest records both (``routing``).

Faults: shard actors restart (``max_restarts``) and reload their shard file, then replay the
shard's log (``shard-NNNNN.d2r.log``): an add or remove is written to the log and fsynced before it
is acknowledged, so a restart loses nothing acknowledged; :meth:`ShardedIndex.checkpoint` saves the
shards and empties the logs. A call that hits a dead or restarting shard is retried (``retries``
times, with a growing wait) and then completes with the full answer, or raises
:class:`ShardUnavailableError` naming the shard; ``allow_partial=True`` returns what the other shards
answered with a record of which did.

Layout: :mod:`~d2r.distributed.cluster` (``connect``), :mod:`~d2r.distributed.extraction`
(``extract`` and its actors), :mod:`~d2r.distributed.sharded` (the manifest and routing, the sharded
build, the shard actors and their logs, ``ShardedIndex``, ``open_index``) and
:mod:`~d2r.distributed.serve` (the HTTP service); every name is importable from ``d2r.distributed``.
"""
from __future__ import annotations

# every name the package held before its split, private ones included (the command line, serve.py and
# the tests reach some of them here)
from d2r.distributed.cluster import (  # noqa: F401
    DEFAULT_CONNECT_TIMEOUT, ClusterUnreachableError, _ray, _require_connected, connect, disconnect, ray_log_file)
from d2r.distributed.extraction import _ExtractActor, _Factory, extract  # noqa: F401
from d2r.distributed.sharded import (  # noqa: F401
    _ADD, _LOG_HEAD, _LOG_MAGIC, _REMOVE, _SHARD_FILE, MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION, NAMES,
    LocalShardedIndex, ShardedIndex,
    ShardUnavailableError, _build_one, _entries_subset, _log_record, _merge_topk, _read_log, _ShardActor, _split,
    _store_shard_sizes, _write_manifest, build_sharded_index, open_index, read_manifest, route, shard_index)

__all__ = ["ClusterUnreachableError", "DEFAULT_CONNECT_TIMEOUT", "LocalShardedIndex", "ShardUnavailableError",
           "ShardedIndex", "build_sharded_index", "connect", "disconnect", "extract", "open_index", "ray_log_file",
           "read_manifest", "route", "shard_index"]
