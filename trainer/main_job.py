"""``python3 launch.py main``: the demo job, as the commands a user would type.

Generates the phantom data (on first use), trains the 2D teacher recipe briefly, exports and
verifies an ONNX model, and prints a summary. Each step is a ``launch.py`` command run as a
subprocess and echoed, so the output doubles as a tutorial.
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
RECIPE = "recipes/unet2d_phantom.yaml"
RUN_DIR = Path("runs/unet2d_phantom")


def _step(title: str, args: list[str]) -> None:
    cmd = [sys.executable, "launch.py", *args]
    print(f"\n==> {title}\n$ python launch.py {shlex.join(args)}", flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise UserError(f"step '{title}' failed: python launch.py {shlex.join(args)}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch.py main", description=__doc__)
    parser.add_argument("--epochs", type=int, default=6, help="training epochs for the demo (recipe: 10)")
    parser.add_argument("--samples-per-epoch", type=int, default=320)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    _step("train the 2D teacher on phantom data (generated on first use)", [
        "fit", "--config", RECIPE, "--trainer.max_epochs", str(args.epochs),
        "--model.lr_scheduler.init_args.T_max", str(args.epochs),
        "--data.init_args.samples_per_epoch", str(args.samples_per_epoch),
        "--trainer.enable_progress_bar", "false",
    ])
    onnx_dir = RUN_DIR / "export" / "onnx"
    _step("export ONNX and verify it against PyTorch in onnxruntime", [
        "export", "--ckpt", str(RUN_DIR / "checkpoints" / "best.ckpt"), "--format", "onnx",
        "--out", str(onnx_dir), "--overwrite",
    ])
    _print_summary(ROOT / onnx_dir, time.perf_counter() - start)
    return 0


def _print_summary(onnx_dir: Path, seconds: float) -> None:
    card = json.loads((onnx_dir / "model_card.json").read_text())
    dice = card["metrics"]["dice"]
    artifact = card["artifact"]
    rows = [
        ("Dice (PyTorch, val, mean fg)", f"{dice['pytorch']['mean_foreground']:.4f}"),
        ("Dice (ONNX in onnxruntime)", f"{dice['artifact']['mean_foreground']:.4f}"),
        ("max |ONNX - PyTorch| logit", f"{card['metrics']['max_abs_diff']:.2e}"),
        ("parameters", f"{card['source']['parameters']:,}"),
        ("ONNX file size", f"{artifact['bytes'] / 1e6:.2f} MB"),
        ("artifact", str(onnx_dir / artifact["file"])),
        ("model card", str(onnx_dir / "model_card.json")),
        ("checkpoints", str(RUN_DIR / "checkpoints")),
        ("wall time", f"{seconds / 60:.1f} min"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n==> summary")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
