"""Dice and CPU latency of a 2D phantom U-Net with 1.0 / 0.75 / 0.5 / 0.25 of its channels kept.

One run does everything, so every number in the table comes from the same machine state:

1. trains a teacher U-Net on the phantom HDF5 data (or takes ``--teacher CKPT``);
2. for each fraction kept, starts from the teacher (``model.init_from``) and runs
   ``PruneRetrain`` (structured, ``--rounds`` rounds, ``--epochs-per-round`` epochs each,
   ``--importance`` (default taylor), ``round_to`` 8, LR rewound each round) with logit distillation from the teacher; the 1.0 row gets the
   same retraining without pruning, so Dice differences are due to pruning alone;
3. measures val Dice (whole slices), params and MACs, then latency: PyTorch eager and
   onnxruntime (FP32 ONNX from ``trainer.export.onnx_tools``), batch 1, one thread,
   ``--repeats`` interleaved rounds over all models and runtimes, median per cell;
4. prints a Markdown table and writes it, with the command, to ``--out``.

Goal checked: 0.5 of the channels kept gives >= 2.5x lower ORT latency than 1.0 within 1 Dice
point (0.01). The verdict printed is computed from the measured numbers.

    python benchmarks/bench_prune.py                       # a few minutes on 2 CPU cores
    python benchmarks/bench_prune.py --teacher runs/unet2d_phantom/checkpoints/best.ckpt
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from datamodules.hdf5 import HDF5SegDataModule  # noqa: E402
from trainer.callbacks.distill import Distillation  # noqa: E402
from trainer.callbacks.prune import PruneRetrain  # noqa: E402
from trainer.export.onnx_tools import OrtPredictor, export_onnx, ort_session  # noqa: E402
from trainer.models.unet import UNet  # noqa: E402
from trainer.module import SegmentationModule  # noqa: E402
from trainer.prune.measure import count_macs, count_params, out_channels  # noqa: E402

KEEP = (1.0, 0.75, 0.5, 0.25)
HAND_WRITTEN = "## Other schedules"  # README_prune.md from this heading on is kept by write_readme
DISTILL = {  # Distillation arguments per --distill choice
    "kd": dict(temperature=2.0, kd_weight=1.0, kd_ds_weight=0.5),
    "cwd": dict(kd_weight=0.0, kd_ds_weight=0.0, cwd_weight=1.0, cwd_temperature=4.0),
    "none": None,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/phantom2d.h5", help="phantom HDF5 file (generated if absent)")
    p.add_argument("--teacher", default=None, help="a framework checkpoint to start from instead of training one")
    p.add_argument("--base", type=int, default=16, help="teacher base channels (when training it)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--teacher-epochs", type=int, default=16)
    # 3 rounds of 2 (as recipes/prune_unet2d.yaml): 2 rounds of 3 lost 3.0 Dice points at 0.5, 3 of 2 lost 1.6
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs-per-round", type=int, default=2)
    # as recipes/prune_unet2d.yaml: the last round retrains epochs-per-round + final-epochs
    p.add_argument("--final-epochs", type=int, default=2, help="extra fine-tuning epochs after the last round")
    p.add_argument("--samples-per-epoch", type=int, default=320)
    # 3e-3: measured on the main job's base-16 student pruned to 0.5 in 2 rounds of 3 epochs,
    # val Dice 0.642 at lr 1e-3 vs 0.678 at 3e-3 (unpruned 0.682)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the retraining (teacher: 2e-3)")
    p.add_argument("--importance", default="taylor", choices=["l1", "l2", "bn_scale", "taylor"])
    p.add_argument("--taylor-batches", type=int, default=4, help="training batches the Taylor importance averages")
    p.add_argument("--taylor-accumulate", default="sum", choices=["sum", "abs"])
    # cwd: with kd (T=2) the 0.5 row lost the kidney's recovery: -1.25 points vs -0.59 with cwd
    # (3 rounds of 2 + 2 final epochs, same teacher, 2026-11-23)
    p.add_argument("--distill", default="cwd", choices=sorted(DISTILL),
                   help="distillation terms from the unpruned teacher during retraining (every row alike)")
    p.add_argument("--keep", type=float, nargs="+", default=list(KEEP),
                   help="fractions of channels kept (rows); 1.0 and 0.5 are always run (goal and baseline)")
    p.add_argument("--latency-size", type=int, default=256, help="edge of the square latency input")
    p.add_argument("--repeats", type=int, default=20, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training (timing always uses 1)")
    p.add_argument("--out", default=str(ROOT / "trainer" / "prune" / "README_prune.md"))
    p.add_argument("--work", default=None, help="keep checkpoints here (teacher.ckpt, for --teacher) instead of a temp dir")
    return p.parse_args(argv)


def datamodule(args) -> HDF5SegDataModule:
    dm = HDF5SegDataModule(path=args.data, spatial_dims=2, patch_size=[96, 96], batch_size=8, num_workers=0,
                           val_fraction=0.2, samples_per_epoch=args.samples_per_epoch,
                           generate={"cases": 40, "shape": [16, 96, 96], "seed": 0})
    return dm


def adamw(lr):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)


def cosine(epochs):
    return lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=5e-5)


def trainer(root: Path, epochs: int, callbacks=()) -> pl.Trainer:
    # Validation after every epoch feeds the per-round table of PruneRetrain; the Dice in the
    # main table is measured once at the end with trainer.validate.
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=list(callbacks), logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, gradient_clip_val=12.0, default_root_dir=root)


def validate(module: SegmentationModule, args) -> dict[str, float]:
    """Validation metrics: ``val/dice`` (mean foreground) and ``val/dice_<class>``."""
    tr = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    return {k: float(v) for k, v in tr.validate(module, datamodule=datamodule(args), verbose=False)[0].items()}


def per_class(metrics: dict[str, float]) -> str:
    return " / ".join(f"{v:.2f}" for k, v in metrics.items() if k.startswith("val/dice_"))


def save_framework_checkpoint(module: SegmentationModule, net_kwargs: dict, path: Path) -> Path:
    """What ``launch.py fit`` writes, as far as ``restore_run``/``init_from`` need: weights + recipe dicts."""
    hparams = {"net": {"class_path": "trainer.models.UNet", "init_args": dict(net_kwargs)}, "num_classes": net_kwargs["num_classes"]}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, path)
    return path


def teacher_checkpoint(args, work: Path) -> tuple[Path, dict, float]:
    if args.teacher:
        from trainer.restore import restore_run

        run = restore_run(args.teacher, with_data=False)
        kwargs = dict(run.checkpoint["hyper_parameters"]["net"]["init_args"])
        return Path(args.teacher), kwargs, validate(run.module, args)["val/dice"]
    kwargs = dict(spatial_dims=2, in_channels=1, num_classes=5, depth=args.depth, base_channels=args.base,
                  norm="batch", deep_supervision=True, ds_levels=2)
    pl.seed_everything(0, verbose=False)
    module = SegmentationModule(UNet(**kwargs), num_classes=5, optimizer=adamw(2e-3), lr_scheduler=cosine(args.teacher_epochs))
    t0 = time.time()
    tr = trainer(work / "teacher", args.teacher_epochs)
    tr.fit(module, datamodule=datamodule(args))
    dice = validate(module, args)["val/dice"]
    print(f"teacher trained in {time.time() - t0:.0f} s, val Dice {dice:.4f}", flush=True)
    return save_framework_checkpoint(module, kwargs, work / "teacher.ckpt"), kwargs, dice


def retrain(args, teacher: Path, kwargs: dict, keep: float, work: Path) -> tuple[torch.nn.Module, dict, str]:
    """Returns the retrained net, its validation metrics and PruneRetrain's per-round table."""
    pl.seed_everything(0, verbose=False)
    epochs = total_epochs(args)
    # Pruned rows rewind the LR at each round (a fresh cosine): a round pruned late in one long
    # cosine has too little LR left to recover (measured: Dice 0.23 -> 0.02 without rewinding,
    # 0.23 with). The cosine spans the last round's epochs, so only the last round anneals fully
    # (as in recipes/prune_unet2d.yaml). The 1.0 row anneals once over all epochs.
    last_round = args.epochs_per_round + args.final_epochs
    module = SegmentationModule(UNet(**kwargs), num_classes=kwargs["num_classes"], optimizer=adamw(args.lr),
                                lr_scheduler=cosine(epochs if keep == 1.0 else last_round),
                                init_from=str(teacher))
    callbacks = [] if keep == 1.0 else [PruneRetrain(target_ratio=1.0 - keep, rounds=args.rounds,
                                                     epochs_per_round=args.epochs_per_round, round_to=8,
                                                     importance=args.importance, taylor_batches=args.taylor_batches,
                                                     taylor_accumulate=args.taylor_accumulate,
                                                     rewind_lr=True, report_dir=str(work / f"keep{keep}"))]
    if DISTILL[args.distill] is not None:
        callbacks.append(Distillation(teacher=str(teacher), **DISTILL[args.distill]))
    t0 = time.time()
    tr = trainer(work / f"keep{keep}", epochs, callbacks)
    tr.fit(module, datamodule=datamodule(args))
    metrics = validate(module, args)
    print(f"keep {keep}: retrained {epochs} epochs in {time.time() - t0:.0f} s, val Dice {metrics['val/dice']:.4f} "
          f"({per_class(metrics)})", flush=True)
    rounds = work / f"keep{keep}" / "prune_rounds.md"
    return module.net.eval(), metrics, rounds.read_text() if rounds.exists() else ""


def total_epochs(args) -> int:
    return args.rounds * args.epochs_per_round + args.final_epochs


def time_models(nets: dict[float, torch.nn.Module], size: int, repeats: int, work: Path) -> dict[tuple[float, str], float]:
    """Median ms per (keep, runtime), batch 1, one thread, rounds interleaved over all cells."""
    torch.set_num_threads(1)
    x = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(0))
    runners = {}
    for keep, net in nets.items():
        net = copy.deepcopy(net).eval()
        path = work / f"keep{keep}.onnx"
        export_onnx(net, torch.zeros(1, 1, 64, 64), path)
        ort = OrtPredictor(ort_session(path, threads=1))
        with torch.no_grad():
            err = float((ort(x) - net(x)).abs().max())
        assert err < 1e-3, f"ONNX of keep {keep} differs from PyTorch by {err}"
        runners[keep, "eager"] = lambda n=net: n(x)
        runners[keep, "ort"] = lambda o=ort: o(x)
    times = {k: [] for k in runners}
    with torch.no_grad():
        for fn in runners.values():  # warm-up
            for _ in range(3):
                fn()
        for _ in range(repeats):
            for key, fn in runners.items():
                t0 = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t0) * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_prune.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_prune_") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        teacher, kwargs, teacher_dice = teacher_checkpoint(args, work)
        keeps = sorted({1.0, 0.5, *args.keep}, reverse=True)
        results = {keep: retrain(args, teacher, kwargs, keep, work) for keep in keeps}
        nets = {keep: r[0] for keep, r in results.items()}
        ms = time_models(nets, args.latency_size, args.repeats, work)
    size = args.latency_size
    base = {"params": count_params(nets[1.0]), "macs": count_macs(nets[1.0], torch.zeros(1, 1, size, size))}
    rows = []
    for keep, (net, metrics, _) in results.items():
        dice = metrics["val/dice"]
        chans = sum(c for n, c in out_channels(net).items() if not n.startswith(("head", "ds_heads")))
        chans0 = sum(c for n, c in out_channels(nets[1.0]).items() if not n.startswith(("head", "ds_heads")))
        params, macs = count_params(net), count_macs(net, torch.zeros(1, 1, size, size))
        rows.append({
            "keep": keep, "channels": chans / chans0, "params": params, "params_x": params / base["params"],
            "macs": macs, "macs_x": macs / base["macs"], "dice": dice, "ddice": dice - results[1.0][1]["val/dice"],
            "classes": per_class(metrics),
            "eager": ms[keep, "eager"], "eager_x": ms[1.0, "eager"] / ms[keep, "eager"],
            "ort": ms[keep, "ort"], "ort_x": ms[1.0, "ort"] / ms[keep, "ort"],
        })
    names = " / ".join(k.removeprefix("val/dice_") for k in results[1.0][1] if k.startswith("val/dice_"))
    lines = [
        f"| channels kept (target) | kept (actual) | params | MACs | val Dice | Δ Dice vs 1.0 | Dice {names} | eager ms | "
        "eager speed-up | ORT ms | ORT speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['keep']:.2f} | {r['channels']:.3f} | {r['params']:,} ({r['params_x']:.2f}x) | {r['macs'] / 1e9:.2f} G "
            f"({r['macs_x']:.2f}x) | {r['dice']:.4f} | {r['ddice']:+.4f} | {r['classes']} | {r['eager']:.1f} | {r['eager_x']:.2f}x | "
            f"{r['ort']:.1f} | {r['ort_x']:.2f}x |"
        )
    half = next(r for r in rows if r["keep"] == 0.5)
    speed_ok, dice_ok = half["ort_x"] >= 2.5, half["ddice"] >= -0.01
    verdict = (f"Goal (0.5 kept: >= 2.5x lower ORT latency within 1 Dice point): ORT speed-up {half['ort_x']:.2f}x "
               f"({'met' if speed_ok else 'MISSED'}), Dice {half['ddice']:+.4f} vs 1.0 "
               f"({'met' if dice_ok else 'MISSED'}).")
    table = "\n".join(lines)
    elapsed = time.time() - started
    print("\n" + table + "\n\n" + verdict)
    verdict += f"\n\nPruneRetrain's per-round table of the 0.5 row (val Dice after each round's retraining):\n\n{results[0.5][2]}"
    write_readme(Path(args.out), command, args, kwargs, table, verdict, teacher_dice, elapsed)
    print(f"\nwritten to {args.out} ({elapsed:.0f} s in all)")
    return 0


def write_readme(path: Path, command: str, args, kwargs: dict, table: str, verdict: str, teacher_dice: float, elapsed: float) -> None:
    import importlib.metadata

    import onnxruntime

    epochs = total_epochs(args)
    text = f"""# Prune-retrain (`trainer/callbacks/prune.py`, `trainer/prune/`)

Use: add `trainer.callbacks.prune.PruneRetrain` to a recipe (see `recipes/prune_unet2d.yaml` and the callback's
docstring for every argument). Structured pruning physically removes channels through Torch-Pruning's dependency
graph; `target_ratio` is the fraction of each layer's original output channels removed after the last round. Each
round is recorded in the network's structural history (kept channel indices per layer, plain data), so any checkpoint
rebuilds the pruned network (`--ckpt_path` resume, `restore_run`, export). Unstructured sparsity (`method:
unstructured`) only masks weights: no speed-up.

## Measured: Dice and CPU latency vs channels kept

Produced by one run of

    {command}

({elapsed / 60:.1f} min; {platform.processor() or platform.machine()}, {args.threads} torch thread(s) for
training, Python {platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__},
torch-pruning {importlib.metadata.version("torch-pruning")}; {os.cpu_count()} cores, 1-minute load average at the end
{os.getloadavg()[0]:.1f}). Absolute milliseconds depend on what else runs; ratios come from interleaved repeats within this run.

Setup: U-Net 2D `{kwargs}` on the phantom HDF5 data (`{args.data}`, 40 cases of 16x96x96, 20% of cases for
validation, 96x96 patches, {args.samples_per_epoch} samples per epoch). The teacher was trained
{args.teacher_epochs if not args.teacher else '(given: ' + args.teacher + ')'} epochs (val Dice {teacher_dice:.4f}). Each row starts from the teacher
(`model.init_from`) and retrains {epochs} epochs (AdamW lr {args.lr}) with distillation from it (`Distillation({DISTILL[args.distill]})`, `--distill {args.distill}`); pruned rows use
`PruneRetrain(method=structured, target_ratio=1-kept, rounds={args.rounds}, epochs_per_round={args.epochs_per_round},
importance={args.importance}, taylor_batches={args.taylor_batches},
taylor_accumulate={args.taylor_accumulate}, round_to=8, rewind_lr=true)` and {args.final_epochs} more epochs after the last round, the
LR restarting each round on a cosine over {args.epochs_per_round + args.final_epochs} epochs, which only the last round completes (the 1.0 row: one cosine
over all {epochs} epochs) (ratio = fraction of each layer's original output channels removed; the head and
deep-supervision heads keep their 5 class channels). Dice: mean foreground Dice on whole validation slices. Params count the
deep-supervision heads; MACs and latency are for one {args.latency_size}x{args.latency_size} slice (eval mode, no DS
heads). Latency: batch 1, one thread, median of {args.repeats} interleaved rounds; eager = PyTorch FP32, ORT =
onnxruntime FP32 on the ONNX written by `trainer.export.onnx_tools.export_onnx` (checked against PyTorch before timing).
Speed-up = latency of the 1.0 row / latency of the row.

{table}

{verdict}

Notes
- Importance: with l1 magnitude the 0.5 and 0.25 rows predicted no foreground at all after retraining (val Dice 0.0000 in
  two earlier runs of this benchmark, l1, with and without LR rewinding). Investigated on a 10-epoch teacher: l1 keeps
  the large-weight, mostly-active channels and drops the sparse ones that detect organs at full resolution; after
  pruning the full-resolution output is all background and 60 AdamW steps at lr 1e-3 do not bring it back (lr 5e-3 do).
  First-order Taylor importance (|w * dL/dw| on 4 training batches) keeps the channels the loss depends on: the same 60
  steps at lr 1e-3 recover the foreground (fraction of foreground pixels predicted 0.077 vs 0.068 in the labels).
  Hence `importance: taylor` here and in `recipes/prune_unet2d.yaml`.
- Distillation during retraining: channel-wise (`cwd`, every class weighs the same). With voxel-wise KD at T=2 (`--distill
  kd`) the same schedule lost 1.25 points at 0.5 kept, nearly all of it the kidney (0.86 vs 0.90): KD's average over
  voxels is mostly background and slows the recovery of small classes (see "Other schedules and settings" below).
- LR rewinding (each round restarts the optimizer and its cosine): measured separately while developing, on the same
  data with a weaker teacher (3 epochs, val Dice 0.22), 2 rounds to 0.5 kept with distillation and one cosine over
  4 epochs: Dice right after the second round 0.003 and 0.021 two epochs later; with rewinding 0.088 then 0.228.
- Channels kept: 0.75 and 0.25 of layers with 16 channels round to multiples of 8 (16 -> 8 or 16), so the actual
  fraction differs slightly from the target (column "kept (actual)").
- Pruning 50% of channels leaves ~0.25x of conv MACs (cost scales with in x out channels); the latency ratio is lower than
  the MACs ratio because of memory traffic, norm/activation ops and per-op overhead at batch 1.
"""
    # measured comparisons written by hand below the generated part survive a rerun
    old = path.read_text() if path.exists() else ""
    kept = old[old.index(HAND_WRITTEN):] if HAND_WRITTEN in old else ""
    path.write_text(text + ("\n" + kept if kept else ""))


if __name__ == "__main__":
    sys.exit(main())
