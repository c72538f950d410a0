"""Every seed and regression input of the Python fuzz targets (tests/fuzz/py/<target>.py) through the
target's TestOneInput, without atheris: the inputs that once crashed stay fixed, and the seeds stay
valid inputs. (The libFuzzer targets' inputs are replayed by .ci/fuzz.sh, which builds them.)"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TARGETS = sorted(p.stem for p in (HERE / "py").glob("*.py") if not p.name.startswith("_"))
INPUTS = [(t, p) for t in TARGETS for kind in ("corpus", "regressions")
          for p in sorted((HERE / kind / t).glob("*")) if p.is_file()]


def _target(name: str):
    sys.path.insert(0, str(HERE / "py"))
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # a target whose optional dependencies are not installed here
        pytest.skip(f"fuzz target {name}: {exc}")
    finally:
        sys.path.remove(str(HERE / "py"))


def test_every_target_has_seeds():
    assert "index_load" in TARGETS and "store_read" in TARGETS
    for t in TARGETS:
        assert any((HERE / "corpus" / t).glob("*")), f"tests/fuzz/corpus/{t} holds no seed inputs"


@pytest.mark.parametrize("target,path", INPUTS, ids=[f"{t}/{p.parent.name}/{p.name}" for t, p in INPUTS])
def test_replay(target, path):
    _target(target).TestOneInput(path.read_bytes())
