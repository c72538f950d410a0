"""`d2r serve`: an HTTP query service (Ray Serve) for an index file or a sharded index."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from d2r.cli._common import UsageError, _common, _ray_option, add_command, ray_session
from d2r.distributed.request_parsing import Limits


def register(sub) -> None:
    p = add_command(sub, "serve", "an HTTP query service (Ray Serve) for an index file or a sharded index",
                    "POST /search with an image (raw bytes or a multipart field 'image') or descriptors (JSON "
                    "{\"descriptors\": [[...]]} or a .npy file) -> JSON ranked ids, scores and names; GET /health, "
                    "GET /stats. See d2r.serve for the formats.")
    p.add_argument("index", help="an index file from `d2r index`, or a sharded-index folder (`d2r index --shards N`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface; mind who can reach "
                                                       "it)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("-k", type=int, default=10, help="results per query unless the request says (?k=N)")
    p.add_argument("--max-features", type=int, default=None, help="features extracted per query image (default: the "
                                                                  "index's record)")
    p.add_argument("--delf", default=None, metavar="WEIGHTS", help="DELF weights, for an index of DELF features")
    p.add_argument("--token", default=None, help="a bearer token every request but GET /health must send "
                                                 "(Authorization: Bearer TOKEN); default: $D2R_SERVE_TOKEN; required "
                                                 "for a --host beyond loopback (prefer the variable: arguments are "
                                                 "visible to other users in the process list)")
    lim = Limits()
    p.add_argument("--max-request-bytes", type=int, default=lim.max_request_bytes, metavar="N",
                   help="largest request body (413 above)")
    p.add_argument("--max-image-pixels", type=int, default=lim.max_image_pixels, metavar="N",
                   help="largest image, width x height read from its header before decoding (413 above)")
    p.add_argument("--max-pixels-per-byte", type=int, default=lim.max_pixels_per_byte, metavar="N",
                   help="an image above a megapixel must bring a byte of file per N pixels (a decompression bomb "
                        "brings thousands; 413 above)")
    p.add_argument("--max-descriptors", type=int, default=lim.max_descriptors, metavar="N",
                   help="most descriptors a query may post (413 above)")
    p.add_argument("--max-json-depth", type=int, default=lim.max_json_depth, metavar="N",
                   help="deepest nesting of a JSON body (400 above)")
    p.add_argument("--k-max", type=int, default=lim.k_max, metavar="N", help="largest k a request may ask")
    p.add_argument("--threads", type=int, default=2, help="threads running queries (image decoding, extraction, "
                                                          "search) in the service's replica")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="Ray Serve's log level")
    p.add_argument("--access-log", action="store_true", help="log every request (off by default)")
    _ray_option(p, "the Ray cluster to serve on (default: local)")
    _common(p, json_out=False)
    p.set_defaults(func=run)


def run(args) -> int:
    from d2r import distributed
    from d2r.distributed import serve

    target = Path(args.index)
    if not target.exists():
        raise UsageError(f"{args.index}: no such index file or sharded-index folder")
    if target.is_dir() and not (target / distributed.MANIFEST).is_file():   # before Ray starts
        raise UsageError(f"{args.index}: a folder without {distributed.MANIFEST}, so not a sharded index; give an "
                         "index file or a sharded-index folder (`d2r index --shards N`)")
    token = args.token if args.token is not None else (os.environ.get("D2R_SERVE_TOKEN") or None)
    try:
        limits = Limits(max_request_bytes=args.max_request_bytes, max_image_pixels=args.max_image_pixels,
                        max_descriptors=args.max_descriptors, max_json_depth=args.max_json_depth, k_max=args.k_max,
                        max_pixels_per_byte=args.max_pixels_per_byte)
        serve._check_bind(args.host, token)
    except ValueError as exc:
        msg = str(exc)
        for name in ("max_request_bytes", "max_image_pixels", "max_descriptors", "max_json_depth", "k_max",
                     "max_pixels_per_byte"):
            msg = msg.replace(f"Limits.{name}", "--" + name.replace("_", "-"))
        raise UsageError(msg) from None
    if not 1 <= args.k <= limits.k_max:
        raise UsageError(f"-k must be from 1 to --k-max ({limits.k_max}), got {args.k}")
    if args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    # Ray Serve's dependencies' own deprecation notices (pydantic) are not the user's concern
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", module=r"(ray|pydantic|starlette|fastapi)(\.|$)")
    # SIGINT (Ctrl-C) and SIGTERM (`kill PID`, `kill %1`) stop it: the service, then the cluster it started
    with ray_session(args, args.ray or "local", target):
        serve.run(args.index, host=args.host, port=args.port, k=args.k, delf=args.delf,
                  max_features=args.max_features, blocking=False, limits=limits, token=token,
                  log_level=args.log_level, access_log=args.access_log, threads=args.threads)
        print(f"d2r serve: {args.index} on http://{args.host}:{args.port} (POST /search, GET /health, GET /stats); "
              "Ctrl-C or SIGTERM (kill PID) stops it", flush=True)
        import time

        from ray import serve as ray_serve

        try:
            while True:
                time.sleep(3600)
        finally:
            ray_serve.shutdown()
