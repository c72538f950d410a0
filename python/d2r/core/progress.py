"""Progress for every step that can take more than a few seconds, with one switch:
``set_quiet(True)`` (the command line's ``--quiet``) silences it all, whatever a call asks.

On a terminal, progress is a tqdm bar redrawn in place. When stderr is not a terminal (a log file, a
pipe, a CI job), a redrawn bar would write a line per update; progress is then a plain line every
``D2R_PROGRESS_INTERVAL`` seconds (default 10; ``0`` or ``off``: no progress lines at all) and one
line when the step ends, e.g. ``d2r: extract: 120/411 img (29 %), 31 s, 3.9 img/s``."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

_T = TypeVar("_T")

_quiet = False

#: The environment variable holding the seconds between two progress lines written to a log.
INTERVAL_VARIABLE = "D2R_PROGRESS_INTERVAL"
_DEFAULT_INTERVAL = 10.0


def set_quiet(quiet: bool) -> None:
    """Silence (True) or allow (False) every d2r progress bar in this process."""
    global _quiet
    _quiet = bool(quiet)


def log_interval() -> float | None:
    """Seconds between two progress lines when stderr is not a terminal (``D2R_PROGRESS_INTERVAL``,
    default 10), or None when they are turned off (0, ``off``, ``none``)."""
    raw = os.environ.get(INTERVAL_VARIABLE, "").strip().lower()
    if not raw:
        return _DEFAULT_INTERVAL
    if raw in ("off", "none", "no", "false"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{INTERVAL_VARIABLE}={raw!r}: give a number of seconds (0 or 'off': no progress "
                         "lines)") from None
    if value != value or value < 0:
        raise ValueError(f"{INTERVAL_VARIABLE}={raw!r}: give a number of seconds >= 0 (0 or 'off': no progress "
                         "lines)")
    return value if value > 0 else None


def _to_terminal() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):   # replaced or closed stderr
        return False


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _fmt_count(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


class LogProgress:
    """A progress 'bar' for logs: the subset of tqdm's interface d2r uses (update, set_description,
    set_postfix_str, reset, close), writing one plain line to stderr at most every `interval`
    seconds, and a last line on close."""

    def __init__(self, total: float | None, desc: str, unit: str = "img", interval: float = _DEFAULT_INTERVAL,
                 file: Any = None) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, float(interval)
        self.n: float = 0
        self.postfix = ""
        self._file = file
        self._t0 = self._last = time.monotonic()
        self._closed = False
        self._lock = threading.Lock()

    def _line(self, final: bool) -> str:
        elapsed = time.monotonic() - self._t0
        parts = []
        if self.total is not None or self.n:
            count = _fmt_count(self.n) + (f"/{_fmt_count(self.total)}" if self.total is not None else "")
            pct = f" ({100.0 * self.n / self.total:.0f} %)" if self.total else ""
            parts.append(f"{count} {self.unit}{pct}")
        parts.append(_fmt_seconds(elapsed) + (" in all" if final else ""))
        if self.n and elapsed > 0:
            parts.append(f"{self.n / elapsed:.3g} {self.unit}/s")
        if self.postfix:
            parts.append(self.postfix)
        return f"d2r: {self.desc}: " + ", ".join(parts) + (" (done)" if final else "")

    def _write(self, final: bool) -> None:
        f = self._file if self._file is not None else sys.stderr
        try:
            print(self._line(final), file=f, flush=True)
        except (OSError, ValueError):   # a closed stream: progress is never worth an error
            pass

    def _maybe_write(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._write(False)

    def update(self, n: float = 1) -> None:
        with self._lock:
            self.n += n
            self._maybe_write()

    def refresh(self) -> None:
        with self._lock:
            self._maybe_write()

    def set_description(self, desc: str, refresh: bool = True) -> None:
        self.desc = desc

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        with self._lock:
            self.postfix = s
            if refresh:
                self._maybe_write()

    def reset(self, total: float | None = None) -> None:
        self.n = 0
        self.total = total

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # a step shorter than one interval writes nothing: a log gets a line per step only when it
            # was long enough to be worth one
            if time.monotonic() - self._t0 >= self.interval:
                self._write(True)


def bar(total: float | None, desc: str, enabled: bool = True, unit: str = "img", leave: bool = False) -> Any:
    """A progress bar (tqdm on a terminal, :class:`LogProgress` otherwise), or None when disabled (by the
    call, by set_quiet, or by ``D2R_PROGRESS_INTERVAL=0`` when stderr is not a terminal)."""
    if not enabled or _quiet:
        return None
    if not _to_terminal():
        interval = log_interval()
        return None if interval is None else LogProgress(total, desc, unit, interval)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave)


def iterate(it: Iterable[_T], total: float | None, desc: str, enabled: bool = True,
            unit: str = "img") -> Iterable[_T]:
    """`it` wrapped in a progress bar when enabled."""
    b = bar(total, desc, enabled, unit)
    if b is None:
        return it
    return _counted(it, b)


def _counted(it: Iterable[_T], b: Any) -> Iterator[_T]:
    try:
        for x in it:
            yield x
            b.update(1)
    finally:
        b.close()


@contextlib.contextmanager
def busy(desc: str, enabled: bool = True) -> Iterator[None]:
    """A sign of life for one long call that reports no steps (e.g. faiss k-means): the elapsed time,
    refreshed twice a second on a terminal, a line every D2R_PROGRESS_INTERVAL seconds in a log."""
    if not enabled or _quiet:
        yield
        return
    b: Any
    if _to_terminal():
        from tqdm.auto import tqdm

        b = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed} elapsed", leave=False)
    else:
        interval = log_interval()
        if interval is None:
            yield
            return
        b = LogProgress(None, desc, "s", interval)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            b.refresh()

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        b.close()
