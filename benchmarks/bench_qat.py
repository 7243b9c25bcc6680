"""QAT/PTQ benchmark on this CPU: step cost, artifact latency, Dice. Prints a Markdown table.

    .venv/bin/python benchmarks/bench_qat.py [--quick] [--out FILE.md]

One run, one process, everything measured here (no numbers carried over):

1. data: a small phantom HDF5 file (``datamodules.hdf5.HDF5SegDataModule`` generates it:
   16 cases of 16x96x96, 5 classes incl. small low-contrast lesions), no augmentation;
2. FP32: a 2D U-Net (base 16, depth 4) trained with Lightning on 64x64 patches, batch 8;
3. PTQ: ``trainer.quant.ptq.post_training_quantize`` (percentile 99.99, 8 batches);
4. QAT: the FP32 weights fine-tuned (lr / 10) with the ``QuantizationAwareTraining``
   callback (percentile calibration, fixed scales), once as is and once with BatchNorm
   statistics and ranges frozen for the last epoch; as the fair reference, the same
   fine-tuning without quantization;
5. artifacts through the export package: ``onnx`` (FP32), ``onnx-int8-cpu`` (onnxruntime
   static INT8 of the FP32 model; and of the QAT model, keeping its trained scales),
   ``onnx-qdq`` of the PTQ and of the QAT model (verified);
6. Dice (mean foreground, global per class, whole validation slices) of every model and
   artifact; latency at batch 1 (256x256, interleaved repeats, median) of each artifact in
   onnxruntime vs PyTorch eager FP32; training-step time QAT vs FP32 (interleaved repeats,
   median). Every timing runs on one thread (steadier on a shared machine).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torchmetrics.segmentation import DiceScore  # noqa: E402

from datamodules.hdf5 import HDF5SegDataModule  # noqa: E402
from trainer.callbacks.qat import QuantizationAwareTraining  # noqa: E402
from trainer.export import ExportMeta, OrtPredictor, export_artifact, ort_session  # noqa: E402
from trainer.inference import predict_logits  # noqa: E402
from trainer.models import UNet  # noqa: E402
from trainer.module import SegmentationModule  # noqa: E402
from trainer.quant.calibrate import calibrate, quant_layers, set_weight_ranges  # noqa: E402
from trainer.quant.convert import quantize_net  # noqa: E402
from trainer.quant.ptq import post_training_quantize  # noqa: E402

NUM_CLASSES = 5
LATENCY_SHAPE = (1, 1, 256, 256)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def quiet() -> None:
    """Warnings and library logs off, seed 0: the benchmark prints only its own lines."""
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("trainer").setLevel(logging.ERROR)
    torch.manual_seed(0)


def make_data(tmp: Path, steps_per_epoch: int, patch: int) -> HDF5SegDataModule:
    dm = HDF5SegDataModule(
        path=str(tmp / "phantom2d.h5"), spatial_dims=2, patch_size=[patch, patch], batch_size=8, num_workers=0,
        samples_per_epoch=8 * steps_per_epoch, val_fraction=0.25, augment=False,
        generate={"cases": 16, "shape": [16, 96, 96], "seed": 0},
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def new_module(lr: float) -> SegmentationModule:
    net = UNet(spatial_dims=2, num_classes=NUM_CLASSES, depth=4, base_channels=16)
    return SegmentationModule(net, num_classes=NUM_CLASSES,
                              optimizer=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=1e-4))


def fit(module: SegmentationModule, dm, epochs: int, callbacks=()) -> None:
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )
    trainer.fit(module, datamodule=dm)


def dice(predict, batches) -> float:
    """Mean foreground Dice, overlaps summed over the whole validation set per class."""
    metric = DiceScore(num_classes=NUM_CLASSES, include_background=False, average="none",
                       aggregation_level="global", input_format="index")
    for batch in batches:
        logits = predict_logits(predict, batch["image"], divisor=16)
        metric.update(logits.argmax(1), batch["label"])
    return float(torch.nanmean(metric.compute()))


def eager(net):
    model = copy.deepcopy(net).eval()

    def run(x):
        with torch.no_grad():
            return model(x)
    return run


def interleaved(runners: dict, make_input, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each runner, calls interleaved so load drifts hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in runners}
    for i in range(warmup + repeats):
        for name, fn in runners.items():
            x = make_input()
            t0 = time.perf_counter()
            fn(x)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step_runner(net, loss_fn, refresh_ranges: bool):
    """One optimizer step as training does it (fixed-scale QAT: plus the post-step weight-range
    refresh the callback does in on_train_batch_end)."""
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-5)

    def step(batch):
        loss = loss_fn(net(batch["image"]), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if refresh_ranges:
            set_weight_ranges(net)
    return step


def export(net, fmt: str, out: Path, batches, **kw) -> Path:
    meta = ExportMeta(spatial_dims=2, num_classes=NUM_CLASSES, divisor=16)
    return export_artifact(net, fmt, out, batches, meta, threads=1, **kw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fp32-epochs", type=int, default=6, help="FP32 epochs (default: %(default)s)")
    p.add_argument("--qat-epochs", type=int, default=2,
                   help="fine-tuning epochs, QAT and (the reference) FP32 alike (default: %(default)s)")
    p.add_argument("--steps-per-epoch", type=int, default=20, help="(default: %(default)s)")
    p.add_argument("--patch", type=int, default=64, help="training patch edge (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=12, help="timed repeats per runner (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny settings to check the script runs")
    p.add_argument("--out", help="also write the Markdown table to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.fp32_epochs, args.qat_epochs, args.repeats, args.steps_per_epoch = 1, 1, 3, 5
    quiet()
    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench_qat-"))

    dm = make_data(tmp, args.steps_per_epoch, args.patch)
    val = list(dm.val_dataloader())
    calib = [b for _, b in zip(range(8), dm.train_dataloader())]
    export_batches = calib[:4]  # export: calibration (onnx-int8-cpu) and verification input
    log(f"data: {len(val)} validation batches, threads={torch.get_num_threads()}")

    pl.seed_everything(0, verbose=False)
    fp32 = new_module(lr=2e-3)
    fit(fp32, dm, args.fp32_epochs)
    log("FP32 trained")

    ptq_net = copy.deepcopy(fp32.net).eval()
    post_training_quantize(ptq_net, [b["image"] for b in calib], "percentile")
    log("PTQ calibrated")

    # The same fine-tuning with and without quantization, so that QAT is compared with an
    # FP32 model that saw as many steps.
    tuned = new_module(lr=2e-4)
    tuned.net.load_state_dict(fp32.net.state_dict())
    fit(tuned, dm, args.qat_epochs)
    qat = new_module(lr=2e-4)
    qat.net.load_state_dict(fp32.net.state_dict())
    fit(qat, dm, args.qat_epochs, [QuantizationAwareTraining(calibration="percentile", calib_batches=8)])
    # the same with 7-bit weights: what onnxruntime multiplies exactly on every CPU
    qat7 = new_module(lr=2e-4)
    qat7.net.load_state_dict(fp32.net.state_dict())
    fit(qat7, dm, args.qat_epochs, [QuantizationAwareTraining(calibration="percentile", calib_batches=8, weight_bits=7)])
    # the same with BatchNorm statistics and ranges frozen for the last epoch
    qat_frozen = new_module(lr=2e-4)
    qat_frozen.net.load_state_dict(fp32.net.state_dict())
    last = args.qat_epochs - 1 if args.qat_epochs > 1 else None
    fit(qat_frozen, dm, args.qat_epochs, [QuantizationAwareTraining(
        calibration="percentile", calib_batches=8, freeze_bn_epoch=last, freeze_ranges_epoch=last)])
    log(f"FP32 and QAT fine-tuned ({len(quant_layers(qat.net))} quantized layers)")

    loose = {"atol": 1e9, "max_exceed_fraction": 1.0, "min_argmax_agreement": 0.0}
    qdq_tolerance = loose if args.quick else None
    paths = {
        "onnx": export(fp32.net, "onnx", tmp / "onnx", export_batches),
        # < 8 batches: onnxruntime 1.32's MinMax calibrater discards what it collected each time
        # it reaches the format's CalibMaxIntermediateOutputs=8 (exactly 8 -> "No data is collected")
        "onnx-int8-cpu": export(fp32.net, "onnx-int8-cpu", tmp / "int8", export_batches, tolerance=loose,
                                format_options={"calibration_batches": 4, "benchmark_runs": 0}),
        # --quick nets are barely trained: near-tie logits make the default verification flaky
        # the QAT model's fast CPU artifact: its trained scales in onnxruntime's fusable layout.
        # Its 8-bit grids re-rounded to 7 bits miss the default verification (1.28% of logits
        # beyond 2 steps on 2026-12-08; why the pipeline trains QAT with weight_bits 7): measured
        # here with a loose tolerance; the 7-bit QAT model below is verified at the default one
        "onnx-int8-cpu (QAT)": export(qat.net, "onnx-int8-cpu", tmp / "int8_qat", export_batches, tolerance=loose,
                                      format_options={"calibration_batches": 4, "benchmark_runs": 0}),
        "onnx-int8-cpu (QAT 7-bit)": export(qat7.net, "onnx-int8-cpu", tmp / "int8_qat7", export_batches,
                                            tolerance=qdq_tolerance,
                                            format_options={"calibration_batches": 4, "benchmark_runs": 0}),
        "onnx-qdq (PTQ)": export(ptq_net, "onnx-qdq", tmp / "qdq_ptq", export_batches, tolerance=qdq_tolerance),
        "onnx-qdq (QAT)": export(qat.net, "onnx-qdq", tmp / "qdq_qat", export_batches, tolerance=qdq_tolerance),
    }
    log("exported" + ("" if args.quick else " (onnx-qdq artifacts passed the default verification)"))
    sessions = {k: OrtPredictor(ort_session(v, threads=1)) for k, v in paths.items()}

    rows_dice = {
        "PyTorch FP32": dice(eager(fp32.net), val),
        "PyTorch FP32 fine-tuned (same steps, no quantization)": dice(eager(tuned.net), val),
        "PyTorch PTQ (fake-quant)": dice(eager(ptq_net), val),
        "PyTorch QAT (fake-quant)": dice(eager(qat.net), val),
        "PyTorch QAT, BN + ranges frozen for the last epoch": dice(eager(qat_frozen.net), val),
        "PyTorch QAT with 7-bit weights (weight_bits=7)": dice(eager(qat7.net), val),
        "ORT onnx (FP32)": dice(sessions["onnx"], val),
        "ORT onnx-int8-cpu (FP32 model, ORT static INT8)": dice(sessions["onnx-int8-cpu"], val),
        "ORT onnx-qdq (PTQ)": dice(sessions["onnx-qdq (PTQ)"], val),
        "ORT onnx-qdq (QAT)": dice(sessions["onnx-qdq (QAT)"], val),
        "ORT onnx-int8-cpu (QAT model, trained scales)": dice(sessions["onnx-int8-cpu (QAT)"], val),
        "ORT onnx-int8-cpu (7-bit QAT model, trained scales)": dice(sessions["onnx-int8-cpu (QAT 7-bit)"], val),
    }
    log("Dice measured")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread for every timing: steadier on a shared machine
    gen = torch.Generator().manual_seed(1)
    lat = interleaved(
        {"PyTorch eager FP32": eager(fp32.net), "PyTorch eager QAT (fake-quant)": eager(qat.net),
         "ORT onnx (FP32)": sessions["onnx"], "ORT onnx-int8-cpu": sessions["onnx-int8-cpu"],
         "ORT onnx-qdq (QAT)": sessions["onnx-qdq (QAT)"], "ORT onnx-int8-cpu (QAT)": sessions["onnx-int8-cpu (QAT)"],
         "ORT onnx-int8-cpu (7-bit QAT)": sessions["onnx-int8-cpu (QAT 7-bit)"]},
        lambda: torch.randn(LATENCY_SHAPE, generator=gen), args.repeats,
    )
    log("latency measured")

    batch = calib[0]
    lsq_net = copy.deepcopy(fp32.net)
    quantize_net(lsq_net, learnable_scales=True)
    calibrate(lsq_net, [b["image"] for b in calib], "percentile", train_mode=True)
    step = interleaved({"FP32": train_step_runner(copy.deepcopy(fp32.net), fp32.loss, False),
                        "QAT": train_step_runner(copy.deepcopy(qat.net), fp32.loss, True),
                        "QAT (LSQ)": train_step_runner(lsq_net, fp32.loss, False)},
                       lambda: batch, args.repeats)
    torch.set_num_threads(threads)
    log("training steps measured")

    table = render(rows_dice, lat, step, threads, time.time() - t_start, args)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


def render(rows_dice, lat, step, threads, seconds, args) -> str:
    base = rows_dice["PyTorch FP32"]
    ref = lat["PyTorch eager FP32"]
    lines = [
        f"QAT benchmark: U-Net 2D (base 16, depth 4, 5 classes) on phantom slices; "
        f"{args.fp32_epochs * args.steps_per_epoch} FP32 steps, then {args.qat_epochs * args.steps_per_epoch} QAT steps "
        f"(batch 8x{args.patch}x{args.patch}); torch {torch.__version__}; run took {seconds:.0f} s; "
        f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        "",
        "| measurement | value | vs reference | goal |",
        "|---|---|---|---|",
        f"| training step, batch 8x{args.patch}x{args.patch}, 1 thread: FP32 | {step['FP32'] * 1e3:.0f} ms | 1.00x | |",
        f"| training step: QAT (fake-quant, weight-range refresh) | {step['QAT'] * 1e3:.0f} ms | "
        f"{step['QAT'] / step['FP32']:.2f}x FP32 | <= 1.15x |",
        f"| training step: QAT with learnable scales (LSQ, torch's learnable ops) | {step['QAT (LSQ)'] * 1e3:.0f} ms | "
        f"{step['QAT (LSQ)'] / step['FP32']:.2f}x FP32 | |",
    ]
    for name, sec in lat.items():
        speed = ref / sec
        goal = ">= 3x faster" if name.startswith("ORT onnx-int8-cpu") else ""
        lines.append(f"| latency batch 1, 1x256x256, 1 thread: {name} | {sec * 1e3:.1f} ms | "
                     f"{speed:.2f}x faster than eager FP32 | {goal} |")
    tuned = rows_dice["PyTorch FP32 fine-tuned (same steps, no quantization)"]
    qat = rows_dice["PyTorch QAT (fake-quant)"]
    qat7 = rows_dice["PyTorch QAT with 7-bit weights (weight_bits=7)"]
    for name, value in rows_dice.items():
        goal = "within 0.3 Dice points of the QAT model" if "trained scales" in name else (
            "within 0.3 Dice points of FP32" if name == "ORT onnx-qdq (QAT)" else "")
        versus = f"{(value - base) * 100:+.2f} points vs PyTorch FP32"
        if "QAT" in name:
            versus += f", {(value - tuned) * 100:+.2f} vs FP32 fine-tuned alike"
        if "trained scales" in name:
            ref = qat7 if "7-bit" in name else qat
            versus += f", {(value - ref) * 100:+.2f} vs its QAT model"
        lines.append(f"| Dice (mean foreground, validation): {name} | {value:.4f} | {versus} | {goal} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
