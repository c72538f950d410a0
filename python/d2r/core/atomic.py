"""Atomic file output: write to a temporary file in the target's folder, fsync, rename over the
target. A crash or an exception never leaves a half-written file under the target's name.

Temporary files are named `.{name}.{pid}.{random}.tmp`. A process killed mid-write leaves its
temporary file behind; the next atomic_write to the same target deletes those whose process is gone."""
from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":   # no cheap liveness test (os.kill(pid, 0) terminates the process on Windows)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # EPERM: alive, another user's
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete `.{path.name}.{pid}.{random}.tmp` files beside `path` left by processes that no longer run."""
    head = f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(head) and name.endswith(".tmp")):
            continue
        pid, _, rand = name[len(head):-len(".tmp")].partition(".")
        if pid.isdigit() and rand and "." not in rand and not _pid_alive(int(pid)):
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def _create_temporary(path: Path) -> tuple[int, str]:
    while True:
        tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            # 0o666 less the umask: the permissions a plain open() would give the target
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
        except FileNotFoundError:
            if not path.parent.is_dir():
                raise FileNotFoundError(errno.ENOENT, f"cannot save: folder {str(path.parent)!r} does not exist",
                                        str(path)) from None
            raise


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """`with atomic_write(path) as f:` yields a binary file object; on success the file replaces `path`."""
    target = Path(path)
    _remove_stale_temporaries(target)
    fd, tmp = _create_temporary(target)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
