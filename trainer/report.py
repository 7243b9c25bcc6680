"""``python launch.py report RUN_DIR``: what each compression stage cost and kept.

For every stage of a pipeline run (or a single training run), from its checkpoint and its
exported artifacts: parameters, MACs, file size, Dice and HD95 of the PyTorch model and of
each artifact on the whole validation set (every case, unless ``--max-batches`` says
otherwise, and then the report says so), predicted through ``trainer.inference.predict_logits``
with the model's own inference settings (``model.sw_overlap`` included) and scored by
``trainer.metrics.SegmentationMetrics``: the code and settings validation and export
verification use. CPU latency at batch 1 on one thread, PyTorch eager and onnxruntime, all
timed interleaved in this one run. Writes ``report.md``, ``report.json``, ``report.png`` (Dice
vs latency, marker area by file size), ``per_class.png`` and ``qualitative.png``, and checks the
pipeline's goals (``trainer.goals``: the mean and every foreground class, teacher -> final).
"""
from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    hd95: float  # mm, mean over foreground classes of the per-class mean over cases
    latency_ms: float = float("nan")
    path: str = ""
    per_class_dice: dict[str, float] = field(default_factory=dict)
    per_class_hd95: dict[str, float] = field(default_factory=dict)
    case_dice: float = float("nan")  # per-case Dice, mean over cases and foreground classes
    missed: int = 0  # (case, class) pairs in the label that the model did not predict at all
    spurious: int = 0  # (case, class) pairs predicted where the label has none


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
QUALITATIVE_BATCHES = 8  # batches kept in memory for the qualitative figure


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def score_model(fn, run, max_batches: int | None):
    """``(scores, kept batches, their predictions)`` of ``fn`` over the validation set."""
    from trainer.inference import predict_logits
    from trainer.metrics import SegmentationMetrics

    metric = SegmentationMetrics(run.num_classes, run.class_names, keep_cases=True)
    kept, preds = [], []
    for i, batch in enumerate(itertools.islice(run.datamodule.val_dataloader(), max_batches)):
        pred = predict_logits(fn, batch["image"], settings=run.module.inference).argmax(1)
        metric.update(pred, batch["label"], batch)
        if i < QUALITATIVE_BATCHES:
            kept.append(batch)
            preds.append(pred)
    return metric.compute(), kept, preds


def _row(name: str, kind: str, params: int, macs: int, size: int, path: str, scores) -> Row:
    return Row(name, kind, params, macs, size, _nan(scores.mean_dice), _nan(scores.mean_hd95), path=path,
               per_class_dice={k: _nan(v) for k, v in scores.dice.items()},
               per_class_hd95={k: _nan(v) for k, v in scores.hd95.items()},
               case_dice=_nan(scores.mean_case_dice), missed=sum(scores.missed.values()),
               spurious=sum(scores.spurious.values()))


def _example(batches, run) -> torch.Tensor:
    image = batches[0]["image"][:1]
    if run.roi_size is not None:  # 3D: latency of one sliding window
        image = image[(slice(None), slice(None), *[slice(0, r) for r in run.roi_size])]
    from trainer.inference import pad_to_multiple

    return pad_to_multiple(image, run.divisor)[0].contiguous()


def evaluate_stage(name: str, ckpt: Path, exports: dict[str, str], max_batches: int | None):
    from trainer.export.onnx_tools import OrtPredictor, ort_session
    from trainer.latency import ort_runner, torch_runner
    from trainer.prune.measure import count_macs, count_params
    from trainer.restore import restore_run

    run = restore_run(ckpt)
    net = run.net.eval()
    scores, batches, preds = score_model(net, run, max_batches)
    example = _example(batches, run)
    params, macs = count_params(net), count_macs(net, example)
    weights_bytes = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    rows = [_row(name, "pytorch", params, macs, weights_bytes, str(ckpt), scores)]
    runners = {(name, "pytorch"): torch_runner(net, example)}
    notes = []
    for fmt, directory in exports.items():
        card = json.loads((Path(directory) / "model_card.json").read_text())
        artifact = Path(directory) / card["artifact"]["file"]
        if artifact.suffix != ".onnx":
            continue  # TensorRT engines are measured on their GPU, not here
        notes += _card_mismatch(f"{name}/{fmt}", card, run)
        a_scores, _, _ = score_model(OrtPredictor(ort_session(artifact)), run, max_batches)
        rows.append(_row(name, fmt, params, macs, int(card["artifact"]["bytes"]), str(artifact), a_scores))
        runners[(name, fmt)] = ort_runner(str(artifact), example)
    evaluation = {"stage": name, "cases": scores.cases, "partial_cases": scores.partial_cases, "scope": scores.scope,
                  "inference": run.module.inference.card(), "max_batches": max_batches,
                  "preprocessing": getattr(run.datamodule, "preprocessing", None), "per_case": scores.per_case}
    return rows, runners, (run, batches, preds), evaluation, notes


def _card_mismatch(what: str, card: dict, run) -> list[str]:
    """An artifact whose card describes other inputs than the data it is scored on here."""
    notes = []
    recorded = (card.get("preprocessing") or {})
    data = getattr(run.datamodule, "preprocessing", None)
    if recorded.get("recorded") and data is not None:
        from datamodules.preprocess import match_record

        expected = {k: v for k, v in recorded.items() if k not in ("recorded", "steps")}
        try:
            if match_record(expected, data, "the validation data") != "same":
                notes.append(f"{what}: its card's preprocessing differs from the validation data's (raw intensities)")
        except Exception as err:  # a UserError naming the difference
            notes.append(f"{what}: {err}")
    overlap = (card.get("input") or {}).get("sliding_window_overlap")
    if overlap is not None and run.module.roi_size and abs(float(overlap) - run.module.sw_overlap) > 1e-9:
        notes.append(f"{what}: exported with sliding-window overlap {overlap}, the model's is {run.module.sw_overlap}")
    return notes


# ---------------------------------------------------------------- goals and output
def to_markdown(rows: list[Row], goals: list[dict[str, Any]], evaluations: list[dict[str, Any]] | None = None,
                notes: list[str] | None = None, final: str | None = None) -> str:
    head = ("| stage | artifact | params | MMACs | size (MB) | Dice | HD95 (mm) | CPU latency (ms) |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r.stage} | {r.kind} | {r.parameters:,} | {r.macs / 1e6:.1f} | {r.size_bytes / 1e6:.2f} | "
        f"{r.dice:.4f} | {r.hd95:.2f} | {r.latency_ms:.2f} |\n" for r in rows)
    return (head + body + "\nLatency: batch 1, one thread, median of interleaved rounds in this run; "
            "PyTorch rows are eager FP32, artifact rows onnxruntime CPU. Size of a PyTorch row is its weights (state dict).\n\n"
            + evaluation_markdown(rows, evaluations or [], notes or []) + goals_lib.goals_markdown(goals, final))


def evaluation_markdown(rows: list[Row], evaluations: list[dict[str, Any]], notes: list[str]) -> str:
    """How the scores were computed (set, settings, definitions), per-class scores, warnings."""
    from datamodules.preprocess import describe_record
    from trainer.metrics import CONVENTION

    lines = []
    for ev in evaluations[:1] + [e for e in evaluations[1:] if e["cases"] != evaluations[0]["cases"]]:
        scope = f"the first {ev['max_batches']} validation batches (--max-batches)" if ev["max_batches"] else \
            "the whole validation set"
        partial = f", {ev['partial_cases']} of them cut short" if ev["partial_cases"] else ""
        inf = ev["inference"]
        window = (f"sliding window {inf['roi_size']}, overlap {inf['sliding_window_overlap']} (model.sw_overlap), "
                  f"{inf['sliding_window_mode']}" if inf["roi_size"] else f"whole slices padded to a multiple of {inf['divisor']}")
        lines.append(f"Scored on {scope}: {ev['cases']} cases{partial} ({ev['scope']}), {window}.")
    lines.append("Dice: pooled over every voxel of those cases, mean over foreground classes. HD95: mm, per case "
                 f"volume and class, mean over cases then classes; {CONVENTION} (missed / spurious pairs are counted "
                 "in the per-class table).")
    record = next((e["preprocessing"] for e in evaluations if e.get("preprocessing")), None)
    lines.append("Data preprocessing (recorded in the data file and in every artifact's model card): "
                 + ("; ".join(describe_record(record)) if record else "not recorded in the data file") + ".")
    lines += [f"**Warning**: {n}" for n in notes]
    names = list(rows[0].per_class_dice) if rows else []
    table = ("\n| stage | artifact | " + " | ".join(f"{n} Dice / HD95" for n in names) + " | missed | spurious |\n"
             "|---|---|" + "---:|" * len(names) + "---:|---:|\n")
    table += "".join(f"| {r.stage} | {r.kind} | " + " | ".join(
        f"{r.per_class_dice.get(n, float('nan')):.3f} / {r.per_class_hd95.get(n, float('nan')):.1f}" for n in names)
        + f" | {r.missed} | {r.spurious} |\n" for r in rows)
    return "\n\n".join(lines) + "\n" + table + "\n"


def write_report(run_dir: str | Path, max_batches: int | None = None, wandb_project: str | None = None,
                 final: str | None = None, goals: goals_lib.Goals | None = None) -> Path:
    """Evaluate every stage of ``run_dir`` on the whole validation set (or its first
    ``max_batches`` batches) and write the report; ``final`` (``STAGE/FORMAT``) picks the
    deployable artifact the goals are checked on, ``goals`` their limits (both default to what
    the pipeline recorded in ``run_dir``, else the last row and ``trainer.goals``' defaults)."""
    from trainer.latency import time_interleaved
    from trainer.report_plots import plot_per_class, plot_qualitative, plot_tradeoff

    run_dir = Path(run_dir)
    stages = find_stages(run_dir)
    recorded_final, recorded_goals = goals_lib.recorded(run_dir)
    final, goals = final or recorded_final, goals or recorded_goals or goals_lib.Goals()
    rows: list[Row] = []
    runners: dict = {}
    views, evaluations, notes = [], [], []
    for name, ckpt, exports in stages:
        print(f"[report] evaluating {name} ({ckpt})", flush=True)
        stage_rows, stage_runners, view, evaluation, stage_notes = evaluate_stage(name, ckpt, exports, max_batches)
        rows += stage_rows
        runners.update(stage_runners)
        views.append((name, view))
        evaluations.append(evaluation)
        notes += stage_notes
    print("[report] timing all models interleaved (batch 1, 1 thread)", flush=True)
    times = time_interleaved(runners)
    for r in rows:
        r.latency_ms = 1000 * times[(r.stage, r.kind)]
    goals_lib.check_class_names(goals, ["background", *rows[0].per_class_dice], f"report {run_dir}")
    checked = goals_lib.check_goals(rows, final, goals) if len(stages) > 1 else []
    md = to_markdown(rows, checked, evaluations, notes, final)
    (run_dir / "report.md").write_text(f"# Compression report: {run_dir}\n\n" + md +
                                       "\n![tradeoff](report.png)\n![Dice per class](per_class.png)\n")
    (run_dir / "report.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "goals": checked,
                                                     "failing_classes": goals_lib.failing_classes(checked),
                                                     "evaluation": evaluations, "notes": notes}, indent=1, default=float))
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
    parser.add_argument("--max-batches", type=int, default=None, help="score only the first N validation batches "
                        "(default: the whole validation set; the report says when it was cut)")
    parser.add_argument("--final", metavar="STAGE/FORMAT", help="the deployable artifact goals are checked on "
                        "(default: the last artifact of the last stage)")
    parser.add_argument("--wandb", metavar="PROJECT", help="also log table and plots to this W&B project "
                        "(offline unless WANDB_MODE/WANDB_API_KEY say otherwise)")
    args = parser.parse_args(argv)
    write_report(args.run_dir, args.max_batches, args.wandb, args.final)
    return 0
