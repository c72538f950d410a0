"""What every command shares: exit statuses, the usage-error types, the help formatter and the
options every command takes (``--quiet``, ``--json``, ``--ray``), image lists, JSON output, the
listing of skipped inputs, and the one-line error messages of :func:`d2r.cli.main`."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

EXIT_OK, EXIT_NOTHING_USABLE, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_TERMINATED = 128 + signal.SIGTERM   # 143
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class UsageError(ValueError):
    """A mistake in the command line or its files: exit status 2."""


class NothingUsable(Exception):
    """No usable input remained: exit status 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) received by a Ray command: it stops as Ctrl-C stops it (the cluster it
    started shut down), with exit status 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)


# ---- Ray commands ------------------------------------------------------------------------------------
def _ray_log_path(at) -> Path:
    """Where a Ray command's Ray output goes: FOLDER/ray.log for a folder (a store, a sharded index),
    FILE.ray.log beside a file; a file in the temporary folder where that cannot be written."""
    at = Path(at)
    path = at / "ray.log" if at.is_dir() else at.with_name(at.name + ".ray.log")
    try:
        with open(path, "a", encoding="utf-8"):
            pass
        return path
    except OSError:
        return Path(tempfile.gettempdir()) / f"d2r-ray-{os.getpid()}.log"


@contextmanager
def ray_session(args, address, log_at):
    """Connect to Ray for one command: Ray's own output into a log file beside `log_at` (named once on
    stderr, unless --quiet), SIGINT and SIGTERM (and SIGHUP) turned into an orderly stop (the exception
    reaches :func:`d2r.cli.main`, which exits 130 or 128 + the signal), and on the way out, however
    it ends, the cluster left (a local one stopped with every process it started) and stderr given
    back. A process already connected (Python, tests) keeps its cluster and its output as they are."""
    from d2r import distributed

    ray = distributed._ray()
    if ray.is_initialized():
        yield None
        return
    log = _ray_log_path(log_at)
    previous = {}

    def stop(signum, frame):
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    def install():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            if sig not in previous:
                current = signal.getsignal(sig)
                if current == signal.SIG_IGN:   # e.g. SIGINT of a script's background job: left ignored
                    continue
                previous[sig] = current
            signal.signal(sig, stop)

    install()
    finished = False
    try:
        try:
            distributed.connect(address, log_file=log)
        except SystemExit as exc:   # Ray's own SIGTERM handler, set while Ray starts: sys.exit(signal number)
            if exc.code == signal.SIGTERM:
                raise Terminated(signal.SIGTERM) from None
            raise
        install()   # Ray replaced the SIGTERM handler with its own (which prints stack frames and exits)
        if not getattr(args, "quiet", False):
            print(f"d2r {args.command}: Ray's own messages go to {log}", file=sys.stderr, flush=True)
        yield log
        finished = True
    finally:
        held = []   # a signal while the cluster stops is noted, not raised into the shutdown
        for sig in previous:
            signal.signal(sig, lambda signum, frame: held.append(signum))
        try:
            distributed.disconnect()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if finished and held:   # the work was done, but the stop was asked for: the status says so
            raise KeyboardInterrupt if held[0] == signal.SIGINT else Terminated(held[0])


def _emit_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=str))


def _extract_listing_skips(extractor, images, **kw):
    """extract_many for a command that lists every skipped image itself (`_skipped`): its summary
    warning, which points at the result's `.errors`, would only repeat them."""
    from d2r.extract import UnreadableImagesWarning, extract_many

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImagesWarning)
        return extract_many(extractor, images, **kw)


def _skipped(command, errors, json_out):
    """The unreadable inputs, listed: one stderr line each (text output), or the JSON "skipped" list."""
    if not json_out:
        for name, err in errors:
            print(f"d2r {command}: skipped {name}: {err}", file=sys.stderr)
    return [{"image": n, "error": e} for n, e in errors]


def _images(paths):
    """Image paths from files, folders (recursively, by suffix) and .txt lists (one path per line,
    relative to the list's folder)."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.is_file())
            found = [q for q in files if q.suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                raise UsageError(f"{p}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
            _warn_other_files(p, [q for q in files if q.suffix.lower() not in IMAGE_SUFFIXES])
            out += found
        elif p.suffix.lower() == ".txt" and p.is_file():
            out += [p.parent / line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif p.exists():
            out.append(p)
        else:
            raise UsageError(f"{p}: no such image, folder or .txt list; check the path")
    if not out:
        raise UsageError("no images given; pass image files, folders or .txt lists of paths")
    return [str(q) for q in out]


def _warn_other_files(folder: Path, others) -> None:
    """One warning naming the files of an image folder that are not images (by suffix): how many, and
    the first few."""
    if not others:
        return
    shown = ", ".join(str(q.relative_to(folder)) for q in others[:3]) + (", ..." if len(others) > 3 else "")
    lists = (" (a .txt list of paths is read when given as an argument, not inside a folder)"
             if any(q.suffix.lower() == ".txt" for q in others) else "")
    warnings.warn(f"{folder}: skipped {len(others)} file{'s' if len(others) > 1 else ''} that "
                  f"{'are' if len(others) > 1 else 'is'} not an image ({', '.join(IMAGE_SUFFIXES)}): {shown}{lists}",
                  UserWarning, stacklevel=3)


def _names_file(index_path) -> Path:
    from d2r.workflows.build import names_file

    return names_file(index_path)


def _query_extractor(index, args):
    """The extractor the index's database features were made with (recorded by `d2r index`), with
    --max-features applied; the CLI's RootSIFT for indexes without a record."""
    from d2r.extract.describe import query_extractor

    try:
        return query_extractor(index.extractor, args.max_features, getattr(args, "delf", None), where=str(args.index))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# ---- the parser --------------------------------------------------------------------------------------
class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Help with every option's default (flags and options without one excepted), and descriptions kept
    as written."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _ray_option(p, what):
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help=f"{what}: 'local' starts one on this machine, 'auto' joins the running one, or a Ray address "
                        "(HOST:6379, ray://HOST:10001); needs pip install 'd2r[ray]'")


def _common(p, json_out=True):
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or notes (errors and results only)")
    if json_out:
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout instead of text")


def add_command(sub, name, help, description=None) -> argparse.ArgumentParser:
    """A command's subparser (its description: `description`, or the one-line `help`)."""
    return sub.add_parser(name, help=help, description=description or help, formatter_class=_Formatter)


# ---- checks and errors -------------------------------------------------------------------------------
def _check_outputs(args) -> None:
    """Fail before the work, not after it, when an output's folder does not exist."""
    for name in ("out",):
        v = getattr(args, name, None)
        if v is not None:
            parent = Path(v).parent
            if not parent.is_dir():
                raise UsageError(f"cannot write {v}: folder {parent} does not exist; create it first")


def _check_numbers(args) -> None:
    for name, low in (("words", 1), ("iters", 1), ("sample", 1), ("k", 1), ("max_features", 1), ("workers", 1),
                      ("batch_images", 1), ("max_regions", 1), ("rerank_top", 1), ("shards", 1), ("port", 1)):
        v = getattr(args, name, None)
        if v is not None and v < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, got {v}")


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (OSError: its description and file)."""
    if isinstance(exc, OSError) and exc.strerror:
        msg = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        msg = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError) and exc.args:
        msg = str(exc.args[0])
    return " ".join(msg.split())


def _origin(exc: BaseException) -> str | None:
    """The package whose code raised `exc` (the last Python frame), or None when it was d2r's own code
    (or a builtin d2r called): d2r's messages name the problem and the fix; another package's would
    pass through unexplained."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the d2r package, every layer
    if last is None or os.path.abspath(last).startswith(here):
        return None
    parts = Path(last).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return parts[parts.index(marker) + 1].split(".")[0]
    return Path(last).stem


def _internal(prefix, exc, where) -> int:
    if os.environ.get("D2R_DEBUG"):
        raise exc
    print(f"{prefix}: internal error{where}: {type(exc).__name__}: {_one_line(exc)} (unexpected: a bug in d2r, please "
          "report it; D2R_DEBUG=1 shows the traceback)", file=sys.stderr)
    return EXIT_INTERNAL
