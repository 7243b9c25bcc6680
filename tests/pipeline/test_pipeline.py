"""launch.py pipeline / report end to end on tiny stages, including a kill and a resume."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
from test_fit_cli import ROOT, launch, tiny_recipe  # noqa: E402

from trainer.errors import UserError  # noqa: E402
from trainer.pipeline import has_checkpoint, load_pipeline, set_dotted  # noqa: E402


def write_pipeline(tmp: Path, teacher_epochs: int = 2, student_epochs: int = 2) -> Path:
    recipe = tiny_recipe(tmp, epochs=teacher_epochs, n_train=8)
    spec = {
        "run_dir": str(tmp / "pipe"),
        "stages": [
            {"name": "teacher", "recipe": str(recipe), "export": ["onnx"]},
            {"name": "student", "set": {"trainer.max_epochs": student_epochs,
                                        "model.net.init_args.base_channels": 4},
             "inputs": {"model.init_from": "teacher"}, "export": ["onnx"]},
        ],
        "goals": {"class_dice_drop_points": {"default": 3, "organ2": 100}},
    }
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_set_dotted_walks_lists_by_class_name():
    recipe = {"trainer": {"callbacks": [{"class_path": "a.B", "init_args": {"x": 1}}, {"class_path": "a.C"}]}}
    set_dotted(recipe, "trainer.callbacks.C.y", 2, "t")
    set_dotted(recipe, "trainer.callbacks.B.x", 3, "t")
    assert recipe["trainer"]["callbacks"] == [{"class_path": "a.B", "init_args": {"x": 3}},
                                              {"class_path": "a.C", "init_args": {"y": 2}}]
    with pytest.raises(UserError, match="'D' matches 0 entries"):
        set_dotted(recipe, "trainer.callbacks.D.z", 1, "t")


def test_unknown_input_stage_is_named(tmp_path):
    path = write_pipeline(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["stages"][1]["inputs"] = {"model.init_from": "teachr"}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match="unknown stage 'teachr'.*teacher"):
        load_pipeline(path)


def test_a_stage_resumes_from_any_checkpoint(tmp_path):
    """Not only last.ckpt: requeue.ckpt (a stage requeued before its first epoch ended), a
    monitor or an every-N-steps checkpoint resume it too (--ckpt_path last picks among them)."""
    assert not has_checkpoint(tmp_path)
    (tmp_path / "export" / "onnx").mkdir(parents=True)
    (tmp_path / "export" / "onnx" / "x.ckpt").touch()
    assert not has_checkpoint(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "requeue.ckpt").touch()
    assert has_checkpoint(tmp_path)


def test_report_on_directory_without_runs(tmp_path, subprocess_env):
    proc = launch(["report", str(tmp_path)], subprocess_env, check=False)
    assert proc.returncode == 2 and "has no runs" in proc.stderr


@pytest.mark.slow
def test_pipeline_runs_resumes_after_kill_skips_and_refuses_changes(tmp_path, subprocess_env):
    path = write_pipeline(tmp_path, teacher_epochs=6)
    run_dir = tmp_path / "pipe"
    # 1) kill the pipeline in the middle of the teacher stage (after its first checkpoint)
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "pipeline", str(path)], cwd=ROOT,
                            env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    last = run_dir / "teacher" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    # SIGTERM to the pipeline process alone (not its group): it must stop its stage too
    os.kill(proc.pid, signal.SIGTERM)
    try:
        out = proc.communicate(timeout=120)[0].decode()
        stage_cmd = str(run_dir / "teacher" / "recipe.yaml")
        orphans = [p for p in Path("/proc").glob("[0-9]*") if stage_cmd in _cmdline(p)]
    finally:
        with contextlib.suppress(ProcessLookupError):  # safety net: a failure leaves nothing running
            os.killpg(proc.pid, signal.SIGKILL)
    assert last.exists(), "the teacher stage never wrote a checkpoint"
    assert proc.returncode == 2 and "stopped by signal 15" in out, out[-2000:]
    assert not orphans, f"the stage outlived the pipeline: {orphans}"
    assert not json.loads((run_dir / "teacher" / "stage.json").read_text())["complete"]
    # 2) run again: the teacher resumes from its last checkpoint, then the student runs
    out = launch(["pipeline", str(path)], subprocess_env).stdout
    assert "teacher: resume" in out and "student: train" in out
    for stage in ("teacher", "student"):
        status = json.loads((run_dir / stage / "stage.json").read_text())
        assert status["complete"] and (run_dir / stage / "export" / "onnx" / "model_card.json").exists()
    report = json.loads((run_dir / "report.json").read_text())
    assert [(r["stage"], r["kind"]) for r in report["rows"]] == [
        ("teacher", "pytorch"), ("teacher", "onnx"), ("student", "pytorch"), ("student", "onnx")]
    assert all(r["latency_ms"] > 0 and 0 <= r["dice"] <= 1 for r in report["rows"])
    assert report["goals"] and {"goal", "value", "target", "met"} <= set(report["goals"][0])
    assert (run_dir / "report.png").stat().st_size > 0 and (run_dir / "qualitative.png").stat().st_size > 0
    # every foreground class checked against the limit the pipeline file states for it
    per_class = {g["class"]: g for g in report["goals"] if "final" in g}
    assert {c: g["limit"] for c, g in per_class.items()} == {"organ1": 3, "organ2": 100}
    assert report["failing_classes"] == [c for c, g in per_class.items() if not g["met"]]
    assert per_class["organ2"]["met"] == (per_class["organ2"]["value"] <= 100)
    md = (run_dir / "report.md").read_text()
    assert "| class | teacher | final | drop | limit | |" in md and "| organ2 |" in md
    assert (run_dir / "per_class.png").stat().st_size > 0
    # 3) a third run skips both stages
    out = launch(["pipeline", str(path), "--no-report"], subprocess_env).stdout
    assert "teacher: complete, skipped" in out and "student: complete, skipped" in out
    # 4) a changed recipe for a complete stage is refused, then rerun on request
    spec = yaml.safe_load(path.read_text())
    spec["stages"][1]["set"]["trainer.max_epochs"] = 1
    path.write_text(yaml.safe_dump(spec))
    proc = launch(["pipeline", str(path), "--no-report"], subprocess_env, check=False)
    assert proc.returncode == 2 and "stage 'student'" in proc.stderr and "--rerun-changed" in proc.stderr
    out = launch(["pipeline", str(path), "--no-report", "--rerun-changed"], subprocess_env).stdout
    assert "teacher: complete, skipped" in out and "student: train" in out


def _cmdline(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_submit_pipeline_dry_run_quotes_and_validates(tmp_path, subprocess_env):
    path = write_pipeline(tmp_path)
    out = launch(["submit", "--pipeline", str(path), "--gpus-per-node", "0", "--time", "01:00:00",
                  "--job-name", "p; touch pwned", "--dry-run"], subprocess_env).stdout
    assert "#SBATCH --requeue" in out and "#SBATCH --signal=USR1@" in out
    assert f"pipeline {path}" in out and "--job-name='p; touch pwned'" in out
    bad = launch(["submit", "--pipeline", str(tmp_path / "nope.yaml"), "--gpus-per-node", "0",
                  "--time", "01:00:00", "--dry-run"], subprocess_env, check=False)
    assert bad.returncode == 2 and "nope.yaml" in bad.stderr


# ---------------------------------------------------------------- hostile pipeline files (issue 17)
def _with(tmp_path: Path, edit) -> Path:
    path = write_pipeline(tmp_path)
    spec = yaml.safe_load(path.read_text())
    edit(spec)
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".", "/tmp/abs", "x\ny", "", "-rf"])
def test_stage_names_that_leave_run_dir_are_refused(tmp_path, name):
    path = _with(tmp_path, lambda s: s["stages"][0].update(name=name))
    with pytest.raises(UserError, match="(must be a plain folder name|must be a mapping with a 'name')") as info:
        load_pipeline(path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.update(run_dir="/"), "run_dir='/' must name a folder"),
    (lambda s: s["stages"][1].update(set=["trainer.max_epochs", 3]), "'set' must be a mapping"),
    (lambda s: s["stages"][1].update(inputs="teacher"), "'inputs' must be a mapping"),
    (lambda s: s["stages"][1].update(export="onnx"), "'export' must be a list"),
    (lambda s: s["stages"][1].update(export=[{"format": "onnx"}]), "'export' must be a list"),
])
def test_malformed_stage_fields_are_one_line(tmp_path, edit, words):
    with pytest.raises(UserError, match=words):
        load_pipeline(_with(tmp_path, edit))


def test_pipeline_file_alias_bomb_fifo_and_non_mapping_recipe(tmp_path):
    from hostile import make_fifo
    from test_inputs import alias_bomb

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    with pytest.raises(UserError, match="through its aliases"):
        load_pipeline(bomb)
    with pytest.raises(UserError, match="is a FIFO"):
        load_pipeline(make_fifo(tmp_path / "fifo.yaml"))
    listed = tmp_path / "list.yaml"
    listed.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="is not a mapping of recipe keys"):
        load_pipeline(_with(tmp_path, lambda s: s["stages"][0].update(recipe=str(listed))))


def test_rerun_changed_never_deletes_outside_run_dir(tmp_path, monkeypatch):
    from trainer.pipeline import Runner, Stage

    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "stage.json").write_text(json.dumps({"recipe_sha256": "old"}))
    runner = Runner(tmp_path / "run", [Stage("x", {})], rerun_changed=True)
    monkeypatch.setattr(Runner, "stage_dir", lambda self, stage: outside)  # as a name like '../precious' would
    with pytest.raises(UserError, match="not a folder of run_dir"):
        runner.run()
    assert (outside / "stage.json").exists()
