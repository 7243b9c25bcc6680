#!/usr/bin/env bash
# Real data, from a Debian package to a verified, compressed artifact and its report.
#
#   bash benchmarks/walkthrough_real_mri.sh            # after `python3 launch.py setup`
#
# 1. `apt-get download mricron-data` (16 MB, Debian main) and unpack it with `dpkg -x`: colin27
#    (templates/ch2.nii.gz, one person's T1 MRI, 1 mm) and the AAL atlas on the same grid
#    (templates/aal.nii.gz, 116 hand-drawn regions named in aal.nii.txt).
# 2. benchmarks/real_mri/make_aal_dataset.py: an nnU-Net v2 raw folder (dataset.json, imagesTr,
#    labelsTr), the 116 regions merged into 6 lobe-level classes, 8 axial slabs as cases.
# 3. `data convert` (reorient to RAS, resample to 2 mm, z-score the T1 per case: all recorded in
#    the file), `data inspect`.
# 4. `pipeline recipes/pipeline_aal2d.yaml`: teacher -> 50% pruned student, exported as ONNX and
#    CPU INT8, each verified; the compression report.
# 5. `verify` of the final artifact from its folder alone, as on a deployment machine.
#
# One subject only: cases are slabs of the same brain. Set WORK to keep the download elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WORK=${WORK:-runs/walkthrough_aal2d_source}
mkdir -p "$WORK" data
if [ ! -f "$WORK/pkg/usr/share/mricron/templates/aal.nii.gz" ]; then
  (cd "$WORK" && apt-get download mricron-data && dpkg -x mricron-data_*_all.deb pkg)
fi
TEMPLATES="$WORK/pkg/usr/share/mricron/templates"
rm -rf "$WORK/raw"
"$PY" benchmarks/real_mri/make_aal_dataset.py --templates "$TEMPLATES" --out "$WORK/raw/Dataset900_AAL"
"$PY" launch.py data convert "$WORK/raw/Dataset900_AAL" --out data/aal2d.h5 --target-spacing 2 2 2 --force
"$PY" launch.py data inspect data/aal2d.h5
"$PY" launch.py pipeline recipes/pipeline_aal2d.yaml
"$PY" launch.py verify runs/walkthrough_aal2d/prune/export/onnx-int8-cpu
echo "report: runs/walkthrough_aal2d/report.md"
