"""Command dispatch for ``launch.py``.

fit/validate/test/predict go through LightningCLI, so a recipe maps 1:1 onto constructor
arguments (``class_path``/``init_args``), ``--print_config`` works and dotted overrides
(``--trainer.max_epochs 3``) work. The other commands are small argparse programs that
live next to what they drive (export, data, slurm, pipeline, report).
"""
from __future__ import annotations

import os
import sys
from typing import Callable

from trainer.errors import UserError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

USAGE = """usage: python3 launch.py COMMAND ...

Commands:
    main                     install if needed, then run the demo job on phantom data
    test [pytest args]       install if needed, then run the test suite
    setup                    only create/update the .venv
    fit|validate|test|predict --config recipes/X.yaml   (LightningCLI; --help for its options)
    export --ckpt PATH --format onnx --out DIR
    verify ARTIFACT_DIR [--data FILE]          re-verify an export here (deployment machine), exit 0/2
    quantize --ckpt PATH --out NEW.ckpt        post-training quantization
    distill-cache --teacher CKPT --data-config recipes/X.yaml --out FILE
    data generate|convert|inspect ...
    submit --config recipes/X.yaml --nodes N --gpus-per-node G --time HH:MM:SS
    pipeline recipes/pipeline_X.yaml
    report RUN_DIR

``test`` with no further words runs the suite; ``test --config ...`` is Lightning's test.
COMMAND --help describes a command's options."""


def _lightning(argv: list[str]) -> int:
    from trainer.callbacks.requeue import RequeueStop
    from trainer.recipe_cli import run_lightning_cli

    try:
        run_lightning_cli(argv)
    except RequeueStop:  # checkpointed at a safe point after USR1/TERM; the job is requeued (issue 16)
        return 0
    return 0


def _test_suite(argv: list[str]) -> int:
    import pytest

    code = pytest.main(argv or ["-q", "tests"])
    return int(code)


def _lazy(module: str, attr: str = "main") -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        mod = __import__(module, fromlist=[attr])
        return getattr(mod, attr)(argv)

    return run


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "export": _lazy("trainer.export.cli"),
    "verify": _lazy("trainer.export.verify_cli"),
    "data": _lazy("datamodules.tools"),
    "main": _lazy("trainer.main_job"),
    "setup": lambda argv: 0,
    "submit": _lazy("trainer.slurm_submit"),
    "pipeline": _lazy("trainer.pipeline"),
    "report": _lazy("trainer.report"),
    "distill-cache": _lazy("trainer.distill.cache"),
    "quantize": _lazy("trainer.quant.ptq"),  # post-training quantization of a checkpoint (issue 7)
}


def _configure_environment() -> None:
    # Nothing may reach the network by default: W&B logs offline unless the user set a mode
    # or an API key.
    if "WANDB_MODE" not in os.environ and "WANDB_API_KEY" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"


def _catch_requeue_signals() -> None:
    # Issue 4 (SLURM requeue): inside a SLURM job, note USR1/TERM from the very start, before
    # torch/Lightning are imported (seconds), so an early signal is not fatal; the
    # RequeueOnSignal callback acts on it at the first safe point (trainer/callbacks/requeue.py).
    # requeue_signals is standard library only, so this runs within milliseconds of start.
    from trainer.requeue_signals import install_signal_handlers, under_slurm_job

    if under_slurm_job():
        install_signal_handlers()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    _configure_environment()
    cmd, rest = argv[0], argv[1:]
    if cmd == "fit":
        _catch_requeue_signals()
    try:
        if cmd == "test" and not any(a.startswith(("--config", "-c", "--print_config")) for a in rest):
            return _test_suite(rest)
        if cmd in LIGHTNING_COMMANDS:
            return _lightning(argv)
        if cmd not in COMMANDS:
            raise UserError(f"unknown command {cmd!r}; known: {', '.join([*LIGHTNING_COMMANDS, *COMMANDS])}")
        return COMMANDS[cmd](rest)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
