"""A one-time content check of each data file version, remembered in the cache directory.

Files written by ``data convert``/``generate`` were validated case by case while they were
written, and the node cache validates what it decodes; an uncompressed HDF5 file made by hand
(h5py) is memory-mapped in place and was never looked at. Before such a file trains, every
case is checked once: all metadata readable, every image voxel finite (a NaN or Inf voxel makes
every loss NaN), every label in ``[0, num_classes)``. The result is remembered under
``<cache_dir>/checked/`` keyed by the file's path, size, inode and modification/change times
(cheap to compute, and any rewrite changes them), so later runs, ranks and workers only
``stat`` the file. Writers mark what they wrote (:func:`mark_checked`).

HDF5 files are checked in a child process with a time limit: damaged HDF5 metadata (a
corrupt global heap, say) can make the HDF5 library loop forever inside one call, which no
Python code in the same process could interrupt.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from trainer.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_ENV = "COMPRESSSEG_CHECK_TIMEOUT"  # base seconds for the HDF5 check (the size adds to it)
_CHECKED: set[str] = set()  # signatures known good in this process


def _signature(path: str) -> str:
    st = os.stat(path)
    key = [os.path.realpath(path), st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]


def _marker_dir(cache_dir: str | None) -> Path:
    from datamodules.cache import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / "checked"


def is_checked(path: str, cache_dir: str | None = None) -> bool:
    sig = _signature(path)
    if sig in _CHECKED or (_marker_dir(cache_dir) / sig).is_file():
        _CHECKED.add(sig)
        return True
    return False


def mark_checked(path: str, cache_dir: str | None = None) -> None:
    """Remember that ``path`` (as it is now) passed; silently skipped where the cache is not writable."""
    sig = _signature(path)
    _CHECKED.add(sig)
    with contextlib.suppress(OSError):
        folder = _marker_dir(cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / sig).write_text(os.path.realpath(path) + "\n")


@contextlib.contextmanager
def _lock(path: str, cache_dir: str | None):
    """One checker per file version and node: other ranks wait for it, then see its marker."""
    try:
        folder = _marker_dir(cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / f"{_signature(path)}.lock", "w")
    except OSError:
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


# --------------------------------------------------------------------------------- HDF5
def ensure_h5_checked(path: str, cache_dir: str | None = None) -> None:
    """Check ``path`` once (in a child process with a time limit); raise the child's one-line error."""
    if is_checked(path, cache_dir):
        return
    with _lock(path, cache_dir):
        if is_checked(path, cache_dir):
            return
        size = os.path.getsize(path)
        limit = float(os.environ.get(TIMEOUT_ENV, 60)) + size / 20e6  # a slow disk reads 20 MB/s
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        try:
            done = subprocess.run([sys.executable, "-m", "datamodules.filecheck", path], capture_output=True,
                                  text=True, timeout=limit, env=env, cwd=ROOT)
        except subprocess.TimeoutExpired:
            raise UserError(f"{path}: the HDF5 library did not finish reading the file within {limit:.0f} s; its "
                            "metadata is probably corrupt (regenerate or reconvert it)") from None
        lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
        if done.returncode != 0:
            reason = lines[-1][len("error: "):] if lines else f"the check process died (exit {done.returncode})"
            raise UserError(reason if path in reason else f"{path}: {reason}")
        mark_checked(path, cache_dir)


def check_h5_content(path: str) -> None:
    """Every case's metadata, finite images and label range (run by the child process)."""
    from datamodules.h5io import iter_case_arrays, read_h5_header

    header, _ = read_h5_header(path, checked=True)
    for info, image, label in iter_case_arrays(path, header):
        where = f"{path} case {info.case_id!r}"
        check_finite(image, where)
        top = int(label.max()) if label.size else 0
        if top >= header.num_classes:
            raise UserError(f"{where}: label value {top} is out of range [0, {header.num_classes}); fix the labels or "
                            "raise num_classes in the file")


def check_finite(image, where: str, block_bytes: int = 64 * 2**20) -> None:
    """Raise if any voxel of ``image`` ([C, D, H, W], array-like) is NaN or Inf; reads
    ``block_bytes`` at a time so a large case never needs a second copy in memory."""
    c, d = image.shape[0], image.shape[1]
    per_slice = max(1, int(np.prod(image.shape[2:])) * 4)
    step = max(1, block_bytes // per_slice)
    for ch in range(c):
        for z in range(0, d, step):
            block = np.asarray(image[ch, z : z + step])
            if not np.isfinite(block).all():
                bad = int(block.size - np.isfinite(block).sum())
                first = z + int(np.argwhere(~np.isfinite(block))[0][0])
                raise UserError(f"{where}: image has NaN/Inf voxels ({bad} in channel {ch} from slice {first}); "
                                "clean the source data and rewrite the file")


def _main(argv: list[str]) -> int:
    try:
        check_h5_content(argv[0])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
