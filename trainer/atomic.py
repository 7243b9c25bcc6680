"""Files replaced atomically: a kill at any moment leaves the old file or the new one, never
half of one.

The one way the framework rewrites a file in place (checkpoints, run and status records, the
ZeRO completeness marker, the offline teacher cache): the new content goes to a temporary file
in the same folder (same filesystem, so the rename is atomic), is synced to disk, renamed over
the target, and the folder entry is synced too. A failure, or a kill signal raised as an
exception, removes the temporary. Temporaries are named ``.<name>.<random>.tmp``.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_path(path: str | Path, clean_stale: bool = False) -> Iterator[Path]:
    """A temporary path next to ``path``, renamed over it when the block ends without error.

    For writers that take a file name (h5py). ``clean_stale`` removes temporaries of ``path``
    left by a process killed with SIGKILL (only where a single writer owns ``path``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if clean_stale:
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; keep the usual permissions
        os.close(fd)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", clean_stale: bool = False) -> Iterator[IO]:
    """An open file that replaces ``path`` when the block ends without error (see :func:`atomic_path`)."""
    with atomic_path(path, clean_stale) as tmp, open(tmp, mode) as fh:
        yield fh


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path, "w") as fh:
        fh.write(text)


def _fsync(path: Path) -> None:
    # a file's data, or a folder's entries; a filesystem that cannot sync a folder is no error
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
