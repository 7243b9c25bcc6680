"""Every GPU path of the framework, run for real in one ~10-minute slot on 1-8 GPUs, as a PASS/FAIL table.

    python benchmarks/gpu_check.py [--out DIR] [--gpus N] [--budget SECONDS] [--dry-run]

The CPU test-suite cannot exercise what only GPUs do: NCCL refuses CPU tensors, DeepSpeed
casts the model and its batches to half precision, CUDA fake-quant kernels want float32
scales, TensorRT builds engines. This script runs each of those paths through the user's own
commands (``launch.py fit`` with the shipped strategy fragments, ``launch.py export``), on
tiny phantom data so that the whole list fits a 10-minute slot:

* teacher: 1 GPU, fp32 (the starting point of the distillation checks);
* DDP pruning on all GPUs, 16-mixed: a Taylor round in ``setup`` (collectives before the
  strategy moved the model) and one at epoch 1 (optimizer rebuild);
* DeepSpeed ZeRO-2 and ZeRO-3, each with bf16-mixed and 16-mixed: online distillation (KD and
  a FitNets adapter) plus QAT with fixed scales, on all GPUs;
* unlabelled distillation (a third of the training cases have no label), DDP, bf16-mixed;
* export ``onnx-fp16`` of the pruned DDP student, verified;
* ``tensorrt`` FP16 (float student) and INT8 (QAT student) with the per-layer precision
  report, and FP16 requested on the QAT model (Q/DQ needs the INT8 flag);
* latency of the INT8 and the FP16 engine of the same architecture, timed interleaved.

Each check has a time limit; when the budget runs out the rest are skipped (SKIP). Exit 0
when nothing FAILed. Results: the table on stdout and ``OUT/gpu_check.md``/``.json``. On a
machine without CUDA it says so and exits 0; ``--dry-run`` writes the recipes and checks that
each parses (works anywhere).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FRAGMENTS = ROOT / "recipes" / "strategy"
NUM_CLASSES = 5


# ----------------------------------------------------------------------------- recipes
def _net(base: int, depth: int, norm: str) -> dict:
    return {"class_path": "trainer.models.UNet",
            "init_args": {"spatial_dims": 2, "in_channels": 1, "num_classes": NUM_CLASSES, "depth": depth,
                          "base_channels": base, "norm": norm}}


def _data(out: Path, unlabelled: int = 0) -> dict:
    cases = 12 + unlabelled
    return {"class_path": "datamodules.hdf5.HDF5SegDataModule", "init_args": {
        "path": str(out / "data" / f"phantom2d_u{unlabelled}.h5"), "spatial_dims": 2, "patch_size": [64, 64],
        "batch_size": 8, "num_workers": 2, "val_fraction": 0.25, "samples_per_epoch": 64,
        "generate": {"cases": cases, "shape": [8, 64, 64], "seed": 0, "unlabelled": unlabelled}}}


def _recipe(run: Path, data: dict, net: dict, *, devices: int, precision: str, callbacks: list, epochs: int = 2,
            accelerator: str = "gpu") -> dict:
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(run / "checkpoints"), "filename": "last", "enable_version_counter": False}}
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": accelerator, "devices": devices, "precision": precision, "max_epochs": epochs,
                    "use_distributed_sampler": False, "default_root_dir": str(run), "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
                    "callbacks": [checkpoint, *callbacks]},
        "model": {"net": net, "num_classes": NUM_CLASSES,
                  "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.002}}},
        "data": data,
    }


def _distill(teacher: Path, features: bool = True) -> dict:
    args: dict = {"teacher": str(teacher), "kd_weight": 0.5}
    if features:  # student decoders.0 (32 channels) -> teacher decoders.0 (64): a 1x1 adapter
        args["features"] = [{"student": "decoders.0", "teacher": "decoders.0", "weight": 0.5}]
    return {"class_path": "trainer.callbacks.distill.Distillation", "init_args": args}


QAT = {"class_path": "trainer.callbacks.qat.QuantizationAwareTraining",
       "init_args": {"calib_batches": 2, "calibration": "percentile"}}
PRUNE = {"class_path": "trainer.callbacks.prune.PruneRetrain",
         "init_args": {"target_ratio": 0.5, "rounds": 2, "epochs_per_round": 1, "importance": "taylor",
                       "taylor_batches": 2}}
TEACHER_NET, STUDENT_NET = _net(32, 3, "batch"), _net(16, 3, "instance")


@dataclass
class Fit:
    name: str
    recipe: dict
    fragment: str | None = None

    def command(self, out: Path) -> list[str]:
        path = out / "recipes" / f"{self.name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.recipe, sort_keys=False))
        extra = ["--config", str(FRAGMENTS / self.fragment)] if self.fragment else []
        return [sys.executable, str(ROOT / "launch.py"), "fit", "--config", str(path), *extra]


def fits(out: Path, gpus: int, accelerator: str = "gpu") -> dict[str, Fit]:
    """The training runs, by check name (their order is the order they run in). With
    ``accelerator="cpu"`` (a smoke test of this script), fp16 becomes bf16: CPUs have no fp16."""
    data, teacher = _data(out), out / "teacher" / "checkpoints" / "last.ckpt"
    half = "16-mixed" if accelerator == "gpu" else "bf16-mixed"
    unit = "GPU" if accelerator == "gpu" else "CPU rank"
    recipe = lambda run, *a, **kw: _recipe(out / run, *a, accelerator=accelerator, **kw)  # noqa: E731
    runs = {f"teacher (1 {unit}, fp32)": Fit("teacher", recipe("teacher", data, TEACHER_NET, devices=1,
                                                                precision="32-true", callbacks=[]))}
    runs[f"DDP prune, Taylor rounds in setup + epoch 1 ({gpus} {unit}s, {half})"] = Fit(
        "ddp_prune", recipe("ddp_prune", data, STUDENT_NET, devices=gpus, precision=half, callbacks=[PRUNE]), "ddp.yaml")
    for stage in (2, 3):
        for precision in dict.fromkeys(("bf16-mixed", half)):
            name = f"zero{stage}_{precision.split('-')[0]}"
            runs[f"ZeRO-{stage} {precision}: distill (KD + adapter) + QAT ({gpus} {unit}s)"] = Fit(
                name, recipe(name, data, STUDENT_NET, devices=gpus, precision=precision,
                             callbacks=[QAT, _distill(teacher)]), f"deepspeed_zero{stage}.yaml")
    runs[f"unlabelled distillation, DDP bf16-mixed ({gpus} {unit}s)"] = Fit(
        "unlabelled", recipe("unlabelled", _data(out, unlabelled=6), STUDENT_NET, devices=gpus,
                             precision="bf16-mixed", callbacks=[_distill(teacher, features=False)]), "ddp.yaml")
    return runs


# ----------------------------------------------------------------------------- running
@dataclass
class Result:
    check: str
    status: str  # PASS, FAIL, SKIP
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Runner:
    out: Path
    budget: float
    started: float = field(default_factory=time.monotonic)
    results: list[Result] = field(default_factory=list)

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def run(self, check: str, action: Callable[[float], str], limit: float, needs: tuple[str, ...] = ()) -> bool:
        """Run ``action(timeout)`` (returns a detail line, raises on failure); record the row."""
        missing = [n for n in needs if not any(r.check == n and r.status == "PASS" for r in self.results)]
        if missing:
            return self._add(Result(check, "SKIP", 0.0, f"needs: {missing[0]}"))
        timeout = min(limit, self.left() - 5)
        if timeout < 20:
            return self._add(Result(check, "SKIP", 0.0, "time budget spent"))
        t0 = time.monotonic()
        try:
            detail, status = action(timeout), "PASS"
        except Exception as exc:  # noqa: BLE001 - every failure becomes a FAIL row
            detail, status = " ".join(str(exc).split())[-300:], "FAIL"
        return self._add(Result(check, status, time.monotonic() - t0, detail))

    def _add(self, result: Result) -> bool:
        self.results.append(result)
        print(f"[gpu_check] {result.status:4s} {result.seconds:6.1f}s  {result.check}: {result.detail}", flush=True)
        return result.status == "PASS"

    def command(self, cmd: list[str], timeout: float, log: str) -> str:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
        env.pop("COMPRESSSEG_ALLOW_CPU", None)  # a broken CUDA must fail here, not train on the CPU
        path = self.out / "logs" / f"{log}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as fh:
            done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
        if done.returncode != 0:
            tail = path.read_text().strip().splitlines()[-3:]
            raise RuntimeError(f"exit {done.returncode} ({path}): {' | '.join(tail)}")
        return str(path)


def _fit_action(runner: Runner, fit: Fit) -> Callable[[float], str]:
    def action(timeout: float) -> str:
        runner.command(fit.command(runner.out), timeout, fit.name)
        status = json.loads((runner.out / fit.name / "fit_status.json").read_text())
        if not status.get("completed"):
            raise RuntimeError(f"fit stopped early: {status}")
        return f"{status['global_step']} steps; {_checkpoint_facts(runner.out / fit.name / 'checkpoints' / 'last.ckpt')}"
    return action


def _checkpoint_facts(path: Path) -> str:
    from trainer.checkpointing import load_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):
        ckpt = load_checkpoint(path)  # a ZeRO directory is consolidated
    weights = ckpt["state_dict"]
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise RuntimeError(f"non-finite weights in {path}: {bad[:3]}")
    scales = [float(v) for k, v in weights.items() if k.endswith("input_quant.scale")]
    if scales and min(scales) <= 0:
        raise RuntimeError(f"uncalibrated activation scales in {path}")
    kind = "ZeRO directory" if path.is_dir() else "file"
    return f"checkpoint {kind}, {len(weights)} tensors finite" + (f", {len(scales)} scales calibrated" if scales else "")


def _export_action(runner: Runner, ckpt: Path, fmt: str, name: str, *extra: str,
                   expect: Callable[[dict], str] | None = None) -> Callable[[float], str]:
    def action(timeout: float) -> str:
        out = runner.out / "export" / name
        runner.command([sys.executable, str(ROOT / "launch.py"), "export", "--ckpt", str(ckpt), "--format", fmt,
                        "--out", str(out), "--overwrite", *extra], timeout, f"export_{name}")
        card = json.loads((out / "model_card.json").read_text())
        detail = f"verified={card['verification']['passed']}"
        return detail + ("; " + expect(card) if expect else "")
    return action


def _engine_report(want: str) -> Callable[[dict], str]:
    def check(card: dict) -> str:
        details = card["details"]
        counts = details["layer_precisions"]["by_output_precision"]
        if details["precision_built"] != want or not counts.get(want):
            raise RuntimeError(f"built {details['precision_built']} with layer outputs {counts}, wanted {want}")
        fp32 = len(details.get("fp32_constrained_layers", []))
        notes = f"; note: {details['notes'][0][:80]}" if details.get("notes") else ""
        return f"{details['gpu']}, TensorRT {details['tensorrt']}, layers by output precision {counts}, {fp32} pinned FP32{notes}"
    return check


def _latency_action(runner: Runner, engines: dict[str, Path], repeats: int = 15, calls: int = 20):
    def action(timeout: float) -> str:
        ms = engine_latency(engines, repeats, calls)
        int8, fp16 = ms["int8"], ms["fp16"]
        runner.latency = {k: round(v, 4) for k, v in ms.items()}  # type: ignore[attr-defined]
        return f"median ms per batch: INT8 {int8:.3f}, FP16 {fp16:.3f}; INT8 {fp16 / int8:.2f}x faster"
    return action


def engine_latency(engines: dict[str, Path], repeats: int, calls: int) -> dict[str, float]:
    """Median ms per call of each engine at its profile's largest input, interleaved rounds."""
    import torch

    from trainer.export.formats.tensorrt_engine import TrtPredictor

    runs = {}
    for name, artifact in engines.items():
        card = json.loads((artifact.parent / "model_card.json").read_text())
        shape = tuple(card["details"]["profile"]["max"])
        pred = TrtPredictor(artifact)
        x = torch.randn(shape, device="cuda", dtype=pred._torch_dtype(pred.input))
        pred.context.set_input_shape(pred.input, shape)
        out = torch.empty(tuple(pred.context.get_tensor_shape(pred.output)), device="cuda",
                          dtype=pred._torch_dtype(pred.output))
        pred.context.set_tensor_address(pred.input, x.data_ptr())
        pred.context.set_tensor_address(pred.output, out.data_ptr())
        runs[name] = (pred, x, out)
    stream = torch.cuda.current_stream()
    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(repeats):
        for name in (list(engines) if r % 2 == 0 else list(reversed(engines))):
            pred = runs[name][0]
            for _ in range(3):  # warm
                pred.context.execute_async_v3(stream.cuda_stream)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(calls):
                pred.context.execute_async_v3(stream.cuda_stream)
            end.record(stream)
            end.synchronize()
            times[name].append(start.elapsed_time(end) / calls)
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------- the plan
def plan(runner: Runner, gpus: int, accelerator: str = "gpu") -> None:
    out = runner.out
    runs = fits(out, gpus, accelerator)
    names = list(runs)
    teacher = names[0]
    for name, fit in runs.items():
        runner.run(name, _fit_action(runner, fit), limit=240, needs=() if name == teacher else (
            (teacher,) if "distill" in name else ()))
    zero2_bf16 = next(n for n in names if n.startswith("ZeRO-2 bf16"))
    pruned = next(n for n in names if n.startswith("DDP prune"))
    unlabelled = next(n for n in names if n.startswith("unlabelled"))
    ckpt = lambda name: out / runs[name].name / "checkpoints" / "last.ckpt"  # noqa: E731
    # onnx-fp16 is for float networks (a QAT checkpoint is refused): the pruned, fp16-trained student
    runner.run("export onnx-fp16 (pruned DDP student)", _export_action(runner, ckpt(pruned), "onnx-fp16", "onnx_fp16"),
               limit=180, needs=(pruned,))
    if accelerator != "gpu":
        return  # TensorRT needs a GPU
    fp16, int8 = "tensorrt FP16 + precision report (float student)", "tensorrt INT8 + precision report (QAT student)"
    runner.run(fp16, _export_action(runner, ckpt(unlabelled), "tensorrt", "trt_fp16", "--precision", "fp16",
                                    "--max-batch", "8", expect=_engine_report("fp16")), limit=240, needs=(unlabelled,))
    runner.run(int8, _export_action(runner, ckpt(zero2_bf16), "tensorrt", "trt_int8", "--precision", "int8",
                                    "--max-batch", "8", expect=_engine_report("int8")), limit=240, needs=(zero2_bf16,))
    runner.run("tensorrt --precision fp16 of the QAT student builds INT8 (Q/DQ)",
               _export_action(runner, ckpt(zero2_bf16), "tensorrt", "trt_qdq_fp16", "--precision", "fp16",
                              expect=_engine_report("int8")), limit=240, needs=(zero2_bf16,))
    engines = {"int8": out / "export" / "trt_int8" / "model.engine", "fp16": out / "export" / "trt_fp16" / "model.engine"}
    runner.run("latency: TensorRT INT8 vs FP16 engines (same U-Net, batch 8, 64x64)", _latency_action(runner, engines),
               limit=120, needs=(fp16, int8))


def environment() -> str:
    import torch

    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}), NCCL "
             f"{'.'.join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else '-'}"]
    for module in ("lightning", "deepspeed", "tensorrt", "onnxruntime"):
        try:
            lines.append(f"{module} {__import__(module).__version__}")
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            lines.append(f"{module} unavailable ({type(exc).__name__})")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(gpus)} x {gpus[0] if gpus else 'no GPU'}; " + ", ".join(lines)


def table(results: list[Result], env: str) -> str:
    rows = ["| check | result | s | detail |", "|---|---|---:|---|"]
    rows += [f"| {r.check} | **{r.status}** | {r.seconds:.0f} | {r.detail.replace('|', '/')} |" for r in results]
    return f"{env}\n\n" + "\n".join(rows) + "\n"


def dry_run(out: Path, gpus: int) -> int:
    """Write every recipe and parse it as ``launch.py fit`` would (no GPU needed)."""
    from trainer.recipe_cli import run_lightning_cli

    for name, fit in fits(out, gpus).items():
        cmd = fit.command(out)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
            run_lightning_cli([*cmd[2:], "--print_config"])
        if "class_path: trainer.models.UNet" not in buf.getvalue():
            print(f"[gpu_check] recipe of {name!r} does not parse:\n{buf.getvalue()[-1000:]}")
            return 1
        print(f"[gpu_check] plan: {name}: {' '.join(cmd[2:])}")
    for step in ("export onnx-fp16", "tensorrt FP16 + precision report", "tensorrt INT8 + precision report",
                 "tensorrt --precision fp16 of the QAT student", "latency: TensorRT INT8 vs FP16"):
        print(f"[gpu_check] plan: {step}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu_check", help="work and results folder (default runs/gpu_check)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs for the multi-GPU checks (default: all, at most 8)")
    p.add_argument("--budget", type=float, default=570, help="seconds for everything (default 570)")
    p.add_argument("--dry-run", action="store_true", help="write and parse the recipes only; no GPU needed")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the training and ONNX checks on CPU ranks (gloo, bf16 for fp16): tests this script's "
                        "plumbing where there is no GPU; proves nothing about GPUs")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    import torch

    if args.dry_run:
        return dry_run(out, args.gpus or 2)
    accelerator = "cpu" if args.cpu_smoke else "gpu"
    if accelerator == "gpu" and not torch.cuda.is_available():
        build = torch.version.cuda or "none (a CPU build)"
        print(f"gpu_check: no CUDA device on this machine (torch {torch.__version__}, CUDA build {build}); "
              "nothing to check. Run it on a machine with 1-8 NVIDIA GPUs.")
        return 0
    available = torch.cuda.device_count() if accelerator == "gpu" else 2
    gpus = max(1, min(args.gpus or available, available, 8))
    env = environment() if accelerator == "gpu" else f"CPU smoke test ({gpus} CPU ranks over gloo; no GPU involved)"
    print(f"[gpu_check] {env}", flush=True)
    runner = Runner(out, args.budget)
    plan(runner, gpus, accelerator)
    text = table(runner.results, env)
    print("\n" + text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(text)
    (out / "gpu_check.json").write_text(json.dumps({"environment": env, "gpus": gpus, "latency_ms": getattr(runner, "latency", None),
                                                    "results": [r.__dict__ for r in runner.results]}, indent=1))
    return 1 if any(r.status == "FAIL" for r in runner.results) else 0


if __name__ == "__main__":
    sys.exit(main())
