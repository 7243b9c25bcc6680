"""The requeue signal path without a cluster: loader workers under the cluster's signals, the
requeue decision from Slurm's job state, a signal after the last step, the no-progress guard.

(The same paths against real Slurm, with the time limit's own signals, are in test_slurm_cluster.py.)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from trainer.callbacks.requeue import requeue_verdict
from trainer.requeue_signals import loader_is_shielded, shield_loader_kwargs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
import scale_kit as kit  # noqa: E402


class _SlowItems(Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.02)
        return torch.tensor([i])


def _iterate_while_workers_are_signalled(loader: DataLoader) -> list[int]:
    """Signals every worker with TERM and USR1 from another process (as slurmstepd does) after
    a few batches, then reads the rest; returns the sample ids seen."""
    seen = []
    iterator = iter(loader)
    for k, batch in enumerate(iterator):
        seen += batch.flatten().tolist()
        if k == 2:
            pids = [str(w.pid) for w in iterator._workers]
            subprocess.run(["kill", "-TERM", *pids], check=True)
            subprocess.run(["kill", "-USR1", *pids], check=True)
            time.sleep(0.3)
    return seen


def test_shielded_workers_survive_the_clusters_signals_and_still_obey_their_parent():
    loader = DataLoader(_SlowItems(), batch_size=2, num_workers=2, **shield_loader_kwargs(2))
    assert loader_is_shielded(loader)
    assert sorted(_iterate_while_workers_are_signalled(loader)) == list(range(24))
    # the DataLoader's own terminate() (a stuck worker, multiprocessing at exit) still ends them
    iterator = iter(loader)
    next(iterator)
    for worker in iterator._workers:
        worker.terminate()
    for worker in iterator._workers:
        worker.join(timeout=10)
        assert worker.exitcode == 0
    del iterator


def test_unshielded_workers_die_on_the_clusters_term():
    """What issue 16 saw: PyTorch's worker handler dies on a TERM that is not its parent's."""
    loader = DataLoader(_SlowItems(), batch_size=2, num_workers=2)
    assert not loader_is_shielded(loader)
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        _iterate_while_workers_are_signalled(loader)


def test_the_datamodules_shield_their_loaders(tmp_path):
    from datamodules.hdf5 import HDF5SegDataModule

    dm = HDF5SegDataModule(path=str(tmp_path / "phantom.h5"), spatial_dims=2, patch_size=[32, 32], batch_size=2,
                           num_workers=2, generate={"cases": 5, "shape": [2, 32, 32], "seed": 0})
    dm.prepare_data()
    dm.setup("fit")
    for split in ("train", "val"):
        assert loader_is_shielded(dm.make_dataloader(split)), split
    assert not {"worker_init_fn", "multiprocessing_context"} & set(HDF5SegDataModule(
        path=str(tmp_path / "phantom.h5"), spatial_dims=2, patch_size=[32, 32], num_workers=0)._loader_kwargs())


@pytest.mark.parametrize("state,restart,go,why", [
    ({"JobState": "RUNNING"}, 0, True, "running"),  # the --signal timer, scancel -s
    ({"JobState": "COMPLETING", "Reason": "TimeLimit", "Restarts": "0"}, 0, True, "time limit"),
    ({"JobState": "COMPLETING", "Reason": "None", "Restarts": "1"}, 0, False, "already being requeued"),  # scontrol requeue
    ({"JobState": "COMPLETING", "Reason": "None", "Restarts": "2"}, 2, False, "scancel"),  # plain scancel
    ({"JobState": "PENDING"}, 0, False, "already being requeued"),
    ({}, 0, True, "unknown"),
])
def test_requeue_verdict_follows_slurms_job_state(state, restart, go, why):
    """States as Slurm 22.05 reported them at the TERM of each case (slurm/README_scale.md)."""
    got, reason = requeue_verdict(state, restart)
    assert got is go and why in reason


# ============================================================================ fit under a fake Slurm
def fake_slurm(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.calls'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = kit.env_with_kit(SLURM_JOB_ID="777", SLURM_JOB_NAME="requeue-paths", **extra)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def run_until_paused_then_signal(args: list[str], env: dict[str, str], marker: Path, sig: int) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, str(kit.ROOT / "launch.py"), *args], cwd=kit.ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.1)
        os.killpg(proc.pid, sig)  # every process of the "step"
        out = proc.communicate(timeout=240)[0]
    finally:
        kit.kill_group(proc.pid)
    return proc.returncode, out


@pytest.mark.slow
def test_signal_after_the_last_step_finishes_the_run_instead_of_requeueing(tmp_path):
    run = tmp_path / "run"
    marker = tmp_path / "paused"
    pause = {"class_path": "scale_kit.PauseAt", "init_args": {"step": 6, "marker": str(marker)}}
    recipe = kit.write_recipe(run / "recipe.yaml", kit.recipe(run, max_steps=6, callbacks=[pause]))
    code, out = run_until_paused_then_signal(["fit", "--config", str(recipe)], fake_slurm(tmp_path), marker,
                                             signal.SIGTERM)
    assert code == 0, out[-3000:]
    assert "after the last training step" in out and not (tmp_path / "scontrol.calls").exists()
    assert not (run / "checkpoints" / "requeue.ckpt").exists()
    assert json.loads((run / "fit_status.json").read_text())["completed"] is True
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


@pytest.mark.slow
def test_a_job_idle_for_too_many_allocations_stops_requeueing_and_says_why(tmp_path):
    """Two allocations already ended before their first step (history file); the third is
    signalled during start-up too: no requeue, exit 2, one line with the reason."""
    run = tmp_path / "run"
    recipe = kit.write_recipe(run / "recipe.yaml", kit.recipe(run, max_steps=4))
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "requeue_history.json").write_text(json.dumps({"job": "777", "idle_allocations": 2}))
    env = fake_slurm(tmp_path, SLURM_RESTART_COUNT="2")
    proc = subprocess.Popen([sys.executable, str(kit.ROOT / "launch.py"), "fit", "--config", str(recipe)], cwd=kit.ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        time.sleep(1.0)  # still importing torch: long before the first step
        os.kill(proc.pid, signal.SIGUSR1)
        out = proc.communicate(timeout=240)[0]
    finally:
        kit.kill_group(proc.pid)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, out[-3000:]
    assert "no optimizer step in 3 consecutive allocations" in errors[0] and "--signal-lead" in errors[0]
    assert not (tmp_path / "scontrol.calls").exists() or "requeue" not in (tmp_path / "scontrol.calls").read_text()
    history = json.loads((run / "checkpoints" / "requeue_history.json").read_text())
    assert history["idle_allocations"] == 3


def test_a_signal_while_the_process_exits_does_not_fail_a_finished_job(tmp_path):
    """Python restores the default handlers while it shuts down; a warning signal then (a
    pipeline's report done, Slurm's timer firing) used to end the job with exit 138 (seen on the
    local cluster). The handlers' exit hook ignores them from the first atexit call on."""
    script = tmp_path / "exiting.py"
    script.write_text(
        "import os, subprocess, sys, time\n"
        "from trainer.requeue_signals import install_signal_handlers\n"
        "install_signal_handlers()\n"
        "flood = ('import os, signal, time\\nend = time.time() + 3\\n'\n"
        "         'while time.time() < end:\\n'\n"
        "         '    try: os.kill(%d, signal.SIGUSR1)\\n'\n"
        "         '    except ProcessLookupError: break\\n' % os.getpid())\n"
        "subprocess.Popen([sys.executable, '-c', flood])  # signals before, during and after the exit\n"
        "time.sleep(0.5)\n"
        "print('done', flush=True)\n"
    )
    for _ in range(3):
        proc = subprocess.run([sys.executable, str(script)], cwd=kit.ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(kit.ROOT)})
        assert proc.returncode == 0 and proc.stdout.strip() == "done", (proc.returncode, proc.stderr[-500:])
