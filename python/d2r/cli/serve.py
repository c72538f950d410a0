"""`d2r serve`: an HTTP query service (Ray Serve) for an index file or a sharded index."""
from __future__ import annotations

import warnings
from pathlib import Path

from d2r.cli._common import UsageError, _common, _ray_option, add_command, ray_session


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
    # Ray Serve's dependencies' own deprecation notices (pydantic) are not the user's concern
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", module=r"(ray|pydantic|starlette|fastapi)(\.|$)")
    # SIGINT (Ctrl-C) and SIGTERM (`kill PID`, `kill %1`) stop it: the service, then the cluster it started
    with ray_session(args, args.ray or "local", target):
        serve.run(args.index, host=args.host, port=args.port, k=args.k, delf=args.delf,
                  max_features=args.max_features, blocking=False)
        print(f"d2r serve: {args.index} on http://{args.host}:{args.port} (POST /search, GET /health, GET /stats); "
              "Ctrl-C or SIGTERM (kill PID) stops it", flush=True)
        import time

        from ray import serve as ray_serve

        try:
            while True:
                time.sleep(3600)
        finally:
            ray_serve.shutdown()
