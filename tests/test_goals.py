"""trainer/goals.py: goals parsed from a pipeline file, checked per class, flagged in the report."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from trainer.errors import UserError
from trainer.goals import Goals, check_class_names, check_goals, failing_classes, goals_markdown, parse_goals, record, \
    recorded
from trainer.pipeline import check_goal_classes, load_pipeline, pipeline_goals
from trainer.report import Row

sys.path.insert(0, str(Path(__file__).resolve().parent / "cli"))
from test_fit_cli import ROOT, launch, tiny_recipe  # noqa: E402

NAMES = ["background", "liver", "kidney", "spleen", "lesion"]


def rows(final_dice: dict[str, float], teacher_dice: dict[str, float] | None = None) -> list[Row]:
    """A teacher (PyTorch + ONNX) and a student artifact with the given per-class Dice."""
    teacher_dice = teacher_dice or {"liver": 0.90, "kidney": 0.80, "spleen": 0.70, "lesion": 0.50}
    mean = lambda d: math.fsum(v for v in d.values() if v == v) / sum(v == v for v in d.values())  # noqa: E731  (the report's nanmean)
    return [Row("teacher", "pytorch", 100, 1000, 4000, mean(teacher_dice), 1.0, 40.0, per_class_dice=teacher_dice),
            Row("teacher", "onnx", 100, 1000, 4000, mean(teacher_dice), 1.0, 20.0, per_class_dice=teacher_dice),
            Row("qat", "onnx-int8-cpu", 10, 100, 100, mean(final_dice), 1.0, 1.0, per_class_dice=final_dice)]


# ---------------------------------------------------------------- parsing
def test_defaults_and_per_class_limits():
    assert parse_goals(None, "p.yaml") == Goals()
    assert Goals().class_limit("lesion") == 3.0
    goals = parse_goals({"class_dice_drop_points": {"default": 2, "lesion": 5}, "dice_drop_points": 1,
                         "teacher_class_dice": {"lesion": 0.4}}, "p.yaml")
    assert (goals.class_limit("liver"), goals.class_limit("lesion"), goals.dice_drop_points) == (2.0, 5.0, 1.0)
    assert parse_goals({"class_dice_drop_points": 4}, "p.yaml").class_limit("kidney") == 4.0
    assert parse_goals(goals.to_dict(), "p.yaml") == goals  # what a run folder records reads back the same


@pytest.mark.parametrize("raw, words", [
    ({"class_dice_drop_points": -1}, "p.yaml: goals.class_dice_drop_points=-1 must be a number >= 0"),
    ({"class_dice_drop_points": {"lesion": -0.5}}, "goals.class_dice_drop_points.lesion=-0.5 must be a number >= 0"),
    ({"class_dice_drop_points": {"lesion": "3 points"}}, "goals.class_dice_drop_points.lesion='3 points'"),
    ({"class_dice_drop_points": [3, 4]}, "goals.class_dice_drop_points=[3, 4] must be a number of points >= 0 or a mapping"),
    ({"class_dice_drop_points": float("nan")}, "goals.class_dice_drop_points=nan"),
    ({"dice_drop_points": True}, "goals.dice_drop_points=True"),
    ({"teacher_class_dice": {"lesion": 40}}, "goals.teacher_class_dice.lesion=40 must be a number in [0, 1]"),
    ({"teacher_class_dice": ["lesion"]}, "goals.teacher_class_dice must map class names"),
    ({"class_dice_drop": 3}, "goals has unknown keys ['class_dice_drop']"),
    ([3], "goals must be a mapping"),
])
def test_bad_goals_are_one_line_errors_naming_key_and_value(raw, words):
    with pytest.raises(UserError) as err:
        parse_goals(raw, "p.yaml")
    assert words in str(err.value) and "\n" not in str(err.value)


def test_unknown_class_names_are_refused():
    goals = parse_goals({"class_dice_drop_points": {"lesoin": 4}, "teacher_class_dice": {"background": 0.5}}, "p.yaml")
    with pytest.raises(UserError, match=r"p.yaml: goals name classes \['background', 'lesoin'\] that the data does "
                                        r"not have; foreground classes: \['liver', 'kidney', 'spleen', 'lesion'\]"):
        check_class_names(goals, NAMES, "p.yaml")
    check_class_names(parse_goals({"class_dice_drop_points": {"lesion": 4}}, "p.yaml"), NAMES, "p.yaml")


@pytest.mark.parametrize("recipe", ["recipes/pipeline_unet2d.yaml", "recipes/pipeline_unet3d.yaml"])
def test_shipped_pipelines_state_a_limit_for_every_class(recipe):
    """The shipped pipelines name each phantom class, and the names are the data's."""
    path = ROOT / recipe
    _, stages = load_pipeline(path)
    goals = pipeline_goals(path)
    check_goal_classes(path, goals, stages[0])
    assert set(goals.class_drop) == set(NAMES[1:]) and "lesion" in goals.teacher_class_dice


# ---------------------------------------------------------------- checking
def test_a_class_lost_under_a_good_mean_fails_and_is_named():
    # liver gains 2 points, lesion loses 5: the mean drops only 0.75 points (goal 1.5 met)
    checked = check_goals(rows({"liver": 0.92, "kidney": 0.80, "spleen": 0.70, "lesion": 0.45}), "qat/onnx-int8-cpu")
    mean = next(g for g in checked if g["goal"].startswith("Dice drop, teacher"))
    assert mean["met"] and mean["value"] == pytest.approx(0.75)
    lesion = next(g for g in checked if g.get("class") == "lesion" and "final" in g)
    assert lesion["value"] == pytest.approx(5.0) and not lesion["met"] and lesion["target"] == "<= 3 points"
    assert failing_classes(checked) == ["lesion"]
    md = goals_markdown(checked, "qat/onnx-int8-cpu")
    assert "| lesion | 0.500 | 0.450 | +5.0 | 3 | **FAILS** |" in md
    assert "| liver | 0.900 | 0.920 | -2.0 | 3 | kept |" in md
    assert md.rstrip().endswith("**1 goal(s) missed; failing classes: lesion.**")


def test_per_class_limit_from_the_goals_decides():
    final = {"liver": 0.90, "kidney": 0.80, "spleen": 0.70, "lesion": 0.45}
    loose = parse_goals({"class_dice_drop_points": {"default": 3, "lesion": 6}}, "p.yaml")
    assert failing_classes(check_goals(rows(final), None, loose)) == []
    strict = parse_goals({"class_dice_drop_points": {"default": 0.5, "lesion": 6}}, "p.yaml")
    assert failing_classes(check_goals(rows({**final, "kidney": 0.79}), None, strict)) == ["kidney"]


def test_teacher_must_learn_a_class_and_an_unscored_class_is_not_kept():
    # the teacher never learned the lesion: "no drop" is no evidence that it was kept
    teacher = {"liver": 0.90, "kidney": 0.80, "spleen": 0.70, "lesion": 0.0}
    goals = parse_goals({"teacher_class_dice": {"lesion": 0.4}}, "p.yaml")
    checked = check_goals(rows(dict(teacher), teacher), None, goals)
    learned = next(g for g in checked if g["goal"] == "lesion learned by the teacher (Dice)")
    assert not learned["met"] and failing_classes(checked) == ["lesion"]
    # a class the final artifact has no score for (absent from the validation cases) fails, said so
    checked = check_goals(rows({"liver": 0.9, "kidney": 0.8, "spleen": 0.7, "lesion": float("nan")}))
    assert failing_classes(checked) == ["lesion"]
    assert "**FAILS (not in the validation cases)**" in goals_markdown(checked, None)
    assert all(math.isfinite(g["value"]) for g in checked if g.get("class") != "lesion")


def test_record_reads_back_and_a_corrupt_record_is_named(tmp_path):
    goals = parse_goals({"class_dice_drop_points": {"default": 2, "lesion": 4}}, "p.yaml")
    record(tmp_path, Path("p.yaml"), "qat/onnx", goals)
    assert recorded(tmp_path) == ("qat/onnx", goals)
    assert recorded(tmp_path / "none") == (None, None)
    (tmp_path / "pipeline.json").write_text(json.dumps({"goals": {"class_dice_drop_points": -2}}))
    with pytest.raises(UserError, match=r"pipeline.json: goals.class_dice_drop_points=-2 must be a number >= 0"):
        recorded(tmp_path)


# ---------------------------------------------------------------- the user's path
def test_pipeline_refuses_bad_goals_before_training(tmp_path, subprocess_env):
    """`launch.py pipeline` with a misspelled class or a negative limit: exit 2, one line
    naming the file, key and value, and nothing trained or written."""
    recipe = tiny_recipe(tmp_path)
    spec = {"run_dir": str(tmp_path / "pipe"), "stages": [{"name": "teacher", "recipe": str(recipe)}],
            "goals": {"class_dice_drop_points": {"default": 3, "organ3": 2}}}
    path = tmp_path / "pipeline.yaml"
    for goals, words in [({"class_dice_drop_points": {"default": 3, "organ3": 2}},
                          "goals name classes ['organ3'] that the data does not have; foreground classes: "
                          "['organ1', 'organ2']"),
                         ({"class_dice_drop_points": {"organ1": -3}}, "goals.class_dice_drop_points.organ1=-3")]:
        path.write_text(yaml.safe_dump({**spec, "goals": goals}))
        proc = launch(["pipeline", str(path)], subprocess_env, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and words in lines[0], proc.stderr
        assert not (tmp_path / "pipe").exists() and not (tmp_path / "run").exists()
