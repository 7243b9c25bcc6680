"""Real SLURM jobs on the local two-node cluster (tests/slurm/conftest.py), submitted with
``launch.py submit``, training the HDF5 datamodule with two loader workers per rank (Slurm
signals every process of a step, workers included).

All scenarios run in one cluster session, submitted together (the campaign fixture), and every
one ends by comparing final weights, bit for bit, with an uninterrupted run:

1. references: 1 node, and 2 nodes x 1 task (DDP over gloo, hostile job name);
2. Slurm's own timer (``--time 00:02:00 --signal-lead 30``, no scancel), 1 node and 2 nodes:
   USR1 mid-training -> requeue.ckpt, requeue, resume;
3. ``scancel -s TERM`` mid-training (workers get it too);
4. an outside ``scontrol requeue`` mid-training (TERM to everything, KillWait 5 s): checkpoint
   within KillWait, no second requeue;
5. ``submit --pipeline`` whose first stage needs three allocations under the timer (two of
   them paced), then the second stage, its export and the report.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_kit as kit  # noqa: E402
import slurm_kit  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
TIMER = ["--time", "00:02:00", "--signal-lead", "30", "--startup-time", "15"]
LONG = ["--time", "00:10:00", "--signal-lead", "60"]
TIMER_STEPS = 152  # paced at 1 s a step in the first allocation: never done before the timer fires;
# a multiple of the every-4-steps checkpoint and of the epochs (8 steps; 4 on 2 ranks), so last.ckpt is final
PAUSE_STEPS = 12


def job_env(cluster) -> dict[str, str]:
    env = kit.env_with_kit()
    env["PYTHONPATH"] = f"{Path(__file__).resolve().parent}:{env['PYTHONPATH']}"
    return cluster.env(env)


def submit(cluster, run: Path, what: list[str], name: str, nodes: int = 1, limits: list[str] = LONG) -> str:
    done = subprocess.run([sys.executable, str(kit.ROOT / "launch.py"), "submit", *what, "--nodes", str(nodes),
                           "--gpus-per-node", "0", "--cpus-per-task", "1", *limits, "--job-name", name,
                           "--log-dir", str(run / "slurm")],
                          cwd=kit.ROOT, env=job_env(cluster), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split("submitted job ")[1].split(":")[0]


def job_log(run: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run / "slurm").glob("*.out")))


def fit_job(cluster, root: Path, data: Path, name: str, *, steps: int, callbacks=(), nodes: int = 1,
            limits: list[str] = LONG) -> dict:
    run = root / name
    recipe = kit.write_recipe(run / "recipe.yaml", slurm_kit.recipe(run, data, max_steps=steps, callbacks=list(callbacks)))
    job_name = "ref; touch pwned" if name == "ref2" else name
    return {"run": run, "name": job_name, "id": submit(cluster, run, ["--config", str(recipe)], job_name, nodes, limits)}


def pause(marker: Path, step: int) -> dict:
    return {"class_path": "scale_kit.PauseAt", "init_args": {"step": step, "marker": str(marker), "timeout": 180}}


def signal_when_paused(cluster, job: dict, marker: Path, command: list[str]) -> None:
    deadline = time.monotonic() + 300
    while not marker.exists():
        state = cluster.job(job["id"]).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING") and time.monotonic() < deadline, \
            f"{state}\n{job_log(job['run'])[-3000:]}"
        time.sleep(0.5)
    subprocess.run([*command, job["id"]], env=cluster.env(), check=True, timeout=30)


def pipeline_files(root: Path, data: Path) -> tuple[Path, Path]:
    """A two-stage pipeline (teacher paced through two timer requeues, then a student with an
    ONNX export) and the same pipeline in another run_dir, for the uninterrupted reference."""
    teacher = kit.write_recipe(root / "teacher.yaml", slurm_kit.recipe(
        root / "unused", data, max_steps=2 * TIMER_STEPS,
        callbacks=[{"class_path": "slurm_kit.SlowUntilSignalled", "init_args": {"seconds": 1.0, "allocations": 2}}]))
    paths = []
    for run_dir in ("pipe", "pipe_ref"):
        spec = {"run_dir": str(root / run_dir), "stages": [
            {"name": "teacher", "recipe": str(teacher)},
            {"name": "student", "set": {"trainer.max_steps": 8}, "inputs": {"model.init_from": "teacher"},
             "export": ["onnx"]}]}
        path = root / f"{run_dir}.yaml"
        path.write_text(yaml.safe_dump(spec))
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def campaign(slurm_cluster, tmp_path_factory):
    """Submits every scenario at once, signals the paused ones, waits for all."""
    from datamodules.hdf5 import HDF5SegDataModule

    root = tmp_path_factory.mktemp("slurm_campaign")
    data = root / "phantom.h5"
    HDF5SegDataModule(**slurm_kit.data_spec(data)["init_args"]).prepare_data()
    slow = {"class_path": "slurm_kit.SlowUntilSignalled", "init_args": {"seconds": 1.0}}
    jobs = {
        "timer1": fit_job(slurm_cluster, root, data, "timer1", steps=TIMER_STEPS, callbacks=[slow], limits=TIMER),
        "timer2": fit_job(slurm_cluster, root, data, "timer2", steps=TIMER_STEPS, callbacks=[slow], nodes=2, limits=TIMER),
    }
    pipe, pipe_ref = pipeline_files(root, data)
    jobs["pipeline"] = {"run": root / "pipe", "id": submit(slurm_cluster, root / "pipe", ["--pipeline", str(pipe)],
                                                           "pipeline-timer", limits=TIMER)}
    markers = {name: root / f"{name}.paused" for name in ("term", "requeue")}
    for name, marker in markers.items():
        jobs[name] = fit_job(slurm_cluster, root, data, name, steps=PAUSE_STEPS, callbacks=[pause(marker, 5)])
    jobs["ref1"] = fit_job(slurm_cluster, root, data, "ref1", steps=TIMER_STEPS)
    jobs["ref2"] = fit_job(slurm_cluster, root, data, "ref2", steps=TIMER_STEPS, nodes=2)
    jobs["ref_short"] = fit_job(slurm_cluster, root, data, "ref_short", steps=PAUSE_STEPS)
    # the pipeline's uninterrupted reference runs here, outside Slurm, meanwhile
    reference = subprocess.Popen([sys.executable, str(kit.ROOT / "launch.py"), "pipeline", str(pipe_ref), "--no-report"],
                                 cwd=kit.ROOT, env=job_env(slurm_cluster),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    signal_when_paused(slurm_cluster, jobs["term"], markers["term"], ["scancel", "-s", "TERM"])
    signal_when_paused(slurm_cluster, jobs["requeue"], markers["requeue"], ["scontrol", "requeue"])
    for job in jobs.values():
        job["info"] = slurm_cluster.wait_job(job["id"], timeout=900)
    ref_out = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, ref_out[-3000:]
    return {"root": root, "jobs": jobs}


def completed(job: dict, restarts: int | None = None) -> str:
    info, log = job["info"], job_log(job["run"])
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", f"{info}\n{log[-4000:]}"
    if restarts is not None:
        assert info.get("Restarts") == str(restarts), f"{info}\n{log[-4000:]}"
    return log


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def requeue_saves(log: str) -> list[int]:
    return [int(s) for s in re.findall(r"requeue\.ckpt at step (\d+)", log)]


def test_reference_jobs_train_to_completion_on_one_and_two_nodes(campaign):
    ref2 = campaign["jobs"]["ref2"]
    completed(campaign["jobs"]["ref1"], 0)
    log = completed(ref2, 0)
    assert ref2["info"]["NumNodes"] == "2" and ref2["info"]["JobName"] == "ref; touch pwned"
    assert not (kit.ROOT / "pwned").exists() and not (ref2["run"] / "pwned").exists()
    ckpt = torch.load(ref2["run"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == TIMER_STEPS and len(ckpt["callbacks"]["RNGState"]["ranks"]) == 2
    assert "restart 0" in log and "Traceback" not in log


@pytest.mark.parametrize("name,ref", [("timer1", "ref1"), ("timer2", "ref2")])
def test_slurms_own_timer_requeues_mid_training_and_resumes_exactly(campaign, name, ref):
    job = campaign["jobs"][name]
    log = completed(job)
    assert int(job["info"]["Restarts"]) >= 1, log[-3000:]
    saves = requeue_saves(log)
    assert saves and 0 < saves[0] < TIMER_STEPS, log[-4000:]  # the timer's USR1 hit mid-training
    assert "RequeueOnSignal: SIGUSR1 received" in log and "requeued SLURM job" in log
    assert re.search(r"resuming from \S+requeue\.ckpt: global step", log), log[-4000:]
    assert "DataLoader worker" not in log and "Traceback" not in log
    kit.assert_bitwise_equal(weights(campaign["jobs"][ref]["run"] / "checkpoints" / "last.ckpt"),
                             weights(job["run"] / "checkpoints" / "last.ckpt"), f"{name} vs {ref}")


@pytest.mark.parametrize("name", ["term", "requeue"])
def test_term_to_every_process_checkpoints_and_resumes_exactly(campaign, name):
    """``scancel -s TERM`` (we requeue) and an outside ``scontrol requeue`` (Slurm requeues; we
    save within KillWait and do not requeue again): exactly one restart either way."""
    job = campaign["jobs"][name]
    log = completed(job, restarts=1)
    assert requeue_saves(log) == [5], log[-4000:]
    assert "RequeueOnSignal: SIGTERM received" in log and "DataLoader worker" not in log
    if name == "term":
        assert "requeued SLURM job" in log
    else:
        assert "already being requeued by Slurm" in log and "requeued SLURM job" not in log
    assert re.search(r"resuming from \S+requeue\.ckpt: global step 5", log), log[-4000:]
    kit.assert_bitwise_equal(weights(campaign["jobs"]["ref_short"]["run"] / "checkpoints" / "last.ckpt"),
                             weights(job["run"] / "checkpoints" / "last.ckpt"), name)


def test_pipeline_stage_spans_allocations_under_the_timer_then_reports(campaign):
    job, root = campaign["jobs"]["pipeline"], campaign["root"]
    log = completed(job)
    assert int(job["info"]["Restarts"]) >= 2, log[-4000:]
    saves = requeue_saves(log)  # the teacher's two paced allocations made progress, each
    assert len(saves) >= 2 and 0 < saves[0] < saves[1] < 2 * TIMER_STEPS, log[-4000:]
    assert log.count("teacher: resume") >= 2, log[-4000:]
    assert "student: train" in log and "Traceback" not in log
    run = root / "pipe"
    assert (run / "report.md").exists() and (run / "student" / "export" / "onnx" / "model.onnx").exists()
    for stage in ("teacher", "student"):
        kit.assert_bitwise_equal(weights(root / "pipe_ref" / stage / "checkpoints" / "last.ckpt"),
                                 weights(run / stage / "checkpoints" / "last.ckpt"), f"pipeline {stage}")
