"""``launch.py submit`` without a cluster: rendering, quoting, and refusing bad input before sbatch.

A fake ``sbatch`` on PATH records whether it was called. The rendered script is also run by
bash with fake ``srun``/``scontrol``, to show that hostile values reach srun as plain
arguments and execute nothing.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from trainer import slurm_submit
from trainer.cli import main as cli_main

RECIPE = """
trainer: {{accelerator: {accelerator}, devices: {devices}, max_steps: 1, logger: false, default_root_dir: {root}}}
model:
  net: {{class_path: trainer.models.UNet, init_args: {{spatial_dims: 2, num_classes: 3, depth: 1, base_channels: 2}}}}
  num_classes: 3
data: {{class_path: tinydata.TinySegDataModule, init_args: {{size: 8, n_train: 2, n_val: 1, batch_size: 2}}}}
"""


@pytest.fixture
def fake_bin(tmp_path, monkeypatch) -> Path:
    """sbatch/srun/scontrol stand-ins that record their argv (JSON, one call per line)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, reply in (("sbatch", "4711"), ("srun", ""), ("scontrol", "n1")):
        script = bin_dir / name
        script.write_text(f"#!/usr/bin/env python3\nimport json, sys\n"
                          f"open({str(tmp_path / (name + '.calls'))!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
                          f"print({reply!r})\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def calls(fake_bin: Path, name: str) -> list[list[str]]:
    path = fake_bin / f"{name}.calls"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def recipe(tmp_path: Path, name: str = "r.yaml", devices=2, accelerator="cpu") -> Path:
    path = tmp_path / name
    path.write_text(RECIPE.format(devices=devices, accelerator=accelerator, root=tmp_path / "run"))
    return path


def submit(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli_main(["submit", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_renders_a_multi_node_cpu_job(tmp_path, fake_bin, capsys):
    code, script, _ = submit(["--config", str(recipe(tmp_path)), "--nodes", "2", "--gpus-per-node", "0",
                              "--time", "01:30:00", "--cpus-per-task", "3", "--signal-lead", "90",
                              "--partition=debug", "--dry-run", "--", "--trainer.max_steps", "7"], capsys)
    assert code == 0
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=3",
                 "#SBATCH --time=01:30:00", "#SBATCH --signal=USR1@90", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", "#SBATCH --partition=debug", "export MASTER_ADDR="):
        assert line in script, line
    assert "--gpus-per-node" not in script.split("set -euo")[0].replace("# (CPU job", "")
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--trainer.max_steps 7 --trainer.num_nodes 2 --trainer.accelerator cpu" in srun
    assert 'RESUME=(--ckpt_path last-or-fresh)' in script and "SLURM_RESTART_COUNT" in script
    assert calls(fake_bin, "sbatch") == []
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_gpu_job_single_node_and_submission_prints_the_job_id(tmp_path, fake_bin, capsys):
    cfg = recipe(tmp_path, devices=4, accelerator="gpu")
    code, out, err = submit(["--config", str(cfg), "--nodes", "1", "--gpus-per-node", "4", "--time", "4:00:00",
                             "--qos", "high", "--log-dir", str(tmp_path / "logs")], capsys)
    assert code == 0, err
    assert "submitted job 4711" in out
    [[parsable, script_path]] = calls(fake_bin, "sbatch")
    assert parsable == "--parsable"
    script = Path(script_path).read_text()
    assert "#SBATCH --gpus-per-node=4" in script and "#SBATCH --ntasks-per-node=4" in script
    assert "#SBATCH --qos high" in script and "MASTER_ADDR" not in script  # the single-node template
    assert "--trainer.accelerator cpu" not in script


def test_hostile_names_and_paths_are_quoted_and_nothing_runs(tmp_path, fake_bin, capsys):
    pwned = tmp_path / "pwned"  # every payload below would create it if a shell evaluated it
    weird_dir = tmp_path / "dir with space $(touch pwned)"
    weird_dir.mkdir()
    cfg = recipe(weird_dir, name="r;touch pwned.yaml")
    name = "x; touch pwned"
    override = f"--trainer.default_root_dir={weird_dir}/`touch pwned`"
    code, script, err = submit(["--config", str(cfg), "--nodes", "2", "--gpus-per-node", "0", "--time", "00:10:00",
                                "--job-name", name, "--dry-run", "--", override], capsys)
    assert code == 0, err
    assert "#SBATCH --job-name='x; touch pwned'" in script
    # run the script as SLURM would, with srun/scontrol faked: srun must get the values verbatim
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=dict(os.environ, SLURM_JOB_ID="1",
                          SLURM_JOB_NODELIST="n[1-2]", SLURM_RESTART_COUNT="1"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not pwned.exists() and not (kit_root() / "pwned").exists()
    [argv] = calls(fake_bin, "srun")
    assert str(cfg) in argv and override in argv
    assert argv[-2:] == ["--ckpt_path", "last-or-fresh"]  # a restarted job resumes


def kit_root() -> Path:
    return Path(slurm_submit.ROOT)


@pytest.mark.parametrize("problem,argv,needle", [
    ("unparseable recipe", ["--nodes", "1", "--gpus-per-node", "0", "--time", "1:00:00", "--", "--trainer.no_such_key", "1"],
     "no_such_key"),
    ("devices mismatch", ["--nodes", "2", "--gpus-per-node", "4", "--time", "1:00:00"], "--gpus-per-node 4"),
    ("cpu recipe on gpus", ["--nodes", "1", "--gpus-per-node", "2", "--time", "1:00:00"], "accelerator=cpu"),
    ("bad time", ["--nodes", "1", "--gpus-per-node", "0", "--time", "90 minutes"], "--time"),
    ("lead beyond limit", ["--nodes", "1", "--gpus-per-node", "0", "--time", "00:01:00"], "--signal-lead"),
    # Slurm may send USR1 60 s early: at 300-120-60 = 120 s, before start-up (120 s) is over
    ("lead leaves no training", ["--nodes", "1", "--gpus-per-node", "0", "--time", "00:05:00"], "leaves no time to train"),
    ("negative start-up", ["--nodes", "1", "--gpus-per-node", "0", "--time", "1:00:00", "--startup-time", "-1"],
     "--startup-time"),
    ("stray positional", ["--nodes", "1", "--gpus-per-node", "0", "--time", "1:00:00", "oops"], "oops"),
])
def test_bad_input_is_one_line_exit_2_and_never_reaches_sbatch(problem, argv, needle, tmp_path, fake_bin, capsys):
    code, _, err = submit(["--config", str(recipe(tmp_path)), *argv], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert calls(fake_bin, "sbatch") == [], f"{problem}: sbatch was called"


def test_recipe_with_yaml_syntax_error_and_missing_recipe(tmp_path, fake_bin, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("trainer: {devices: 2\n")
    for cfg, needle in ((broken, "broken.yaml"), (tmp_path / "absent.yaml", "does not exist")):
        code, _, err = submit(["--config", str(cfg), "--nodes", "1", "--gpus-per-node", "0", "--time", "1:00:00"], capsys)
        assert code == 2 and needle in err.splitlines()[-1], err
    assert calls(fake_bin, "sbatch") == []


def test_parse_time_forms():
    assert slurm_submit.parse_time("1-02:03:04") == 93784
    assert slurm_submit.parse_time("04:00:00") == 14400
    assert slurm_submit.parse_time("30:00") == 1800


# ---------------------------------------------------------------- line breaks in #SBATCH lines (issue 17)
def _directives(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


@pytest.mark.parametrize("option, value, needle", [
    ("--job-name", "x\ntouch pwned", "--job-name"),
    ("--job-name", "x\rtouch pwned", "--job-name"),
    ("--log-dir", "logs\ntouch pwned", "--log-dir"),
    ("--log-dir", "logs/%j", "contains '%'"),
    ("--time", "01:00:00\n", "--time"),
    ("--time", "01:00:00\ntouch pwned", "--time"),
    ("--partition", "gpu\x00x", "sbatch option '--partition'"),
    ("--comment", "a\x1bb", "sbatch option '--comment'"),
])
def test_line_breaks_and_control_characters_never_reach_a_directive(option, value, needle, tmp_path, fake_bin, capsys):
    code, _, err = submit(["--config", str(recipe(tmp_path)), "--nodes", "1", "--gpus-per-node", "0",
                           "--time", "01:00:00", option, value, "--dry-run"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert calls(fake_bin, "sbatch") == []


def test_recipe_file_name_with_a_line_break_gives_a_safe_default_job_name(tmp_path, fake_bin, capsys):
    cfg = recipe(tmp_path, name="r\ntouch pwned.yaml")
    code, script, err = submit(["--config", str(cfg), "--nodes", "1", "--gpus-per-node", "0", "--time", "00:10:00",
                                "--dry-run"], capsys)
    assert code == 0, err
    assert "#SBATCH --job-name=r_touch pwned" in script.replace("'", "")
    template = (slurm_submit.ROOT / "slurm" / "single_node.sbatch").read_text()
    assert len(_directives(script)) == len([x for x in template.splitlines() if x.startswith("#SBATCH")])
    # the path itself reaches srun shell-quoted (a line break inside quotes is part of the argument)
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=dict(os.environ, SLURM_JOB_ID="1",
                          SLURM_JOB_NODELIST="n1"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "pwned").exists() and not (kit_root() / "pwned").exists()
    assert str(cfg) in calls(fake_bin, "srun")[0]


def test_run_directory_with_a_line_break_is_refused_as_the_default_log_dir(tmp_path, fake_bin, capsys):
    cfg = recipe(tmp_path)
    code, _, err = submit(["--config", str(cfg), "--nodes", "1", "--gpus-per-node", "0", "--time", "00:10:00",
                           "--dry-run", "--", "--trainer.default_root_dir", "runs/x\ntouch pwned"], capsys)
    assert code == 2 and "--log-dir (default: from the run directory)" in err.splitlines()[-1], err


def test_short_training_window_is_accepted_with_a_warning(tmp_path, fake_bin, capsys):
    # 240 s limit, USR1 at 240-60 = 180 s or up to 60 s earlier, 90 s start-up: 30 s sure to train
    code, script, err = submit(["--config", str(recipe(tmp_path)), "--nodes", "1", "--gpus-per-node", "0",
                                "--time", "00:04:00", "--signal-lead", "60", "--startup-time", "90", "--dry-run"], capsys)
    assert code == 0 and "#SBATCH --signal=USR1@60" in script
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "only about 30s of each 240s" in warnings[0], err
    code, _, err = submit(["--config", str(recipe(tmp_path)), "--nodes", "1", "--gpus-per-node", "0",
                           "--time", "04:00:00", "--dry-run"], capsys)
    assert code == 0 and "warning" not in err
