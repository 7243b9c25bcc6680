"""Post-training quantization: calibrate a trained FP32 checkpoint, no retraining.

    python launch.py quantize --ckpt runs/x/best.ckpt --calibration percentile --batches 16 --out runs/x/ptq.ckpt

The same quantizers and calibrators as QAT (``trainer.quant``); the network is calibrated in
eval mode (the inference path) on the first N batches of the checkpoint's own training data.
The new checkpoint keeps the recipe and hyper-parameters, carries the weights plus scales,
and records the quantization in its structural history exactly like a QAT run, so
``launch.py export --format onnx-qdq``, ``restore_run`` and ``trainer.test(ckpt_path=...)``
treat it like a QAT checkpoint. It holds no optimizer or loop state: it is for export and
evaluation (QAT can start from it: ``model.init_from: NEW.ckpt``).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from trainer.atomic import atomic_file
from trainer.errors import UserError
from trainer.quant.calibrate import METHODS, CalibrationReport, calibrate
from trainer.quant.convert import FakeQuantConversion, ON_UNSUPPORTED, quantization_entry, quantize_net
from trainer.structure import CHECKPOINT_KEY, history, record

# Training state that would make a PTQ checkpoint look resumable; it is not.
DROPPED_KEYS = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


def post_training_quantize(
    net: nn.Module,
    images: Iterable[torch.Tensor],
    calibration: str = "percentile",
    percentile: float = 99.99,
    bins: int = 2048,
    skip_modules: Sequence[str] = (),
    on_unsupported: str = "error",
    weight_bits: int = 8,
) -> CalibrationReport:
    """Quantize ``net`` in place, calibrate it on ``images`` (eval mode) and record the change.

    Returns the calibration report (activation ranges; quantizers no batch reached).
    ``weight_bits=7``: weights on [-63, 63] (onnxruntime-CPU-safe, see ``fake_quant``).
    """
    state = quantize_net(net, skip_modules, on_unsupported, learnable_scales=False, weight_bits=weight_bits)
    report = calibrate(net, images, calibration, percentile, bins, train_mode=False)
    record(net, FakeQuantConversion, state)
    return report


def quantize_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    calibration: str = "percentile",
    batches: int = 16,
    percentile: float = 99.99,
    bins: int = 2048,
    skip_modules: Sequence[str] = (),
    on_unsupported: str = "error",
    overwrite: bool = False,
    weight_bits: int = 8,
) -> tuple[Path, CalibrationReport]:
    """PTQ of the checkpoint ``ckpt`` into a new checkpoint file ``out``."""
    from trainer.restore import restore_run

    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} exists; pass --overwrite or choose another path")
    if Path(ckpt).resolve() == out.resolve():
        raise UserError(f"--out {out} is the input checkpoint; write the PTQ checkpoint to a new file")
    run = restore_run(ckpt, with_data=True)
    if quantization_entry(run.net) is not None:
        raise UserError(f"{ckpt} is already quantized (its structural history holds a quantization)")
    if run.datamodule is None:
        raise UserError(f"{ckpt} has no datamodule recipe (datamodule_hyper_parameters); PTQ needs its training data")
    images = list(_images(run.datamodule, batches, ckpt))
    report = post_training_quantize(run.net, images, calibration, percentile, bins, skip_modules, on_unsupported,
                                    weight_bits)
    checkpoint = _ptq_checkpoint(run.checkpoint, run.module, report, Path(ckpt))
    with atomic_file(out) as fh:  # never a half-written checkpoint under the final name
        torch.save(checkpoint, fh)
    return out, report


def _images(datamodule, batches: int, ckpt) -> Iterable[torch.Tensor]:
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    for batch in itertools.islice(loader, batches):
        if not isinstance(batch, dict) or "image" not in batch:
            raise UserError(f"{ckpt}: training batches must be dicts with 'image'; got {type(batch).__name__}")
        yield batch["image"].float()


def _ptq_checkpoint(source: dict[str, Any], module: nn.Module, report: CalibrationReport, ckpt: Path) -> dict[str, Any]:
    checkpoint = {k: v for k, v in source.items() if k not in DROPPED_KEYS}
    checkpoint["state_dict"] = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    section = dict(checkpoint.get(CHECKPOINT_KEY, {}))
    section["structure"] = history(module.net)
    section["ptq"] = {
        "source_checkpoint": str(ckpt),
        "calibration": report.method,
        "batches": report.batches,
        "unobserved": list(report.unobserved),
    }
    checkpoint[CHECKPOINT_KEY] = section
    return checkpoint


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="trained FP32 checkpoint (written by launch.py fit)")
    p.add_argument("--out", required=True, help="the new, quantized checkpoint file")
    p.add_argument("--calibration", choices=METHODS, default="percentile", help="activation range estimator (default: %(default)s)")
    p.add_argument("--batches", type=int, default=16, help="training batches to calibrate on (default: %(default)s)")
    p.add_argument("--percentile", type=float, default=99.99, help="for --calibration percentile (default: %(default)s)")
    p.add_argument("--bins", type=int, default=2048, help="histogram bins for percentile/mse (default: %(default)s)")
    p.add_argument("--skip", action="append", default=[], metavar="MODULE", help="module path to keep in float (repeatable)")
    p.add_argument("--on-unsupported", dest="on_unsupported", choices=ON_UNSUPPORTED, default="error")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--weight-bits", dest="weight_bits", type=int, choices=(8, 7), default=8,
                   help="8: TensorRT's int8 grid; 7: exact in onnxruntime on every CPU (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``launch.py quantize``; returns the exit status."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.batches < 1:
            raise UserError(f"--batches={args.batches} must be >= 1")
        if not 0 < args.percentile <= 100:
            raise UserError(f"--percentile={args.percentile} must be in (0, 100]")
        out, report = quantize_checkpoint(
            args.ckpt, args.out, args.calibration, args.batches, args.percentile, args.bins,
            args.skip, args.on_unsupported, args.overwrite, args.weight_bits,
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"wrote {out}: {len(report.activation_amax)} activation ranges ({report.method}, {report.batches} batches)"
          + (f"; not reached (float): {report.unobserved}" if report.unobserved else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
