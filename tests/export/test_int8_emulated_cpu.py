"""INT8 artifacts on an emulated AVX2 CPU without VNNI (``qemu-x86_64 -cpu Haswell``), from
any host: what the static overflow check refuses is really wrong there, what it accepts is
right, and ``launch.py verify --cpu`` verifies an export on such a CPU. onnxruntime picks its
kernels from the (emulated) CPUID, so these results do not depend on the machine running them.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from system_packages import ensure
from trainer.export import export_artifact
from trainer.export.card import CARD_NAME
from trainer.export.formats.onnx_int8_cpu import OnnxInt8Cpu

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOY = {"max_exceed_fraction": 0.05}  # 8-channel toy net (see test_export_formats)


class _Unchecked(OnnxInt8Cpu):
    """The format as it was before the overflow check: full-range int8 weights get through."""

    def static_checks(self, artifact):
        return {}


@pytest.fixture(scope="module")
def qemu(tmp_path_factory):
    ensure(("qemu-x86_64",), ("qemu-user",), tmp_path_factory.mktemp("apt") / "apt.log")
    return "qemu-x86_64"


def _fused_vs_reference(qemu, folder: Path, inputs: Path) -> dict[str, float]:
    step = json.loads((folder / CARD_NAME).read_text())["verification"]["output_step"]
    proc = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, str(HERE / "fused_vs_reference.py"),
                           str(folder / "model.onnx"), str(inputs), str(step)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    words = proc.stdout.split()
    return {words[0]: float(words[1]), words[2]: float(words[3])}


def test_full_range_int8_is_wrong_on_avx2_and_seven_bit_is_right(qemu, tmp_path, net2d, data2d, meta2d):
    inputs = tmp_path / "x.npy"
    np.save(inputs, np.concatenate([b["image"].numpy() for b in data2d["val"]]))
    old = export_artifact(net2d, _Unchecked(reduce_range=False, benchmark_runs=0), tmp_path / "old", data2d["val"], meta2d,
                          threads=1, tolerance=TOY).parent
    new = export_artifact(net2d, "onnx-int8-cpu", tmp_path / "new", data2d["val"], meta2d, threads=1, tolerance=TOY,
                          format_options={"benchmark_runs": 0}).parent
    broken = _fused_vs_reference(qemu, old, inputs)
    assert broken["over_2_steps"] > 0.01 and broken["max_steps"] > 10, broken  # 16-bit pair sums saturated
    fine = _fused_vs_reference(qemu, new, inputs)
    assert fine["over_2_steps"] == 0 and fine["max_steps"] <= 1.5, fine  # rounding at step boundaries only
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "verify", str(new), "--cpu", "Haswell", "--threads", "1"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "qemu-x86_64 -cpu Haswell (emulated)" in proc.stdout and "avx512" not in proc.stdout.split("built on")[0]
