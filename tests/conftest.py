"""Test-wide setup: the real-photo tests read ../shared/data (beside the repository). The installed
package cannot see the repository, so point it there through $D2R_SHARED_DATA when that folder exists
(tests that need it skip with a clear reason otherwise)."""
import os
from pathlib import Path

_SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "D2R_SHARED_DATA" not in os.environ and _SHARED.is_dir():
    os.environ["D2R_SHARED_DATA"] = str(_SHARED)

# TensorFlow (optional, marker tf): oneDNN's kernels reorder float sums from run to run; the parity tests
# compare against TensorFlow's outputs, so use its deterministic reference kernels.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
