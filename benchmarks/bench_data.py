"""Data-loader throughput of every reader, as a ratio to reading the same arrays from memory.

Measured where training sees it: batches coming out of the training DataLoader built by the
datamodule (sampling, fg oversampling, patch reads, collation; augmentation off so that
reading is not hidden behind it, plus one in-memory row with the default augmentation for
scale). Every (reader, workers) cell is measured once per repeat, repeats interleaved, and
the median is reported; the ratio divides by the in-memory median at the same worker count.

    python benchmarks/bench_data.py                      # ~2-3 minutes on 2 cores
    python benchmarks/bench_data.py --repeats 5 --seconds 1.0 --out table.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datamodules import phantom  # noqa: E402
from datamodules.h5io import iter_h5_cases, write_h5  # noqa: E402
from datamodules.hdf5 import HDF5SegDataModule  # noqa: E402
from datamodules.schema import CaseInfo, DatasetHeader  # noqa: E402
from datamodules.store import ArrayStore  # noqa: E402
from datamodules.tfrecord import TFRecordSegDataModule, write_tfrecord  # noqa: E402

BATCH, PATCH = 16, [96, 96]
# (row label, file key, datamodule kwargs)
READERS = [
    ("HDF5 raw, default (memory-mapped in place)", "h5", {}),
    ("HDF5 raw, naive h5py read per sample", "h5", {"memmap": False, "cache": "never"}),
    ("HDF5 lzf, default (node cache)", "lzf", {}),
    ("HDF5 lzf, h5py per sample (cache=never)", "lzf", {"cache": "never"}),
    ("HDF5 gzip, default (node cache)", "gzip", {}),
    ("HDF5 gzip, h5py per sample (cache=never)", "gzip", {"cache": "never"}),
    ("TFRecord plain, default (node cache)", "tfr", {}),
    ("TFRecord plain, index + LRU (cache=never)", "tfr", {"cache": "never"}),
    ("TFRecord gzip, default (node cache)", "tfrgz", {}),
]


def make_files(workdir: str) -> dict:
    args = dict(phantom.DEFAULTS_2D, seed=0)
    names = phantom.class_names()
    files = {"h5": os.path.join(workdir, "raw.h5"), "lzf": os.path.join(workdir, "lzf.h5"),
             "gzip": os.path.join(workdir, "gzip.h5"), "tfr": os.path.join(workdir, "plain.tfrecord"),
             "tfrgz": os.path.join(workdir, "gz.tfrecord.gz")}
    phantom.generate_phantom_h5(files["h5"], **args)
    cases = list(iter_h5_cases(files["h5"]))
    for key, comp in (("lzf", "lzf"), ("gzip", "gzip")):
        write_h5(files[key], cases, num_classes=5, class_names=names, compression=comp)
    write_tfrecord(files["tfr"], cases, num_classes=5, class_names=names)
    write_tfrecord(files["tfrgz"], cases, num_classes=5, class_names=names, compression="gzip")
    return files


def build(files, key, kwargs, workers, cache_dir, augment=False):
    cls = HDF5SegDataModule if key in ("h5", "lzf", "gzip") else TFRecordSegDataModule
    dm = cls(files[key], 2, PATCH, batch_size=BATCH, num_workers=workers, samples_per_epoch=BATCH * 4000,
             cache_dir=cache_dir, augment=augment, **kwargs)
    dm.prepare_data()
    dm.setup()
    return dm


def in_memory(dm):
    """The same datamodule with its store swapped for arrays held in RAM (the baseline)."""
    store = dm.store
    header = DatasetHeader(store.header.num_classes, store.header.class_names, store.header.in_channels,
                           [CaseInfo(c.case_id, c.image_shape, c.spacing) for c in store.cases])
    images = [store.image(i)[...].copy() for i in range(len(store))]
    labels = [store.label(i)[...].copy() for i in range(len(store))]
    store.close()
    dm.store = ArrayStore(header, images, labels)
    return dm


def measure(dm, workers: int, seconds: float, epoch: int) -> float:
    """Samples/s over ~``seconds`` of batches, after worker start-up and 2 warm-up batches."""
    dm.num_workers = workers
    it = iter(dm.make_dataloader("train", epoch=epoch))
    for _ in range(2):
        next(it)
    n, t0 = 0, time.perf_counter()
    while True:
        next(it)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= 3:
            break
    del it
    return n * BATCH / elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where data files and caches go (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.5, help="timed batches per cell")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", help="also write the Markdown table here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_")
    cache_dir = os.path.join(workdir, "cache")
    t_start = time.perf_counter()
    files = make_files(workdir)
    print(f"data: {phantom.DEFAULTS_2D['cases']} cases {list(phantom.DEFAULTS_2D['shape'])} in each format "
          f"({time.perf_counter() - t_start:.1f} s); batch {BATCH}, patch {PATCH}", file=sys.stderr)

    modules, prepare_s = {}, {}
    for label, key, kwargs in READERS:
        t = time.perf_counter()
        modules[label] = build(files, key, kwargs, 0, cache_dir)
        prepare_s[label] = time.perf_counter() - t
    memory = "in memory (baseline)"
    modules[memory] = in_memory(build(files, "h5", {}, 0, cache_dir))
    memory_aug = "in memory, default augmentation"
    modules[memory_aug] = in_memory(build(files, "h5", {}, 0, cache_dir, augment=True))
    rows = [memory, memory_aug] + [r[0] for r in READERS]

    results = {(row, w): [] for row in rows for w in args.workers}
    for rep in range(args.repeats):
        for w in args.workers:
            for row in rows:
                results[row, w].append(measure(modules[row], w, args.seconds, epoch=rep))
        print(f"repeat {rep + 1}/{args.repeats} done ({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)

    med = {k: statistics.median(v) for k, v in results.items()}
    head = "| reader | prepare (s) | " + " | ".join(f"workers={w}: samples/s (x memory)" for w in args.workers) + " |"
    lines = [head, "|" + "---|" * (2 + len(args.workers))]
    for row in rows:
        cells = [f"{med[row, w]:.0f} ({med[row, w] / med[memory, w]:.2f}x)" for w in args.workers]
        prep = f"{prepare_s[row]:.2f}" if row in prepare_s else "-"
        lines.append(f"| {row} | {prep} | " + " | ".join(cells) + " |")
    load = os.getloadavg()
    lines.append("")
    lines.append(f"median of {args.repeats} interleaved repeats, {args.seconds} s of batches each; "
                 f"load average at the end {load[0]:.1f}; total {time.perf_counter() - t_start:.0f} s")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
