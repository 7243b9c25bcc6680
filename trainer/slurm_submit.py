"""``python launch.py submit``: render an sbatch script from ``slurm/*.sbatch`` and submit it.

    python launch.py submit --config recipes/X.yaml [--config recipes/strategy/ddp.yaml] \\
        --nodes N --gpus-per-node G --time HH:MM:SS [--job-name NAME] [--cpus-per-task C] \\
        [--signal-lead S] [--startup-time S] [--log-dir DIR] [--dry-run] [SBATCH OPTIONS...] [-- FIT OVERRIDES...]

Before anything is submitted, the recipe (with the overrides after ``--``) is parsed exactly
as ``launch.py fit`` parses it, without building the model or data, and ``--gpus-per-node``
is checked against the recipe's ``trainer.devices``: one task per device and node.
``--gpus-per-node 0`` means a CPU cluster: ``trainer.devices`` tasks per node, each with
``--cpus-per-task`` cores, and the job runs with ``--trainer.accelerator cpu``. The job always
gets ``--trainer.num_nodes N``.

Options this command does not know (``--partition=gpu``, ``--qos high``, ``--account=x``...) go
to sbatch as ``#SBATCH`` lines. Every user value is shell-quoted (``shlex.quote``) in the
script, and the script is handed to ``sbatch`` as a file (never through a shell). ``--dry-run``
prints the script instead of submitting it. The job id is printed on success.
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time as _time
from pathlib import Path
from typing import Any

from trainer.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = {"single": ROOT / "slurm" / "single_node.sbatch", "multi": ROOT / "slurm" / "multi_node.sbatch",
             "pipeline": ROOT / "slurm" / "pipeline.sbatch"}
STARTUP_S = 120  # default --startup-time: imports, data set-up, rendezvous, loading a checkpoint
SIGNAL_EARLY_S = 60  # Slurm may deliver --signal=SIG@N up to this much earlier than N before the limit
WINDOW_WARN_FRACTION = 0.25  # warn when less than this share of an allocation is sure to train
_TIME = re.compile(r"^(?:(\d+)-)?(\d{1,3})(?::(\d{2}))?(?::(\d{2}))?$")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py submit", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", "-c", action="append",
                   help="recipe YAML (repeat to stack fragments, e.g. recipes/strategy/ddp.yaml)")
    p.add_argument("--pipeline", help="submit a whole pipeline YAML as one single-node, requeueable job "
                   "instead of --config")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, required=True,
                   help="GPUs per node, must equal the recipe's trainer.devices; 0 = CPU cluster")
    p.add_argument("--time", required=True, help="time limit, [D-]HH:MM:SS")
    p.add_argument("--job-name", help="default: the first recipe's file name")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="cores per task (default: 8 with GPUs, 1 without)")
    p.add_argument("--signal-lead", type=int, default=120,
                   help="seconds before the time limit at which SLURM sends USR1 (checkpoint + requeue); default 120")
    p.add_argument("--startup-time", type=int, default=STARTUP_S,
                   help="seconds from a job's start to its first training step (imports, data set-up, DDP rendezvous, "
                        f"checkpoint loading); a --signal-lead that leaves less is refused. Default {STARTUP_S}")
    p.add_argument("--log-dir", default=None,
                   help="where the script and the job's output go (default: <trainer.default_root_dir>/slurm)")
    p.add_argument("--python", default=sys.executable, help="interpreter on the nodes (default: this one)")
    p.add_argument("--dry-run", action="store_true", help="print the script, do not submit")
    return p


def main(argv: list[str]) -> int:
    if "--" in argv:
        cut = argv.index("--")
        argv, fit_overrides = argv[:cut], argv[cut + 1:]
    else:
        fit_overrides = []
    parser = build_parser()
    if any(a in ("-h", "--help") for a in argv):
        parser.print_help()
        return 0
    args, sbatch_extra = _parse(parser, argv)
    if bool(args.config) == bool(args.pipeline):
        raise UserError("submit: give either --config RECIPE (a training run) or --pipeline FILE, not both or neither")
    job = (plan_pipeline_job(args, sbatch_extra) if args.pipeline else plan_job(args, sbatch_extra, fit_overrides))
    script = render(job)
    if args.dry_run:
        print(script, end="")
        return 0
    path = _write_script(job, script)
    job_id = submit(path)
    print(f"submitted job {job_id}: {path} (output {job['output_path']})")
    return 0


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit:  # argparse already printed its usage message
        raise UserError("submit: bad arguments (see usage above); nothing submitted") from None
    if extra and not extra[0].startswith("-"):
        raise UserError(f"submit: unexpected argument {extra[0]!r}; sbatch options start with '-', "
                        "fit overrides go after '--'")
    return args, extra


# ============================================================================ planning
def _check_resources(args: argparse.Namespace) -> None:
    """Checks shared by training and pipeline jobs: GPU count and the USR1 lead vs the time limit."""
    if args.gpus_per_node < 0:
        raise UserError(f"submit: --gpus-per-node {args.gpus_per_node} must be >= 0 (0 = CPU cluster)")
    limit_s = parse_time(args.time)
    if not 0 < args.signal_lead < limit_s:
        raise UserError(f"submit: --signal-lead {args.signal_lead}s must be > 0 and below the time limit {args.time}")
    check_training_window(limit_s, args.signal_lead, args.startup_time, args.time)


def check_training_window(limit_s: int, lead_s: int, startup_s: int, time_arg: str) -> None:
    """Refuse a lead that leaves no training time in an allocation; warn when little is left.

    Slurm checks time limits about every 30 s and may send ``--signal=USR1@lead`` up to
    ``SIGNAL_EARLY_S`` before ``limit - lead``. If that moment can fall before the job's first
    training step, every allocation may requeue without progress, forever (the job would stop
    itself after a few idle allocations: RequeueOnSignal.max_idle_allocations).
    """
    if startup_s < 0:
        raise UserError(f"submit: --startup-time {startup_s} must be >= 0")
    earliest = limit_s - lead_s - SIGNAL_EARLY_S
    window = earliest - startup_s
    if window <= 0:
        raise UserError(
            f"submit: --time {time_arg} with --signal-lead {lead_s} leaves no time to train: Slurm may send USR1 "
            f"up to {SIGNAL_EARLY_S}s early, {max(earliest, 0)}s after the start, and start-up takes about {startup_s}s "
            "(--startup-time); every allocation could requeue before its first step. Lengthen --time or shorten "
            "--signal-lead; nothing submitted")
    if window < WINDOW_WARN_FRACTION * limit_s:
        print(f"warning: submit: only about {window}s of each {limit_s}s allocation is sure to train (USR1 up to "
              f"{SIGNAL_EARLY_S}s before the {lead_s}s lead, {startup_s}s start-up); consider a longer --time",
              file=sys.stderr)


def plan_job(args: argparse.Namespace, sbatch_extra: list[str], fit_overrides: list[str]) -> dict[str, Any]:
    """Validate everything and return the values the template needs (not yet quoted)."""
    if args.nodes < 1:
        raise UserError(f"submit: --nodes {args.nodes} must be >= 1")
    _check_resources(args)
    for cfg in args.config:
        if not Path(cfg).is_file():
            raise UserError(f"submit: recipe {cfg} does not exist")
    trainer_cfg = parse_recipe(args.config, fit_overrides)
    devices = _devices(trainer_cfg.get("devices"), args)
    accelerator = str(trainer_cfg.get("accelerator") or "auto")
    if args.gpus_per_node > 0:
        if devices != args.gpus_per_node:
            raise UserError(f"submit: --gpus-per-node {args.gpus_per_node} but {args.config[0]} has "
                            f"trainer.devices={trainer_cfg.get('devices')!r}; they must match (one task per GPU): "
                            f"pass --gpus-per-node {devices} or override -- --trainer.devices {args.gpus_per_node}")
        if accelerator == "cpu":
            raise UserError(f"submit: --gpus-per-node {args.gpus_per_node} but {args.config[0]} sets "
                            "trainer.accelerator=cpu; use --gpus-per-node 0 for CPU jobs")
    extra_fit = ["--trainer.num_nodes", str(args.nodes)]
    if args.gpus_per_node == 0:
        extra_fit += ["--trainer.accelerator", "cpu"]
    cpus = args.cpus_per_task if args.cpus_per_task is not None else (8 if args.gpus_per_node else 1)
    if cpus < 1:
        raise UserError(f"submit: --cpus-per-task {cpus} must be >= 1")
    name = _job_name(args.job_name, args.config[0])
    log_dir = _log_dir(args.log_dir, Path(trainer_cfg.get("default_root_dir") or "runs") / "slurm")
    fit_args: list[str] = []
    for cfg in args.config:
        fit_args += ["--config", cfg]
    return {
        "template": "multi" if args.nodes > 1 else "single",
        "job_name": name, "nodes": args.nodes, "tasks_per_node": devices, "cpus_per_task": cpus,
        "gpus_per_node": args.gpus_per_node, "time": args.time, "signal_lead": args.signal_lead,
        "log_dir": log_dir, "output_path": str(log_dir / "%x-%j.out"), "workdir": str(Path.cwd()),
        "python": args.python, "launch": str(ROOT / "launch.py"),
        "fit_args": fit_args + list(fit_overrides) + extra_fit,
        "sbatch_extra": _group_options(sbatch_extra),
    }


def plan_pipeline_job(args: argparse.Namespace, sbatch_extra: list[str]) -> dict[str, Any]:
    """One task on one node running ``launch.py pipeline``; its stages validate themselves."""
    from trainer.pipeline import load_pipeline

    if args.nodes != 1:
        raise UserError(f"submit: --pipeline runs on one node; got --nodes {args.nodes}")
    _check_resources(args)
    run_dir, _ = load_pipeline(args.pipeline)  # fails here, before sbatch, on a bad pipeline file
    log_dir = _log_dir(args.log_dir, run_dir / "slurm")
    return {
        "template": "pipeline", "job_name": _job_name(args.job_name, args.pipeline),
        "cpus_per_task": args.cpus_per_task or (8 if args.gpus_per_node else 2),
        "gpus_per_node": args.gpus_per_node, "time": args.time, "signal_lead": args.signal_lead,
        "log_dir": log_dir, "output_path": str(log_dir / "%x-%j.out"), "workdir": str(Path.cwd()),
        "python": args.python, "launch": str(ROOT / "launch.py"), "pipeline": args.pipeline,
        "sbatch_extra": _group_options(sbatch_extra),
    }


# ============================================================================ values in #SBATCH lines
# A #SBATCH line ends at the first line break: the rest of a value would run as a shell line.
# Values that reach a directive are refused if they hold a control character; values in the
# script's shell lines are shell-quoted (render), where a line break is harmless.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def directive_value(value: str, option: str) -> str:
    """``value`` unchanged, or a one-line error if it cannot sit safely on a ``#SBATCH`` line."""
    if _CONTROL.search(value):
        raise UserError(f"submit: {option} {value!r} contains a line break or control character; nothing submitted")
    return value


def _job_name(given: str | None, source: str) -> str:
    if given is not None:
        if not given.strip():
            raise UserError("submit: --job-name must not be empty")
        return directive_value(given, "--job-name")
    # the default comes from a file name: control characters become '_' rather than an error
    return _CONTROL.sub("_", Path(source).stem) or "job"


def _log_dir(given: str | None, default: Path) -> Path:
    option = "--log-dir" if given is not None else "--log-dir (default: from the run directory)"
    text = directive_value(str(given if given is not None else default), option)
    if "%" in text:  # Slurm expands %j, %x... in --output: the job's log would land elsewhere
        raise UserError(f"submit: --log-dir {text!r} contains '%', which Slurm expands in file names; choose another folder")
    return Path(text)


def parse_time(value: str) -> int:
    """Seconds in a SLURM time limit ``[D-]HH:MM:SS`` (also ``MM:SS``, ``HH:MM``)."""
    m = _TIME.fullmatch(value or "")  # fullmatch: "$" alone would accept a trailing newline
    if not m:
        raise UserError(f"submit: --time {value!r} is not a SLURM time limit like 04:00:00 or 1-12:00:00")
    days, first, second, third = m.groups()
    days = int(days or 0)
    if third is not None:
        h, mi, s = int(first), int(second), int(third)
    elif second is not None:
        h, mi, s = (int(first), int(second), 0) if days else (0, int(first), int(second))
    else:
        h, mi, s = (int(first), 0, 0) if days else (0, int(first), 0)
    if mi >= 60 or s >= 60:
        raise UserError(f"submit: --time {value!r}: minutes and seconds must be below 60")
    total = ((days * 24 + h) * 60 + mi) * 60 + s
    if total <= 0:
        raise UserError(f"submit: --time {value!r} must be positive")
    return total


def _devices(value: Any, args: argparse.Namespace) -> int:
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str) and value.strip().isdigit() and int(value) > 0:
        return int(value)
    raise UserError(f"submit: {args.config[0]} has trainer.devices={value!r}; a SLURM job needs an explicit "
                    f"number (tasks per node), e.g. -- --trainer.devices {max(args.gpus_per_node, 1)}")


def _group_options(tokens: list[str]) -> list[list[str]]:
    """``['--partition', 'gpu', '--exclusive']`` -> ``[['--partition', 'gpu'], ['--exclusive']]``."""
    groups: list[list[str]] = []
    for tok in tokens:
        if tok.startswith("-") or not groups:
            groups.append([tok])
        else:
            groups[-1].append(tok)
    for group in groups:
        for token in group:
            directive_value(token, f"sbatch option {group[0]!r}:")
    return groups


def parse_recipe(configs: list[str], overrides: list[str]) -> dict[str, Any]:
    """Parse the recipe like ``launch.py fit`` does, without instantiating; returns ``trainer``."""
    import warnings

    from trainer.recipe_cli import RecipeCLI, _one_line

    class _ParseOnly(RecipeCLI):
        def instantiate_classes(self) -> None:  # validation only: no model, no data, no trainer
            pass

        def _set_seed(self) -> None:
            pass

    args = []
    for cfg in configs:
        args += ["--config", cfg]
    args += _drop_ckpt_path(overrides)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        cli = _ParseOnly(args, run=False)
    except SystemExit as exc:
        if exc.code in (0, None):
            raise
        raise UserError(f"submit: {configs[0]} could not be parsed (see message above); nothing submitted") from None
    except Exception as exc:  # jsonargparse's ArgumentError and friends
        if type(exc).__name__ in ("ArgumentError", "NSKeyError"):
            raise UserError(f"submit: {_one_line(exc, args)}; nothing submitted") from None
        raise
    trainer = cli.config.get("trainer") or {}
    return dict(trainer.items()) if hasattr(trainer, "items") else dict(vars(trainer))


def _drop_ckpt_path(overrides: list[str]) -> list[str]:
    out, skip = [], False
    for tok in overrides:
        if skip:
            skip = False
            continue
        if tok == "--ckpt_path":
            skip = True
            continue
        if tok.startswith("--ckpt_path="):
            continue
        out.append(tok)
    return out


# ============================================================================ rendering
def render(job: dict[str, Any]) -> str:
    """Fill the template; every user-controlled value passes through ``shlex.quote``."""
    q = shlex.quote
    values = {
        "job_name": q(job["job_name"]),
        "nodes": str(int(job.get("nodes", 1))),
        "tasks_per_node": str(int(job.get("tasks_per_node", 1))),
        "cpus_per_task": str(int(job["cpus_per_task"])),
        "gpus_directive": f"#SBATCH --gpus-per-node={int(job['gpus_per_node'])}" if job["gpus_per_node"] else
                          "# (CPU job: no GPUs requested)",
        "time": q(job["time"]),
        "signal_lead": str(int(job["signal_lead"])),
        "output": q(job["output_path"]),
        "extra_directives": "\n".join("#SBATCH " + " ".join(q(t) for t in group) for group in job["sbatch_extra"]),
        "workdir": q(job["workdir"]),
        "python": q(job["python"]),
        "launch": q(job["launch"]),
        "fit_args": " ".join(q(a) for a in job.get("fit_args", [])),
        "pipeline": q(job.get("pipeline", "")),
    }
    text = TEMPLATES[job["template"]].read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    left = re.findall(r"\{\{\w+\}\}", text)
    if left:
        raise RuntimeError(f"slurm template {TEMPLATES[job['template']]} has unknown placeholders {left}")
    return text


def _write_script(job: dict[str, Any], script: str) -> Path:
    log_dir = Path(job["log_dir"])
    log_dir.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", job["job_name"])[:60] or "job"
    path = log_dir / f"{safe}-{_time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    return path


def submit(script: Path) -> str:
    """``sbatch --parsable SCRIPT`` (argument list, no shell); returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError(f"submit: sbatch not found on PATH; the script is at {script} (--dry-run prints it)")
    done = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        message = " ".join(done.stderr.split())[:300] or f"exit status {done.returncode}"
        raise UserError(f"submit: sbatch rejected {script}: {message}")
    return done.stdout.strip().split(";")[0]
