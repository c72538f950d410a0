"""atheris fuzz target: the request parsing of `d2r serve` (d2r.distributed.request_parsing.parse_search).

Input framing (the seed corpus tests/fuzz/corpus/serve_requests/ uses it; see its README.md):
    line 1: the Content-Type header (latin-1; empty for none)
    line 2: the URL's query string (``k=5&allow_partial=1``; parsed as a server does)
    the rest: the request body
The index's dimension is 4 and the limits are small (so that every limit is reachable). Any exception
other than RequestError is a crash; so is a RequestError whose status is not 400, 401, 413 or 415, or
a parsed query that breaks the promises of SearchQuery.

Run: python tests/fuzz/py/serve_requests.py tests/fuzz/corpus/serve_requests -max_total_time=60
(the d2r imported is the environment's: the installed package, or PYTHONPATH=python in a checkout with
the extension built; importable without atheris: tests/distributed/test_serve.py replays the corpora through TestOneInput).
"""
import sys
from urllib.parse import parse_qsl

import numpy as np

if __name__ == "__main__":
    import atheris

    # instrument the parser and what it calls on hostile bytes (json, Pillow's header readers), not numpy
    with atheris.instrument_imports(include=["d2r.distributed.request_parsing", "PIL", "json", "ast"]):
        from d2r.distributed.request_parsing import Limits, RequestError, parse_search
        from PIL import Image

        Image.init()   # Pillow's format plugins, loaded now so that they are instrumented
else:
    from d2r.distributed.request_parsing import Limits, RequestError, parse_search

DIM = 4
LIMITS = Limits(max_request_bytes=1 << 20, max_image_pixels=1 << 16, max_descriptors=64, max_json_depth=8, k_max=100)


def split(data: bytes):
    """(content type, query dict, body) from the framing above."""
    ct, _, rest = data.partition(b"\n")
    qs, _, body = rest.partition(b"\n")
    query = dict(parse_qsl(qs.decode("latin1"), keep_blank_values=True))
    return ct.decode("latin1"), query, body


def TestOneInput(data: bytes) -> str:
    ct, query, body = split(data)
    try:
        q = parse_search(ct, body, query, dim=DIM, default_k=10, limits=LIMITS)
    except RequestError as exc:
        if exc.status not in (400, 401, 413, 415) or not isinstance(exc.body().get("error"), str):
            raise AssertionError(f"a RequestError with status {exc.status}: {exc.body()!r}") from exc
        return str(exc.status)
    assert type(q.k) is int and 1 <= q.k <= LIMITS.k_max, q.k
    assert (q.image is None) != (q.descriptors is None)
    if q.descriptors is not None:
        x = q.descriptors
        assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == DIM and x.shape[0] <= LIMITS.max_descriptors
        assert np.isfinite(x).all()
    else:
        w, h = q.image_size
        assert 1 <= w * h <= LIMITS.max_image_pixels
    return "ok"


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
