"""Real SLURM jobs on the local two-node cluster (tests/slurm/conftest.py): submitted with
``launch.py submit``, 2 nodes x 1 task, DDP over gloo.

1. A job trains to completion (and its hostile job name stays a name).
2. ``scancel -s USR1`` mid-training: the job checkpoints, requeues itself (same job id,
   ``SLURM_RESTART_COUNT=1``), resumes and ends with the weights of job 1, bit for bit.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
import scale_kit as kit  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
CONFIG = dict(devices=1, max_steps=10, val_every=5, keep=2)


def submit(cluster, run: Path, recipe: Path, name: str) -> str:
    env = cluster.env(kit.env_with_kit())
    done = subprocess.run([sys.executable, str(kit.ROOT / "launch.py"), "submit", "--config", str(recipe),
                           "--nodes", "2", "--gpus-per-node", "0", "--time", "00:10:00", "--signal-lead", "60",
                           "--job-name", name, "--log-dir", str(run / "slurm")],
                          cwd=kit.ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split("submitted job ")[1].split(":")[0]


def job_log(run: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run / "slurm").glob("*.out")))


def signal_when_paused(cluster, job_id: str, marker: Path, run: Path) -> None:
    """Wait for ``PauseAt``'s marker (the job is at a known step), then send SLURM's USR1."""
    deadline = time.monotonic() + 180
    while not marker.exists():
        state = cluster.job(job_id).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING") and time.monotonic() < deadline, \
            f"{state}\n{job_log(run)[-3000:]}"
        time.sleep(0.5)
    subprocess.run(["scancel", "-s", "USR1", job_id], env=cluster.env(), check=True, timeout=30)


def assert_finished(cluster, job_id: str, run: Path, restarts: int) -> dict:
    info = cluster.wait_job(job_id, timeout=240)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{job_log(run)[-4000:]}"
    assert info.get("Restarts") == str(restarts), info
    return info


@pytest.fixture(scope="module")
def reference_job(slurm_cluster, tmp_path_factory):
    run = tmp_path_factory.mktemp("slurm_ref")
    recipe = kit.write_recipe(run / "recipe.yaml", kit.recipe(run, **CONFIG))
    name = "ref; touch pwned"
    job_id = submit(slurm_cluster, run, recipe, name)
    info = assert_finished(slurm_cluster, job_id, run, restarts=0)
    return run, info, name


def test_two_node_ddp_job_trains_to_completion(reference_job):
    run, info, name = reference_job
    assert info["NumNodes"] == "2" and info["JobName"] == name
    assert not (kit.ROOT / "pwned").exists() and not (run / "pwned").exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == CONFIG["max_steps"]
    assert len(ckpt["callbacks"]["RNGState"]["ranks"]) == 2  # one RNG state per rank: a 2-process world
    assert "restart 0" in job_log(run)


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_weights(slurm_cluster, reference_job, tmp_path):
    ref_run, _, _ = reference_job
    run = tmp_path / "requeued"
    marker = run / "paused"
    pause = {"class_path": "scale_kit.PauseAt", "init_args": {"step": 4, "marker": str(marker), "timeout": 120}}
    recipe = kit.write_recipe(run / "recipe.yaml", kit.recipe(run, callbacks=[pause], **CONFIG))
    job_id = submit(slurm_cluster, run, recipe, "requeue-me")

    signal_when_paused(slurm_cluster, job_id, marker, run)

    assert_finished(slurm_cluster, job_id, run, restarts=1)
    log = job_log(run)
    assert f"job {job_id} restart 0" in log and f"job {job_id} restart 1" in log, log[-3000:]
    assert "RequeueOnSignal: requeued SLURM job" in log or "requeued SLURM job" in log, log[-3000:]
    requeue = torch.load(run / "checkpoints" / "requeue.ckpt", weights_only=True)
    assert requeue["global_step"] == 4
    kit.assert_bitwise_equal(kit.final_weights(ref_run), kit.final_weights(run), "requeued SLURM job")


def test_pipeline_job_requeued_mid_stage_resumes_and_completes(slurm_cluster, tmp_path):
    """``submit --pipeline`` as one job; USR1 in the middle of the first stage: the pipeline passes
    it to the stage, which checkpoints and requeues; the restarted job resumes that stage, runs the
    next and writes the report."""
    import yaml

    sys.path.insert(0, str(kit.ROOT / "tests" / "pipeline"))
    from test_pipeline import write_pipeline

    path = write_pipeline(tmp_path, teacher_epochs=3)
    spec = yaml.safe_load(path.read_text())
    teacher_recipe = Path(spec["stages"][0]["recipe"])
    recipe = yaml.safe_load(teacher_recipe.read_text())
    marker = tmp_path / "paused"
    recipe["trainer"]["callbacks"].append(
        {"class_path": "scale_kit.PauseAt", "init_args": {"step": 2, "marker": str(marker), "timeout": 120}})
    teacher_recipe.write_text(yaml.safe_dump(recipe))
    run = tmp_path / "pipe"
    done = subprocess.run([sys.executable, str(kit.ROOT / "launch.py"), "submit", "--pipeline", str(path),
                           "--gpus-per-node", "0", "--time", "00:10:00", "--signal-lead", "60",
                           "--job-name", "pipeline-requeue", "--log-dir", str(run / "slurm")],
                          cwd=kit.ROOT, env=slurm_cluster.env(kit.env_with_kit()), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    job_id = done.stdout.split("submitted job ")[1].split(":")[0]

    signal_when_paused(slurm_cluster, job_id, marker, run)

    assert_finished(slurm_cluster, job_id, run, restarts=1)
    log = job_log(run)
    assert "teacher: train" in log and "SLURM asked to stop" in log, log[-3000:]
    assert "teacher: resume" in log and "student: train" in log, log[-3000:]
    assert torch.load(run / "teacher" / "checkpoints" / "requeue.ckpt", weights_only=True)["global_step"] == 2
    assert (run / "report.md").exists() and (run / "student" / "export" / "onnx" / "model.onnx").exists()
