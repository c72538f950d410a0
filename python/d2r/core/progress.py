"""Progress bars (tqdm) for every step that can take more than a few seconds, with one switch:
``set_quiet(True)`` (the command line's ``--quiet``) silences them all, whatever a call asks."""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

_T = TypeVar("_T")

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (True) or allow (False) every d2r progress bar in this process."""
    global _quiet
    _quiet = bool(quiet)


def bar(total: float | None, desc: str, enabled: bool = True, unit: str = "img", leave: bool = False) -> Any:
    """A tqdm bar, or None when disabled (by the call or by set_quiet)."""
    if not enabled or _quiet:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave)


def iterate(it: Iterable[_T], total: float | None, desc: str, enabled: bool = True,
            unit: str = "img") -> Iterable[_T]:
    """`it` wrapped in a tqdm bar when enabled."""
    if not enabled or _quiet:
        return it
    from tqdm.auto import tqdm

    wrapped: Iterable[_T] = tqdm(it, total=total, desc=desc, unit=unit, leave=False)
    return wrapped


@contextlib.contextmanager
def busy(desc: str, enabled: bool = True) -> Iterator[None]:
    """A sign of life for one long call that reports no steps (e.g. faiss k-means): a bar showing the
    elapsed time, refreshed twice a second from a background thread."""
    b = bar(None, desc, enabled, unit="s")
    if b is None:
        yield
        return
    stop = threading.Event()

    def tick() -> None:
        t0 = time.perf_counter()
        while not stop.wait(0.5):
            b.set_postfix_str(f"{time.perf_counter() - t0:.0f} s", refresh=True)

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        b.close()
