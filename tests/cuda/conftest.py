"""The GPU tests run everywhere: against the real CUDA extension where a GPU exists, and against the
CPU stand-in of its binding surface (d2r.cuda.standin) everywhere else, CI included.

`pytest -m gpu` selects them. On a machine with a GPU, D2R_GPU_STANDIN=1 runs them on the stand-in
anyway (to compare), and on a machine without one D2R_GPU_STANDIN=0 skips them instead."""
import os

import pytest

from d2r import cuda
from d2r.cuda import standin

#: Whether a real GPU (and a CUDA build) is here, read before any stand-in is active.
REAL_GPU = cuda.is_available()
_MODE = os.environ.get("D2R_GPU_STANDIN", "")
USE_STANDIN = _MODE == "1" or (not REAL_GPU and _MODE != "0")


@pytest.fixture(autouse=True)
def gpu_surface(request):
    """Tests marked gpu run on the real GPU, or on the stand-in (see the module docstring)."""
    if request.node.get_closest_marker("gpu") is None:
        yield "none"
        return
    if USE_STANDIN:
        with standin.active():
            yield "standin"
    elif REAL_GPU:
        yield "gpu"
    else:
        pytest.skip("no CUDA device, and D2R_GPU_STANDIN=0 turns the CPU stand-in off")
