"""``python launch.py pipeline recipes/pipeline_X.yaml``: a chain of stages, one recipe.

A pipeline file lists stages in order. A training stage is a recipe (its own file, or the
previous stage's recipe) plus ``set`` overrides and ``inputs`` that wire an earlier stage's
checkpoint into a recipe key::

    run_dir: runs/pipeline_unet2d
    stages:
      - name: teacher
        recipe: recipes/unet2d_phantom.yaml
        set: {trainer.max_epochs: 6}
      - name: distill
        recipe: recipes/distill_unet2d.yaml
        inputs: {trainer.callbacks.Distillation.teacher: teacher}
        export: [onnx, "onnx-int8-cpu --calibration-batches 4"]   # format [export options]

Dotted keys walk the recipe; inside a list (``trainer.callbacks``) a segment picks the entry
whose ``class_path`` ends with it, and ``init_args`` is implied. ``final`` names the deployable
artifact and ``goals`` what it must keep (mean and every class; ``trainer.goals``): the report
checks them. Each stage runs in
``<run_dir>/<stage>/`` (checkpoints, logs, the resolved ``recipe.yaml``); the runner skips
stages already complete with an unchanged recipe, resumes an interrupted one from the
checkpoint holding its latest training state (any of its checkpoints, ``requeue.ckpt`` too),
refuses a changed recipe for a complete stage unless ``--rerun-changed``, exports each stage's
checkpoint (verified) and ends with the compression report. It is safe to run again after a
kill or a SLURM requeue: that is how it resumes.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer import atomic
from trainer.errors import UserError
from trainer.inputs import load_yaml_file
from trainer.export.card import sha256_file
from trainer.goals import Goals, check_class_names, parse_goals
from trainer.goals import record as record_goals

ROOT = Path(__file__).resolve().parent.parent
STAGE_KEYS = {"name", "recipe", "set", "inputs", "export", "checkpoint"}
TOP_KEYS = {"run_dir", "stages", "final", "goals"}
STATUS = "stage.json"
_STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


@dataclass
class Stage:
    name: str
    recipe: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)
    export: list[str] = field(default_factory=list)
    checkpoint: str = "best"  # which checkpoint of the stage feeds later stages and export


# ---------------------------------------------------------------- parsing
def load_pipeline(path: str | Path) -> tuple[Path, list[Stage]]:
    path = Path(path)
    spec = load_yaml_file(path, "pipeline file") or {}
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise UserError(f"{path}: needs a non-empty 'stages' list")
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise UserError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    run_dir = Path(spec.get("run_dir") or f"runs/{path.stem}")
    if not str(run_dir).strip() or run_dir.resolve() == Path(run_dir.resolve().anchor):
        raise UserError(f"{path}: run_dir={str(run_dir)!r} must name a folder for the pipeline's outputs")
    stages: list[Stage] = []
    for i, raw in enumerate(spec["stages"]):
        stages.append(_parse_stage(path, i, raw, stages))
    _check_final(path, spec.get("final"), stages)
    parse_goals(spec.get("goals"), str(path))  # bad goals fail before any training
    return run_dir, stages


def _check_final(path: Path, final: Any, stages: list[Stage]) -> None:
    """``final: STAGE/FORMAT`` names the deployable artifact the report's goals are checked on."""
    if final is None:
        return
    exports = {f"{s.name}/{shlex.split(e)[0]}" for s in stages for e in s.export}
    if final not in exports:
        raise UserError(f"{path}: final={final!r} is not an exported artifact; choose one of {sorted(exports)}")


def final_artifact(path: str | Path) -> str | None:
    """The pipeline's ``final`` entry (``STAGE/FORMAT``), if it has one."""
    return (load_yaml_file(Path(path), "pipeline file") or {}).get("final")


def pipeline_goals(path: str | Path) -> Goals:
    """The pipeline's ``goals`` (defaults for the keys it leaves out)."""
    return parse_goals((load_yaml_file(Path(path), "pipeline file") or {}).get("goals"), str(path))


def check_goal_classes(path: Path, goals: Goals, first: Stage) -> None:
    """Before any training: a goal must name one of the data's classes (a typo would never be
    checked). The first stage's datamodule says which, from its file header or ``generate``."""
    data = first.recipe.get("data")
    if not goals.named_classes() or not isinstance(data, dict) or "class_path" not in data:
        return  # nothing named, or no datamodule here: the report checks the names against its rows
    import lightning.pytorch as pl
    from lightning.pytorch.cli import instantiate_module

    from trainer.trust import check_class_path

    where = f"{path}: stage '{first.name}': data"
    check_class_path(data["class_path"], f"{where}.class_path")
    try:
        dm = instantiate_module(pl.LightningDataModule, {"_class_path": data["class_path"], **(data.get("init_args") or {})})
    except UserError:
        raise
    except Exception as exc:  # the stage's fit would refuse it too; say so now, in one line
        raise UserError(f"{where}: cannot build the datamodule: {' '.join(str(exc).split())[:300]}") from None
    names = getattr(dm, "class_names", None)
    if names:
        check_class_names(goals, list(names), str(path))


def _parse_stage(path: Path, i: int, raw: Any, earlier: list[Stage]) -> Stage:
    where = f"{path}: stages[{i}]"
    if not isinstance(raw, dict) or not raw.get("name"):
        raise UserError(f"{where} must be a mapping with a 'name'")
    name = str(raw["name"])
    if not _STAGE_NAME.fullmatch(name) or name in (".", ".."):
        raise UserError(f"{where}: stage name {name!r} must be a plain folder name (letters, digits, '_', '-', '.'; "
                        "no '/', not '..'): each stage runs in <run_dir>/<name>/")
    where = f"{path}: stage '{name}'"
    if set(raw) - STAGE_KEYS:
        raise UserError(f"{where}: unknown keys {sorted(set(raw) - STAGE_KEYS)}; allowed: {sorted(STAGE_KEYS)}")
    known = [s.name for s in earlier]
    if name in known:
        raise UserError(f"{where}: the name is used twice")
    if "recipe" in raw:
        recipe = load_yaml_file(Path(raw["recipe"]), f"{where}: recipe") or {}
        if not isinstance(recipe, dict):
            raise UserError(f"{where}: recipe {raw['recipe']} is not a mapping of recipe keys")
    elif earlier:
        recipe = copy.deepcopy(earlier[-1].recipe)
    else:
        raise UserError(f"{where}: the first stage needs a 'recipe'")
    for field_name in ("set", "inputs"):
        if not isinstance(raw.get(field_name) or {}, dict):
            raise UserError(f"{where}: '{field_name}' must be a mapping of dotted recipe keys, got {raw[field_name]!r}")
    exports = raw.get("export") or []
    if not isinstance(exports, list) or not all(isinstance(e, str) and e.strip() for e in exports):
        raise UserError(f"{where}: 'export' must be a list of 'FORMAT [options]' strings, got {exports!r}")
    for key, value in (raw.get("set") or {}).items():
        set_dotted(recipe, str(key), value, where)
    inputs = dict(raw.get("inputs") or {})
    for key, source in inputs.items():
        if source not in known:
            raise UserError(f"{where}: input {key} names unknown stage {source!r}; earlier stages: {known}")
        set_dotted(recipe, key, f"<{source}>", where)  # checked now, filled in at run time
    checkpoint = raw.get("checkpoint", "best")
    if checkpoint not in ("best", "last"):
        raise UserError(f"{where}: checkpoint={checkpoint!r} must be 'best' or 'last'")
    return Stage(name, recipe, inputs, list(exports), checkpoint)


def set_dotted(config: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set ``a.b.c`` in a recipe; list segments match a ``class_path`` suffix."""
    node: Any = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            matches = [e for e in node if isinstance(e, dict) and str(e.get("class_path", "")).split(".")[-1] == part]
            if len(matches) != 1:
                names = [str(e.get("class_path", "?")).split(".")[-1] for e in node if isinstance(e, dict)]
                raise UserError(f"{where}: key {key}: {part!r} matches {len(matches)} entries of {names}")
            node = matches[0]
            continue
        if not isinstance(node, dict):
            raise UserError(f"{where}: key {key}: {'.'.join(parts[:depth])} is not a mapping")
        if "class_path" in node and part not in ("class_path", "init_args"):
            node = node.setdefault("init_args", {})
        if last:
            node[part] = value
        else:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]


# ---------------------------------------------------------------- running
class Runner:
    def __init__(self, run_dir: Path, stages: list[Stage], rerun_changed: bool = False):
        self.run_dir = run_dir
        self.stages = stages
        self.rerun_changed = rerun_changed
        self.checkpoints: dict[str, Path] = {}

    def stage_dir(self, stage: Stage) -> Path:
        return self.run_dir / stage.name

    def resolved_recipe(self, stage: Stage) -> dict[str, Any]:
        recipe = copy.deepcopy(stage.recipe)
        for key, source in stage.inputs.items():
            set_dotted(recipe, key, str(self.checkpoints[source]), f"stage '{stage.name}'")
        _isolate(recipe, self.stage_dir(stage))
        return recipe

    def run(self) -> None:
        for index, stage in enumerate(self.stages):
            self._run_stage(index, stage)

    def fingerprint(self, stage: Stage, text: str) -> str:
        """Hash of the resolved recipe and of the checkpoints it takes as inputs, so a stage
        built on an earlier stage that has since been rerun counts as changed."""
        digest = hashlib.sha256(text.encode())
        for source in sorted(set(stage.inputs.values())):
            digest.update(sha256_file(self.checkpoints[source]).encode())
        return digest.hexdigest()

    def _run_stage(self, index: int, stage: Stage) -> None:
        sdir = self.stage_dir(stage)
        recipe = self.resolved_recipe(stage)
        text = yaml.safe_dump(recipe, sort_keys=False)
        digest = self.fingerprint(stage, text)
        status = _read_json(sdir / STATUS)
        ckpt = sdir / "checkpoints" / f"{stage.checkpoint}.ckpt"
        if status.get("complete") and status.get("recipe_sha256") == digest and ckpt.exists():
            print(f"[pipeline] {stage.name}: complete, skipped ({sdir})", flush=True)
            self.checkpoints[stage.name] = ckpt
            return
        # Outputs made from an older recipe or older inputs are stale: refuse, or delete them
        # when asked.
        if status.get("recipe_sha256") not in (None, digest):
            if not self.rerun_changed:
                why = "its recipe or an input checkpoint changed"
                raise UserError(f"stage '{stage.name}' ({sdir}) was run before but {why}; "
                                "rerun it with --rerun-changed (its old outputs are deleted) or use a new run_dir")
            if sdir.resolve().parent != self.run_dir.resolve():  # never delete outside run_dir
                raise UserError(f"stage '{stage.name}': {sdir} is not a folder of run_dir {self.run_dir}; not deleting it")
            shutil.rmtree(sdir)
        sdir.mkdir(parents=True, exist_ok=True)
        (sdir / "recipe.yaml").write_text(text)
        _write_json(sdir / STATUS, {"index": index, "complete": False, "recipe_sha256": digest})
        # any checkpoint of the stage resumes it (requeue.ckpt, a monitor or every-N-steps one...):
        # --ckpt_path last picks the one holding the latest training state
        resume = has_checkpoint(sdir)
        args = ["fit", "--config", str(sdir / "recipe.yaml")] + (["--ckpt_path", "last"] if resume else [])
        _launch(f"{stage.name}: {'resume' if resume else 'train'}", args)
        fit = _read_json(sdir / "fit_status.json")
        if not fit.get("completed"):
            raise UserError(f"stage '{stage.name}' stopped before the end of training ({sdir}); "
                            "run the pipeline again to resume it")
        if not ckpt.exists():
            raise UserError(f"stage '{stage.name}' finished but wrote no {ckpt}")
        self.checkpoints[stage.name] = ckpt
        exports = {}
        for entry in stage.export:  # "FORMAT [export options]", e.g. "onnx-qdq --max-exceed-fraction 0.005"
            fmt, *options = shlex.split(entry)
            exports[fmt] = str(sdir / "export" / fmt)
            _launch(f"{stage.name}: export {fmt}", ["export", "--ckpt", str(ckpt), "--format", fmt,
                                                    "--out", exports[fmt], "--overwrite", *options])
        _write_json(sdir / STATUS, {"index": index, "complete": True, "recipe_sha256": digest, "checkpoint": str(ckpt),
                                    "exports": exports})


def _isolate(recipe: dict[str, Any], sdir: Path) -> None:
    """Point the recipe's root dir, checkpoint dirs and logger at the stage's own folder."""
    trainer = recipe.setdefault("trainer", {})
    trainer["default_root_dir"] = str(sdir)
    for cb in trainer.get("callbacks") or []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
            cb.setdefault("init_args", {})["dirpath"] = str(sdir / "checkpoints")
    logger = trainer.get("logger")
    for lg in logger if isinstance(logger, list) else [logger]:
        if isinstance(lg, dict) and "init_args" in lg and "save_dir" in lg["init_args"]:
            lg["init_args"]["save_dir"] = str(sdir)


def has_checkpoint(sdir: Path) -> bool:
    """True when the stage folder holds a checkpoint in any ``checkpoints/`` folder."""
    return any("checkpoints" in p.relative_to(sdir).parts for p in sdir.rglob("*.ckpt"))


class Requeued(Exception):
    """A SLURM requeue signal arrived; the job has been (or is being) requeued."""


_child: list[subprocess.Popen] = []
_stopped: list[int] = []  # a stop signal (outside SLURM) that the pipeline passed on to its stage


def _forward_signal(signum: int, frame: Any) -> None:
    # Inside a SLURM job the pipeline only notes the signal and passes it to a running training
    # stage, whose RequeueOnSignal callback checkpoints and requeues at a safe point. (Slurm
    # signals the stage too; twice is harmless.) Exports run with the signals ignored: they finish
    # and the pipeline requeues afterwards (at once on TERM, see _wait).
    from trainer.requeue_signals import _note_signal

    _note_signal(signum, frame)
    for proc in _child:
        if proc.poll() is None and getattr(proc, "compressseg_fit", False):
            proc.send_signal(signum)


def _stop_signal(signum: int, frame: Any) -> None:
    # Outside SLURM, `kill PIPELINE_PID` (or a closed terminal) must not orphan the running
    # stage: pass SIGTERM on, let _launch wait for the stage to exit and then stop the pipeline.
    # Between stages there is no child: stop at once (the next run resumes or skips).
    _stopped.append(signum)
    live = [proc for proc in _child if proc.poll() is None]
    if not live:
        raise UserError(f"stopped by signal {signum} between stages; run the pipeline again to resume")
    for proc in live:
        proc.send_signal(signal.SIGTERM)


def _install_signal_forwarding() -> None:
    from trainer.requeue_signals import install_signal_handlers, under_slurm_job

    if under_slurm_job():
        install_signal_handlers(handler=_forward_signal)
    else:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _stop_signal)


def _check_requeue(where: str) -> None:
    """Between stages (no child to checkpoint): requeue the job now if a signal came."""
    from trainer.requeue_signals import received

    if received() is not None:
        from trainer.callbacks.requeue import requeue_job

        requeue_job()
        raise Requeued(where)


def _launch(title: str, args: list[str]) -> None:
    from trainer.requeue_signals import ignore_requeue_signals, received, under_slurm_job

    _check_requeue(f"before {title}")
    print(f"\n[pipeline] {title}\n$ python launch.py {shlex.join(args)}", flush=True)
    is_fit = args[0] == "fit"
    shield = under_slurm_job() and not is_fit
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=Path.cwd(),
                            preexec_fn=ignore_requeue_signals if shield else None)
    proc.compressseg_fit = is_fit
    _child[:] = [proc]
    code = _wait(proc, requeue_on_term=shield)
    if _stopped:
        raise UserError(f"[{title}] stopped by signal {_stopped[0]} (passed on to the stage, which exited "
                        f"with code {code}); run the pipeline again to resume")
    if code != 0:
        raise UserError(f"[{title}] failed with exit code {code}: python launch.py {shlex.join(args)}")
    if received() is not None and is_fit and not _read_json(_stage_dir(args) / "fit_status.json").get("completed"):
        raise Requeued(title)  # the stage saved a checkpoint and requeued the job itself
    # a signal after the stage's last step: it finished; the next _check_requeue requeues


def _wait(proc: subprocess.Popen, requeue_on_term: bool) -> int:
    """Wait for a child; on TERM while an export runs, requeue at once (KillWait is short)."""
    from trainer.requeue_signals import received_term

    requeued = False
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if requeue_on_term and received_term() and not requeued:
                from trainer.callbacks.requeue import requeue_job

                requeued = True
                requeue_job()


def _stage_dir(fit_args: list[str]) -> Path:
    return Path(fit_args[fit_args.index("--config") + 1]).parent


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic.write_text(path, json.dumps(data, indent=1))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch.py pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", help="pipeline YAML, e.g. recipes/pipeline_unet2d.yaml")
    parser.add_argument("--rerun-changed", action="store_true",
                        help="rerun stages whose recipe or input checkpoints changed (their old outputs are deleted)")
    parser.add_argument("--no-report", action="store_true", help="skip the compression report at the end")
    args = parser.parse_args(argv)
    run_dir, stages = load_pipeline(args.pipeline)
    final, goals = final_artifact(args.pipeline), pipeline_goals(args.pipeline)
    check_goal_classes(Path(args.pipeline), goals, stages[0])
    record_goals(run_dir, Path(args.pipeline), final, goals)  # `launch.py report RUN_DIR` checks the same
    _install_signal_forwarding()
    try:
        Runner(run_dir, stages, args.rerun_changed).run()
    except Requeued as where:
        print(f"[pipeline] SLURM asked to stop ({where}); the job is requeued and will resume", flush=True)
        return 0
    if not args.no_report:
        from trainer.report import write_report

        write_report(run_dir, final=final, goals=goals)
    return 0
