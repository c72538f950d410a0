"""Input validation shared by the Python API: every public entry point turns bad input into a clear
TypeError / ValueError before it reaches the native core."""
from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

import numpy as np
from numpy.typing import NDArray

# The values checked here come from users: they are typed Any (anything may be passed; what is not
# acceptable raises TypeError or ValueError).

MAX_ID = 1 << 62    # image ids lie in [0, 2**62); also the largest k (more than any index holds)
ALPHA_MAX = 64.0    # sigma(u) = sign(u)|u|^alpha: larger exponents only underflow


def as_descriptors(x: Any, dim: int | None = None, name: str = "descriptors") -> NDArray[np.float32]:
    """Return x as a C-contiguous float32 (n, dim) array. float64 is converted; other dtypes raise
    TypeError; wrong rank or dimension, NaN and Inf raise ValueError. Zero rows are allowed."""
    if not isinstance(x, np.ndarray):
        if hasattr(x, "__cuda_array_interface__"):
            raise TypeError(f"{name} is a GPU array; the CPU path takes host arrays (numpy)")
        try:
            x = np.asarray(x)
        except Exception as exc:  # pragma: no cover - exotic objects
            raise TypeError(f"{name} must be an array, got {type(x).__name__}") from exc
    if x.dtype == np.float64:
        x = x.astype(np.float32)
    elif x.dtype != np.float32:
        raise TypeError(f"{name} must be float32 (or float64), got dtype {x.dtype}")
    if x.ndim == 1 and x.size == 0 and dim is not None:
        x = x.reshape(0, dim)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, dim), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} have dimension {x.shape[1]}, expected {dim}")
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or Inf")
    return np.ascontiguousarray(x)


def as_ids(ids: Any, n: int | None = None, name: str = "image_ids") -> NDArray[np.int64]:
    """int64 1-D ids, non-negative and unique."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name}: {arr.shape[0]} ids given for {n} images")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative")
    if arr.size and arr.max() >= MAX_ID:
        raise ValueError(f"{name} must be below 2**62, got {arr.max()}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if np.unique(arr).size != arr.size:
        raise ValueError(f"{name} contain duplicates")
    return arr


def as_offsets(offsets: Any, n_rows: int, name: str = "offsets") -> NDArray[np.int64]:
    """CSR offsets: int64, 1-D, starting at 0, non-decreasing, ending at n_rows."""
    arr = np.asarray(offsets)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"{name} must be a non-empty 1-D array")
    if arr[0] != 0 or arr[-1] != n_rows:
        raise ValueError(f"{name} must start at 0 and end at {n_rows}, got {arr[0]} .. {arr[-1]}")
    if np.any(np.diff(arr) < 0):
        raise ValueError(f"{name} must be non-decreasing")
    return arr


def check_positive_int(value: Any, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def check_choice(value: Any, name: str, choices: Collection[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


def check_k(k: Any) -> int:
    """k for top-k search: None (every image) -> -1; a positive integer, huge ones clamped to 2**62."""
    if k is None:
        return -1
    return min(check_positive_int(k, "k"), MAX_ID)


def as_image_id(x: Any) -> int | None:
    """x as an image id for `x in index`: None when x is not an integer (1.5, '1', True) or out of
    the id range, so that such an x is never in an index."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        return None
    x = int(x)
    return x if 0 <= x < MAX_ID else None


def _check_real(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        v = float(value)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def check_alpha(alpha: Any) -> float:
    a = _check_real(alpha, "alpha")
    if not 0 < a <= ALPHA_MAX:
        raise ValueError(f"alpha must be in (0, {ALPHA_MAX:g}], got {alpha!r}")
    return a


def check_tau(tau: Any) -> float:
    t = _check_real(tau, "tau")
    if not -1 <= t < 1:
        raise ValueError(f"tau must be in [-1, 1) (tau >= 1 would make every score 0), got {tau!r}")
    return t


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def check_score_params(alpha: Any, tau: Any, normalize: Any) -> tuple[float, float, bool]:
    """The selectivity and normalisation parameters: alpha in (0, 64], tau in [-1, 1), normalize a bool."""
    return check_alpha(alpha), check_tau(tau), check_bool(normalize, "normalize")
