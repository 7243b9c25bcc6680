"""Turn Debian's ``mricron-data`` (colin27 T1 MRI + AAL atlas) into an nnU-Net v2 raw folder.

One person's brain, so "cases" are axial slabs of it: ``--slabs`` consecutive blocks of axial
slices, each written as its own NIfTI pair with the affine of its place in the head (the slab's
origin moves along z), so ``data convert`` sees real geometry. The 116 AAL regions are merged
into lobe-level classes by the AAL code's thousands digit (2xxx frontal, 6xxx parietal, 8xxx
temporal, 5xxx occipital, 3xxx/4xxx/7xxx insula, limbic and deep grey nuclei as "central",
9xxx cerebellum and vermis).

    python benchmarks/real_mri/make_aal_dataset.py --templates X/usr/share/mricron/templates --out raw/Dataset900_AAL

Every slab comes from the same subject: a model trained on some slabs and validated on others
learns this one brain's anatomy at other heights, nothing about other people.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

GROUPS = {"frontal": (2,), "parietal": (6,), "temporal": (8,), "occipital": (5,), "central": (3, 4, 7), "cerebellum": (9,)}


def merged_classes(names_file: Path) -> np.ndarray:
    """Lookup AAL label value -> class index (0 background) from ``aal.nii.txt`` (value name code)."""
    lookup = np.zeros(256, np.uint8)
    for line in names_file.read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        value, code = int(parts[0]), int(parts[2])
        for index, digits in enumerate(GROUPS.values(), start=1):
            if code // 1000 in digits:
                lookup[value] = index
    return lookup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--templates", required=True, type=Path, help="mricron-data's templates folder")
    p.add_argument("--out", required=True, type=Path, help="the nnU-Net raw folder to write")
    p.add_argument("--slabs", type=int, default=8, help="axial slabs (cases)")
    args = p.parse_args()
    t1 = nib.load(args.templates / "ch2.nii.gz")
    atlas = nib.load(args.templates / "aal.nii.gz")
    if not np.allclose(t1.affine, atlas.affine) or t1.shape != atlas.shape:
        raise SystemExit("ch2.nii.gz and aal.nii.gz are not on one grid")
    image = np.asarray(t1.dataobj, dtype=np.float32)
    label = merged_classes(args.templates / "aal.nii.txt")[np.asarray(atlas.dataobj)]
    for sub in ("imagesTr", "labelsTr"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, image.shape[2], args.slabs + 1).round().astype(int)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        affine = t1.affine.copy()
        affine[:3, 3] = t1.affine[:3, :3] @ [0, 0, lo] + t1.affine[:3, 3]  # the slab's first voxel
        name = f"colin27_slab{i:02d}"
        nib.save(nib.Nifti1Image(image[:, :, lo:hi], affine), str(args.out / "imagesTr" / f"{name}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label[:, :, lo:hi], affine), str(args.out / "labelsTr" / f"{name}.nii.gz"))
    labels = {"background": 0, **{name: i for i, name in enumerate(GROUPS, start=1)}}
    (args.out / "dataset.json").write_text(json.dumps({
        "name": "colin27 + AAL (mricron-data), lobes as classes, axial slabs as cases",
        "channel_names": {"0": "T1"}, "labels": labels, "numTraining": args.slabs, "file_ending": ".nii.gz"}, indent=1))
    counts = np.bincount(label.reshape(-1), minlength=len(labels))
    print(f"wrote {args.slabs} slabs of {image.shape[0]}x{image.shape[1]}x~{image.shape[2] // args.slabs} voxels to {args.out}; "
          "voxels per class: " + ", ".join(f"{n} {c}" for n, c in zip(labels, counts)))


if __name__ == "__main__":
    main()
