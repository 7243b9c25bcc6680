"""``launch.py data ...``: generate phantoms, convert folders of cases, inspect data files.

    python launch.py data generate --out data/phantom2d.h5 --dims 2
    python launch.py data generate --out data/phantom3d.tfrecord.gz --dims 3 --cases 24
    python launch.py data convert cases/ --out data/mine.h5 --num-classes 3
    python launch.py data convert cases/ --out data/mixed.h5 --unlabelled   # images without labels too
    python launch.py data convert Task09_Spleen/ --out data/spleen.h5 --target-spacing median   # MSD / nnU-Net raw
    python launch.py data inspect data/phantom2d.h5

:func:`main` returns the exit status: 0 on success, 2 after printing ``error: <message>``
for a :class:`~trainer.errors.UserError` (bad input), like ``launch.py`` does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from datamodules import phantom
from datamodules.filecheck import check_finite
from datamodules.schema import H5_FORMAT, TFRECORD_FORMAT, sniff_data_file
from trainer.errors import UserError
from trainer.inputs import check_writable, file_problem


def output_format(path: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    name = path.lower()
    if name.endswith((".h5", ".hdf5")):
        return "h5"
    if name.endswith((".tfrecord", ".tfrecords", ".tfrec", ".tfrecord.gz", ".tfrecords.gz", ".tfrec.gz")):
        return "tfrecord"
    raise UserError(f"cannot tell the output format of {path}; use a .h5 or .tfrecord[.gz] name or --format")


def write_cases(path: str, cases, *, fmt: str, num_classes: int, class_names: list[str], compression: str | None,
                preprocessing: dict | None = None) -> int:
    if fmt == "h5":
        from datamodules.h5io import write_h5

        return write_h5(path, cases, num_classes=num_classes, class_names=class_names, compression=compression,
                        preprocessing=preprocessing)
    from datamodules.tfrecord import write_tfrecord

    if compression not in (None, "gzip"):
        raise UserError(f"{path}: TFRecord supports --compression none or gzip, not {compression}")
    if path.endswith(".gz"):
        compression = "gzip"
    return write_tfrecord(path, cases, num_classes=num_classes, class_names=class_names, compression=compression,
                          preprocessing=preprocessing)


def _progress(iterable, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="case", file=sys.stderr, disable=None)


# -- generate ----------------------------------------------------------------------------------
def check_output(path: str, force: bool) -> None:
    """An output must be a file name: not a directory (even with --force), not an existing file without --force."""
    if os.path.isdir(path):
        raise UserError(f"--out {path} is a directory; give a file name (e.g. {os.path.join(path, 'data.h5')})")
    if os.path.lexists(path) and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")
    check_writable(path)  # now, not after converting every case


def cmd_generate(args) -> int:
    fmt = output_format(args.out, args.format)
    check_output(args.out, args.force)
    defaults = phantom.DEFAULTS_2D if args.dims == 2 else phantom.DEFAULTS_3D
    shape = tuple(args.shape or defaults["shape"])
    cases = args.cases or defaults["cases"]
    try:
        names = phantom.class_names(args.num_classes)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not 0 <= args.unlabelled < cases:
        raise UserError(f"generate: --unlabelled {args.unlabelled} must be in [0, --cases {cases}): at least one case keeps its label")
    stream = phantom.iter_phantom_cases(cases=cases, shape=shape, num_classes=args.num_classes, seed=args.seed,
                                        in_channels=args.channels, unlabelled=args.unlabelled)
    compression = None if args.compression == "none" else args.compression
    n = write_cases(args.out, _progress(stream, cases, "generate"), fmt=fmt, num_classes=args.num_classes,
                    class_names=names, compression=compression, preprocessing=phantom.preprocessing_record(args.channels))
    print(f"wrote {n} phantom cases of shape {list(shape)} to {args.out}")
    return 0


# -- convert -----------------------------------------------------------------------------------
def cmd_convert(args) -> int:
    from datamodules.convert import Conversion, ConvertOptions

    fmt = output_format(args.out, args.format)
    check_output(args.out, args.force)
    names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
    options = ConvertOptions(num_classes=args.num_classes, class_names=names, unlabelled=args.unlabelled,
                             spacing_json=args.spacing_json, orientation=args.orientation,
                             target_spacing=args.target_spacing, interpolation=args.interpolation,
                             normalize=args.normalize, modality=args.modality)
    plan = Conversion(args.src, options).plan()  # one scan first when dataset statistics are needed
    spacings: list[tuple[float, float, float]] = []

    def cases():
        for case in plan.cases():
            spacings.append(case[3])
            yield case

    compression = None if args.compression == "none" else args.compression
    n = write_cases(args.out, _progress(cases(), len(plan.sources.cases), "convert"), fmt=fmt,
                    num_classes=plan.num_classes, class_names=plan.class_names, compression=compression,
                    preprocessing=plan.record)
    print(f"wrote {n} cases ({plan.num_classes} classes: {', '.join(plan.class_names)}) to {args.out}")
    from datamodules.preprocess import describe_record

    print("preprocessing: " + "; ".join(describe_record(plan.record)))
    _note_spacing_spread(spacings, plan.target)
    return 0


def _note_spacing_spread(spacings: list, target) -> None:
    """Cases of different spacings train a network on different physical scales: say so."""
    sp = np.asarray(spacings, float)
    if target is None and len(sp) > 1 and np.any(sp.max(0) > 1.1 * sp.min(0)):
        lo, hi = (" ".join(f"{v:.3g}" for v in row) for row in (sp.min(0), sp.max(0)))
        print(f"note: case spacings range from [{lo}] to [{hi}] mm (z y x); pass --target-spacing median (or Z Y X) "
              "to resample them onto one grid", file=sys.stderr)


# -- inspect -----------------------------------------------------------------------------------
def detect_format(path: str) -> str:
    """``"h5"`` or ``"tfrecord"`` from the file's first bytes (a directory or glob: TFRecords)."""
    if os.path.isdir(path) or any(ch in path for ch in "*?["):
        return "tfrecord"
    problem = file_problem(path)
    if problem:
        raise UserError(f"data file {path} {problem}")
    kind, what = sniff_data_file(path)
    if kind is None:
        raise UserError(f"{path} is neither HDF5 nor TFRecord (it looks like {what}); `data inspect` reads those two")
    return kind


def read_data_file(path: str) -> tuple[dict, object]:
    """``(description, case stream)`` of an HDF5 or TFRecord data file: the description has
    ``num_classes``, ``class_names``, ``in_channels``, ``preprocessing``; the stream yields
    ``(case_id, image, label or None, spacing)``."""
    if detect_format(path) == "h5":
        from datamodules.h5io import iter_h5_cases, read_h5_description

        return read_h5_description(path), iter_h5_cases(path)
    from datamodules.tfrecord import iter_tfrecord_cases, list_tfrecord_files, read_tfrecord_description

    files = list_tfrecord_files(path)
    if not files:
        raise UserError(f"{path}: no TFRecord files found")
    return read_tfrecord_description(files), iter_tfrecord_cases(files)


def data_for_model(path: str, card_preprocessing: dict | None, workdir: str) -> tuple[str, str | None]:
    """The data file to score a model on, given the ``preprocessing`` section of its card:
    ``path`` itself when the file was preprocessed the same way; a normalised copy in
    ``workdir`` when the file holds the same geometry with raw intensities (``--normalize
    noNorm``), normalised exactly as ``convert`` would (CT with the model's dataset constants,
    z-score per case); otherwise a one-line ``UserError`` naming the difference. Also a note
    saying what was done (None when nothing)."""
    from datamodules.preprocess import channel_norms, match_record, normalize_image

    recorded = card_preprocessing or {}
    if not recorded.get("recorded"):
        return path, None if not card_preprocessing else "the model card records no preprocessing; data used as it is"
    expected = {k: v for k, v in recorded.items() if k not in ("recorded", "steps")}
    meta, stream = read_data_file(path)
    if match_record(expected, meta.get("preprocessing"), path) == "same":
        return path, None
    norms = channel_norms(expected)
    fmt = detect_format(path)  # the copy keeps the format: the run's datamodule class reads it
    copy = os.path.join(workdir, "normalised." + ("h5" if fmt == "h5" else "tfrecord"))

    def cases():
        for case_id, image, label, spacing in stream:
            yield case_id, normalize_image(image, norms)[0], label, spacing

    write_cases(copy, cases(), fmt=fmt, num_classes=meta["num_classes"], class_names=meta["class_names"],
                compression=None, preprocessing=expected)
    return copy, f"{path} holds raw intensities; normalised the model's way before scoring ({', '.join(n.scheme for n in norms)})"


def inspect_file(path: str) -> dict:
    """Summary of a data file: cases, shapes, dtypes, class frequencies, spacing (validated:
    every TFRecord CRC is checked, every label range too)."""
    if detect_format(path) == "h5":
        from datamodules.h5io import iter_h5_cases, open_h5, read_h5_description, read_h5_header

        header, offsets = read_h5_header(path)
        with open_h5(path) as f:
            first = f["cases"][header.cases[0].case_id]["image"]
            storage = f"chunks {list(first.chunks)}, {first.compression}" if first.chunks else "contiguous"
        mappable = all(o is not None for pair in offsets for o in pair)
        info = {"format": H5_FORMAT, "storage": storage + (" (memory-mapped at read)" if mappable else " (node cache at read)")}
        stream, meta = iter_h5_cases(path), {**header.describe(), **read_h5_description(path)}
    else:
        from datamodules.tfrecord import (check_index, index_path_for, is_gzip, iter_tfrecord_cases,
                                          list_tfrecord_files, load_index, read_tfrecord_description)

        files = list_tfrecord_files(path)
        if not files:
            raise UserError(f"{path}: no TFRecord files found")
        indexes, notes = [], []
        for f in files:
            ip = index_path_for(f)
            if os.path.exists(ip):
                index = load_index(ip, f)
                check_index(index, ip, f)
                indexes.append(index)
            else:
                notes.append(f"{os.path.basename(f)}: no index yet (created on first use)")
        gz = sum(is_gzip(f) for f in files)
        info = {"format": TFRECORD_FORMAT, "files": len(files), "storage": f"{gz} gzip, {len(files) - gz} plain",
                "index": notes or "present and consistent"}
        stream = iter_tfrecord_cases(files, indexes if len(indexes) == len(files) else None)
        meta = read_tfrecord_description(files)
    from datamodules.intensity import IntensityStats

    cases, counts, spacings, shapes, intensity = [], None, [], {}, IntensityStats()
    for case_id, image, label, spacing in stream:
        k = meta["num_classes"]
        check_finite(image, f"{path} case {case_id!r}")
        intensity.add(len(cases), image, label)
        shapes[str(list(image.shape))] = shapes.get(str(list(image.shape)), 0) + 1
        spacings.append(spacing)
        if label is None:  # unlabelled: no class statistics
            cases.append({"case": case_id, "shape": list(image.shape), "spacing": list(spacing), "labelled": False})
            continue
        if label.size and int(label.max()) >= k:
            raise UserError(f"{path} case {case_id!r}: label value {int(label.max())} is out of range [0, {k})")
        c = np.bincount(label.reshape(-1), minlength=k)[:k]
        counts = c if counts is None else counts + c
        cases.append({"case": case_id, "shape": list(image.shape), "spacing": list(spacing),
                      "classes_present": [int(i) for i in np.flatnonzero(c)]})
    if not cases:
        raise UserError(f"{path}: contains no cases (empty dataset)")
    sp = np.asarray(spacings)
    counts = np.zeros(meta["num_classes"], np.int64) if counts is None else counts
    total = max(int(counts.sum()), 1)
    labelled = [c for c in cases if c.get("labelled", True)]
    info.update({
        "file": path,
        "num_classes": meta["num_classes"],
        "class_names": meta["class_names"],
        "in_channels": meta["in_channels"],
        "num_cases": len(cases),
        "unlabelled_cases": len(cases) - len(labelled),
        "dtypes": {"image": "float32", "label": "uint8"},
        "shapes": shapes,
        "spacing_zyx_mm": {"min": sp.min(0).tolist(), "median": np.median(sp, 0).tolist(), "max": sp.max(0).tolist()},
        "class_voxels": [int(v) for v in counts],
        "class_fraction": [float(v) / total for v in counts],
        "cases_with_class": [sum(i in c["classes_present"] for c in labelled) for i in range(meta["num_classes"])],
        "intensity": intensity.summary(),
        "preprocessing": meta.get("preprocessing"),
        "cases": cases,
    })
    return info


def _print_inspect(info: dict, show_cases: bool) -> None:
    print(f"file        {info['file']}  ({info['format']}, {info['storage']})")
    if "index" in info:
        print(f"index       {info['index']}")
    unlabelled = f" ({info['unlabelled_cases']} unlabelled)" if info["unlabelled_cases"] else ""
    print(f"cases       {info['num_cases']}{unlabelled}   in_channels {info['in_channels']}   "
          f"dtypes image {info['dtypes']['image']}, label {info['dtypes']['label']}")
    print("shapes      " + ", ".join(f"{s} x{n}" for s, n in info["shapes"].items()) + "   ([C, D, H, W])")
    sp = info["spacing_zyx_mm"]
    fmt = lambda v: "[" + " ".join(f"{x:.3g}" for x in v) + "]"  # noqa: E731
    print(f"spacing     z y x mm: min {fmt(sp['min'])}  median {fmt(sp['median'])}  max {fmt(sp['max'])}")
    from datamodules.intensity import format_summary
    from datamodules.preprocess import describe_record

    record = info.get("preprocessing")
    print("preprocess  " + ("; ".join(describe_record(record)) if record else "not recorded (file made by hand or by an older version)"))
    print("\n".join(format_summary(info["intensity"])))
    print("classes     id  name                 voxels     fraction  cases")
    for i, name in enumerate(info["class_names"]):
        print(f"            {i:<3} {name:<20} {info['class_voxels'][i]:>10}  {100 * info['class_fraction'][i]:7.3f}%  "
              f"{info['cases_with_class'][i]:>5}")
    if show_cases:
        for c in info["cases"]:
            classes = f"classes {c['classes_present']}" if c.get("labelled", True) else "unlabelled"
            print(f"  {c['case']:<24} {c['shape']}  spacing {c['spacing']}  {classes}")


def cmd_inspect(args) -> int:
    info = inspect_file(args.file)
    if args.json:
        if not args.cases:
            info.pop("cases")
        print(json.dumps(info, indent=2))
    else:
        _print_inspect(info, args.cases)
    return 0


# -- entry point ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch.py data", description="Generate, convert and inspect segmentation data files.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="write a deterministic phantom dataset (HDF5 or TFRecord)")
    g.add_argument("--out", required=True, help="output .h5 or .tfrecord[.gz] file")
    g.add_argument("--dims", type=int, choices=(2, 3), default=2,
                   help="defaults for 2D (40 cases of 16x96x96) or 3D (24 cases of 48x64x64) recipes")
    g.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), help="case shape (overrides --dims)")
    g.add_argument("--cases", type=int, help="number of cases (overrides --dims)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-classes", type=int, default=5, help="2..5: background, liver, kidney, spleen, lesion")
    g.add_argument("--channels", type=int, default=1, choices=(1, 2))
    g.add_argument("--unlabelled", type=int, default=0, metavar="N",
                   help="the last N cases are stored without their labels (images for distillation)")
    g.add_argument("--compression", choices=("none", "lzf", "gzip"), default="none",
                   help="none (default) is the fast, memory-mapped read path")
    g.add_argument("--format", choices=("h5", "tfrecord"), help="default: from the --out extension")
    g.add_argument("--force", action="store_true", help="overwrite an existing file")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("convert", help="convert an MSD / nnU-Net raw folder or a folder of NumPy, NIfTI, NRRD, MHA or "
                       "DICOM cases, preprocessed (see datamodules.convert, datamodules.preprocess)")
    c.add_argument("src", help="an MSD / nnU-Net raw folder (dataset.json + imagesTr/ + labelsTr/), or a folder with "
                   "<case>_image.<ext> + <case>_label.<ext> (npy, nii[.gz], nrrd, nhdr, mha, mhd; a DICOM series "
                   "folder <case>_image/) or <case>.npz")
    c.add_argument("--out", required=True, help="output .h5 or .tfrecord[.gz] file")
    c.add_argument("--num-classes", type=int, help="classes incl. background (default: dataset.json's labels, else max label + 1)")
    c.add_argument("--class-names", help="comma-separated, background first (default: dataset.json's label names)")
    c.add_argument("--spacing-json", help="JSON {case: [z, y, x]} for NumPy cases (default: <src>/spacing.json)")
    c.add_argument("--modality", help="channel names when src has no dataset.json, comma-separated (e.g. CT, or T1,FLAIR): "
                   "they choose the normalisation")
    c.add_argument("--normalize", default="auto", help="auto (default: by modality as nnU-Net: CT -> dataset percentile "
                   "clip + z-score, anything else -> per-case z-score) or one of CT, zscore, zscore_nonzero, noNorm, "
                   "rescale_to_0_1, rgb_to_0_1, or one per channel, comma-separated")
    c.add_argument("--orientation", default="RAS", help="canonical orientation volumes with geometry are turned to "
                   "(axis permutations and flips only; default RAS), or none to keep the stored axes")
    c.add_argument("--target-spacing", nargs="+", metavar="MM", help="resample every case to this spacing: Z Y X in mm "
                   "(0 keeps that axis) or 'median' (the dataset's median, nnU-Net's default); default: no resampling")
    c.add_argument("--interpolation", choices=("linear", "bspline"), default="linear",
                   help="image interpolation when resampling (labels: nearest); default linear")
    c.add_argument("--compression", choices=("none", "lzf", "gzip"), default="none")
    c.add_argument("--format", choices=("h5", "tfrecord"), help="default: from the --out extension")
    c.add_argument("--force", action="store_true", help="overwrite an existing file")
    c.add_argument("--unlabelled", action="store_true",
                   help="store images that have no label as unlabelled cases (for distillation) instead of refusing them")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("inspect", help="summarise and validate an HDF5 or TFRecord data file")
    i.add_argument("file", help=".h5 file, .tfrecord[.gz] file, directory or glob of TFRecords")
    i.add_argument("--cases", action="store_true", help="list every case")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return UserError.exit_code


if __name__ == "__main__":
    sys.exit(main())
