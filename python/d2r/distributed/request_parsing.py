"""The request parsing of ``d2r serve``, without Ray or HTTP: ``parse_search(content_type, body, query, ...)``
turns a ``POST /search`` request into a validated :class:`SearchQuery`, or raises :class:`RequestError`
carrying the HTTP status (400 malformed, 401 unauthorised, 413 too large, 415 unsupported media type)
and the JSON body to answer with. No input makes it raise anything else (fuzzed: ``tests/fuzz/py/
serve_requests.py``).

What it checks, each size limit configurable in :class:`Limits`:

* the body's size (``max_request_bytes``; the service also checks ``Content-Length`` before reading);
* JSON: UTF-8, nesting depth (``max_json_depth``, measured on the bytes before parsing, so no recursion),
  finite numbers only (``NaN``, ``Infinity`` and ``1e400`` are refused), an object with
  ``"descriptors"`` (a list of rows, each a list of exactly ``dim`` JSON numbers: numeric strings and
  booleans are refused) and optionally ``"k"`` (a JSON integer: ``2.7``, ``true`` and ``"10"`` are
  refused); no other keys;
* ``.npy``: version 1 to 3, a float32 or float64 (little or big endian) 2-D array of ``dim`` columns, the
  data size the header declares equal to the bytes that follow it (checked before anything is
  allocated), never pickled objects;
* multipart forms: a valid boundary, well-formed parts, the field ``image`` or ``descriptors`` once;
* images: a format the service decodes (JPEG, PNG, WebP, BMP, TIFF, PNM), the width and height read
  from the header, before any pixel is decoded, within ``max_image_pixels``, and above a megapixel at most
  ``max_pixels_per_byte`` pixels per byte of file (a decompression bomb);
* ``k`` (the URL's ``?k=``, a string of at most 9 digits, or the JSON body's): an integer from 1 to
  ``k_max``; descriptors per query at most ``max_descriptors``;
* ``expand`` (the URL's ``?expand=``): ``none``, ``hqe``, ``hqe-fused`` or ``aqe`` (query expansion).
"""
from __future__ import annotations

import ast
import hmac
import io
import itertools
import json
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

__all__ = ["Limits", "RequestError", "SearchQuery", "check_content_length", "check_image_header", "check_token",
           "parse_k", "parse_multipart", "parse_npy", "parse_search", "parse_json_descriptors"]

_NPY_MAGIC = b"\x93NUMPY"
# what both Pillow (which reads the header here) and OpenCV (which decodes) read
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "PPM")
_F32_MAX = float(np.finfo(np.float32).max)


class RequestError(ValueError):
    """A request the service refuses: ``status`` (400, 401, 413 or 415), ``message``; ``body()`` is the JSON
    answer ``{"error": message}``, ``headers`` any HTTP headers to answer with."""

    def __init__(self, status: int, message: str, headers: Optional[Mapping[str, str]] = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": self.message}


def _bad(msg: str) -> RequestError:
    return RequestError(400, msg)


@dataclass(frozen=True)
class Limits:
    """The service's limits on a request (each a positive integer).

    max_request_bytes: the body (default 20 MB; 413 above). max_image_pixels: width x height from the
    image's header (default 40 megapixels; 413 above). max_descriptors: rows of posted descriptors
    (default 20,000; 413 above). max_json_depth: nesting of a JSON body (default 8; the service's JSON is
    3 deep; 400 above). k_max: the largest k a request may ask (default 1,000; 400 above).
    max_pixels_per_byte: an image of more than a megapixel must bring at least one byte of file per this
    many pixels (default 100; real photos have 2 to 13; a decompression bomb, a few KB of PNG declaring
    tens of megapixels, has thousands; 413 above)."""

    max_request_bytes: int = 20_000_000
    max_image_pixels: int = 40_000_000
    max_descriptors: int = 20_000
    max_json_depth: int = 8
    k_max: int = 1000
    max_pixels_per_byte: int = 100

    def __post_init__(self):
        for name in ("max_request_bytes", "max_image_pixels", "max_descriptors", "max_json_depth", "k_max",
                     "max_pixels_per_byte"):
            v = getattr(self, name)
            if type(v) is not int or v < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {v!r}")


@dataclass
class SearchQuery:
    """A validated ``POST /search``: either ``image`` (encoded bytes whose header passed the pixel limit;
    ``image_size`` its (width, height)) or ``descriptors`` ((n, dim) float32, finite); ``k``;
    ``allow_partial``; ``expand`` (None, "hqe", "hqe-fused" or "aqe": query expansion, d2r.core.expand)."""

    k: int
    allow_partial: bool = False
    expand: Optional[str] = None
    image: Optional[bytes] = None
    image_size: Optional[tuple] = None
    descriptors: Optional[np.ndarray] = None


# ---- small pieces -----------------------------------------------------------------------------------------
def check_token(authorization: Optional[str], token: Optional[str]) -> None:
    """Raise RequestError(401) unless ``authorization`` (the ``Authorization`` header) is ``Bearer <token>``;
    no check when token is None. Compared in constant time."""
    if token is None:
        return
    challenge = {"WWW-Authenticate": 'Bearer realm="d2r"'}
    if not authorization:
        raise RequestError(401, "this service needs a bearer token (Authorization: Bearer <token>)", challenge)
    scheme, _, got = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not got.strip():
        raise RequestError(401, "the Authorization header must be 'Bearer <token>'", challenge)
    if not hmac.compare_digest(got.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")):
        raise RequestError(401, "wrong bearer token", challenge)


def check_content_length(value: Optional[str], limits: Limits) -> Optional[int]:
    """The ``Content-Length`` header checked before the body is read: 413 above the limit, 400 if not a
    number; None when absent (the body is then counted as it is read)."""
    if value is None:
        return None
    v = value.strip()
    if not re.fullmatch(r"[0-9]{1,19}", v):
        raise _bad(f"Content-Length must be a number of bytes, got {value[:40]!r}")
    n = int(v)
    if n > limits.max_request_bytes:
        raise RequestError(413, f"the request body is {n} bytes, more than this service's limit of "
                                f"{limits.max_request_bytes} (--max-request-bytes)")
    return n


def _too_big(n: int, limits: Limits) -> RequestError:
    return RequestError(413, f"the request body is {n} bytes or more, more than this service's limit of "
                             f"{limits.max_request_bytes} (--max-request-bytes)")


def parse_k(value: Any, limits: Limits, where: str = "k", text: bool = True) -> int:
    """k from the URL (text=True: a string of at most 9 digits) or from JSON (text=False: a JSON integer;
    not a float such as 2.0, a bool or a string such as "10"): an integer in [1, k_max]."""
    if isinstance(value, str) and text:
        if not re.fullmatch(r"[0-9]{1,9}", value):
            raise _bad(f"{where} must be an integer from 1 to {limits.k_max}, got {value[:40]!r}")
        k = int(value)
    elif type(value) is int:
        k = value
    else:
        shown = (json.dumps(value[:40] if isinstance(value, str) else value)
                 if isinstance(value, (bool, float, str, type(None))) else type(value).__name__)
        raise _bad(f"{where} must be an integer from 1 to {limits.k_max}, got {shown}")
    if not 1 <= k <= limits.k_max:
        shown = str(k) if abs(k) < 10 ** 30 else "a number of " + str(len(str(abs(k)))) + " digits"
        raise _bad(f"{where} must be an integer from 1 to {limits.k_max}, got {shown}")
    return k


def _finite(x: np.ndarray, what: str) -> np.ndarray:
    if x.size and not np.isfinite(x).all():
        raise _bad(f"{what} contain NaN or Inf")
    if x.dtype == np.float64:
        if x.size and float(np.abs(x).max()) > _F32_MAX:
            raise _bad(f"{what} contain values beyond float32's range")
        x = x.astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


def _rows_limit(n: int, limits: Limits) -> None:
    if n > limits.max_descriptors:
        raise RequestError(413, f"{n} descriptors in one query, more than this service's limit of "
                                f"{limits.max_descriptors} (--max-descriptors)")


# ---- JSON -------------------------------------------------------------------------------------------------
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)   # linear: no nested quantifiers
_JSON_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")
_JSON_PAIR = re.compile(rb"\[\]|\{\}")


def _json_depth_ok(body: bytes, max_depth: int) -> bool:
    """Whether the JSON text nests at most max_depth deep (and its brackets pair up), without parsing it:
    strings are dropped, then innermost bracket pairs removed max_depth times; anything left is too
    deep or unbalanced."""
    s = _JSON_NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", body))
    for _ in range(max_depth):
        if not s:
            return True
        t = _JSON_PAIR.sub(b"", s)
        if t == s:
            return False
        s = t
    return not s


def _reject_constant(name: str):
    raise _bad(f"JSON numbers must be finite: {name} is not allowed")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise _bad(f"JSON numbers must be finite: {text[:40]} is not")
    return v


def parse_json_descriptors(body: bytes, dim: int, limits: Limits):
    """A JSON body ``{"descriptors": [[...], ...], "k": 10}`` -> ((n, dim) float32, k or None)."""
    if not _json_depth_ok(body, limits.max_json_depth):
        raise _bad(f"the JSON body nests deeper than {limits.max_json_depth} levels (--max-json-depth) or its "
                   "brackets do not pair up")
    try:
        text = body.decode("utf-8")
        doc = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RequestError:
        raise
    except (ValueError, RecursionError) as exc:   # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise _bad(f"the JSON body does not parse: {str(exc)[:200]}") from None
    if not isinstance(doc, dict) or "descriptors" not in doc:
        raise _bad('the JSON body must be an object with "descriptors": [[...], ...] (and optionally "k")')
    extra = sorted(set(doc) - {"descriptors", "k"})
    if extra:
        raise _bad(f"unknown key(s) in the JSON body: {', '.join(repr(e[:40]) for e in extra[:5])} "
                   '(only "descriptors" and "k")')
    k = parse_k(doc["k"], limits, where='"k"', text=False) if "k" in doc else None
    rows = doc["descriptors"]
    if type(rows) is not list:
        raise _bad('"descriptors" must be a list of rows (lists of numbers)')
    _rows_limit(len(rows), limits)
    for i, row in enumerate(rows):
        if type(row) is not list or len(row) != dim:
            got = f"a list of {len(row)}" if type(row) is list else type(row).__name__
            raise _bad(f'"descriptors" must be rows of {dim} numbers for this index (n, {dim}); row {i} is {got}')
    types = set(map(type, itertools.chain.from_iterable(rows)))
    if not types <= {int, float}:
        bad = sorted(t.__name__ for t in types - {int, float})
        raise _bad(f'"descriptors" must hold JSON numbers only, got {", ".join(bad)} (numeric strings and '
                   'booleans are refused)')
    try:
        x = np.array(rows, dtype=np.float64).reshape(len(rows), dim)
    except OverflowError:
        raise _bad('"descriptors" contain values beyond float32\'s range') from None
    return _finite(x, '"descriptors"'), k


# ---- .npy -------------------------------------------------------------------------------------------------
def _literal_depth_ok(text: str, max_depth: int = 4) -> bool:
    d = 0
    for ch in text:
        if ch in "([{":
            d += 1
            if d > max_depth:
                return False
        elif ch in ")]}":
            d -= 1
    return True


def parse_npy(data: bytes, dim: int, limits: Limits) -> np.ndarray:
    """A ``.npy`` file's bytes -> (n, dim) float32. The header is read by hand (no pickle, no object
    arrays); the data size it declares must equal the bytes after it, checked before allocating."""
    if len(data) < 10 or not data.startswith(_NPY_MAGIC):
        raise _bad("not a .npy file (no \\x93NUMPY magic)")
    major = data[6]
    if major == 1:
        hlen, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        if len(data) < 12:
            raise _bad("not a .npy file: the header is cut short")
        hlen, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise _bad(f"not a .npy file this service reads: format version {major} (1 to 3 are)")
    if hlen > 4096 or start + hlen > len(data):
        raise _bad(f"not a .npy file: a header of {hlen} bytes in a file of {len(data)}")
    try:
        text = data[start:start + hlen].decode("utf-8" if major == 3 else "latin1")
    except UnicodeDecodeError:
        raise _bad("not a .npy file: the header is not text") from None
    if not _literal_depth_ok(text):
        raise _bad("not a .npy file: the header is not a plain dictionary")
    try:
        header = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise _bad("not a .npy file: the header is not a Python literal") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise _bad("not a .npy file: the header must have exactly 'descr', 'fortran_order' and 'shape'")
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    if not isinstance(descr, str) or not re.fullmatch(r"[<>]f[48]", descr):
        raise _bad(f"the .npy array must be float32 or float64 (descr '<f4' or '<f8'), got {str(descr)[:40]!r}")
    if type(fortran) is not bool:
        raise _bad("not a .npy file: 'fortran_order' must be True or False")
    if (type(shape) is not tuple or len(shape) != 2 or any(type(s) is not int for s in shape)
            or any(s < 0 for s in shape)):
        raise _bad(f"the .npy array must be 2-D (n, {dim}), got shape {str(shape)[:60]}")
    n, d = shape
    if d != dim:
        raise _bad(f"descriptors must be (n, {dim}) for this index, got shape ({n}, {d})")
    itemsize = int(descr[2])
    offset = start + hlen
    if n * d * itemsize != len(data) - offset:
        raise _bad(f"the .npy header declares shape ({n}, {d}) of {descr}, {n * d * itemsize} bytes, but "
                   f"{len(data) - offset} bytes follow it")
    _rows_limit(n, limits)
    x = np.frombuffer(data, dtype=np.dtype(descr), count=n * d, offset=offset)
    x = x.reshape((n, d), order="F" if fortran else "C").astype(np.float64 if itemsize == 8 else np.float32)
    return _finite(x, "descriptors")


# ---- multipart --------------------------------------------------------------------------------------------
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_TOKEN_PARAM = re.compile(r'\s*;\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)', re.DOTALL)


def _params(header_value: str) -> dict:
    """The ``; name=value`` parameters after a header's first item (names lower-cased; quotes removed)."""
    _, sep, rest = header_value.partition(";")
    out: dict = {}
    if not sep:
        return out
    rest = ";" + rest
    pos = 0
    while pos < len(rest):
        m = _TOKEN_PARAM.match(rest, pos)
        if m is None:
            if rest[pos:].strip(" \t;") == "":
                break
            raise _bad(f"a malformed header parameter list: {header_value[:80]!r}")
        v = m.group(2)
        if v.startswith('"'):
            v = re.sub(r"\\(.)", r"\1", v[1:-1], flags=re.DOTALL)
        out.setdefault(m.group(1).lower(), v)
        pos = m.end()
    return out


def parse_multipart(content_type: str, body: bytes, max_parts: int = 16) -> dict:
    """A ``multipart/form-data`` body -> {field name: bytes}; 400 for a missing or invalid boundary, a body
    that is not multipart, a part without ``Content-Disposition: form-data; name=...``, or a field twice."""
    boundary = _params(content_type).get("boundary")
    if boundary is None:
        raise _bad("a multipart/form-data request needs a boundary (Content-Type: multipart/form-data; "
                   "boundary=...)")
    if not _BOUNDARY.fullmatch(boundary):
        raise _bad("the multipart boundary must be 1 to 70 characters of the set RFC 2046 allows")
    delim = b"--" + boundary.encode("ascii")
    if body.startswith(delim):
        pos = len(delim)
    else:
        i = body.find(b"\r\n" + delim)
        if i < 0:
            raise _bad("the multipart body does not contain its boundary")
        pos = i + 2 + len(delim)
    fields: dict = {}
    while True:
        if body[pos:pos + 2] == b"--":
            return fields
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise _bad("the multipart body is malformed (a boundary line not ended by CRLF)")
        start = eol + 2
        nxt = body.find(b"\r\n" + delim, start)
        if nxt < 0:
            raise _bad("the multipart body is not closed by its final boundary")
        if len(fields) >= max_parts:
            raise _bad(f"more than {max_parts} parts in the multipart body")
        name, value = _part(body[start:nxt])
        if name in fields:
            raise _bad(f"the multipart field {name[:40]!r} appears twice")
        fields[name] = value
        pos = nxt + 2 + len(delim)


def _part(part: bytes):
    if part.startswith(b"\r\n"):
        head, data = b"", part[2:]
    else:
        end = part.find(b"\r\n\r\n")
        if end < 0:
            raise _bad("a multipart part has no blank line after its headers")
        head, data = part[:end], part[end + 4:]
    name = None
    for line in head.split(b"\r\n") if head else []:
        key, sep, value = line.partition(b":")
        if not sep or not key.strip():
            raise _bad("a multipart part has a malformed header line")
        if key.strip().lower() == b"content-disposition":
            v = value.decode("latin1").strip()
            if v.split(";")[0].strip().lower() != "form-data":
                raise _bad("a multipart part's Content-Disposition must be form-data")
            name = _params(v).get("name")
    if name is None:
        raise _bad('a multipart part has no Content-Disposition: form-data; name="..."')
    return name, data


#: images above this many pixels must bring a byte of file per Limits.max_pixels_per_byte pixels
BOMB_FLOOR_PIXELS = 1_000_000


# ---- images -----------------------------------------------------------------------------------------------
def check_image_header(data: bytes, limits: Limits) -> tuple:
    """(width, height) read from the image's header (Pillow opens lazily: no pixel is decoded); 400 for
    bytes that are not an image of IMAGE_FORMATS, 413 above ``max_image_pixels``."""
    if not data:
        raise _bad("cannot decode the posted image: the body is empty")
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with d2r[ray]
        raise RequestError(415, "this service cannot read image headers (Pillow is not installed); post "
                                "descriptors instead") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # DecompressionBombWarning: the limit below decides
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        raise RequestError(413, "the posted image declares more pixels than this service's limit of "
                                f"{limits.max_image_pixels} (--max-image-pixels)") from None
    except Exception as exc:   # noqa: BLE001 - a plugin may raise anything on hostile bytes: all mean 400
        raise _bad("cannot decode the posted image: not a JPEG, PNG, WebP, BMP, TIFF or PNM image "
                   f"({type(exc).__name__})") from None
    if type(w) is not int or type(h) is not int or w < 1 or h < 1:
        raise _bad(f"cannot decode the posted image: its header declares a size of {w} x {h}")
    if w * h > limits.max_image_pixels:
        raise RequestError(413, f"the posted image is {w} x {h} = {w * h} pixels, more than this service's limit "
                                f"of {limits.max_image_pixels} (--max-image-pixels)")
    if w * h > BOMB_FLOOR_PIXELS and w * h > limits.max_pixels_per_byte * len(data):
        raise RequestError(413, f"the posted image declares {w} x {h} = {w * h} pixels in {len(data)} bytes, more than "
                                f"{limits.max_pixels_per_byte} pixels per byte (--max-pixels-per-byte): a "
                                "decompression bomb?")
    return w, h


# ---- the request ------------------------------------------------------------------------------------------
def _allow_partial(value: Optional[str]) -> bool:
    if value is None:
        return False
    v = value.strip().lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no", ""):
        return False
    raise _bad(f"allow_partial must be 0 or 1, got {value[:40]!r}")


def _expand(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    v = value.strip().lower()
    if v in ("", "none"):
        return None
    if v in ("hqe", "hqe-fused", "aqe"):
        return v
    raise _bad(f"expand must be none, hqe, hqe-fused or aqe, got {value[:40]!r}")


def parse_search(content_type: Optional[str], body: bytes, query: Mapping[str, str], *, dim: int,
                 default_k: int = 10, limits: Limits = Limits()) -> SearchQuery:
    """A ``POST /search`` request -> SearchQuery, or RequestError. content_type: the header (None or "" for
    none); body: all of it; query: the URL's parameters (``k``, ``allow_partial``, ``expand``)."""
    if len(body) > limits.max_request_bytes:
        raise _too_big(len(body), limits)
    k = parse_k(query["k"], limits, where="k") if query.get("k") is not None else None
    partial = _allow_partial(query.get("allow_partial"))
    ct = (content_type or "").split(";")[0].strip().lower()
    out = SearchQuery(k=default_k, allow_partial=partial, expand=_expand(query.get("expand")))
    if ct == "multipart/form-data":
        form = parse_multipart(content_type or "", body)
        if "image" in form and "descriptors" in form:
            raise _bad("the form has both 'image' and 'descriptors': send one")
        if "image" in form:
            out.image = form["image"]
            out.image_size = check_image_header(out.image, limits)
        elif "descriptors" in form:
            out.descriptors = parse_npy(form["descriptors"], dim, limits)
        else:
            raise _bad("the form needs a field 'image' (an image file) or 'descriptors' (a .npy file)")
    elif not body:
        raise _bad("empty request body: send an image, a .npy file or JSON descriptors")
    elif ct == "application/json":
        out.descriptors, k_body = parse_json_descriptors(body, dim, limits)
        if k is None:
            k = k_body
    elif ct == "application/x-npy" or body[:6] == _NPY_MAGIC:
        out.descriptors = parse_npy(body, dim, limits)
    elif ct.startswith("image/") or ct in ("application/octet-stream", ""):
        out.image = body
        out.image_size = check_image_header(body, limits)
    else:
        raise RequestError(415, f"unsupported content type {ct[:60]!r}: send image bytes (image/*), a .npy file "
                                "(application/x-npy), JSON descriptors (application/json) or a multipart form")
    out.k = k if k is not None else default_k
    return out
