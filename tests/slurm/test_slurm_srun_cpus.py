"""srun steps get the job's --cpus-per-task (slurm/*.sbatch), on a real local Slurm cluster.

Slurm 22.05-23.02 changed srun to ignore the job's ``--cpus-per-task``: each task of a step
got one CPU, so a rank's DataLoader workers and intra-op threads shared a single core. The
templates export ``SRUN_CPUS_PER_TASK``. On a 4-CPU node, a job of 2 tasks x 2 CPUs shows
both sides: without the templates' line its step gets 2 CPUs (1 per task) on the affected
versions, with it 4."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _template_line() -> str:
    lines = {line for t in ("single_node", "multi_node", "pipeline")
             for line in (ROOT / "slurm" / f"{t}.sbatch").read_text().splitlines()
             if line.startswith("export SRUN_CPUS_PER_TASK")}
    assert len(lines) == 1, f"the templates disagree on SRUN_CPUS_PER_TASK: {lines}"
    return lines.pop()


def _step_cpus(cluster, tmp_path: Path, name: str, export: str) -> int:
    out = tmp_path / f"{name}.out"
    script = tmp_path / f"{name}.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=2\n#SBATCH --cpus-per-task=2\n"
                      f"#SBATCH --time=00:02:00\n#SBATCH --output={out}\n{export}\n"
                      "srun bash -c '[ \"$SLURM_PROCID\" = 0 ] && scontrol show step \"$SLURM_JOB_ID.$SLURM_STEP_ID\"'\n")
    done = subprocess.run(["sbatch", "--parsable", str(script)], env=cluster.env(), capture_output=True, text=True,
                          timeout=60, check=True)
    info = cluster.wait_job(done.stdout.strip().split(";")[0], timeout=120)
    for _ in range(20):  # the output file may trail the job state
        if out.exists() and "CPUs=" in out.read_text():
            break
        time.sleep(0.25)
    text = out.read_text() if out.exists() else ""
    found = re.search(r"\bCPUs=(\d+)", text)
    assert found, f"{info}\n{text}"
    return int(found.group(1))


def test_steps_get_the_jobs_cpus_per_task(four_cpu_node, tmp_path):
    version = subprocess.run(["sinfo", "--version"], env=four_cpu_node.env(), capture_output=True, text=True).stdout
    with_line = _step_cpus(four_cpu_node, tmp_path, "template", _template_line())
    assert with_line == 4, f"{version}: a step of the templates got {with_line} CPUs for 2 tasks x 2"
    without = _step_cpus(four_cpu_node, tmp_path, "plain", "")
    if re.search(r"slurm (22\.05|23\.02)", version):  # the versions whose srun drops --cpus-per-task
        assert without == 2, f"{version}: expected 1 CPU per task without the line, got {without} for 2 tasks"
