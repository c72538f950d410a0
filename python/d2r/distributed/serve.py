"""``d2r serve``: a query service on Ray Serve in front of a sharded index (a :class:`d2r.distributed.
ShardedIndex`) or a single index file, the way to embed d2r in a larger system over HTTP.

Endpoints (JSON responses, UTF-8):

``POST /search`` (query parameter ``k``, default the service's; ``allow_partial=1`` to accept the
  answer of the shards that answered): the query as

  * raw image bytes (``Content-Type: image/jpeg``, ``image/png``, ... or ``application/octet-stream``),
  * a multipart form (``multipart/form-data``) with the image in the field ``image`` (or
    descriptors as a ``.npy`` file in the field ``descriptors``),
  * descriptors as JSON (``application/json``: ``{"descriptors": [[...], ...], "k": 10}``, rows of
    JSON numbers of the index's dimension; ``k`` a JSON integer),
  * descriptors as a ``.npy`` file (``Content-Type: application/x-npy``; float32 or float64).

  Images are decoded as ``d2r.extract.read_image_rgb`` decodes a file and their features extracted with
  the extractor the index records (RootSIFT; DELF with ``--delf WEIGHTS``). The response::

    {"k": 10, "descriptors": 812, "kernel": "asmk*",
     "results": [{"rank": 1, "id": 17, "score": 0.53, "name": "/data/img17.jpg"}, ...],
     "shards": {"answered": [0, 1], "missing": []}}          # with allow_partial=1 only

  Every request is parsed and checked by :func:`d2r.distributed.request_parsing.parse_search` against
  the service's :class:`~d2r.distributed.request_parsing.Limits`. Errors, each with ``{"error": "..."}``:
  400 a malformed request (unreadable image, descriptors of the wrong shape, NaN, a bad k, bad JSON,
  multipart or .npy), 401 a missing or wrong bearer token, 404/405 an unknown endpoint or method, 413
  beyond a limit (body bytes, image pixels, descriptors), 415 an unsupported content type, 503 when a
  shard does not answer. A 500 (also JSON) would be a bug.

``GET /health``: ``{"status": "ok", "images": N, "shards": S}``, answered on the event loop (never behind
queries, which run in a thread pool) and without the token; ``GET /stats``: the index's statistics
(per shard for a sharded index).

The service binds to 127.0.0.1 unless told otherwise (``--host``); beyond loopback it needs a token.
"""
from __future__ import annotations

import ipaddress
import logging
from typing import Any

from d2r.distributed.request_parsing import Limits, RequestError, check_token, parse_search

__all__ = ["QueryService", "is_loopback", "make_app", "run"]

_log = logging.getLogger("d2r.serve")


def is_loopback(host: str) -> bool:
    """Whether binding to host is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    h = host.strip().strip("[]")
    if h.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _check_bind(host: str, token) -> None:
    if token is not None and (not isinstance(token, str) or len(token) < 8):
        raise ValueError("the service's token must be a string of at least 8 characters")
    if token is None and not is_loopback(host):
        raise ValueError(f"binding to {host!r} (beyond loopback) needs a bearer token: pass --token or set "
                         "D2R_SERVE_TOKEN (clients then send 'Authorization: Bearer <token>')")


# after a query image of at least this many pixels, the freed heap is handed back to the system
_TRIM_PIXELS = 2_000_000
_LIBC: Any = None   # the C library once loaded (False where it cannot be)


def _trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim; nothing elsewhere): a large
    image's decoding and scale space would otherwise stay in the process's RSS."""
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


class QueryService:
    """The service's logic, without HTTP: ``handle(method, path, query, content_type, body,
    authorization=None) -> (status, dict)``. The Ray Serve deployment wraps it; tests may call it
    directly. limits: a :class:`~d2r.distributed.request_parsing.Limits`; token: the bearer token every
    endpoint but ``/health`` then requires."""

    def __init__(self, path, k: int = 10, delf=None, max_features=None, shard_options=None,
                 limits: Limits | None = None, token: str | None = None):
        from d2r.workflows.build import _read_names
        from d2r.distributed import MANIFEST, ShardedIndex
        from d2r.extract.describe import query_extractor
        from d2r.core.index import Index
        from pathlib import Path

        self.limits = limits if limits is not None else Limits()
        if type(k) is not int or not 1 <= k <= self.limits.k_max:
            raise ValueError(f"k must be an integer from 1 to k_max={self.limits.k_max}, got {k!r}")
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
        self.k = k
        self.token = token
        self.extractor = query_extractor(self.index.extractor, max_features, delf, where=str(path))
        self.dim = self.index.codebook.dim
        # the service never adds or removes: the count is the index's for its lifetime (and /health must
        # not wait on busy shards)
        self.n_images = len(self.index)

    # ---- requests -----------------------------------------------------------------------------------
    def health(self):
        return 200, {"status": "ok", "images": self.n_images, "shards": self.index.n_shards if self.sharded else 1}

    def handle(self, method: str, path: str, query, content_type: str = "", body: bytes = b"",
               authorization: str | None = None):
        from d2r.distributed import ShardUnavailableError
        from d2r.extract import ImageLoadError

        path = "/" + path.strip("/")
        try:
            if path == "/health" and method == "GET":
                return self.health()
            check_token(authorization, self.token)
            if path == "/stats" and method == "GET":
                return 200, self.index.stats()
            if path == "/search" and method == "POST":
                return 200, self._search(query, content_type, body)
            if path in ("/health", "/stats", "/search"):
                return 405, {"error": f"{method} {path} is not allowed (GET /health, GET /stats, POST /search)"}
            return 404, {"error": f"no endpoint {path[:100]} (GET /health, GET /stats, POST /search)"}
        except RequestError as exc:
            return exc.status, exc.body()
        except ShardUnavailableError as exc:
            return 503, {"error": str(exc), "shards": exc.shards}
        except ImageLoadError as exc:
            return 400, {"error": str(exc)}
        except Exception:   # noqa: BLE001 - a bug; the client still gets JSON, the log the traceback
            _log.exception("d2r serve: %s %s failed", method, path)
            return 500, {"error": "internal error (a bug in d2r serve: see the service's log)"}

    def _search(self, query, content_type, body):
        q = parse_search(content_type, body, query, dim=self.dim, default_k=self.k, limits=self.limits)
        if q.image is not None:
            x = self._extract(q.image)
        else:
            x = q.descriptors
        out = {"k": q.k, "descriptors": int(x.shape[0]), "kernel": self.index.kernel}
        if q.expand is not None:
            out["expand"] = q.expand
        if self.sharded:
            res = self.index.search(x, k=q.k, allow_partial=q.allow_partial, expand=q.expand)
            scores, ids = res[0], res[1]
            if q.allow_partial:
                out["shards"] = res[2]
        else:
            scores, ids = self.index.search(x, k=q.k, expand=q.expand)
        out["results"] = [{"rank": r + 1, "id": int(i), "score": float(s),
                           "name": self.names[int(i)] if int(i) < len(self.names) else None}
                          for r, (s, i) in enumerate(zip(scores, ids))]
        return out

    def _extract(self, data: bytes):
        from d2r.extract import decode_image_rgb

        img = decode_image_rgb(data, "the posted image")
        try:
            if img.shape[0] * img.shape[1] > self.limits.max_image_pixels:   # the header said otherwise
                raise RequestError(413, f"the posted image decodes to {img.shape[1]} x {img.shape[0]} pixels, more "
                                        f"than this service's limit of {self.limits.max_image_pixels}")
            return self.extractor(img).descriptors
        finally:
            if img.shape[0] * img.shape[1] >= _TRIM_PIXELS:
                del img
                _trim_heap()


def _logging_config(log_level: str, access_log: bool):
    from ray.serve.schema import LoggingConfig

    return LoggingConfig(log_level=log_level.upper(), enable_access_log=bool(access_log))


def make_app(path, k: int = 10, delf=None, max_features=None, shard_options=None, num_cpus: float = 0.5,
             limits: Limits | None = None, token: str | None = None, threads: int = 2,
             max_ongoing_requests: int = 32, log_level: str = "WARNING", access_log: bool = False):
    """The Ray Serve application of the service (``serve.run(make_app(...))``). Queries (parsing, image
    decoding, extraction, search) run in a pool of ``threads`` threads, so the replica's event loop stays
    free to answer ``/health``; at most ``max_ongoing_requests`` requests are in the replica at once."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve
    from starlette.responses import JSONResponse

    lim: Limits = limits if limits is not None else Limits()

    @serve.deployment(ray_actor_options={"num_cpus": num_cpus}, max_ongoing_requests=int(max_ongoing_requests),
                      logging_config=_logging_config(log_level, access_log))
    class D2RService:
        def __init__(self):
            self.service = QueryService(path, k=k, delf=delf, max_features=max_features, shard_options=shard_options,
                                        limits=lim, token=token)
            self.pool = ThreadPoolExecutor(max_workers=int(threads), thread_name_prefix="d2r-query")

        async def _body(self, request) -> bytes:
            """The body, refused (413) past the limit: by Content-Length before reading, else as it comes."""
            from d2r.distributed.request_parsing import _too_big, check_content_length

            check_content_length(request.headers.get("content-length"), lim)
            chunks, n = [], 0
            async for chunk in request.stream():
                n += len(chunk)
                if n > lim.max_request_bytes:
                    raise _too_big(n, lim)
                chunks.append(chunk)
            return b"".join(chunks)

        async def __call__(self, request):
            method, path = request.method, request.url.path
            if method == "GET" and path.strip("/") == "health":
                status, doc = self.service.health()
                return JSONResponse(doc, status_code=status)
            auth = request.headers.get("authorization")
            try:
                check_token(auth, token)   # before reading a body
                body = await self._body(request) if method in ("POST", "PUT", "PATCH") else b""
            except RequestError as exc:
                return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
            loop = asyncio.get_running_loop()
            status, doc = await loop.run_in_executor(
                self.pool, self.service.handle, method, path, dict(request.query_params),
                request.headers.get("content-type", ""), body, auth)
            headers = {"WWW-Authenticate": 'Bearer realm="d2r"'} if status == 401 else None
            return JSONResponse(doc, status_code=status, headers=headers)

    return D2RService.bind()  # type: ignore[attr-defined]  # bind() comes from @serve.deployment


def run(path, host: str = "127.0.0.1", port: int = 8000, k: int = 10, delf=None, max_features=None,
        shard_options=None, blocking: bool = True, limits: Limits | None = None, token: str | None = None,
        log_level: str = "WARNING", access_log: bool = False, threads: int = 2):
    """Start the service (Ray Serve, on the connected cluster) on host:port; blocking=True serves until
    interrupted (Ctrl-C), then shuts the service down. A host beyond loopback needs ``token`` (clients
    send ``Authorization: Bearer <token>``; ``/health`` stays open). log_level: Ray Serve's (``DEBUG``,
    ``INFO``, ``WARNING``, ``ERROR``); access_log: log every request (off by default)."""
    import time

    from ray import serve

    from d2r.distributed.cluster import _route_ray_loggers

    _check_bind(host, token)
    if str(log_level).upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {log_level!r}")
    logging_config = _logging_config(log_level, access_log)
    _route_ray_loggers()   # Serve's loggers (set up as it is imported) into connect(log_file=...)'s file, if any
    serve.start(http_options={"host": host, "port": int(port)}, logging_config=logging_config)
    serve.run(make_app(path, k=k, delf=delf, max_features=max_features, shard_options=shard_options, limits=limits,
                       token=token, threads=threads, log_level=log_level, access_log=access_log),
              name="d2r", route_prefix="/", logging_config=logging_config)
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
