"""Fault campaign: kill or signal the shipped 2D recipe at random steps, resume, compare bitwise.

    .venv/bin/python benchmarks/bench_faults.py [--faults 3] [--seed 0] [--workdir DIR] [--out FILE.md]

The run is ``recipes/unet2d_phantom.yaml`` as shipped (HDF5 datamodule, ``num_workers: 2``,
its ``best.ckpt`` monitor checkpoint and its ``last.ckpt``) with small overrides: U-Net base 8,
3 epochs of 64 samples (24 batches of 8), and one more ModelCheckpoint every 3 optimizer steps
(keeping 2), so resume has monitor, per-epoch, every-N-steps and requeue checkpoints to choose
from. Two variants: fp32, and bf16-mixed with ``accumulate_grad_batches 2``.

Per fault kind and variant, ``--faults`` runs each (kinds interleaved), every fault at a random
training batch (mid-accumulation included):

* ``SIGKILL`` to the run's process group (main process and loader workers): restart with
  ``--ckpt_path last-or-fresh`` (from scratch when killed before the first checkpoint);
* ``SIGTERM`` / ``USR1`` to the whole process group, as Slurm signals every process of a job
  step: the run is a Slurm job to ``launch.py`` (``SLURM_JOB_ID`` set, a stand-in ``scontrol``
  that records requeue requests on ``PATH``); it must checkpoint at its next safe point and ask
  for one requeue; the restart is what the sbatch template runs (``SLURM_RESTART_COUNT=1``,
  ``--ckpt_path last-or-fresh``).

Per kind it prints: faults injected, runs that resumed (restart ran to the end from a checkpoint
and reported it), runs that finished instead (the signal came during the last step: the run
ends rather than requeueing, as it should), final weights bitwise equal to the uninterrupted run of that variant (every
tensor of the state dict), steps lost beyond the last safe point (SIGKILL: newest checkpoint on
disk after the kill minus the step resumed from; TERM/USR1: steps trained before the signal
minus the step of the requeue checkpoint), steps redone (SIGKILL: since the last checkpoint),
the longest time from the signal to the requeue checkpoint on disk, and requeue requests.
Goal: every fault resumed, all bitwise equal, 0 steps lost beyond the last safe point.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import yaml

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
RECIPE = ROOT / "recipes" / "unet2d_phantom.yaml"
EPOCHS, SAMPLES, BATCH = 3, 64, 8
VARIANTS = {"fp32": {"precision": "32-true", "accumulate": 1}, "bf16-mixed, accumulate 2": {"precision": "bf16-mixed", "accumulate": 2}}
KINDS = ("SIGKILL", "SIGTERM", "USR1")


class StepProbe(pl.Callback):
    """Recipe callback (``bench_faults.StepProbe``): rank 0 appends ``batches global_step time``
    after every training batch, so the harness knows where the run is when it injects."""

    def __init__(self, path: str):
        self.path = path
        self._batches = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._batches = trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        if trainer.is_global_zero:
            with open(self.path, "a") as fh:
                fh.write(f"{self._batches} {trainer.global_step} {time.time():.3f}\n")


# ============================================================================ recipes
def make_recipe(run: Path, data: Path, variant: dict) -> Path:
    """The shipped recipe, isolated in ``run`` (trainer.pipeline's own isolation), small overrides."""
    from trainer.pipeline import _isolate, set_dotted

    recipe = yaml.safe_load(RECIPE.read_text())
    where = f"bench_faults ({RECIPE.name})"
    for key, value in {"trainer.max_epochs": EPOCHS, "trainer.precision": variant["precision"],
                       "trainer.accumulate_grad_batches": variant["accumulate"], "trainer.enable_progress_bar": False,
                       "trainer.log_every_n_steps": 1, "model.net.init_args.base_channels": 8,
                       "model.lr_scheduler.init_args.T_max": EPOCHS, "data.init_args.path": str(data),
                       "data.init_args.samples_per_epoch": SAMPLES, "data.init_args.batch_size": BATCH}.items():
        set_dotted(recipe, key, value, where)
    recipe["trainer"]["callbacks"] += [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"filename": "{step:04d}", "every_n_train_steps": 3, "save_top_k": 2, "monitor": "step",
                       "mode": "max", "save_on_train_epoch_end": True}},
        {"class_path": "bench_faults.StepProbe", "init_args": {"path": str(run / "probe.log")}},
    ]
    _isolate(recipe, run)
    run.mkdir(parents=True, exist_ok=True)
    path = run / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def base_env(fake_bin: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(BENCH), env.get("PYTHONPATH", "")])
    env.update(WANDB_MODE="offline", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if fake_bin is not None:
        env["PATH"] = f"{fake_bin}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def slurm_env(run: Path, restart: int) -> dict[str, str]:
    """A Slurm job as ``launch.py`` sees it, with a ``scontrol`` that records what it is asked."""
    fake = run / "bin"
    fake.mkdir(exist_ok=True)
    scontrol = fake / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {run / 'scontrol.calls'}\n")
    scontrol.chmod(0o755)
    return base_env(fake, SLURM_JOB_ID="4242", SLURM_JOB_NAME="bench-faults", SLURM_RESTART_COUNT=str(restart))


# ============================================================================ running
def start(recipe: Path, env: dict[str, str], extra: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "a")
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "fit", "--config", str(recipe), *extra],
                            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    return proc


def finish(proc: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid)
        proc.wait()
        return -999
    finally:
        _killpg(proc.pid)  # loader workers of a SIGKILLed main process


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def probe(run: Path) -> list[tuple[int, int, float]]:
    path = run / "probe.log"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            rows.append((int(parts[0]), int(parts[1]), float(parts[2])))
    return rows


def inject(proc: subprocess.Popen, run: Path, at_batch: int, sig: int, timeout: float = 600) -> tuple[float, int]:
    """Wait until ``at_batch`` training batches are done, then signal the process group.
    Returns (time sent, optimizer steps completed at that moment)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = probe(run)
        if rows and rows[-1][0] >= at_batch:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"run ended or stalled before batch {at_batch}; see {run / 'fit.log'}")
        time.sleep(0.01)
    sent = time.time()
    os.killpg(proc.pid, sig)
    done = [r for r in probe(run) if r[2] <= sent]
    return sent, (done[-1][1] if done else 0)


def final_state(run: Path) -> dict:
    import torch

    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def equal_weights(a: dict, b: dict) -> bool:
    import torch

    sa, sb = a["state_dict"], b["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and a["global_step"] == b["global_step"]


def newest_on_disk(run: Path) -> int:
    """The highest global step among the intact checkpoints left on disk (what resume should reach)."""
    from trainer.checkpointing import list_checkpoints, read_training_state, verify_checkpoint

    steps = []
    for path in list_checkpoints([run / "checkpoints"]):
        try:
            state = read_training_state(path)
        except Exception:  # noqa: BLE001 - an unreadable file is not a safe point
            continue
        if verify_checkpoint(path) is None:
            steps.append(state.global_step)
    return max(steps, default=0)


@dataclass
class Outcome:
    kind: str
    variant: str
    at_batch: int
    resumed: bool = False
    finished: bool = False  # the signal's safe point was the last step: the run ended instead of requeueing
    equal: bool = False
    lost_beyond: int = 0
    redone: int = 0
    to_checkpoint_s: float | None = None
    requeues: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)


def run_fault(kind: str, variant_name: str, at_batch: int, work: Path, data: Path, reference: dict, index: int) -> Outcome:
    variant = VARIANTS[variant_name]
    run = work / f"{kind.lower()}-{'bf16' if 'bf16' in variant_name else 'fp32'}-{index}"
    recipe = make_recipe(run, data, variant)
    out = Outcome(kind, variant_name, at_batch)
    log = run / "fit.log"
    sig = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "USR1": signal.SIGUSR1}[kind]
    env = base_env() if kind == "SIGKILL" else slurm_env(run, 0)
    proc = start(recipe, env, [], log)
    sent, steps_at_signal = inject(proc, run, at_batch, sig)
    code = finish(proc)
    if kind == "SIGKILL":
        on_disk = newest_on_disk(run)  # 0 when killed before the first checkpoint: restart from scratch
        restart_env, restart_args = base_env(), ["--ckpt_path", "last-or-fresh"]
    else:
        requeue_ckpt = run / "checkpoints" / "requeue.ckpt"
        if code == 0 and not requeue_ckpt.exists() and "after the last training step" in log.read_text():
            out.finished = True
            out.equal = equal_weights(final_state(run), reference)
            out.extra = {"signal_step": steps_at_signal, "resumed_from": "(finished)", "resumed_step": steps_at_signal}
            return out
        if code != 0 or not requeue_ckpt.exists():
            out.note = f"interrupted run exited {code}, requeue.ckpt {'present' if requeue_ckpt.exists() else 'missing'}"
            return out
        from trainer.checkpointing import read_training_state

        on_disk = read_training_state(requeue_ckpt).global_step
        out.to_checkpoint_s = requeue_ckpt.stat().st_mtime - sent
        calls = (run / "scontrol.calls").read_text().splitlines() if (run / "scontrol.calls").exists() else []
        out.requeues = sum(line.startswith("requeue") for line in calls)
        restart_env, restart_args = slurm_env(run, 1), ["--ckpt_path", "last-or-fresh"]
    mark = log.stat().st_size
    code = finish(start(recipe, restart_env, restart_args, log))
    text = log.read_text()[mark:]
    resumed = re.search(r"resuming from (\S+): global step (\d+)", text)
    fresh = on_disk == 0 and "starting fresh" in text
    if code != 0 or not (resumed or fresh):
        out.note = f"restart exited {code}" + ("" if resumed else ", no 'resuming from' line")
        return out
    resumed_step = int(resumed.group(2)) if resumed else 0
    out.resumed = True
    out.extra = {"signal_step": steps_at_signal, "resumed_from": Path(resumed.group(1)).name if resumed else "(fresh)",
                 "resumed_step": resumed_step, "newest_on_disk": on_disk}
    if kind == "SIGKILL":
        out.lost_beyond = on_disk - resumed_step
        out.redone = steps_at_signal - resumed_step
    else:
        out.lost_beyond = max(0, steps_at_signal - resumed_step) + (on_disk - resumed_step)
    out.equal = equal_weights(final_state(run), reference)
    return out


# ============================================================================ report
LABELS = {"SIGKILL": "SIGKILL to the process group", "SIGTERM": "SIGTERM to the process group (Slurm job)",
          "USR1": "USR1 to the process group (Slurm job)"}


def table(outcomes: list[Outcome], faults: int, seed: int, took: float, repeat_equal: dict[str, bool]) -> str:
    lines = ["| fault | precision | injected | resumed | finished instead (signal in the last step) | bitwise equal | "
             "steps lost beyond the last safe point | steps redone since the last checkpoint | "
             "signal -> checkpoint on disk, max (s) | requeue requests |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in KINDS:
        for variant in VARIANTS:
            rows = [o for o in outcomes if o.kind == kind and o.variant == variant]
            if not rows:
                continue
            times = [o.to_checkpoint_s for o in rows if o.to_checkpoint_s is not None]
            killed = kind == "SIGKILL"
            cells = [LABELS[kind], variant, len(rows), sum(o.resumed for o in rows),
                     "-" if killed else sum(o.finished for o in rows), sum(o.equal for o in rows),
                     sum(o.lost_beyond for o in rows), sum(o.redone for o in rows) if killed else "-",
                     f"{max(times):.2f}" if times else "-", "-" if killed else sum(o.requeues for o in rows)]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    met = all((o.resumed or o.finished) and o.equal for o in outcomes) and sum(o.lost_beyond for o in outcomes) == 0
    detail = "; ".join(
        f"{o.kind}/{'bf16' if 'bf16' in o.variant else 'fp32'} batch {o.at_batch}: "
        + ("signalled during the last step, the run finished" if o.finished else
           f"{o.extra['signal_step']} steps done, resumed from {o.extra['resumed_from']} at step {o.extra['resumed_step']}"
           + (f" (checkpoint {o.to_checkpoint_s:.2f} s after the signal)" if o.to_checkpoint_s is not None else "")
           if o.extra else o.note) for o in outcomes)
    repeat = ", ".join(f"{k}: {'bitwise equal' if v else 'DIFFERENT'}" for k, v in repeat_equal.items())
    return "\n".join(lines) + (
        f"\n\n{len(outcomes)} faults ({faults} per kind and precision, random batches, seed {seed}), {took / 60:.1f} min. "
        f"Recipe `{RECIPE.relative_to(ROOT)}` (HDF5, num_workers 2) with U-Net base 8, {EPOCHS} epochs x {SAMPLES} "
        f"samples, batch {BATCH}; checkpoints: best.ckpt (val/dice), last.ckpt (every validation), every 3 steps "
        f"(2 kept), requeue.ckpt. The uninterrupted run, repeated: {repeat}.\n\n"
        f"- {'met' if met else 'NOT met'}: every fault resumed (or, signalled during the last step, the run "
        "finished instead of requeueing), bitwise equal, 0 steps lost beyond the last safe point\n\n"
        f"Each fault: {detail}.\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faults", type=int, default=3, help="faults per kind and precision (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random fault batches")
    p.add_argument("--workdir", default="/tmp/compressseg-bench-faults", help="runs go here (emptied first)")
    p.add_argument("--out", help="also write the Markdown table here")
    args = p.parse_args(argv)
    import shutil

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sys.path.insert(0, str(ROOT))
    data = work / "phantom2d.h5"  # the first reference run generates it from the recipe's `generate`
    started = time.perf_counter()
    references, repeat_equal = {}, {}
    for name, variant in VARIANTS.items():
        for attempt in ("ref", "ref-again"):
            run = work / f"{attempt}-{'bf16' if 'bf16' in name else 'fp32'}"
            code = finish(start(make_recipe(run, data, variant), base_env(), [], run / "fit.log"))
            if code != 0:
                raise SystemExit(f"reference run {run} exited {code}; see {run / 'fit.log'}")
            state = final_state(run)
            if attempt == "ref":
                references[name] = state
            else:
                repeat_equal[name] = equal_weights(state, references[name])
        print(f"[bench_faults] reference {name}: {references[name]['global_step']} steps", flush=True)
    rng = random.Random(args.seed)
    outcomes = []
    for index in range(args.faults):
        for kind in KINDS:
            for name, variant in VARIANTS.items():
                at_batch = rng.randint(1, EPOCHS * SAMPLES // BATCH - 1)
                outcome = run_fault(kind, name, at_batch, work, data, references[name], index)
                outcomes.append(outcome)
                print(f"[bench_faults] {kind} {name} at batch {at_batch}: resumed={outcome.resumed} finished={outcome.finished} "
                      f"equal={outcome.equal} lost_beyond={outcome.lost_beyond} {outcome.extra or outcome.note}", flush=True)
    text = table(outcomes, args.faults, args.seed, time.perf_counter() - started, repeat_equal)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if all((o.resumed or o.finished) and o.equal and o.lost_beyond == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
