"""`d2r serve` under hostile requests (issue 24). The request parser (d2r.distributed.request_parsing, no
Ray) is tested case by case: every malformed request is a RequestError with 400, 401, 413 or 415, and
nothing else; the seed and regression corpora of its fuzz target replay through it. End to end over
HTTP (Ray Serve on a local cluster, a small RootSIFT index of synthetic textures): each kind of bad
request the issue found gets its status and a JSON body, never 500; the token; /health answers while a
slow query runs; the replica's memory after batches of bad requests."""
from __future__ import annotations

import io
import json
import os
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from d2r.distributed.request_parsing import (Limits, RequestError, check_content_length, check_image_header,
                                             check_token, parse_k, parse_multipart, parse_search)
from support import start_local_ray

DIM = 128
ROOT = Path(__file__).resolve().parents[2]


def _status(ct, body, query=None, dim=DIM, limits=Limits(), default_k=10):
    try:
        parse_search(ct, body, query or {}, dim=dim, default_k=default_k, limits=limits)
    except RequestError as exc:
        assert isinstance(exc.body()["error"], str) and exc.body()["error"]
        return exc.status, exc.message
    return 200, ""


def _npy(shape, dtype="<f4", data=b"", version=1):
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode("latin1")
    if version == 1:
        header = header.ljust(117) + b"\n"
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data
    header = header.ljust(115) + b"\n"
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<I", len(header)) + header + data


def _png(width, height):
    """A grey PNG of width x height, all zero: a few KB that decode to width x height pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _form(name, data, boundary="d2rtestboundary"):
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"q\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()


def _desc_json(rows=2, k=None, dim=DIM):
    doc = {"descriptors": np.full((rows, dim), 0.25).tolist()}
    if k is not None:
        doc["k"] = k
    return json.dumps(doc).encode()


# The bad requests the issue found (each a 500, or accepted, on main), with the status they now get.
_DEEP = b"[" * 100_000 + b"]" * 100_000
BAD_REQUESTS = {
    "multipart_no_boundary": ("multipart/form-data", _form("image", b"x"), {}, 400),
    "multipart_garbage": ("multipart/form-data; boundary=xyz", b"\x00\xffgarbage" * 50, {}, 400),
    "json_infinity": ("application/json", _desc_json().replace(b"}", b', "k": Infinity}'), {}, 400),
    "json_nan_descriptor": ("application/json", _desc_json().replace(b"0.25", b"NaN", 1), {}, 400),
    "json_deep": ("application/json", _DEEP, {}, 400),
    "json_deep_in_object": ("application/json", b'{"descriptors": ' + _DEEP + b"}", {}, 400),
    "npy_huge_shape": ("application/x-npy", _npy((10 ** 9, DIM), data=b"\0" * 100), {}, 400),
    "npy_huge_shape_in_form": ("multipart/form-data; boundary=b0", _form("descriptors", _npy((10 ** 9, DIM),
                                                                                     data=b"\0" * 100), "b0"), {}, 400),
    "npy_pickle": ("application/x-npy", _npy((1, DIM), dtype="|O", data=b"\x80\x04N."), {}, 400),
    "k_float": ("application/json", _desc_json(k=2.7), {}, 400),
    "k_bool": ("application/json", _desc_json(k=True), {}, 400),
    "k_1e300": ("application/json", _desc_json().replace(b"}", b', "k": 1e300}'), {}, 400),
    "k_string_json": ("application/json", _desc_json(k="10"), {}, 400),
    "k_url_24_digits": ("application/json", _desc_json(), {"k": "1" * 24}, 400),
    "k_url_float": ("application/json", _desc_json(), {"k": "2.7"}, 400),
    "k_zero": ("application/json", _desc_json(), {"k": "0"}, 400),
    "descriptors_numeric_strings": ("application/json",
                                    json.dumps({"descriptors": [["0.5"] * DIM]}).encode(), {}, 400),
    "descriptors_bools": ("application/json", json.dumps({"descriptors": [[True] * DIM]}).encode(), {}, 400),
    "descriptors_wrong_dim": ("application/json", _desc_json(dim=DIM - 1), {}, 400),
    "descriptors_overflow": ("application/json", _desc_json().replace(b"0.25", b"1e39", 1), {}, 400),
    "image_bomb": ("image/png", _png(8000, 6000), {}, 413),               # 48 MP: beyond the pixel limit
    "image_bomb_24mp": ("image/png", _png(6000, 4000), {}, 413),          # the issue's: 24 MP in a few KB
    "image_garbage": ("image/jpeg", b"garbage bytes", {}, 400),
    "unsupported_type": ("text/xml", b"<a/>", {}, 415),
}


# ---- the parser, without Ray ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(BAD_REQUESTS))
def test_each_bad_request_is_a_typed_error(kind):
    ct, body, query, want = BAD_REQUESTS[kind]
    status, msg = _status(ct, body, query)
    assert status == want, (kind, msg)


def test_valid_requests_parse():
    ok = parse_search("application/json", _desc_json(rows=3, k=7), {}, dim=DIM)
    assert ok.k == 7 and ok.descriptors.shape == (3, DIM) and ok.descriptors.dtype == np.float32
    assert parse_search("application/json", _desc_json(k=7), {"k": "3"}, dim=DIM).k == 3   # the URL wins
    assert parse_search("application/json", _desc_json(), {}, dim=DIM, default_k=4).k == 4
    ints = json.dumps({"descriptors": [[1] * DIM]}).encode()   # JSON integers are numbers too
    np.testing.assert_array_equal(parse_search("application/json", ints, {}, dim=DIM).descriptors, np.ones((1, DIM)))
    x = np.random.default_rng(0).random((5, DIM))
    for arr in (x.astype(np.float32), x, x.astype(">f4"), np.asfortranarray(x)):
        buf = io.BytesIO()
        np.save(buf, arr)
        for ct, body in (("application/x-npy", buf.getvalue()), ("application/octet-stream", buf.getvalue()),
                         ("multipart/form-data; boundary=\"q q\"", _form("descriptors", buf.getvalue(), "q q"))):
            got = parse_search(ct, body, {"k": "5", "allow_partial": "1"}, dim=DIM)
            np.testing.assert_array_equal(got.descriptors, x.astype(np.float32))
            assert got.k == 5 and got.allow_partial
    buf = io.BytesIO()
    np.save(buf, np.zeros((0, DIM), np.float32))
    assert parse_search("application/x-npy", buf.getvalue(), {}, dim=DIM).descriptors.shape == (0, DIM)
    png = _png(64, 48)
    for ct, body in (("image/png", png), ("", png), ("multipart/form-data; boundary=b", _form("image", png, "b"))):
        q = parse_search(ct, body, {}, dim=DIM)
        assert q.image == png and q.image_size == (64, 48) and q.descriptors is None


def test_k_is_strict():
    lim = Limits(k_max=50)
    for ok in ("1", "50", "007"):
        assert parse_k(ok, lim) == int(ok)
    assert parse_k(50, lim) == 50
    for bad in ("0", "51", "-1", "+3", " 3", "3 ", "2.7", "1e3", "", "1" * 24, "٣", 2.7, 3.0, True, False, None,
                "ten", 10 ** 300, [3], {"k": 3}):
        with pytest.raises(RequestError) as e:
            parse_k(bad, lim)
        assert e.value.status == 400 and "from 1 to 50" in e.value.message
    assert _status("application/json", _desc_json(), {"k": "51"}, limits=lim)[0] == 400
    assert _status("application/json", _desc_json(), {"allow_partial": "maybe"})[0] == 400
    # ?expand=: none, hqe or aqe (query expansion), nothing else
    for value, want in ((None, None), ("none", None), ("", None), ("hqe", "hqe"), ("AQE", "aqe"), ("hqe-fused", "hqe-fused")):
        query = {} if value is None else {"expand": value}
        assert parse_search("application/json", _desc_json(), query, dim=DIM).expand == want
    for bad in ("qe", "hqe,aqe", "1", "x" * 500):
        assert _status("application/json", _desc_json(), {"expand": bad})[0] == 400


def test_limits_are_enforced_and_configurable():
    lim = Limits(max_request_bytes=1000, max_image_pixels=64 * 48, max_descriptors=4, max_json_depth=3, k_max=5)
    assert _status("application/json", b" " * 1001, limits=lim)[0] == 413
    assert _status("image/png", _png(64, 48), limits=lim)[0] == 200
    assert _status("image/png", _png(64, 49), limits=lim)[0] == 413
    assert _status("application/json", _desc_json(rows=4, dim=2), dim=2, limits=lim)[0] == 200
    assert _status("application/json", _desc_json(rows=5, dim=2), dim=2, limits=lim)[0] == 413
    buf = io.BytesIO()
    np.save(buf, np.zeros((5, 2), np.float32))
    assert _status("application/x-npy", buf.getvalue(), dim=2, limits=lim)[0] == 413
    assert _status("application/json", b'{"descriptors": [[[1]]]}', dim=1, limits=lim)[0] == 400   # depth 4
    assert _status("application/json", b'{"descriptors": [[1]]}', dim=1, limits=lim)[0] == 200     # depth 3
    # brackets inside strings are not nesting
    assert "unknown key" in _status("application/json", b'{"descriptors": [[1]], "[[[[": 1}', dim=1, limits=lim)[1]
    assert _status("application/json", _desc_json(dim=2), {"k": "6"}, dim=2, limits=lim)[0] == 400
    # Content-Length is checked before the body is read
    assert check_content_length(None, lim) is None and check_content_length("1000", lim) == 1000
    for value, status in (("1001", 413), ("9" * 19, 413), ("-1", 400), ("12abc", 400), ("9" * 30, 400)):
        with pytest.raises(RequestError) as e:
            check_content_length(value, lim)
        assert e.value.status == status
    for bad in (dict(max_request_bytes=0), dict(k_max=-1), dict(max_json_depth=2.5), dict(max_descriptors=True)):
        with pytest.raises(ValueError, match="positive integer"):
            Limits(**bad)


def test_image_header_is_read_before_decoding():
    """A bomb (a few KB declaring 48 megapixels) is refused from its header in milliseconds; so is one
    beyond Pillow's own bomb limit (2^31 pixels: its DecompressionBombError is a 413 too)."""
    bomb = _png(8000, 6000)
    assert len(bomb) < 100_000
    t = time.perf_counter()
    with pytest.raises(RequestError) as e:
        check_image_header(bomb, Limits())
    assert e.value.status == 413 and "8000 x 6000" in e.value.message
    assert time.perf_counter() - t < 0.5
    with pytest.raises(RequestError) as e:   # the bomb: within the pixel limit, 24 MP in 23 KB
        check_image_header(_png(6000, 4000), Limits())
    assert e.value.status == 413 and "pixels per byte" in e.value.message
    check_image_header(_png(1000, 1000), Limits())                     # a megapixel or less: no ratio check
    check_image_header(_png(6000, 4000), Limits(max_pixels_per_byte=10 ** 9))
    header_only = _png(1, 1).replace(struct.pack(">II", 1, 1), struct.pack(">II", 60000, 60000))
    with pytest.raises(RequestError) as e:
        check_image_header(header_only, Limits(max_image_pixels=2 ** 40))
    assert e.value.status in (400, 413)   # a bad CRC (400) or Pillow's bomb check (413): never decoded
    gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"
    with pytest.raises(RequestError) as e:
        check_image_header(gif, Limits())
    assert e.value.status == 400


def test_multipart_parsing():
    body = (b"preamble\r\n--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b\r\n"
            b"content-disposition: form-data; name=image; filename=\"x;y.jpg\"\r\n\r\n\r\n--\r\n--b--\r\nepilogue")
    assert parse_multipart("multipart/form-data; boundary=b", body) == {"a": b"1", "image": b"\r\n--"}
    for ct, b in [("multipart/form-data; boundary=", body), ("multipart/form-data; boundary=" + "x" * 71, body),
                  ("multipart/form-data; boundary=b", b"--b\r\n\r\nno end"),
                  ("multipart/form-data; boundary=b", b"--b\r\nX: y\r\n\r\nv\r\n--b--"),       # no disposition
                  ("multipart/form-data; boundary=b", b"--b\r\nbroken header\r\n\r\nv\r\n--b--"),
                  ("multipart/form-data; boundary=b", b"--bX\r\n\r\nv\r\n--b--"),
                  ("multipart/form-data; boundary=b", (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nv\r\n"
                                                       b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\nw\r\n--b--")),
                  ("multipart/form-data; boundary=\"b", body), ("multipart/form-data; charset", body)]:
        with pytest.raises(RequestError) as e:
            parse_multipart(ct, b)
        assert e.value.status == 400
    many = b"".join(b"--b\r\nContent-Disposition: form-data; name=f%d\r\n\r\nv\r\n" % i for i in range(17)) + b"--b--"
    with pytest.raises(RequestError, match="more than 16 parts"):
        parse_multipart("multipart/form-data; boundary=b", many)
    assert _status("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\nv\r\n"
                                                      b"--b--")[0] == 400   # neither image nor descriptors


def test_token():
    check_token(None, None)
    check_token("anything", None)
    check_token("Bearer s3cret-token", "s3cret-token")
    check_token("bearer   s3cret-token ", "s3cret-token")
    for header in (None, "", "Bearer", "Bearer ", "Basic s3cret-token", "Bearer s3cret-tokem", "Bearer s3cret",
                   "s3cret-token", "Bearer s3cret-token-and-more", "Bearer \udcff"):
        with pytest.raises(RequestError) as e:
            check_token(header, "s3cret-token")
        assert e.value.status == 401 and e.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_bind_beyond_loopback_needs_a_token(tmp_path, capsys):
    from d2r.cli import main
    from d2r.distributed import serve

    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("localhost") and serve.is_loopback("::1")
    assert serve.is_loopback("127.8.0.1") and not serve.is_loopback("0.0.0.0") and not serve.is_loopback("10.0.0.1")
    assert not serve.is_loopback("example.org")
    serve._check_bind("127.0.0.1", None)
    serve._check_bind("0.0.0.0", "a-long-enough-token")
    for host, token, match in (("0.0.0.0", None, "needs a bearer token"), ("::", None, "needs a bearer token"),
                               ("127.0.0.1", "short", "at least 8")):
        with pytest.raises(ValueError, match=match):
            serve._check_bind(host, token)
    (tmp_path / "x.d2r").write_bytes(b"")
    env = os.environ.pop("D2R_SERVE_TOKEN", None)
    try:
        assert main(["serve", str(tmp_path / "x.d2r"), "--host", "0.0.0.0"]) == 2   # before Ray starts
        assert "needs a bearer token" in capsys.readouterr().err
        assert main(["serve", str(tmp_path / "x.d2r"), "--max-image-pixels", "0"]) == 2
        assert "--max-image-pixels must be a positive integer" in capsys.readouterr().err
        assert main(["serve", str(tmp_path / "x.d2r"), "-k", "20", "--k-max", "10"]) == 2
    finally:
        if env is not None:
            os.environ["D2R_SERVE_TOKEN"] = env


def _corpus_files():
    files = []
    for sub in ("corpus", "regressions"):
        folder = ROOT / "tests" / "fuzz" / sub / "serve_requests"
        files += sorted(p for p in folder.glob("*") if p.is_file() and p.name != "README.md")
    return files


def test_fuzz_corpus_replays():
    """The fuzz target's seed and regression inputs through the parser: a RequestError or a query, never
    another exception (the target's own check, without atheris)."""
    sys.path.insert(0, str(ROOT / "tests" / "fuzz" / "py"))
    try:
        import serve_requests as target
    finally:
        sys.path.pop(0)
    files = _corpus_files()
    assert len(files) >= 8
    outcomes = {}
    for p in files:
        outcomes[p.name] = target.TestOneInput(p.read_bytes())
    assert "ok" in outcomes.values() and any(v.startswith("4") for v in outcomes.values())


# ---- end to end over HTTP (Ray Serve) ---------------------------------------------------------------------
def _url(query):
    return "/search" + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


TOKEN = "test-token-0123456789"


def _texture(rng, h, w):
    import cv2

    x = rng.random((h // 8, w // 8)).astype(np.float32)
    img = cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)
    img = (255 * (img - img.min()) / (np.ptp(img) + 1e-9)).astype(np.uint8)
    return np.dstack([img, img[:, ::-1], img[::-1]])


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The service on a local Ray cluster, with a token, in front of a RootSIFT index of 12 synthetic
    textures (no shared data needed); yields (base URL, call, the index folder)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'd2r[ray]')")
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'd2r[ray]')")
    import cv2
    import urllib.error
    import urllib.request

    import d2r
    from d2r import distributed
    from d2r.distributed import serve as d2r_serve
    from d2r.extract import RootSIFT
    from d2r.workflows.build import build_index
    from d2r.workflows.pipeline import train_codebook
    from ray import serve

    tmp = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(3)
    paths = []
    for i in range(12):
        p = tmp / f"tex{i:02d}.png"
        cv2.imwrite(str(p), _texture(rng, 240, 320))
        paths.append(str(p))
    d2r.extract_dataset(paths, tmp / "store", RootSIFT(max_features=200), progress=False)
    names, feats = d2r.load_features(tmp / "store")
    cb = train_codebook(feats, 32, seed=0, progress=False)
    build_index(tmp / "store", tmp / "idx.d2r", cb, progress=False)
    cv2.imwrite(str(tmp / "big.jpg"), _texture(rng, 2000, 3000), [cv2.IMWRITE_JPEG_QUALITY, 80])   # 6 MP: a slow query

    start_local_ray(ray)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d2r_serve.run(tmp / "idx.d2r", port=port, k=5, blocking=False, token=TOKEN,
                  limits=Limits(max_request_bytes=4_000_000, max_descriptors=1000))
    base = f"http://127.0.0.1:{port}"

    def call(path, data=None, ctype=None, token=TOKEN, timeout=120, method=None, headers=None):
        h = dict(headers or {})
        if ctype:
            h["Content-Type"] = ctype
        if token:
            h["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(base + path, data=data, headers=h,
                                     method=method or ("POST" if data is not None else "GET"))
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, {"not json": raw[:200].decode("latin1")}

    try:
        yield base, call, tmp, paths
    finally:
        serve.shutdown()
        ray.shutdown()


def test_http_bad_requests_get_their_status_and_json(service):
    base, call, tmp, paths = service
    status, doc = call("/search", Path(paths[3]).read_bytes(), "image/png")
    assert status == 200, doc
    assert doc["results"][0]["name"] == paths[3] and doc["k"] == 5
    status, doc = call("/search?k=2", _form("image", Path(paths[3]).read_bytes()),
                       "multipart/form-data; boundary=d2rtestboundary")
    assert status == 200 and doc["results"][0]["name"] == paths[3] and doc["k"] == 2
    for kind, (ct, body, query, want) in sorted(BAD_REQUESTS.items()):
        status, doc = call(_url(query), body, ct)
        assert status == want and isinstance(doc.get("error"), str), (kind, status, doc)
    # the size limit (4 MB here): by Content-Length before reading, and by counting a chunked body
    status, doc = call("/search", b"\0" * 4_000_001, "application/octet-stream")
    assert status == 413 and "4000000" in doc["error"]

    def chunks():
        for _ in range(5):
            yield b"\0" * 1_000_000
    status, doc = call("/search", chunks(), "application/octet-stream", headers={"Transfer-Encoding": "chunked"})
    assert status == 413, doc
    status, doc = call("/search", _desc_json(rows=1001), "application/json")
    assert status == 413 and "1000" in doc["error"]
    status, doc = call("/search", b"{}", "application/json", method="GET")
    assert status == 405
    assert call("/nowhere")[0] == 404


def test_http_query_expansion(service):
    """?expand=hqe|aqe: the service answers what Index.search(..., expand=) answers on the same file."""
    import d2r

    base, call, tmp, paths = service
    _, feats = d2r.load_features(tmp / "store")
    index = d2r.Index.load(tmp / "idx.d2r", mmap=True)
    changed = False
    for i in (2, 7):
        x = feats[i].descriptors[: len(feats[i].descriptors) // 3]   # a third of an image: alpha-QE adds words
        buf = io.BytesIO()
        np.save(buf, x)
        for expand in ("hqe", "aqe"):
            status, doc = call(f"/search?k=5&expand={expand}", buf.getvalue(), "application/x-npy")
            assert status == 200 and doc["expand"] == expand, doc
            scores, ids = index.search(x, k=5, expand=expand)
            assert [r["id"] for r in doc["results"]] == ids.tolist()
            np.testing.assert_allclose([r["score"] for r in doc["results"]], scores, rtol=1e-6)
            changed |= not np.array_equal(scores, index.search(x, k=5)[0])
    assert changed   # alpha-QE changes these answers (0.09 -> 0.42 for image 2): the parameter is not ignored


def test_http_token(service):
    base, call, tmp, paths = service
    assert call("/health", token=None) == (200, {"status": "ok", "images": 12, "shards": 1})   # open
    for token in (None, "wrong-token-0123456789"):
        for path, data in (("/search", _desc_json()), ("/stats", None)):
            status, doc = call(path, data, "application/json", token=token)
            assert status == 401 and "token" in doc["error"]
    status, doc = call("/stats")
    assert status == 200 and doc["images"] == 12
    # an unauthorised client's body is not read: the 401 comes before the size check
    status, doc = call("/search", b"\0" * 4_000_001, "application/octet-stream", token=None)
    assert status == 401


def test_health_answers_while_a_slow_query_runs(service):
    """Three 6-megapixel images take seconds to decode and extract (two at a time, in the service's two
    query threads); /health, asked meanwhile, answers within a second each time (on main the queries
    held the replica's event loop, and /health waited for them all)."""
    base, call, tmp, paths = service
    big = (tmp / "big.jpg").read_bytes()
    done = []

    def slow():
        t = time.perf_counter()
        status = call("/search", big, "image/jpeg")[0]
        done.append((status, time.perf_counter() - t))
    ths = [threading.Thread(target=slow) for _ in range(3)]
    t0 = time.perf_counter()
    for th in ths:
        th.start()
    time.sleep(0.5)
    waits = []
    while any(th.is_alive() for th in ths) and time.perf_counter() - t0 < 120:
        t = time.perf_counter()
        status, doc = call("/health", token=None, timeout=60)
        waits.append((time.perf_counter() - t, any(th.is_alive() for th in ths)))
        assert status == 200
        time.sleep(0.2)
    for th in ths:
        th.join()
    assert [s for s, _ in done] == [200] * 3
    during = [w for w, alive in waits if alive]
    print(f"/health during queries of {', '.join(f'{t:.1f}' for _, t in done)} s: "
          + ", ".join(f"{w * 1000:.0f} ms" for w in during))
    assert len(during) >= 3, (done, waits)   # the queries were slow enough to test anything
    assert max(during) < 1.0, waits


def _replica_rss_mb() -> float:
    """RSS of the service's replica process (its title names the deployment)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"ServeReplica:d2r:D2RService" in cmd:
                status = Path(f"/proc/{pid}/status").read_text()
                found.append(int(status.split("VmRSS:")[1].split()[0]) / 1024)
        except (OSError, IndexError):
            continue
    assert len(found) == 1, found
    return found[0]


# the kinds of bad request the issue measured memory with; 200 of each
MEMORY_KINDS = ("multipart_no_boundary", "multipart_garbage", "json_infinity", "json_deep", "npy_huge_shape",
                "k_float", "descriptors_numeric_strings", "image_bomb_24mp")
# the replica's RSS growth over them, measured at 2 to 3 MB on the loaded 2-core test machine (see
# BENCHMARKS.md); main grew by hundreds of MB
RSS_GROWTH_LIMIT_MB = 30


def test_memory_back_to_baseline_after_bad_requests(service):
    import http.client

    base, call, tmp, paths = service
    conn = http.client.HTTPConnection(base.split("//")[1], timeout=60)   # one kept-alive connection

    def post(kind):
        ct, body, query, want = BAD_REQUESTS[kind]
        conn.request("POST", _url(query), body=body, headers={"Content-Type": ct, "Authorization": f"Bearer {TOKEN}"})
        r = conn.getresponse()
        doc = json.loads(r.read())
        assert r.status == want and "error" in doc, (kind, r.status, doc)

    for kind in MEMORY_KINDS:   # warm up every path once
        post(kind)
    before = _replica_rss_mb()
    for _ in range(200):
        for kind in MEMORY_KINDS:
            post(kind)
    after = _replica_rss_mb()
    conn.close()
    print(f"replica RSS: {before:.1f} MB before, {after:.1f} MB after {200 * len(MEMORY_KINDS)} bad requests")
    assert after - before < RSS_GROWTH_LIMIT_MB, (before, after)


def test_cli_passes_the_options_through(tmp_path, monkeypatch):
    """`d2r serve`'s limits, token (option or D2R_SERVE_TOKEN), log level and access log reach
    d2r.distributed.serve.run (stopped there: no Ray needed)."""
    from d2r import distributed
    from d2r.cli import main
    from d2r.distributed import serve

    got = {}

    def fake_run(path, **kw):
        got.update(kw)
        raise KeyboardInterrupt   # stops the command there

    monkeypatch.setattr(distributed, "connect", lambda *a, **k: None)
    monkeypatch.setattr(serve, "run", fake_run)
    (tmp_path / "x.d2r").write_bytes(b"")
    monkeypatch.setenv("D2R_SERVE_TOKEN", "from-the-environment")
    main(["serve", str(tmp_path / "x.d2r"), "--host", "0.0.0.0", "--max-request-bytes", "1000",
          "--max-image-pixels", "2000", "--max-descriptors", "30", "--max-json-depth", "4", "--k-max", "50",
          "--max-pixels-per-byte", "7", "--log-level", "info", "--access-log", "--threads", "3", "-k", "5"])
    assert got["limits"] == Limits(max_request_bytes=1000, max_image_pixels=2000, max_descriptors=30, max_json_depth=4,
                                   k_max=50, max_pixels_per_byte=7)
    assert got["token"] == "from-the-environment" and got["host"] == "0.0.0.0" and got["k"] == 5
    assert got["log_level"] == "info" and got["access_log"] is True and got["threads"] == 3
    got.clear()
    main(["serve", str(tmp_path / "x.d2r"), "--token", "from-the-option"])
    assert got["token"] == "from-the-option" and got["limits"] == Limits()
    assert got["log_level"] == "warning" and got["access_log"] is False   # the defaults: no access log
