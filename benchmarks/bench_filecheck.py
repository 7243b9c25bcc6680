"""What the one-time content check of a data file costs (issue 17), next to what a run already pays.

    python benchmarks/bench_filecheck.py [--cases 40 160] [--repeats 3] [--out FILE.md]

For phantom HDF5 files shaped like the 2D recipes' (cases of 16x96x96), interleaved per repeat:

* ``first use``: ``datamodules.filecheck.ensure_h5_checked`` on a file version never seen (a
  child process reads every case's metadata, scans every voxel for NaN/Inf and every label);
* ``later use``: the same call once the result is remembered (a ``stat`` and a marker lookup),
  which is what every later run, rank and worker pays;
* ``datamodule setup``: ``HDF5SegDataModule(...).setup()`` on the checked file, what every run
  already pays (header, split, label scan for foreground sampling).

Prints a Markdown table (median seconds of the repeats).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datamodules import filecheck, phantom  # noqa: E402
from datamodules.h5io import write_h5  # noqa: E402
from datamodules.hdf5 import HDF5SegDataModule  # noqa: E402


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(path: str, work: Path, repeat: int) -> dict[str, float]:
    fresh = str(work / f"copy{repeat}.h5")
    shutil.copyfile(path, fresh)  # a new inode: a file version never checked
    filecheck._CHECKED.clear()
    first = _timed(lambda: filecheck.ensure_h5_checked(fresh))
    filecheck._CHECKED.clear()  # as a new process would find it: only the marker
    later = _timed(lambda: filecheck.ensure_h5_checked(fresh))
    setup = _timed(lambda: HDF5SegDataModule(fresh, 2, [96, 96], num_workers=0, val_fraction=0.2).setup())
    os.remove(fresh)
    return {"first use": first, "later use": later, "datamodule setup": setup}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, nargs="+", default=[40, 160])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the Markdown table to this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_filecheck-"))
    os.environ["COMPRESSSEG_CACHE_DIR"] = str(work / "cache")
    try:
        files = {}
        for n in args.cases:
            files[n] = str(work / f"phantom{n}.h5")
            cases = phantom.iter_phantom_cases(cases=n, shape=(16, 96, 96), seed=0)
            write_h5(files[n], cases, num_classes=5, class_names=phantom.class_names(5))
        results: dict[int, list[dict[str, float]]] = {n: [] for n in args.cases}
        for r in range(args.repeats):  # interleaved: load on the shared machine hits every size alike
            for n in args.cases:
                results[n].append(measure(files[n], work, r))
        lines = ["| file | size (MB) | first use: full check (s) | later use | datamodule setup, every run (s) |",
                 "|---|---:|---:|---:|---:|"]
        for n in args.cases:
            med = {k: statistics.median(m[k] for m in results[n]) for k in results[n][0]}
            size = os.path.getsize(files[n]) / 1e6
            lines.append(f"| {n} cases of 16x96x96 | {size:.1f} | {med['first use']:.3f} | "
                         f"{med['later use'] * 1e3:.2f} ms | {med['datamodule setup']:.3f} |")
        lines.append(f"\nmedian of {args.repeats} interleaved repeats; first use includes starting the checking "
                     "process (Python + h5py)")
        text = "\n".join(lines) + "\n"
        print(text, end="")
        if args.out:
            Path(args.out).write_text(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
