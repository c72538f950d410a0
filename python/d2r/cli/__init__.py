"""The `d2r` command: demo (the main job), extract, train-codebook, index, search, evaluate, convert-delf,
convert-codebook, info.

Conventions every command follows (and commands added later must follow):

- ``--help`` describes every option with its default;
- progress bars go to stderr, results to stdout; ``--quiet`` silences the bars (and notes), ``--json``
  prints one JSON document on stdout instead of the human-readable text;
- an error is one line on stderr, ``d2r COMMAND: error: <what is wrong>; <how to fix it>``; warnings
  are one line each, ``d2r COMMAND: warning: ...``;
- unreadable inputs (images) are skipped and listed; ``--strict`` stops at the first one;
- exit status: 0 success (perhaps with skipped inputs, listed), 1 nothing usable remained or
  ``--strict`` stopped at an unreadable input, 2 a usage error (bad argument, missing or unusable
  file), 3 an internal error (a bug: please report it; ``D2R_DEBUG=1`` shows the traceback),
  130 interrupted (SIGINT, Ctrl-C), 143 terminated (SIGTERM; Ray commands and ``serve``);
- a Ray command (``--ray``, ``index --shards``, ``serve``) writes Ray's own messages to ``ray.log``
  in its store or index folder (named once on stderr unless ``--quiet``), and SIGINT or SIGTERM
  stops it with the cluster it started: no process is left behind.

Layout: one module per command (``demo``, ``extract``, ``train_codebook``, ``index``, ``search``,
``serve``, ``evaluate``, ``convert_delf``, ``convert_codebook``, ``info``), each with ``register(sub)``
(adds its subparser and options) and ``run(args)``; ``_common`` holds what the commands share (exit
statuses, usage errors, the help formatter, the shared options, error messages), ``_pipeline`` what
demo and evaluate share. A new command is a module listed in ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from d2r.cli import (convert_codebook, convert_delf, demo, evaluate, extract, index, info, search, serve,
                     train_codebook)
from d2r.cli._common import (EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_NOTHING_USABLE, EXIT_OK, EXIT_TERMINATED,
                             EXIT_USAGE, IMAGE_SUFFIXES, NothingUsable, Terminated, UsageError, _check_numbers,
                             _check_outputs, _Formatter, _internal, _one_line, _origin)
from d2r.cli._pipeline import DATASETS_HELP, pipeline_extractor

__all__ = ["main", "build_parser", "pipeline_extractor", "UsageError", "NothingUsable", "DATASETS_HELP",
           "IMAGE_SUFFIXES", "EXIT_OK", "EXIT_NOTHING_USABLE", "EXIT_USAGE", "EXIT_INTERNAL", "EXIT_INTERRUPTED",
           "EXIT_TERMINATED"]

# the commands, in the order `d2r --help` lists them: each module's register(sub) adds its subparser
COMMANDS = (demo, extract, train_codebook, index, search, serve, evaluate, convert_delf, convert_codebook, info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="d2r", formatter_class=_Formatter,
        description="Detect-to-Retrieve image retrieval (ASMK*, R-ASMK*): from images to ranked, evaluated results.",
        epilog="The four steps on your own images: d2r extract IMAGES --out store; d2r train-codebook store --out "
               "cb.npy; d2r index store --codebook cb.npy --out db.d2r; d2r search db.d2r QUERY.jpg.\n"
               "Exit status: 0 success, 1 nothing usable remained (or --strict stopped), 2 usage error, 3 internal "
               "error, 130 interrupted (SIGINT), 143 terminated (SIGTERM).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    prefix = f"d2r {args.command}"

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prefix}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    from d2r.core import progress as _progress
    from d2r.extract import ImageLoadError, NoUsableImagesError
    from d2r.core.index_io import IndexFileError

    saved_show, saved_quiet = warnings.showwarning, _progress._quiet
    warnings.showwarning = show
    _progress.set_quiet(bool(getattr(args, "quiet", False)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            _check_numbers(args)
            _check_outputs(args)
            return args.func(args)
    except (NothingUsable, NoUsableImagesError) as exc:
        print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_NOTHING_USABLE
    except ImageLoadError as exc:  # --strict
        print(f"{prefix}: error: {_one_line(exc)} (stopped: --strict; without it unreadable images are skipped "
              "and listed)", file=sys.stderr)
        return EXIT_NOTHING_USABLE
    except IndexFileError as exc:
        print(f"{prefix}: error: {_one_line(exc)}; rebuild it with `d2r index`", file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, ValueError, TypeError, KeyError, OSError) as exc:
        origin = None if isinstance(exc, (UsageError, OSError)) else _origin(exc)
        if origin is not None:
            return _internal(prefix, exc, f" in {origin}")
        print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:
        hint = "" if "d2r[" in str(exc) else "; install d2r with its extras, e.g. pip install \"d2r[demo]\""
        print(f"{prefix}: error: a package this needs is not installed ({_one_line(exc)}){hint}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:
        from d2r.distributed import ShardUnavailableError

        if not isinstance(exc, ShardUnavailableError):
            return _internal(prefix, exc, "")
        print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_NOTHING_USABLE
    except KeyboardInterrupt as exc:   # Ctrl-C (SIGINT), or SIGTERM / SIGHUP to a Ray command (Terminated)
        if args.command == "serve":
            if not getattr(args, "quiet", False):
                print(f"{prefix}: stopped", file=sys.stderr)
        else:
            print(f"{prefix}: interrupted (completed shards and files are kept; rerun to resume)", file=sys.stderr)
        return 128 + exc.signum if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except Exception as exc:  # a bug: say so, in one line
        return _internal(prefix, exc, "")
    finally:
        warnings.showwarning = saved_show
        _progress.set_quiet(saved_quiet)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
