"""``python launch.py report RUN_DIR``: what each compression stage cost and kept.

For every stage of a pipeline run (or a single training run), from its checkpoint and its
exported artifacts: parameters, MACs, file size, Dice and HD95 of the PyTorch model and of
each artifact on the validation set (both through ``trainer.inference.predict_logits``),
and CPU latency at batch 1 on one thread, PyTorch eager and onnxruntime, all timed
interleaved in this one run. Writes ``report.md``, ``report.json``, ``report.png`` (Dice vs
latency, marker area by file size), ``per_class.png`` and ``qualitative.png``, and checks the
pipeline's goals (``trainer.goals``: the mean and every foreground class, teacher -> final).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import goals as goals_lib
from trainer.errors import UserError


@dataclass
class Row:
    stage: str
    kind: str  # "pytorch" or an export format
    parameters: int
    macs: int
    size_bytes: int
    dice: float
    hd95: float
    latency_ms: float = float("nan")
    path: str = ""
    per_class_dice: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- discovery
def find_stages(run_dir: Path) -> list[tuple[str, Path, dict[str, str]]]:
    """(name, checkpoint, {format: export dir}) for each finished stage, in pipeline order."""
    if not run_dir.is_dir():
        raise UserError(f"report: {run_dir} is not a directory")
    stages = []
    for status_file in run_dir.glob("*/stage.json"):
        status = json.loads(status_file.read_text())
        if status.get("complete"):
            stages.append((status.get("index", 0), status_file.parent.name, Path(status["checkpoint"]),
                           status.get("exports", {})))
    if stages:
        return [(name, ckpt, exports) for _, name, ckpt, exports in sorted(stages)]
    for name in ("best.ckpt", "last.ckpt"):  # a single training run
        ckpt = run_dir / "checkpoints" / name
        if ckpt.exists():
            exports = {d.name: str(d) for d in (run_dir / "export").glob("*") if (d / "model_card.json").exists()}
            return [(run_dir.name, ckpt, exports)]
    raise UserError(f"report: {run_dir} has no runs (no */stage.json of a finished pipeline stage and no checkpoints/*.ckpt)")


# ---------------------------------------------------------------- evaluation
def _scores(fn, batches, run) -> tuple[float, float, dict[str, float], list[torch.Tensor]]:
    from monai.metrics import compute_hausdorff_distance
    from torchmetrics.segmentation import DiceScore

    from trainer.inference import predict_logits

    dice = DiceScore(num_classes=run.num_classes, include_background=False, average="none",
                     aggregation_level="global", input_format="index")
    hd: list[np.ndarray] = []
    preds = []
    for batch in batches:
        pred = predict_logits(fn, batch["image"], run.roi_size, 0.5, run.divisor).argmax(1)
        dice.update(pred, batch["label"])
        onehot = lambda t: torch.nn.functional.one_hot(t, run.num_classes).movedim(-1, 1)  # noqa: E731
        hd.append(compute_hausdorff_distance(onehot(pred), onehot(batch["label"]), percentile=95).numpy())
        preds.append(pred)
    per_class = dice.compute().reshape(-1)  # 0-d for one foreground class (binary)
    hd_all = np.concatenate(hd, 0)
    hd95 = float(np.nanmean(np.where(np.isfinite(hd_all), hd_all, np.nan))) if np.isfinite(hd_all).any() else float("nan")
    names = run.class_names[1:]
    return (float(torch.nanmean(per_class)), hd95,
            {n: float(v) for n, v in zip(names, per_class)}, preds)


def _example(batches, run) -> torch.Tensor:
    image = batches[0]["image"][:1]
    if run.roi_size is not None:  # 3D: latency of one sliding window
        image = image[(slice(None), slice(None), *[slice(0, r) for r in run.roi_size])]
    from trainer.inference import pad_to_multiple

    return pad_to_multiple(image, run.divisor)[0].contiguous()


def evaluate_stage(name: str, ckpt: Path, exports: dict[str, str], max_batches: int):
    from trainer.export.onnx_tools import OrtPredictor, ort_session
    from trainer.latency import ort_runner, torch_runner
    from trainer.prune.measure import count_macs, count_params
    from trainer.restore import restore_run

    run = restore_run(ckpt)
    batches = [b for _, b in zip(range(max_batches), run.datamodule.val_dataloader())]
    example = _example(batches, run)
    net = run.net.eval()
    params, macs = count_params(net), count_macs(net, example)
    dice, hd95, per_class, preds = _scores(net, batches, run)
    weights_bytes = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    rows = [Row(name, "pytorch", params, macs, weights_bytes, dice, hd95, path=str(ckpt),
                per_class_dice=per_class)]
    runners = {(name, "pytorch"): torch_runner(net, example)}
    for fmt, directory in exports.items():
        card = json.loads((Path(directory) / "model_card.json").read_text())
        artifact = Path(directory) / card["artifact"]["file"]
        if artifact.suffix != ".onnx":
            continue  # TensorRT engines are measured on their GPU, not here
        a_dice, a_hd95, a_per_class, _ = _scores(OrtPredictor(ort_session(artifact)), batches, run)
        rows.append(Row(name, fmt, params, macs, int(card["artifact"]["bytes"]), a_dice, a_hd95,
                        path=str(artifact), per_class_dice=a_per_class))
        runners[(name, fmt)] = ort_runner(str(artifact), example)
    return rows, runners, (run, batches, preds)


# ---------------------------------------------------------------- goals and output
def to_markdown(rows: list[Row], goals: list[dict[str, Any]], final: str | None = None) -> str:
    head = "| stage | artifact | params | MMACs | size (MB) | Dice | HD95 (vox) | CPU latency (ms) |\n|---|---|---:|---:|---:|---:|---:|---:|\n"
    body = "".join(
        f"| {r.stage} | {r.kind} | {r.parameters:,} | {r.macs / 1e6:.1f} | {r.size_bytes / 1e6:.2f} | "
        f"{r.dice:.4f} | {r.hd95:.2f} | {r.latency_ms:.2f} |\n" for r in rows)
    return (head + body + "\nLatency: batch 1, one thread, median of interleaved rounds in this run; "
            "PyTorch rows are eager FP32, artifact rows onnxruntime CPU. Size of a PyTorch row is its weights (state dict).\n\n"
            + goals_lib.goals_markdown(goals, final))


def write_report(run_dir: str | Path, max_batches: int = 8, wandb_project: str | None = None,
                 final: str | None = None, goals: goals_lib.Goals | None = None) -> Path:
    """Evaluate every stage of ``run_dir`` and write the report; ``final`` (``STAGE/FORMAT``)
    picks the deployable artifact the goals are checked on, ``goals`` their limits (both default
    to what the pipeline recorded in ``run_dir``, else the last row and ``trainer.goals``' defaults)."""
    from trainer.latency import time_interleaved
    from trainer.report_plots import plot_per_class, plot_qualitative, plot_tradeoff

    run_dir = Path(run_dir)
    stages = find_stages(run_dir)
    recorded_final, recorded_goals = goals_lib.recorded(run_dir)
    final, goals = final or recorded_final, goals or recorded_goals or goals_lib.Goals()
    rows: list[Row] = []
    runners: dict = {}
    views = []
    for name, ckpt, exports in stages:
        print(f"[report] evaluating {name} ({ckpt})", flush=True)
        stage_rows, stage_runners, view = evaluate_stage(name, ckpt, exports, max_batches)
        rows += stage_rows
        runners.update(stage_runners)
        views.append((name, view))
    print("[report] timing all models interleaved (batch 1, 1 thread)", flush=True)
    times = time_interleaved(runners)
    for r in rows:
        r.latency_ms = 1000 * times[(r.stage, r.kind)]
    goals_lib.check_class_names(goals, ["background", *rows[0].per_class_dice], f"report {run_dir}")
    checked = goals_lib.check_goals(rows, final, goals) if len(stages) > 1 else []
    md = to_markdown(rows, checked, final)
    (run_dir / "report.md").write_text(f"# Compression report: {run_dir}\n\n" + md +
                                       "\n![tradeoff](report.png)\n![Dice per class](per_class.png)\n")
    (run_dir / "report.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "goals": checked,
                                                     "failing_classes": goals_lib.failing_classes(checked)},
                                                    indent=1, default=float))
    plot_tradeoff(rows, run_dir / "report.png")
    plot_per_class(rows, run_dir / "per_class.png")
    # teacher next to the stage of the deployable artifact (``final``), else the last stage
    shown = next((v for v in views if final and v[0] == final.split("/")[0]), views[-1])
    plot_qualitative(views[0][1], shown[1], views[0][0], shown[0], run_dir / "qualitative.png")
    if wandb_project:
        _log_wandb(run_dir, rows, wandb_project)
    print("\n" + md)
    print(f"[report] {run_dir / 'report.md'}, report.json, report.png, per_class.png, qualitative.png")
    return run_dir / "report.md"


def _log_wandb(run_dir: Path, rows: list[Row], project: str) -> None:
    import wandb

    run = wandb.init(project=project, name=f"report-{run_dir.name}", dir=str(run_dir), job_type="report")
    columns = ["stage", "artifact", "parameters", "macs", "size_bytes", "dice", "hd95", "latency_ms"]
    table = wandb.Table(columns=columns, data=[[getattr(r, c if c != "artifact" else "kind") for c in columns] for r in rows])
    run.log({"compression/table": table, "compression/tradeoff": wandb.Image(str(run_dir / "report.png")),
             "compression/qualitative": wandb.Image(str(run_dir / "qualitative.png"))})
    run.finish()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch.py report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--max-batches", type=int, default=8, help="validation batches to score (default 8)")
    parser.add_argument("--final", metavar="STAGE/FORMAT", help="the deployable artifact goals are checked on "
                        "(default: the last artifact of the last stage)")
    parser.add_argument("--wandb", metavar="PROJECT", help="also log table and plots to this W&B project "
                        "(offline unless WANDB_MODE/WANDB_API_KEY say otherwise)")
    args = parser.parse_args(argv)
    write_report(args.run_dir, args.max_batches, args.wandb, args.final)
    return 0
