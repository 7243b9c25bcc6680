"""Which modules a checkpoint may make us import.

A checkpoint loads with ``weights_only=True`` (no pickled code), but it still *names* code:
``hyper_parameters.net.class_path``, the loss, the datamodule's ``_class_path`` and the
structural history's converters. Rebuilding a run imports and calls those classes with
arguments from the file, so a hostile checkpoint could name ``subprocess.Popen`` and its
arguments. Every class path read from a checkpoint is therefore checked against an
allow-list of module prefixes *before* anything is imported.

The defaults are this framework's packages and the libraries whose networks, losses and
optimizers its recipes build on. Users' own networks (or data modules, or structural
converters) are allowed by naming their modules in the environment::

    export COMPRESSSEG_TRUSTED_MODULES=mylab.nets,mylab.data   # comma-separated module prefixes

A prefix matches whole dotted segments (``mylab.nets`` allows ``mylab.nets.UNet3`` and
``mylab.nets.deep.X``, not ``mylab.netsevil``).

An installed package can declare the modules its checkpoints name (its networks, data modules,
structural converters) as entry points; installing the package is the user's trust decision::

    [project.entry-points."compressseg.trusted_modules"]
    mylab = "mylab.nets"
"""
from __future__ import annotations

import os
from importlib import metadata
from typing import Any, Iterator

from trainer.errors import UserError

ENV = "COMPRESSSEG_TRUSTED_MODULES"
ENTRY_POINT_GROUP = "compressseg.trusted_modules"
#: classes a checkpoint may name for the network, loss, optimizer and datamodule
DEFAULT_CLASS_MODULES = ("trainer", "datamodules", "torch.nn", "torch.optim", "monai.networks", "monai.losses")
#: structural converters (``trainer.structure``) a checkpoint may replay
DEFAULT_CONVERTER_MODULES = ("trainer",)


def trusted_modules(defaults: tuple[str, ...] = DEFAULT_CLASS_MODULES) -> tuple[str, ...]:
    """``defaults``, the prefixes in ``$COMPRESSSEG_TRUSTED_MODULES`` and those installed packages
    declare under the entry-point group ``compressseg.trusted_modules``."""
    extra = [p.strip().strip(".") for p in os.environ.get(ENV, "").split(",")]
    declared = [entry.value.strip().strip(".") for entry in metadata.entry_points(group=ENTRY_POINT_GROUP)]
    return tuple(dict.fromkeys([*defaults, *(p for p in [*extra, *declared] if p)]))


def is_trusted(class_path: str, defaults: tuple[str, ...] = DEFAULT_CLASS_MODULES) -> bool:
    return isinstance(class_path, str) and any(
        class_path == prefix or class_path.startswith(prefix + ".") for prefix in trusted_modules(defaults)
    )


def check_class_path(class_path: Any, where: str, defaults: tuple[str, ...] = DEFAULT_CLASS_MODULES) -> None:
    """Raise a one-line ``UserError`` unless ``class_path`` lies under a trusted module prefix."""
    if not is_trusted(class_path, defaults):
        raise UserError(
            f"{where} names class {class_path!r}, outside the modules a checkpoint may import "
            f"({', '.join(trusted_modules(defaults))}); if it is your own code, add its module to "
            f"{ENV} (comma-separated prefixes)"
        )


def class_paths(tree: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every ``class_path`` / ``_class_path`` entry in nested dicts/lists."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            here = f"{key}.{k}" if key else str(k)
            if k in ("class_path", "_class_path"):
                yield here, v
            else:
                yield from class_paths(v, here)
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from class_paths(v, f"{key}[{i}]")


def check_tree(tree: Any, where: str) -> None:
    """Check every class path in a checkpoint's hyperparameter tree (nothing is imported)."""
    for key, value in class_paths(tree):
        check_class_path(value, f"{where} ({key})")
