"""``python3 launch.py main``: the demo job, as the commands a user would type.

Runs the 2D pipeline on phantom data (generated on first use): train a teacher U-Net,
distill a student with 1/3 of its parameters, prune half of the student's channels (1/12 left),
fine-tune it quantization-aware, export and verify every stage's artifacts, then print the
compression report and where the ONNX/INT8 artifacts and plots are. Rerunning it resumes
or skips finished stages.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from trainer.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = "recipes/pipeline_unet2d.yaml"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch.py main", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=PIPELINE, help=f"pipeline to run (default {PIPELINE})")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    words = ["pipeline", args.pipeline]
    print(f"==> python launch.py {shlex.join(words)}", flush=True)
    if subprocess.run([sys.executable, str(ROOT / "launch.py"), *words], cwd=ROOT).returncode != 0:
        raise UserError(f"the pipeline failed: python launch.py {shlex.join(words)} (rerun to resume)")
    from trainer.pipeline import load_pipeline

    run_dir, _ = load_pipeline(ROOT / args.pipeline)
    _print_summary(ROOT / run_dir, time.perf_counter() - start)
    return 0


def _print_summary(run_dir: Path, seconds: float) -> None:
    report = json.loads((run_dir / "report.json").read_text())
    print("\n==> where things are")
    for row in report["rows"]:
        if row["kind"] != "pytorch":
            print(f"  {row['stage']:>8} {row['kind']:<14} {row['path']}")
    print(f"  report: {run_dir / 'report.md'} (+ report.json)")
    print(f"  plots:  {run_dir / 'report.png'}, {run_dir / 'qualitative.png'}")
    missed = [g["goal"] for g in report["goals"] if not g["met"]]
    print(f"  goals:  {len(report['goals']) - len(missed)}/{len(report['goals'])} met" +
          (f"; missed: {'; '.join(missed)}" if missed else ""))
    print(f"  wall time: {seconds / 60:.1f} min")
