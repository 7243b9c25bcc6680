"""Rules that make a recipe say each thing once, applied to the parsed recipe before anything is built.

* **Class count**: ``model.num_classes`` is the one setting. It fills the net's class
  parameter (``num_classes``, or ``out_channels`` for MONAI-style nets) when the recipe left
  that at its default; a net set to a different count is a one-line error naming both keys.
  Without ``model.num_classes`` the net's value is taken.
* **Run directory**: ``trainer.default_root_dir`` is the one output setting. A
  ``ModelCheckpoint`` without ``dirpath`` writes to ``<root>/checkpoints``, a logger whose
  ``save_dir`` is missing or at its default (W&B's ``.``) logs under ``<root>``, and without
  a ``trainer.logger`` the run logs CSV to ``<root>/logs`` (``RecipeCLI``), so
  ``--trainer.default_root_dir runs/mine`` moves every output of a shipped recipe. Explicit
  paths are kept.
* **Schedule length**: a cosine (or polynomial) schedule without ``T_max``
  (``total_iters``) runs for ``trainer.max_epochs``; an explicit value that differs is
  kept and reported in one warning line.
* :func:`check_recipe_arguments`: every ``--config`` file must be a regular file of
  bounded, alias-checked YAML (``trainer.inputs``), and so must every command-line value.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from trainer.errors import UserError
from trainer.inputs import check_yaml_text, read_text_file

#: constructor parameters that hold a network's number of output classes, first match wins
CLASS_PARAMS = ("num_classes", "out_channels", "n_classes")
#: epoch-stepped schedulers whose length should follow ``trainer.max_epochs``
LENGTH_PARAMS = {"CosineAnnealingLR": "T_max", "PolynomialLR": "total_iters"}
_FILE_OPTIONS = ("--config", "-c")


def check_recipe_arguments(args: list[str]) -> None:
    """Check the recipe files and values of a LightningCLI command line before it is parsed."""
    i = 0
    while i < len(args):
        token = args[i]
        name, eq, inline = token.partition("=")
        if name in _FILE_OPTIONS and (eq or i + 1 < len(args)):
            path = inline if eq else args[i + 1]
            if not os.path.lexists(path) and any(c in path for c in "{:\n"):  # a recipe given inline
                check_yaml_text(path, "--config value")
            else:
                check_yaml_text(read_text_file(path, "recipe"), f"recipe {path}")
            i += 1 if eq else 2
            continue
        if token.endswith((".yaml", ".yml")) and os.path.exists(token):  # a nested config file (--model x.yaml)
            check_yaml_text(read_text_file(token, "recipe"), f"recipe {token}")
        else:
            check_yaml_text(token, f"command-line value {token[:40]!r}", syntax_errors=False)
        i += 1


# ----------------------------------------------------------------------------- helpers
def _get(ns: Any, key: str, default: Any = None) -> Any:
    if ns is None:
        return default
    if isinstance(ns, dict):
        return ns.get(key, default)
    return getattr(ns, key, default)


def _set(ns: Any, key: str, value: Any) -> None:
    if isinstance(ns, dict):
        ns[key] = value
    else:
        setattr(ns, key, value)


def _entries(value: Any) -> list[Any]:
    if value is None or isinstance(value, bool):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _class_name(spec: Any) -> str:
    return str(_get(spec, "class_path") or "").rpartition(".")[2]


def _signature_default(class_path: str, param: str) -> Any:
    """The default of ``param`` in ``class_path``'s constructor (the recipe named this class,
    so importing it is what the recipe parser already did); ``inspect.Parameter.empty`` if none."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return inspect.signature(cls).parameters[param].default
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        return inspect.Parameter.empty


# ----------------------------------------------------------------------------- rules
def settle_num_classes(cfg: Any, where: str) -> None:
    model = _get(cfg, "model")
    net = _get(model, "net")
    init_args = _get(net, "init_args")
    declared = _get(model, "num_classes")
    param = next((p for p in CLASS_PARAMS if init_args is not None and _get(init_args, p, ...) is not ...), None)
    if param is None:  # a net without a recognisable class parameter: model.num_classes is needed
        if declared is None:
            raise UserError(f"{where}: set model.num_classes (classes including background)")
        return
    net_value = _get(init_args, param)
    if declared is None:
        if net_value is None:
            raise UserError(f"{where}: set model.num_classes (classes including background)")
        _set(model, "num_classes", net_value)
        return
    if net_value == declared:
        return
    default = _signature_default(str(_get(net, "class_path")), param)
    if net_value is None or net_value == default:
        _set(init_args, param, declared)  # left at the net's default: model.num_classes decides
        return
    raise UserError(f"{where}: model.num_classes={declared} but model.net.init_args.{param}={net_value}; "
                    f"set the class count once, in model.num_classes (remove {param} from the net)")


def settle_run_dir(cfg: Any) -> None:
    trainer = _get(cfg, "trainer")
    root = _get(trainer, "default_root_dir")
    if not root:
        return
    root = os.fspath(root)
    for cb in _entries(_get(trainer, "callbacks")):
        if _class_name(cb) == "ModelCheckpoint" and _get(cb, "init_args") is not None \
                and _get(_get(cb, "init_args"), "dirpath") is None:
            _set(_get(cb, "init_args"), "dirpath", os.path.join(root, "checkpoints"))
    for logger in _entries(_get(trainer, "logger")):
        init_args = _get(logger, "init_args")
        save_dir = _get(init_args, "save_dir", ...)
        if init_args is not None and save_dir is not ... and (
                save_dir is None or save_dir == _signature_default(str(_get(logger, "class_path")), "save_dir")):
            _set(init_args, "save_dir", root)


def settle_schedule_length(cfg: Any, where: str) -> None:
    scheduler = _get(_get(cfg, "model"), "lr_scheduler")
    param = LENGTH_PARAMS.get(_class_name(scheduler))
    init_args = _get(scheduler, "init_args")
    if param is None or init_args is None:
        return
    epochs = _get(_get(cfg, "trainer"), "max_epochs")
    length = _get(init_args, param)
    if length is None:
        if epochs is None or epochs < 1:
            raise UserError(f"{where}: model.lr_scheduler {_class_name(scheduler)} needs {param}, or trainer.max_epochs "
                            f"to follow (max_epochs={epochs})")
        _set(init_args, param, int(epochs))
    elif epochs is not None and epochs > 0 and length != epochs and not _restarts_schedule(cfg):
        print(f"warning: {where}: model.lr_scheduler.init_args.{param}={length} but trainer.max_epochs={epochs}; "
              f"the schedule does not end with the run (leave {param} out to follow max_epochs)", file=sys.stderr)


def _restarts_schedule(cfg: Any) -> bool:
    # PruneRetrain (rewind_lr) rebuilds the optimizer and schedule every round: its T_max is a
    # round's length by design, not the run's
    return any(_class_name(cb) == "PruneRetrain" for cb in _entries(_get(_get(cfg, "trainer"), "callbacks")))


def apply_recipe_rules(cfg: Any, where: str) -> None:
    """All rules above, in place on the parsed config of one subcommand."""
    settle_num_classes(cfg, where)
    settle_run_dir(cfg)
    settle_schedule_length(cfg, where)
