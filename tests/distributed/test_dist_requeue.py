"""Checkpoint-and-requeue on USR1/SIGTERM without a cluster: a fake ``scontrol`` on PATH
records what it was asked, ``SLURM_JOB_ID`` makes ``launch.py fit`` install the handler.

(The real thing, on a local two-node SLURM cluster, is in tests/slurm/.)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import scale_kit as kit

CONFIG = dict(devices=1, precision="32-true", accumulate=2, max_steps=10)


def fake_slurm_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {record}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = kit.env_with_kit(SLURM_JOB_ID="4242", SLURM_JOB_NAME="scale-test")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def requeue_calls(tmp_path: Path) -> list[str]:
    """The ``scontrol requeue`` calls (``scontrol show job`` queries the job's state first)."""
    lines = (tmp_path / "scontrol.calls").read_text().splitlines()
    return [line for line in lines if line.startswith("requeue")]


def start_fit(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(kit.ROOT / "launch.py"), *args], cwd=kit.ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kit.kill_group(proc.pid)
        out, _ = proc.communicate()
        raise AssertionError(f"fit did not finish:\n{out[-3000:]}")
    finally:
        kit.kill_group(proc.pid)
    return out


@pytest.mark.slow
def test_signal_before_training_requeues_without_dying(tmp_path):
    run = tmp_path / "run"
    recipe = kit.write_recipe(run / "recipe.yaml", kit.recipe(run, **CONFIG))
    proc = start_fit(["fit", "--config", str(recipe)], fake_slurm_env(tmp_path))
    time.sleep(1.0)  # launch.py is still importing torch/Lightning: long before training starts
    os.kill(proc.pid, signal.SIGUSR1)
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert requeue_calls(tmp_path) == ["requeue 4242"]
    assert "arrived before training" in out
    assert not list((run / "checkpoints").glob("step=*.ckpt")), "trained although a requeue signal was pending"


def _reference_then_paused_run(tmp_path, config):
    """An uninterrupted reference run, then the same recipe started under a fake SLURM
    environment, pausing at step 4 (``scale_kit.PauseAt`` writes rank 0's pid to ``marker``)."""
    ref = tmp_path / "ref"
    kit.write_recipe(ref / "recipe.yaml", kit.recipe(ref, **config))
    kit.launch(["fit", "--config", str(ref / "recipe.yaml")], kit.env_with_kit())
    run, marker = tmp_path / "run", tmp_path / "paused"
    pause = {"class_path": "scale_kit.PauseAt", "init_args": {"step": 4, "marker": str(marker)}}
    recipe = kit.write_recipe(run / "recipe.yaml", kit.recipe(run, callbacks=[pause], **config))
    return ref, run, recipe, marker, start_fit(["fit", "--config", str(recipe)], fake_slurm_env(tmp_path))


def _wait_until_paused(proc, marker, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists() or not marker.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, finish(proc)[-3000:]
        time.sleep(0.2)


@pytest.mark.slow
def test_sigterm_mid_training_saves_requeues_and_resumes_exactly(tmp_path):
    ref, run, recipe, marker, proc = _reference_then_paused_run(tmp_path, CONFIG)
    _wait_until_paused(proc, marker, 180)
    os.kill(proc.pid, signal.SIGTERM)  # what SLURM sends on preemption
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert requeue_calls(tmp_path) == ["requeue 4242"]
    requeue_ckpt = run / "checkpoints" / "requeue.ckpt"
    assert requeue_ckpt.is_file(), out[-3000:]
    import torch

    assert torch.load(requeue_ckpt, weights_only=True)["global_step"] == 4
    steps = sorted(int(p.stem.split("=")[1]) for p in (run / "checkpoints").glob("step=*.ckpt"))
    # nothing runs after the requeue checkpoint (not even the step's own ModelCheckpoint save)
    assert steps[-1] <= 4, f"training went on after the signal: {steps}"

    # the restarted job: what the sbatch template runs when SLURM_RESTART_COUNT > 0
    resumed = kit.launch(["fit", "--config", str(recipe), "--ckpt_path", "last-or-fresh"],
                         kit.env_with_kit(SCALE_KIT_ATTEMPT="1"))
    assert "resuming from" in resumed.stdout and "requeue.ckpt" in resumed.stdout
    kit.assert_bitwise_equal(kit.final_weights(ref), kit.final_weights(run), "requeued run")


@pytest.mark.slow
def test_one_signalled_rank_of_two_stops_both_at_the_same_step_and_resumes_exactly(tmp_path):
    """Only rank 0 gets the signal (rank 1 never does): the ranks agree through the callback's
    asynchronous gloo vote (no collective on the training device per step), one step after
    the signal, save together, requeue once, and the resumed run ends bitwise equal."""
    config = dict(CONFIG, devices=2, max_steps=10, val_every=None)  # no validation: only the per-step vote decides
    ref, run, recipe, marker, proc = _reference_then_paused_run(tmp_path, config)
    _wait_until_paused(proc, marker, 240)
    os.kill(int(marker.read_text()), signal.SIGUSR1)  # rank 0's process only
    out = finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert requeue_calls(tmp_path) == ["requeue 4242"]
    import torch

    saved = torch.load(run / "checkpoints" / "requeue.ckpt", weights_only=True)["global_step"]
    assert 5 <= saved <= 6, f"requeue checkpoint at step {saved}"  # the vote lags the signal by a step
    resumed = kit.launch(["fit", "--config", str(recipe), "--ckpt_path", "last-or-fresh"],
                         kit.env_with_kit(SCALE_KIT_ATTEMPT="1"))
    assert "requeue.ckpt" in resumed.stdout
    kit.assert_bitwise_equal(kit.final_weights(ref), kit.final_weights(run), "requeued two-rank run")
