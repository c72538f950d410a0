"""Shared by the atheris targets of tests/fuzz/py: running a target under atheris, or importing it
without atheris (tests/fuzz/test_corpora.py replays the corpora through TestOneInput)."""
from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

try:
    import atheris
except ImportError:  # replaying the corpora (pytest) needs no atheris
    atheris = None

# Where the targets write the files they load: memory-backed where there is /dev/shm.
SCRATCH = Path(tempfile.mkdtemp(prefix="d2r-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))


def instrumented_imports(fuzzing: bool, include: list[str], do_import: Callable[[], None]) -> None:
    """do_import() with atheris's coverage instrumentation of the modules named in `include` when
    fuzzing (the target runs as a script under atheris), a plain import otherwise."""
    if fuzzing and atheris is not None:
        with atheris.instrument_imports(include=include):
            do_import()
    else:
        do_import()


def run(test_one_input: Callable[[bytes], None]) -> None:
    """The target's main: libFuzzer's command line (corpus folders, files, -max_total_time=...)."""
    if atheris is None:
        sys.exit("atheris is not installed: pip install 'd2r[fuzz]' (or pip install atheris)")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()



def debug(exc: BaseException) -> None:
    """Prints an allowed error when D2R_FUZZ_DEBUG=1 (to see where seeds and inputs stop)."""
    if os.environ.get("D2R_FUZZ_DEBUG") == "1":
        print(f"allowed: {type(exc).__name__}: {exc}", file=sys.stderr)
