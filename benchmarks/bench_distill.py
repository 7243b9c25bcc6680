"""Distillation benchmark on this CPU: Dice of teacher / student alone / distilled students, and
the cost of a distillation step. Prints a Markdown table.

    .venv/bin/python benchmarks/bench_distill.py [--workers 2] [--quick] [--out FILE.md]

One run, everything measured here (no numbers carried over); ``--workers`` trains the students
in that many processes (the Dice of a seed does not depend on the process):

1. data: a phantom HDF5 file (``HDF5SegDataModule`` generates it: 24 cases of 12x64x64, 5
   classes incl. small low-contrast lesions), the datamodule's default augmentation,
   75/25 case split; data loading in the training process (``num_workers=0``);
2. teacher: a 2D U-Net (base 16, depth 4, deep supervision) trained ``--teacher-steps`` steps;
3. students: a 2D U-Net (base 10, depth 3, deep supervision; 0.097x the teacher's
   parameters), each trained ``--student-steps`` steps for each of ``--seeds`` seeds; with
   the same seed every variant has the same initialisation, data order and schedule (AdamW 2e-3,
   cosine): alone (Dice+CE); online distillation (channel-wise ``cwd`` T=4 weight 1, FitNets
   hint student ``decoders.1`` -> teacher ``decoders.2`` (1/2 resolution), affinity student
   ``decoders.0`` -> teacher ``decoders.1`` (1/4)); offline distillation (the same ``cwd``
   from a teacher-logit cache made by ``launch.py distill-cache``'s ``main``). Why ``cwd`` and
   not the voxel-wise ``kd``: ``kd`` at T=2 (weight 0.5, ``kd_ds`` 0.25) starved the small
   classes and left students 11-18 points below the student alone (3 seeds, 2026-11-23).
   Budget: 3000 steps for every model. Distillation needs the longer schedule: with students
   at 1500 steps (teacher 2400) online gained +0.41 points over the student alone and offline
   lost 0.38; at 3000 steps +0.70 and +0.46 (3 seeds each, 2026-11-23 and 2026-12-07);
   the same online and offline distillation "+ unlabelled cases": ``--unlabelled`` (54)
   further phantom cases stored without labels join the training split (the file's first 24
   cases and the validation split are unchanged; the supervised loss skips the unlabelled
   samples, the distillation terms use them; the offline cache covers them). What a teacher
   adds beyond the labels is its function on images nobody labelled, and distilling on more
   of them is how students catch up with teachers (Beyer et al. 2022; Xie et al. 2020): online
   0.66 points below the teacher with them, 2.03 without (3 seeds, 2026-12-07);
4. Dice: mean foreground Dice (global per class) on whole validation slices, the framework's
   ``val/dice``;
5. step time: the wall time from ``on_train_batch_start`` to ``on_train_batch_end``
   (forward, loss terms incl. teacher forward or cache replay, backward, optimizer step; the
   data loading before it is the same for all), in ``--repeats`` interleaved rounds of short
   fits (alone, online, offline, alone, ...), first step of each fit dropped, median.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from datamodules.hdf5 import HDF5SegDataModule  # noqa: E402
from trainer.callbacks.distill import Distillation  # noqa: E402
from trainer.distill.cache import main as distill_cache  # noqa: E402
from trainer.models import UNet  # noqa: E402
from trainer.module import SegmentationModule  # noqa: E402

NUM_CLASSES = 5
LABELLED_CASES = 24
STEPS_PER_EPOCH = 25
TEACHER_NET = dict(spatial_dims=2, in_channels=1, num_classes=NUM_CLASSES, depth=4, base_channels=16,
                   deep_supervision=True, ds_levels=2)
# depth 3, base 10: 0.097x the teacher's parameters. A depth-4 base-5 student (0.098x) learned
# only the liver in this budget (alone or distilled), which leaves nothing to compare.
STUDENT_NET = {**TEACHER_NET, "depth": 3, "base_channels": 10, "ds_levels": 1}
# channel-wise KD only (kd and kd_ds off): see the module docstring
KD = dict(kd_weight=0.0, kd_ds_weight=0.0, cwd_weight=1.0, cwd_temperature=4.0)
# student decoders.1 / .0 sit at 1/2 / 1/4 resolution, like the teacher's decoders.2 / .1
ONLINE = dict(**KD, features=[{"student": "decoders.1", "teacher": "decoders.2", "weight": 0.5}],
              affinity=[{"student": "decoders.0", "teacher": "decoders.1", "weight": 1.0, "grid": 16}])
OFFLINE = dict(KD)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def data_args(tmp: Path, unlabelled: int = 0) -> dict:
    """The benchmark's data; with ``unlabelled`` > 0, the same 24 labelled cases (same split)
    plus that many unlabelled phantom cases, which join the training split only."""
    name = f"phantom2d_u{unlabelled}.h5" if unlabelled else "phantom2d.h5"
    return dict(path=str(tmp / name), spatial_dims=2, patch_size=[64, 64], batch_size=8, num_workers=0,
                val_fraction=0.25, samples_per_epoch=8 * STEPS_PER_EPOCH, val_batch_size=12,
                generate={"cases": LABELLED_CASES + unlabelled, "shape": [12, 64, 64], "seed": 0, "unlabelled": unlabelled})


def make_module(net_kwargs: dict, steps: int, seed: int) -> SegmentationModule:
    torch.manual_seed(seed)
    epochs = max(1, steps // STEPS_PER_EPOCH)
    return SegmentationModule(
        UNet(**net_kwargs), num_classes=NUM_CLASSES,
        optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=1e-4),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs, eta_min=5e-5),
    )


class StepTimer(pl.Callback):
    """Wall time of each training step, batch start to batch end."""

    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)


def trainer(tmp: Path, callbacks=(), max_steps: int = -1, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1 if max_steps > 0 else 1,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
                      gradient_clip_val=12.0, default_root_dir=tmp, callbacks=list(callbacks), **kw)


def fit(module, dm, tmp, steps, callbacks=()) -> float:
    start = time.perf_counter()
    trainer(tmp, callbacks, max_steps=steps).fit(module, datamodule=dm)
    return time.perf_counter() - start


def dice(module, dm, tmp) -> dict[str, float]:
    """``{"dice": mean foreground Dice, "<class>": Dice per foreground class}`` on validation."""
    out = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=tmp).validate(module, datamodule=dm, verbose=False)[0]
    return {k.removeprefix("val/").removeprefix("dice_"): float(v) for k, v in out.items() if k.startswith("val/dice")}


def save_teacher(module: SegmentationModule, path: Path) -> Path:
    """A checkpoint in the framework's format (recipe dicts as hyper-parameters)."""
    hparams = {"net": {"class_path": "trainer.models.UNet", "init_args": TEACHER_NET}, "num_classes": NUM_CLASSES}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, path)
    return path


VARIANTS = ("student alone", "student + online distillation", "student + offline distillation")
# the same two distillations with unlabelled cases added to the training data
WITH_UNLABELLED = ("student + online distillation + unlabelled cases", "student + offline distillation + unlabelled cases")


def variant_callbacks(name: str, tmp: Path) -> list:
    if name.startswith("student + online distillation"):
        return [Distillation(teacher=str(tmp / "teacher.ckpt"), **ONLINE)]
    if name.startswith("student + offline distillation"):
        cache = "teacher_logits_unlabelled.h5" if name in WITH_UNLABELLED else "teacher_logits.h5"
        return [Distillation(cache=str(tmp / cache), **OFFLINE)]
    return []


def quiet_torch(threads: int) -> None:
    """The process settings of every benchmark process: few log lines, ``threads`` threads,
    denormals flushed (tiny activations late in training otherwise slow CPU steps down)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def datamodule(tmp: Path, unlabelled: int = 0) -> HDF5SegDataModule:
    dm = HDF5SegDataModule(**data_args(tmp, unlabelled))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def train_student(name: str, seed: int, workdir: str, steps: int, threads: int, unlabelled: int) -> tuple[dict, float]:
    """One student of the table: (validation Dice per class, training wall seconds).

    Runs in a worker process when ``--workers`` > 1; the seed fixes initialisation and data
    order, so the result does not depend on which process trains it."""
    quiet_torch(threads)
    tmp = Path(workdir)
    dm = datamodule(tmp, unlabelled if name in WITH_UNLABELLED else 0)
    log(f"{name}, seed {seed}: {steps} steps")
    pl.seed_everything(seed, verbose=False)
    student = make_module(STUDENT_NET, steps, seed=seed)
    seconds = fit(student, dm, tmp, steps, variant_callbacks(name, tmp))
    scores = dice(student, dm, tmp)
    log(f"{name}, seed {seed}: Dice {scores['dice']:.4f} "
        f"({', '.join(f'{k} {v:.3f}' for k, v in scores.items() if k != 'dice')}), {seconds:.0f} s")
    return scores, seconds


def run_students(jobs: list[tuple[str, int]], tmp: Path, args) -> list[tuple[dict, float]]:
    """``train_student`` for each (variant, seed), in ``args.workers`` processes of ``args.threads`` threads."""
    work = [(name, seed, str(tmp), args.student_steps, args.threads, args.unlabelled) for name, seed in jobs]
    if args.workers <= 1:
        return [train_student(*w) for w in work]
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(train_student, *zip(*work)))


def step_times(dm, tmp, repeats: int, steps: int) -> dict[str, float]:
    """Median step time per variant, variants interleaved within each repeat."""
    short = dict(zip(VARIANTS, ("alone", "online", "offline")))
    times = {name: [] for name in short.values()}
    modules = {name: make_module(STUDENT_NET, 1000, seed=1) for name in VARIANTS}
    for _ in range(repeats):
        for name in VARIANTS:
            timer = StepTimer()
            trainer(tmp, [*variant_callbacks(name, tmp), timer], max_steps=steps).fit(modules[name], datamodule=dm)
            times[short[name]] += timer.times[1:]  # first step of a fit warms up
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--teacher", default=None,
                   help="a teacher.ckpt written by an earlier run of this script (same data): reused, not trained")
    p.add_argument("--student-steps", type=int, default=3000)
    p.add_argument("--unlabelled", type=int, default=54,
                   help="unlabelled phantom cases added to the training data of the '+ unlabelled cases' "
                        "variants (0: leave those variants out)")
    p.add_argument("--seeds", type=int, default=3,
                   help="train each student variant with this many seeds (init + data order); Dice is their mean")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--timing-steps", type=int, default=6, help="steps per timing fit")
    p.add_argument("--quick", action="store_true", help="tiny budget: checks the script runs, numbers meaningless")
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    p.add_argument("--workdir", default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 by default: on a shared 2-core machine two OpenMP threads stall at "
                        "barriers whenever another process holds a core (steps ran 5-10x slower)")
    p.add_argument("--workers", type=int, default=1,
                   help="train the students in this many processes (of --threads threads each); Dice does not "
                        "change, the step timing still runs alone at the end")
    args = p.parse_args(argv)
    if args.quick:
        args.teacher_steps = args.student_steps = STEPS_PER_EPOCH
        args.repeats, args.timing_steps = 1, 3
    quiet_torch(args.threads)
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench_distill_"))
    tmp.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    dm = datamodule(tmp)
    variants = VARIANTS + (WITH_UNLABELLED if args.unlabelled else ())
    if args.unlabelled:  # the unlabelled cases must not change what the students are scored on
        mixed = datamodule(tmp, args.unlabelled)
        ids = lambda d, split: [d.store.cases[i].case_id for i in d.splits[split]]  # noqa: E731
        assert ids(mixed, "val") == ids(dm, "val"), "the unlabelled cases moved the validation split"

    wall, results = {}, {}
    teacher = make_module(TEACHER_NET, args.teacher_steps, seed=0)
    if args.teacher:
        log(f"teacher: {args.teacher} (given)")
        teacher.load_state_dict(torch.load(args.teacher, weights_only=True)["state_dict"])
        wall["teacher"] = float("nan")
    else:
        log(f"teacher: {args.teacher_steps} steps")
        wall["teacher"] = fit(teacher, dm, tmp, args.teacher_steps)
    results["teacher"] = dice(teacher, dm, tmp)
    teacher_ckpt = save_teacher(teacher, tmp / "teacher.ckpt")
    log(f"teacher Dice {results['teacher']['dice']:.4f}; writing the teacher-logit cache(s)")
    start = time.perf_counter()
    write_cache(tmp, teacher_ckpt, 0, "teacher_logits.h5")
    wall["cache"] = time.perf_counter() - start
    if args.unlabelled:
        write_cache(tmp, teacher_ckpt, args.unlabelled, "teacher_logits_unlabelled.h5")

    seeds = range(1, args.seeds + 1)
    per_seed = {name: [] for name in variants}
    # seed-major, so a drift in machine load hits every variant alike
    jobs = [(name, seed) for seed in seeds for name in variants]
    for (name, seed), (scores, seconds) in zip(jobs, run_students(jobs, tmp, args)):
        wall[name] = wall.get(name, 0.0) + seconds / len(seeds)
        per_seed[name].append(scores)
    for name, runs_dice in per_seed.items():
        results[name] = {k: statistics.mean(r[k] for r in runs_dice) for k in runs_dice[0]}
        results[name]["seeds"] = [r["dice"] for r in runs_dice]

    log("interleaved step timing")
    steps = step_times(dm, tmp, args.repeats, args.timing_steps)
    n_teacher = sum(p.numel() for p in UNet(**TEACHER_NET).parameters())
    n_student = sum(p.numel() for p in UNet(**STUDENT_NET).parameters())
    table = render(args, results, wall, steps, n_teacher, n_student)
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    print(json.dumps({"dice": results, "wall_s": wall, "step_s": steps}))
    return 0


def write_cache(tmp: Path, teacher_ckpt: Path, unlabelled: int, name: str) -> Path:
    """``launch.py distill-cache`` over the benchmark data (with ``unlabelled`` extra cases)."""
    recipe = tmp / f"data_u{unlabelled}.yaml"
    init_args = data_args(tmp, unlabelled)
    recipe.write_text(yaml.safe_dump({"data": {"class_path": "datamodules.hdf5.HDF5SegDataModule", "init_args": init_args}}))
    distill_cache(["--teacher", str(teacher_ckpt), "--data-config", str(recipe), "--out", str(tmp / name)])
    return tmp / name


def _arch(net: dict) -> str:
    return f"base {net['base_channels']}, depth {net['depth']}"


def render(args, results, wall, steps, n_teacher, n_student) -> str:
    classes = [k for k in results["teacher"] if k != "dice"]
    alone_seeds = results["student alone"]["seeds"]
    t = results["teacher"]["dice"]
    rows = [
        f"| model | params | val Dice | Dice - teacher | {' | '.join(classes)} | Dice per seed | vs alone, paired by seed "
        "| train wall (s) |",
        f"|---|---:|---:|---:|{'---:|' * len(classes)}---|---|---:|",
    ]
    names = ("teacher", *VARIANTS, *(n for n in WITH_UNLABELLED if n in results))
    for name in names:
        arch = _arch(TEACHER_NET if name == "teacher" else STUDENT_NET)
        n = n_teacher if name == "teacher" else n_student
        d = results[name]["dice"]
        delta = "-" if name == "teacher" else f"{100 * (d - t):+.2f} pt"
        per_class = " | ".join(f"{results[name][c]:.3f}" for c in classes)
        seeds = results[name].get("seeds", [])
        paired = [100 * (a - b) for a, b in zip(seeds, alone_seeds)]
        vs_alone = (f"{statistics.mean(paired):+.2f} pt (min {min(paired):+.2f}, max {max(paired):+.2f})"
                    if paired and name != "student alone" else "-")
        rows.append(f"| {name} (U-Net {arch}) | {n:,} | {d:.4f} | {delta} | {per_class} | "
                    f"{' '.join(f'{x:.4f}' for x in seeds) or '-'} | {vs_alone} | {'- (reused)' if wall[name] != wall[name] else f'{wall[name]:.0f}'} |")
    rows += [
        "",
        f"Parameter ratio student/teacher: {n_student / n_teacher:.3f}. Teacher {args.teacher_steps} steps"
        f"{' (trained by an earlier run of this script, reused: ' + args.teacher + ')' if args.teacher else ''}, "
        f"students {args.student_steps} steps each (batch 8, 64x64), {args.seeds} seed(s) per student variant "
        f"(Dice and wall time: their mean), {args.threads} torch thread(s). "
        f"Teacher-logit cache: {wall['cache']:.0f} s."
        + (f" '+ unlabelled cases': {args.unlabelled} unlabelled phantom cases join the labelled "
           "training cases (the teacher's soft targets are their only signal; validation unchanged)." if args.unlabelled else ""),
        "",
        "| step (median of interleaved repeats) | ms | ratio to student alone |",
        "|---|---:|---:|",
    ]
    for name in ("alone", "online", "offline"):
        rows.append(f"| {name} | {1000 * steps[name]:.1f} | {steps[name] / steps['alone']:.2f}x |")
    alone = results["student alone"]["dice"]
    distilled = {name: results[name]["dice"] for name in names[2:]}
    best = max(distilled, key=distilled.get)
    goals = [(f"distilled student within 1 Dice point of the teacher (best: {best}, {100 * (distilled[best] - t):+.2f})",
              t - distilled[best] <= 0.01)]
    goals += [(f"{name} above the student alone ({100 * (d - alone):+.2f} points)", d > alone) for name, d in distilled.items()]
    goals.append(("offline step <= 1.15x student-alone step", steps["offline"] / steps["alone"] <= 1.15))
    rows += ["", *[f"- {'met' if ok else 'MISSED'}: {goal}" for goal, ok in goals]]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
