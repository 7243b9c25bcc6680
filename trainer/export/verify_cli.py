"""``python launch.py verify ARTIFACT_DIR [--data FILE --ckpt CKPT]``: verify an exported
artifact again, on the machine where it will run.

An INT8 result can depend on the CPU (``int8_safety``), and a file can be damaged on its way
to the deployment machine. This command re-checks, with nothing but the artifact folder:

1. the artifact's sha256 against its model card;
2. the format's static checks (for ``onnx-int8-cpu``: no integer kernel can overflow);
3. the artifact run here on the verification data stored with it (inputs, labels and the
   PyTorch logits of the build machine), with the card's tolerance.

``--cpu MODEL`` runs all of it on an emulated x86-64 CPU (``qemu-x86_64 -cpu MODEL``, e.g.
``Haswell``: AVX2 without VNNI), so an artifact can be checked for a CPU the build machine
does not have; onnxruntime picks its kernels from the emulated CPUID. Slow (tens of times),
meant for small verification sets.

With ``--data FILE`` (HDF5/TFRecord in the training run's layout) the reference is PyTorch
itself, rebuilt from ``--ckpt`` (default: the checkpoint the card names, if it is still there
with the same sha256), on every labelled case of the file. The file must have been prepared
the way the card's ``preprocessing`` says (orientation, spacing, intensity normalisation): a
file with the same geometry and raw intensities (``data convert --normalize noNorm``) is
normalised the model's way first; any other difference is refused in one line
(``datamodules.tools.data_for_model``). Exit 0 when everything passes, 2 otherwise (one line
naming what failed); nothing is written unless ``--json`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.export.bundle import read_bundle
from trainer.export.card import CARD_NAME, sha256_file
from trainer.export.machine import EMULATION_ENV, describe, machine_info
from trainer.export.registry import ExportFormat, format_class
from trainer.export.verify import Tolerance, VerificationError, verify_artifact


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py verify", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact_dir", help="a folder written by `launch.py export` (artifact + model_card.json)")
    p.add_argument("--data", help="verify on every labelled case of this HDF5/TFRecord file instead of the stored set")
    p.add_argument("--ckpt", help="with --data: the checkpoint to rebuild PyTorch from (default: the card's)")
    p.add_argument("--max-batches", dest="max_batches", type=int, default=None, help="verify on at most N batches")
    p.add_argument("--threads", type=int, default=0, help="runtime threads (0: all cores)")
    p.add_argument("--json", help="also write the outcome as JSON to this file")
    p.add_argument("--cpu", help="run on this emulated x86-64 CPU model (qemu-x86_64 -cpu MODEL, e.g. Haswell)")
    return p


def _emulated(cpu: str, argv: list[str]) -> int:
    """Run this same command (without ``--cpu``) under ``qemu-x86_64 -cpu MODEL``."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise UserError(f"--cpu emulates x86-64 CPUs with qemu-x86_64; this host is {platform.machine()}")
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        raise UserError("--cpu needs qemu-x86_64 (Debian/Ubuntu package qemu-user: apt-get install qemu-user)")
    models = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True).stdout.split()
    if cpu not in models:
        raise UserError(f"--cpu {cpu!r} is not a qemu-x86_64 CPU model (e.g. Haswell, Skylake-Client, Nehalem; "
                        "`qemu-x86_64 -cpu help` lists them)")
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--cpu":
            skip = True
        elif not arg.startswith("--cpu="):
            rest.append(arg)
    launch = Path(__file__).resolve().parents[2] / "launch.py"
    env = dict(os.environ, **{EMULATION_ENV: f"qemu-x86_64 -cpu {cpu}"})
    proc = subprocess.run([qemu, "-cpu", cpu, sys.executable, str(launch), "verify", *rest], env=env,
                          stderr=subprocess.PIPE, text=True)
    # qemu names every host CPU feature its emulator cannot model; not the user's concern
    noise = "TCG doesn't support requested feature"
    sys.stderr.write("".join(line for line in proc.stderr.splitlines(True) if noise not in line))
    return proc.returncode


def load_card(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory written by `launch.py export`")
    path = directory / CARD_NAME
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{directory} has no {CARD_NAME}; is it an export folder?") from None
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the model card: {err}") from None
    for key in ("format", "format_options", "artifact", "input", "output", "class_names", "verification"):
        if key not in card:
            raise UserError(f"{path}: model card has no {key!r} section")
    return card


def _format(card: dict[str, Any], path: Path) -> ExportFormat:
    cls = format_class(card["format"])
    try:
        fmt = cls(**card["format_options"])
    except TypeError as err:
        raise UserError(f"{path}: format_options of {card['format']!r} do not fit this version: {err}") from None
    fmt.check_available()
    return fmt


def _artifact(directory: Path, card: dict[str, Any]) -> Path:
    path = directory / card["artifact"]["file"]
    if not path.is_file():
        raise UserError(f"{path}: the artifact named in the model card is missing")
    digest = sha256_file(path)
    if digest != card["artifact"].get("sha256"):
        raise UserError(f"{path}: sha256 {digest[:12]}... does not match the model card "
                        f"({str(card['artifact'].get('sha256'))[:12]}...); the file was modified or is corrupt")
    return path


def _reference_from_data(card: dict[str, Any], data: str, ckpt: str | None, max_batches: int | None):
    """``(PyTorch predictor, batches, note)`` for every labelled case of ``data``, prepared as the card says."""
    import tempfile

    from datamodules.tools import data_for_model

    if not Path(data).exists():
        raise UserError(f"data file {data} does not exist")
    with tempfile.TemporaryDirectory(prefix="verify-data-") as work:
        path, note = data_for_model(str(data), card.get("preprocessing"), work)
        return (*_reference_batches(card, path, ckpt, max_batches), note)


def _reference_batches(card: dict[str, Any], data: str, ckpt: str | None, max_batches: int | None):
    from trainer.export.api import take_batches
    from trainer.restore import build_datamodule, restore_run

    ckpt_path = Path(ckpt) if ckpt else _card_checkpoint(card)
    run = restore_run(ckpt_path, with_data=False)
    # every case of the file is evaluated (no split), read the way the run read its own data
    dm = build_datamodule(ckpt_path, run.checkpoint, {"path": str(data), "generate": None, "val_fraction": 0.0,
                                                      "test_fraction": 0.0, "val_cases": None, "test_cases": None,
                                                      "num_workers": 0})
    if dm is None:
        raise UserError(f"{ckpt_path}: checkpoint carries no datamodule recipe; cannot read {data} the way it was trained")
    if dm.num_classes != card["output"]["num_classes"]:
        raise UserError(f"{data} has {dm.num_classes} classes but the artifact outputs {card['output']['num_classes']}")
    model = run.module.net.cpu().eval()
    return (lambda x: model(x)), take_batches(dm.labelled_dataloader(), max_batches)


def _card_checkpoint(card: dict[str, Any]) -> Path:
    source = card.get("source") or {}
    path = source.get("checkpoint")
    if not path or not Path(path).is_file():
        raise UserError(f"--data needs the PyTorch model: pass --ckpt (the card's checkpoint {path!r} is not here)")
    if source.get("checkpoint_sha256") and sha256_file(path) != source["checkpoint_sha256"]:
        raise UserError(f"{path}: checkpoint changed since export (sha256 differs from the card); pass --ckpt explicitly")
    return Path(path)


def verify_directory(directory: Path, data: str | None = None, ckpt: str | None = None,
                     max_batches: int | None = None, threads: int = 0) -> dict[str, Any]:
    """Re-verify the export in ``directory`` here; the outcome as a dict (``passed``...)."""
    card = load_card(directory)
    fmt = _format(card, directory / CARD_NAME)
    artifact = _artifact(directory, card)
    static = fmt.static_checks(artifact)  # raises VerificationError naming the layer
    probe = probe_ref = note = None
    if data is not None:
        reference, batches, note = _reference_from_data(card, data, ckpt, max_batches)
    else:
        if ckpt is not None:
            raise UserError("--ckpt is for --data; without --data the stored verification set is used")
        batches, reference, probe, probe_ref = read_bundle(directory, card["verification"].get("bundle"))
        batches, reference = batches[:max_batches], reference[:max_batches]
    spec, ver = card["input"], card["verification"]
    report = verify_artifact(
        reference, fmt.predictor(artifact, threads), batches,
        num_classes=card["output"]["num_classes"], class_names=card["class_names"], tolerance=Tolerance(**ver["tolerance"]),
        roi_size=spec.get("roi_size"), divisor=int(spec.get("divisor") or 1),
        overlap=float(spec.get("sliding_window_overlap") or 0.5), output_step=ver.get("output_step"),
        probe=probe, probe_reference=probe_ref,
    )
    metrics, verification = report.to_card()
    return {
        "artifact": str(artifact), "format": card["format"], "passed": report.passed,
        "message": None if report.passed else report.message(f"{card['format']} artifact {artifact}"),
        "data": data or "stored verification set", "data_note": note, "machine": machine_info(),
        "built_on": ver.get("machine"), "static_checks": static, "metrics": metrics, "verification": verification,
        "card_dice": card.get("metrics", {}).get("dice", {}).get("artifact", {}).get("mean_foreground"),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.cpu:
            return _emulated(args.cpu, argv)
        outcome = verify_directory(Path(args.artifact_dir), args.data, args.ckpt, args.max_batches, args.threads)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if args.json:
        Path(args.json).write_text(json.dumps(outcome, indent=2, default=str) + "\n")
    if outcome.get("data_note"):
        print(f"note: {outcome['data_note']}", file=sys.stderr)
    here = describe(outcome["machine"])
    if not outcome["passed"]:
        print(f"error: on {here}: {outcome['message']}", file=sys.stderr)
        return VerificationError("").exit_code
    dice = outcome["metrics"]["dice"]["artifact"].get("mean_foreground")
    built = describe(outcome["built_on"]) if outcome.get("built_on") else "an unrecorded machine"
    ver = outcome["verification"]
    print(f"verified {outcome['artifact']} ({outcome['format']}) on {here}: {ver['batches']} batches of "
          f"{outcome['data']}, argmax agreement {outcome['metrics']['argmax_agreement']:.4%}, "
          f"max error {ver['max_error_in_units']:.3g} {ver['tolerance']['unit']}, mean Dice {dice} "
          f"(card: {outcome['card_dice']}, built on {built})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
