"""``python launch.py export --ckpt PATH --format FORMAT --out DIR [options]``.

A thin layer over ``export_artifact``: restore the run from the checkpoint, export, verify,
write the model card. Cheap checks (format, its options, output folder, runtime present) run
before the checkpoint is loaded. ``--format F --help`` lists the options of format F.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainer.errors import UserError
from trainer.inputs import check_writable, file_problem
from trainer.export.api import ExportMeta, check_out_dir, export_artifact
from trainer.export.card import CARD_NAME
from trainer.export.registry import format_class, known_formats
from trainer.export.verify import UNITS


def _base_parser() -> argparse.ArgumentParser:
    epilog = "formats:\n" + "\n".join(f"  {name:15s} {cls.summary}" for name, cls in known_formats().items())
    p = argparse.ArgumentParser(
        prog="launch.py export", epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a checkpoint to a verified artifact with a model card.",
    )
    p.add_argument("--ckpt", required=True, help="checkpoint written by training")
    p.add_argument("--format", required=True, help="artifact format (listed below)")
    p.add_argument("--out", required=True, help="output folder (absent or empty unless --overwrite)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the new artifact verified")
    p.add_argument("--max-batches", dest="max_batches", type=int, default=None,
                   help="verify on at most this many validation batches (default: all)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads for verification (0: all cores)")
    tol = p.add_argument_group("verification tolerance (defaults depend on the format; see README_export.md)")
    tol.add_argument("--atol", type=float, default=None, help="allowed |artifact - pytorch| per logit, in --tol-unit units")
    tol.add_argument("--tol-unit", dest="unit", choices=UNITS, default=None)
    tol.add_argument("--max-exceed-fraction", dest="max_exceed_fraction", type=float, default=None,
                     help="fraction of logits allowed beyond --atol")
    tol.add_argument("--min-argmax-agreement", dest="min_argmax_agreement", type=float, default=None)
    tol.add_argument("--max-dice-drop", dest="max_dice_drop", type=float, default=None,
                     help="fail if mean foreground Dice drops by more than this")
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, dict, dict]:
    """``(args, format options, tolerance overrides)``; ``UserError`` for an unknown format."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--format")
    first, _ = pre.parse_known_args(argv)  # the format decides which options exist
    parser = _base_parser()
    fmt_dests: list[str] = []
    if first.format is not None:
        cls = format_class(first.format)
        group = parser.add_argument_group(f"{cls.name} options")
        known = {a.dest for a in parser._actions}
        cls.add_arguments(group)
        fmt_dests = [a.dest for a in parser._actions if a.dest not in known]
    args = parser.parse_args(argv)
    options = {d: getattr(args, d) for d in fmt_dests}
    overrides = {
        k: getattr(args, k)
        for k in ("atol", "unit", "max_exceed_fraction", "min_argmax_agreement", "max_dice_drop")
        if getattr(args, k) is not None
    }
    return args, options, overrides


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``launch.py export``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, options, overrides = parse_args(argv)
        fmt = format_class(args.format)(**options)
        check_out_dir(args.out, args.overwrite)
        check_writable(args.out)  # before the (slow) restore: a read-only --out fails at once
        fmt.check_available()
        ckpt = Path(args.ckpt)
        if not ckpt.is_dir() and (problem := file_problem(ckpt)):  # a file, or a DeepSpeed ZeRO directory
            raise UserError(f"checkpoint {ckpt} {problem}")
        from trainer.restore import restore_run

        run = restore_run(str(ckpt))
        if run.datamodule is None:
            raise UserError(f"checkpoint {ckpt} carries no datamodule recipe; export needs its validation data to verify on")
        path = export_artifact(
            run.module.net, fmt, args.out, run.datamodule.val_dataloader(), ExportMeta.from_run(run, ckpt),
            opset=args.opset, overwrite=args.overwrite, tolerance=overrides or None,
            max_batches=args.max_batches, threads=args.threads,
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    card = json.loads((path.parent / CARD_NAME).read_text())
    dice = card["metrics"]["dice"]
    print(f"wrote {path} ({card['artifact']['bytes']} bytes, sha256 {card['artifact']['sha256'][:12]}...)")
    print(
        f"verified: Dice pytorch {dice['pytorch']['mean_foreground']} / artifact {dice['artifact']['mean_foreground']}, "
        f"max abs diff {card['metrics']['max_abs_diff']:.3g}, argmax agreement {card['metrics']['argmax_agreement']:.4%}; "
        f"card: {path.parent / CARD_NAME}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
