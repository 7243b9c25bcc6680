"""INT8 CPU artifacts: which quantization setting is right on every CPU, and what each one costs.

    .venv/bin/python benchmarks/bench_int8_cpu.py [--quick] [--out FILE.md] [--emulate Haswell|none]

One run, one process (plus emulated children), everything measured here:

1. models: the QAT benchmark's U-Net 2D (base 16, depth 4) trained in FP32 on phantom slices,
   and the same weights fine-tuned with QAT (``bench_qat.py``'s helpers and budgets);
2. artifacts through the export package, one per setting: from the FP32 net, onnxruntime
   ``quantize_static`` with U8S8 full-range int8 weights (the default before), U8S8 7-bit
   weights (the default now), per tensor, S8S8, U8U8; from the QAT net, its trained scales in
   onnxruntime's layout with 7-bit, 8-bit int8 and uint8 weights; the TensorRT-layout onnx-qdq;
   and from a QAT net trained with 7-bit weights (``weight_bits=7``);
3. per artifact: the static overflow check (``trainer/export/int8_safety.py``); on the CPU
   running the benchmark and on an emulated AVX2 CPU without VNNI (``qemu-x86_64 -cpu
   Haswell``; onnxruntime picks its kernels from the emulated CPUID): mean Dice, argmax
   agreement with the PyTorch model it comes from, fraction of logits more than 2 output
   steps away; latency at batch 1 (1x256x256, one thread, interleaved repeats, median) on the
   CPU running the benchmark, vs PyTorch eager FP32. Emulation is too slow to time: speed is
   this CPU's only.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_qat as bq  # noqa: E402
from trainer.callbacks.qat import QuantizationAwareTraining  # noqa: E402
from trainer.export import OrtPredictor, export_artifact, ort_session  # noqa: E402
from trainer.export.card import CARD_NAME  # noqa: E402
from trainer.export.formats.onnx_int8_cpu import OnnxInt8Cpu  # noqa: E402
from trainer.export.int8_safety import check_int8_accumulation  # noqa: E402
from trainer.export.machine import describe, machine_info  # noqa: E402
from trainer.inference import pad_to_multiple  # noqa: E402

LOOSE = {"atol": 1e9, "max_exceed_fraction": 1.0, "min_argmax_agreement": 0.0}


class Unchecked(OnnxInt8Cpu):
    """The format without its overflow check, to measure the settings it refuses."""

    def static_checks(self, artifact):
        return {}


class SignedActivations(Unchecked):
    activation_type = "int8"


def settings() -> list[tuple[str, str, object]]:
    """``(name, source, format)``: source "fp32", "qat" or "qat7" (the model each is scored against)."""
    return [
        ("U8S8, int8 weights (previous default)", "fp32", Unchecked(reduce_range=False, benchmark_runs=0)),
        ("U8S8, 7-bit weights (default)", "fp32", OnnxInt8Cpu(benchmark_runs=0)),
        ("U8S8, 7-bit weights, per tensor", "fp32", OnnxInt8Cpu(per_channel=False, benchmark_runs=0)),
        ("S8S8, int8 weights", "fp32", SignedActivations(reduce_range=False, benchmark_runs=0)),
        ("U8U8, uint8 weights", "fp32", OnnxInt8Cpu(reduce_range=False, weight_type="uint8", benchmark_runs=0)),
        ("QAT scales, 7-bit weights (default for QAT)", "qat", OnnxInt8Cpu(benchmark_runs=0)),
        ("QAT scales, int8 weights as trained", "qat", Unchecked(reduce_range=False, benchmark_runs=0)),
        ("QAT scales, uint8 weights as trained", "qat", OnnxInt8Cpu(reduce_range=False, weight_type="uint8",
                                                                   benchmark_runs=0)),
        ("QAT, onnx-qdq (TensorRT layout)", "qat", "onnx-qdq"),
        ("QAT with 7-bit weights (weight_bits=7), its scales", "qat7", OnnxInt8Cpu(benchmark_runs=0)),
    ]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(args, tmp: Path):
    dm = bq.make_data(tmp, args.steps_per_epoch, args.patch)
    bq.pl.seed_everything(0, verbose=False)
    fp32 = bq.new_module(lr=2e-3)
    bq.fit(fp32, dm, args.fp32_epochs)
    qat = bq.new_module(lr=2e-4)
    qat.net.load_state_dict(fp32.net.state_dict())
    bq.fit(qat, dm, args.qat_epochs, [QuantizationAwareTraining(calibration="percentile", calib_batches=8)])
    qat7 = bq.new_module(lr=2e-4)
    qat7.net.load_state_dict(fp32.net.state_dict())
    bq.fit(qat7, dm, args.qat_epochs, [QuantizationAwareTraining(calibration="percentile", calib_batches=8, weight_bits=7)])
    calib = [b for _, b in zip(range(4), dm.train_dataloader())]
    return dm, {"fp32": fp32.net.eval(), "qat": qat.net.eval(), "qat7": qat7.net.eval()}, calib


def eval_set(val, nets, steps, n, path: Path) -> None:
    """Inputs (whole slices padded to the divisor), labels, and each model's reference logits."""
    images = torch.cat([pad_to_multiple(b["image"], 16)[0] for b in val])[:n]
    labels = torch.cat([pad_to_multiple(b["label"].unsqueeze(1).float(), 16)[0] for b in val])[:n, 0].long()
    refs = {}
    with torch.no_grad():
        for i, net in enumerate(nets):
            refs[f"ref_{i}"] = net(images).numpy()
    np.savez(path, images=images.numpy(), labels=labels.numpy(), steps=np.array(steps, np.float64), **refs)


def score(data: Path, models: list[Path], emulate: str | None) -> dict:
    out = data.with_suffix(f".{emulate or 'native'}.json")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "onnx_eval_child.py"), str(data), str(out), *map(str, models)]
    if emulate:
        cmd = ["qemu-x86_64", "-cpu", emulate, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}...: {proc.stderr[-1500:]}")
    return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fp32-epochs", type=int, default=6)
    p.add_argument("--qat-epochs", type=int, default=2)
    p.add_argument("--steps-per-epoch", type=int, default=20)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=12, help="timed repeats per artifact (default: %(default)s)")
    p.add_argument("--eval-images", type=int, default=32, help="validation slices scored (default: %(default)s)")
    p.add_argument("--emulate", default="Haswell", help="qemu-x86_64 CPU model to score on too, or 'none'")
    p.add_argument("--quick", action="store_true", help="tiny settings to check the script runs")
    p.add_argument("--out", help="also write the Markdown tables to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.fp32_epochs, args.qat_epochs, args.steps_per_epoch, args.repeats, args.eval_images = 1, 1, 5, 3, 4
    emulate = None if args.emulate == "none" else args.emulate
    if emulate and (platform.machine() != "x86_64" or shutil.which("qemu-x86_64") is None):
        log(f"no qemu-x86_64 on this {platform.machine()} host: emulated columns skipped (apt-get install qemu-user)")
        emulate = None
    bq.quiet()
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench_int8_cpu-"))
    dm, nets, calib = train(args, tmp)
    val = list(dm.val_dataloader())
    log(f"trained ({len(val)} validation batches)")

    meta = bq.ExportMeta(spatial_dims=2, num_classes=bq.NUM_CLASSES, divisor=16)
    rows = []
    for i, (name, source, fmt) in enumerate(settings()):
        net = nets[source]
        folder = tmp / f"a{i}"
        export_artifact(net, fmt, folder, calib, meta, threads=1, tolerance=LOOSE, bundle_max_mb=0)
        card = json.loads((folder / CARD_NAME).read_text())
        check = check_int8_accumulation(folder / "model.onnx")
        step = card["verification"].get("output_step") or card["details"].get("output_step")
        rows.append({"name": name, "source": source, "path": folder / "model.onnx", "safe": check.ok,
                     "bound": max((b.bound for b in check.layers), default=0), "step": step or 0.05})
        log(f"exported: {name}")

    data = tmp / "eval.npz"
    eval_set(val, [nets[r["source"]] for r in rows], [r["step"] for r in rows],
             args.eval_images, data)
    from onnx_eval_child import dice

    with np.load(data) as arrays:
        for i, r in enumerate(rows):  # the Dice of the PyTorch model each artifact comes from
            r["ref_dice"] = dice(arrays[f"ref_{i}"].argmax(1), arrays["labels"], bq.NUM_CLASSES)
    native = score(data, [r["path"] for r in rows], None)
    log("scored on this CPU")
    emulated = score(data, [r["path"] for r in rows], emulate) if emulate else {}
    log("scored on the emulated CPU" if emulate else "no emulated scores")

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(1)
    runners = {"PyTorch eager FP32": bq.eager(nets["fp32"])}
    runners.update({r["name"]: OrtPredictor(ort_session(r["path"], threads=1)) for r in rows})
    lat = bq.interleaved(runners, lambda: torch.randn(bq.LATENCY_SHAPE, generator=gen), args.repeats)
    log("latency measured")

    table = render(rows, native, emulated, lat, emulate, args, time.time() - t_start)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _cells(scores: dict | None, ref_dice: float | None) -> list[str]:
    if not scores:
        return ["-", "-", "-"]
    delta = f" ({(scores['dice'] - ref_dice) * 100:+.2f})" if ref_dice is not None else ""
    return [f"{scores['dice']:.4f}{delta}", f"{scores['argmax_agreement']:.4%}", f"{scores['beyond_2_steps']:.3%}"]


def render(rows, native, emulated, lat, emulate, args, seconds) -> str:
    here = describe(machine_info())
    eager = lat["PyTorch eager FP32"]
    emu = f"emulated {emulate} (AVX2, no VNNI)" if emulate else "emulated AVX2 (not run)"
    lines = [
        f"INT8 CPU settings: U-Net 2D (base 16, depth 4, {bq.NUM_CLASSES} classes), {args.fp32_epochs * args.steps_per_epoch} "
        f"FP32 steps + {args.qat_epochs * args.steps_per_epoch} QAT steps; {args.eval_images} validation slices scored; "
        f"this CPU: {here}; run took {seconds / 60:.1f} min; load average at the end {os.getloadavg()[0]:.1f}",
        "",
        f"| setting | overflow check (worst pair bound) | Dice here (vs its PyTorch model) | argmax agreement here | "
        f"logits > 2 steps here | Dice {emu} | argmax {emu} | logits > 2 steps {emu} | latency ms (x eager FP32) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        key, ref_dice = str(r["path"]), r["ref_dice"]
        check = f"{'pass' if r['safe'] else 'FAIL'} ({r['bound']})"
        ms = lat[r["name"]]
        lines.append("| " + " | ".join([
            r["name"], check, *_cells(native.get(key), ref_dice), *_cells(emulated.get(key), ref_dice),
            f"{ms * 1e3:.1f} ({eager / ms:.2f}x)",
        ]) + " |")
    fp32 = next(r["ref_dice"] for r in rows if r["source"] == "fp32")
    qat = next(r["ref_dice"] for r in rows if r["source"] == "qat")
    qat7 = next(r["ref_dice"] for r in rows if r["source"] == "qat7")
    lines.append(f"| PyTorch eager FP32 (Dice {fp32:.4f}; QAT model {qat:.4f}; 7-bit QAT model {qat7:.4f}) "
                 f"| - | - | - | - | - | - | - | {eager * 1e3:.1f} (1.00x) |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
