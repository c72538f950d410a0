"""``d2r serve``: a query service on Ray Serve in front of a sharded index (a :class:`d2r.distributed.
ShardedIndex`) or a single index file, the way to embed d2r in a larger system over HTTP.

Endpoints (JSON responses, UTF-8):

``POST /search`` (query parameter ``k``, default the service's; ``allow_partial=1`` to accept the
  answer of the shards that answered): the query as

  * raw image bytes (``Content-Type: image/jpeg``, ``image/png``, ... or ``application/octet-stream``),
  * a multipart form (``multipart/form-data``) with the image in the field ``image`` (or
    descriptors as a ``.npy`` file in the field ``descriptors``),
  * descriptors as JSON (``application/json``: ``{"descriptors": [[...], ...], "k": 10}``, float rows
    of the index's dimension),
  * descriptors as a ``.npy`` file (``Content-Type: application/x-npy``).

  Images are decoded as ``d2r.extract.read_image_rgb`` decodes a file and their features extracted with
  the extractor the index records (RootSIFT; DELF with ``--delf WEIGHTS``). The response::

    {"k": 10, "descriptors": 812, "kernel": "asmk*",
     "results": [{"rank": 1, "id": 17, "score": 0.53, "name": "/data/img17.jpg"}, ...],
     "shards": {"answered": [0, 1], "missing": []}}          # with allow_partial=1 only

  Errors: 400 with ``{"error": "..."}`` for a bad request (unreadable image, descriptors of the wrong
  shape, NaN, a bad k), 415 for an unsupported content type, 503 when a shard does not answer.

``GET /health``: ``{"status": "ok", "images": N, "shards": S}``; ``GET /stats``: the index's
statistics (per shard for a sharded index).

The service binds to 127.0.0.1 unless told otherwise (``--host``).
"""
from __future__ import annotations

import io
import json

import numpy as np

__all__ = ["QueryService", "make_app", "run"]

_NPY_MAGIC = b"\x93NUMPY"


class QueryService:
    """The service's logic, without HTTP: ``handle(method, path, query, content_type, body) -> (status,
    dict)``. The Ray Serve deployment wraps it; tests may call it directly."""

    def __init__(self, path, k: int = 10, delf=None, max_features=None, shard_options=None):
        from d2r.workflows.build import _read_names
        from d2r.distributed import MANIFEST, ShardedIndex
        from d2r.extract.describe import query_extractor
        from d2r.core.index import Index
        from pathlib import Path

        p = Path(path)
        if p.is_dir() or p.name == MANIFEST:
            self.index = ShardedIndex(p, **(shard_options or {}))
            self.names = self.index.names
            self.sharded = True
        else:
            self.index = Index.load(p, mmap=True)
            self.names = _read_names(p)
            self.sharded = False
        self.path = str(path)
        self.k = int(k)
        self.extractor = query_extractor(self.index.extractor, max_features, delf, where=str(path))
        self.dim = self.index.codebook.dim

    # ---- request parsing ---------------------------------------------------------------------------
    def _descriptors(self, content_type: str, body: bytes, form=None):
        """(descriptors (n, D) float32, k from the body or None)."""
        ct = (content_type or "").split(";")[0].strip().lower()
        if form is not None:
            if "image" in form:
                return self._extract(form["image"]), None
            if "descriptors" in form:
                return self._npy(form["descriptors"]), None
            raise ValueError("the form needs a field 'image' (an image file) or 'descriptors' (a .npy file)")
        if not body:
            raise ValueError("empty request body: send an image, a .npy file or JSON descriptors")
        if ct == "application/json":
            try:
                doc = json.loads(body)
            except ValueError as exc:
                raise ValueError(f"the JSON body does not parse: {exc}") from None
            if not isinstance(doc, dict) or "descriptors" not in doc:
                raise ValueError('the JSON body must be an object with "descriptors": [[...], ...]')
            try:
                x = np.asarray(doc["descriptors"], dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"descriptors must be rows of numbers: {exc}") from None
            return self._checked(x), doc.get("k")
        if ct == "application/x-npy" or body[:6] == _NPY_MAGIC:
            return self._npy(body), None
        if ct.startswith("image/") or ct in ("application/octet-stream", ""):
            return self._extract(body), None
        raise _Unsupported(f"unsupported content type {ct!r}: send image bytes (image/*), a .npy file "
                           "(application/x-npy), JSON descriptors (application/json) or a multipart form")

    def _extract(self, data: bytes):
        from d2r.extract import decode_image_rgb

        img = decode_image_rgb(data, "the posted image")
        return self.extractor(img).descriptors

    def _npy(self, data: bytes):
        try:
            x = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise ValueError(f"not a .npy file: {exc}") from None
        return self._checked(x)

    def _checked(self, x):
        from d2r.core.checks import as_descriptors

        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"descriptors must be (n, {self.dim}) for this index, got shape {x.shape}")
        return as_descriptors(x, self.dim)

    # ---- requests -----------------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict, content_type: str = "", body: bytes = b"", form=None):
        from d2r.distributed import ShardUnavailableError
        from d2r.extract import ImageLoadError

        path = "/" + path.strip("/")
        try:
            if path == "/health" and method == "GET":
                return 200, {"status": "ok", "images": len(self.index),
                             "shards": self.index.n_shards if self.sharded else 1}
            if path == "/stats" and method == "GET":
                return 200, self.index.stats()
            if path == "/search" and method == "POST":
                return 200, self._search(query, content_type, body, form)
            if path in ("/health", "/stats", "/search"):
                return 405, {"error": f"{method} {path} is not allowed (GET /health, GET /stats, POST /search)"}
            return 404, {"error": f"no endpoint {path} (GET /health, GET /stats, POST /search)"}
        except _Unsupported as exc:
            return 415, {"error": str(exc)}
        except ShardUnavailableError as exc:
            return 503, {"error": str(exc), "shards": exc.shards}
        except (ValueError, TypeError, ImageLoadError) as exc:
            return 400, {"error": str(exc)}

    def _search(self, query, content_type, body, form):
        x, k_body = self._descriptors(content_type, body, form)
        k = query.get("k", k_body if k_body is not None else self.k)
        try:
            k = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"k must be a positive integer, got {k!r}") from None
        if k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        partial = str(query.get("allow_partial", "0")).lower() in ("1", "true", "yes")
        out = {"k": k, "descriptors": int(x.shape[0]), "kernel": self.index.kernel}
        if self.sharded:
            res = self.index.search(x, k=k, allow_partial=partial)
            scores, ids = res[0], res[1]
            if partial:
                out["shards"] = res[2]
        else:
            scores, ids = self.index.search(x, k=k)
        out["results"] = [{"rank": r + 1, "id": int(i), "score": float(s),
                           "name": self.names[int(i)] if int(i) < len(self.names) else None}
                          for r, (s, i) in enumerate(zip(scores, ids))]
        return out


class _Unsupported(ValueError):
    pass


def make_app(path, k: int = 10, delf=None, max_features=None, shard_options=None, num_cpus: float = 0.5):
    """The Ray Serve application of the service (``serve.run(make_app(...))``)."""
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(ray_actor_options={"num_cpus": num_cpus})
    class D2RService:
        def __init__(self):
            self.service = QueryService(path, k=k, delf=delf, max_features=max_features, shard_options=shard_options)

        async def __call__(self, request):
            ct = request.headers.get("content-type", "")
            form = None
            body = b""
            if ct.startswith("multipart/form-data"):
                f = await request.form()
                form = {}
                for key in ("image", "descriptors"):
                    if key in f:
                        v = f[key]
                        form[key] = await v.read() if hasattr(v, "read") else str(v).encode()
            else:
                body = await request.body()
            status, doc = self.service.handle(request.method, request.url.path, dict(request.query_params), ct,
                                              body, form)
            return JSONResponse(doc, status_code=status)

    return D2RService.bind()  # type: ignore[attr-defined]  # bind() comes from @serve.deployment


def run(path, host: str = "127.0.0.1", port: int = 8000, k: int = 10, delf=None, max_features=None,
        shard_options=None, blocking: bool = True):
    """Start the service (Ray Serve, on the connected cluster) on host:port; blocking=True serves until
    interrupted (Ctrl-C), then shuts the service down."""
    import time

    from ray import serve

    from d2r.distributed.cluster import _route_ray_loggers

    _route_ray_loggers()   # Serve's loggers (set up as it is imported) into connect(log_file=...)'s file, if any
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(make_app(path, k=k, delf=delf, max_features=max_features, shard_options=shard_options),
              name="d2r", route_prefix="/")
    _route_ray_loggers()
    if not blocking:
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
