"""The goals a compression pipeline states, and their check against the report's measurements.

A pipeline file says what its deployable artifact must keep, next to the artifact it names
(``final``)::

    final: qat/onnx-int8-cpu
    goals:
      latency_speedup: 20            # final artifact vs the teacher's PyTorch eager run (>= x)
      size_reduction: 10             # teacher ONNX file / final artifact file (>= x)
      dice_drop_points: 1.5          # mean foreground Dice, teacher -> final (<= points)
      fp32_artifact_dice_points: 0.1 # every FP32 ONNX vs its own PyTorch model (<= points)
      class_dice_drop_points: 3      # EVERY foreground class, teacher -> final (<= points);
                                     #   or per class: {default: 3, lesion: 4}
      teacher_class_dice: {lesion: 0.4}   # classes the teacher must have learned (>= Dice)

Keys left out take the defaults below (``SCALARS``, ``CLASS_DROP_DEFAULT``). A mean Dice can hide a class that
compression lost (a lesion is a quarter of a four-class mean), so every foreground class is
checked on its own, and a class the teacher never learned cannot be "kept": that is what
``teacher_class_dice`` is for. Class names are the data's (``class_names`` of its header);
the pipeline refuses a name the data does not have before it trains anything. The report
lists the drop of every class next to its limit and flags the classes that fail.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer import atomic
from trainer.errors import UserError

SCALARS = {  # key: (default, what, comparison)
    "latency_speedup": (20.0, "latency: final artifact vs teacher PyTorch eager", ">="),
    "size_reduction": (10.0, "size on disk: teacher ONNX vs final artifact", ">="),
    "dice_drop_points": (1.5, "Dice drop, teacher -> final artifact", "<="),
    "fp32_artifact_dice_points": (0.1, "Dice, {stage} ONNX vs its PyTorch", "<="),
}
CLASS_DROP_DEFAULT = 3.0
KEYS = sorted([*SCALARS, "class_dice_drop_points", "teacher_class_dice"])


@dataclass(frozen=True)
class Goals:
    """Parsed goals; ``class_drop`` maps class names to their own limit (others: ``class_drop_default``)."""

    latency_speedup: float = SCALARS["latency_speedup"][0]
    size_reduction: float = SCALARS["size_reduction"][0]
    dice_drop_points: float = SCALARS["dice_drop_points"][0]
    fp32_artifact_dice_points: float = SCALARS["fp32_artifact_dice_points"][0]
    class_drop_default: float = CLASS_DROP_DEFAULT
    class_drop: dict[str, float] = field(default_factory=dict)
    teacher_class_dice: dict[str, float] = field(default_factory=dict)

    def class_limit(self, name: str) -> float:
        return self.class_drop.get(name, self.class_drop_default)

    def named_classes(self) -> set[str]:
        return set(self.class_drop) | set(self.teacher_class_dice)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form (what ``parse_goals`` reads), e.g. to record with a run."""
        return {**{k: getattr(self, k) for k in SCALARS},
                "class_dice_drop_points": {"default": self.class_drop_default, **self.class_drop},
                "teacher_class_dice": dict(self.teacher_class_dice)}


def _number(value: Any, where: str, *, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        bounds = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        raise UserError(f"{where}={value!r} must be a number {bounds}")
    return float(value)


def parse_goals(raw: Any, where: str) -> Goals:
    """The ``goals:`` mapping of a pipeline file (``None``: every default)."""
    if raw is None:
        return Goals()
    if not isinstance(raw, dict):
        raise UserError(f"{where}: goals must be a mapping of {KEYS}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise UserError(f"{where}: goals has unknown keys {unknown}; allowed: {KEYS}")
    scalars = {k: _number(raw[k], f"{where}: goals.{k}") for k in SCALARS if k in raw}
    drop = raw.get("class_dice_drop_points", CLASS_DROP_DEFAULT)
    per_class: dict[str, float] = {}
    if isinstance(drop, dict):
        per_class = {str(c): _number(v, f"{where}: goals.class_dice_drop_points.{c}") for c, v in drop.items()}
        default = per_class.pop("default", CLASS_DROP_DEFAULT)
    elif drop is None or isinstance(drop, (list, str)):
        raise UserError(f"{where}: goals.class_dice_drop_points={drop!r} must be a number of points >= 0 or a "
                        "mapping {default: 3, CLASS: points}")
    else:
        default = _number(drop, f"{where}: goals.class_dice_drop_points")
    learned = raw.get("teacher_class_dice", {})
    if not isinstance(learned, dict):
        raise UserError(f"{where}: goals.teacher_class_dice must map class names to a Dice in [0, 1], got {learned!r}")
    teacher = {str(c): _number(v, f"{where}: goals.teacher_class_dice.{c}", high=1.0) for c, v in learned.items()}
    return Goals(**scalars, class_drop_default=default, class_drop=per_class, teacher_class_dice=teacher)


def check_class_names(goals: Goals, class_names: list[str], where: str) -> None:
    """Refuse goals that name a class the data does not have (a typo would never be checked)."""
    foreground = list(class_names[1:])
    unknown = sorted(goals.named_classes() - set(foreground))
    if unknown:
        raise UserError(f"{where}: goals name classes {unknown} that the data does not have; foreground classes: {foreground}")


def check_goals(rows: list, final_name: str | None = None, goals: Goals | None = None) -> list[dict[str, Any]]:
    """Every goal as ``{goal, value, target, met}`` (+ ``class`` for per-class ones), measured
    between the first stage's PyTorch row (the teacher) and ``final_name`` (``STAGE/FORMAT``;
    default the last row). ``rows`` are the report's rows (stage, kind, size_bytes, dice,
    latency_ms, per_class_dice)."""
    goals = goals or Goals()
    teacher = next(r for r in rows if r.kind == "pytorch")
    final = next((r for r in rows if f"{r.stage}/{r.kind}" == final_name), rows[-1])
    teacher_size = next((r.size_bytes for r in rows if r.stage == teacher.stage and r.kind == "onnx"), teacher.size_bytes)
    checks: list[tuple[str, float, str, float, str, dict[str, Any]]] = [
        (SCALARS["latency_speedup"][1], teacher.latency_ms / final.latency_ms, ">=", goals.latency_speedup, "x", {}),
        (SCALARS["size_reduction"][1], teacher_size / final.size_bytes, ">=", goals.size_reduction, "x", {}),
        (SCALARS["dice_drop_points"][1], 100 * (teacher.dice - final.dice), "<=", goals.dice_drop_points, "points", {}),
    ]
    for name, value in teacher.per_class_dice.items():
        # NaN (the class is in none of the validation cases) is not met: nothing shows it was kept
        kept = final.per_class_dice.get(name, float("nan"))
        checks.append((f"Dice drop of {name}, teacher -> final artifact", 100 * (value - kept), "<=",
                       goals.class_limit(name), "points", {"class": name, "teacher": value, "final": kept}))
    for name, minimum in goals.teacher_class_dice.items():
        checks.append((f"{name} learned by the teacher (Dice)", teacher.per_class_dice.get(name, float("nan")), ">=",
                       minimum, "", {"class": name}))
    for r in rows:
        if r.kind == "onnx":
            torch_row = next(p for p in rows if p.stage == r.stage and p.kind == "pytorch")
            checks.append((SCALARS["fp32_artifact_dice_points"][1].format(stage=r.stage), 100 * abs(r.dice - torch_row.dice),
                           "<=", goals.fp32_artifact_dice_points, "points", {}))
    out = []
    for text, value, op, target, unit, extra in checks:
        met = bool(value >= target if op == ">=" else value <= target)  # NaN: not met
        out.append({"goal": text, "value": round(value, 3), "target": f"{op} {target:g} {unit}".rstrip(), "met": met,
                    "limit": target, **extra})
    return out


def failing_classes(checked: list[dict[str, Any]]) -> list[str]:
    """Classes with at least one missed goal, in the order the goals were checked."""
    seen: list[str] = []
    for g in checked:
        if not g["met"] and g.get("class") and g["class"] not in seen:
            seen.append(g["class"])
    return seen


def goals_markdown(checked: list[dict[str, Any]], final_name: str | None) -> str:
    """The goal table, the per-class Dice drop table (failing classes flagged) and a verdict
    line that names every failing class."""
    if not checked:
        return ""
    per_class = [g for g in checked if "final" in g]
    head = f"| goal (final artifact: `{final_name or 'the last row'}`) | value | target | |\n|---|---:|---|---|\n"
    body = "".join(f"| {g['goal']} | {g['value']} | {g['target']} | {_flag(g['met'], 'met', 'MISSED')} |\n"
                   for g in checked if g not in per_class)
    failing = failing_classes(checked)
    missed = sum(not g["met"] for g in checked)
    verdict = (f"**{missed} goal(s) missed; failing classes: {', '.join(failing)}.**" if failing else
               f"**{missed} goal(s) missed.**" if missed else "All goals met.")
    return head + body + "\n" + class_drop_markdown(per_class) + "\n" + verdict + "\n"


def class_drop_markdown(per_class: list[dict[str, Any]]) -> str:
    """One row per foreground class: its Dice for the teacher and the final artifact, the drop
    in points and its limit; a class over its limit is flagged FAILS."""
    if not per_class:
        return ""
    rows = "".join(
        f"| {g['class']} | {g['teacher']:.3f} | {g['final']:.3f} | {g['value']:+.1f} | {g['limit']:g} | "
        f"{_flag(g['met'], 'kept', 'FAILS' if math.isfinite(g['value']) else 'FAILS (not in the validation cases)')} |\n"
        for g in per_class)
    return ("Dice per foreground class, teacher -> final artifact (drop in points; limit: "
            "`goals.class_dice_drop_points`):\n\n| class | teacher | final | drop | limit | |\n"
            "|---|---:|---:|---:|---:|---|\n" + rows)


def _flag(met: bool, yes: str, no: str) -> str:
    return yes if met else f"**{no}**"


RECORD = "pipeline.json"


def record(run_dir: Path, pipeline: Path, final: str | None, goals: Goals) -> None:
    """Write the pipeline's ``final`` and goals into its run folder, so ``launch.py report
    RUN_DIR`` checks the same goals later without being told them again."""
    atomic.write_text(run_dir / RECORD, json.dumps({"pipeline": str(pipeline), "final": final, "goals": goals.to_dict()},
                                                   indent=1))


def recorded(run_dir: Path) -> tuple[str | None, Goals | None]:
    """``(final, goals)`` recorded by the pipeline that made ``run_dir`` (``(None, None)`` if none)."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return None, None
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc}); delete it or rerun the pipeline") from None
    return spec.get("final"), parse_goals(spec.get("goals"), str(path))
