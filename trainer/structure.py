"""The structural history of a network, so that a checkpoint can rebuild it.

Techniques that change a network's structure (channel pruning removes channels, QAT inserts
fake-quantizers) record each change on the network itself as ``(converter class path,
state)``. The history travels in every checkpoint (``checkpoint["compressseg"]["structure"]``)
and is replayed on a freshly built network before its weights are loaded, both when
Lightning resumes a run (``SegmentationModule.on_load_checkpoint``) and when
``restore_run`` rebuilds a model for export.
"""
from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from torch import nn

from trainer.errors import UserError
from trainer.trust import DEFAULT_CONVERTER_MODULES, check_class_path

HISTORY_ATTR = "compressseg_structure"
CHECKPOINT_KEY = "compressseg"  # the framework's own section of a checkpoint
# Only this framework's converters (plus modules the user trusts through
# $COMPRESSSEG_TRUSTED_MODULES, see trainer/trust.py) may be named by a checkpoint's history:
# loading a checkpoint must not import arbitrary code.


@runtime_checkable
class StructureConverter(Protocol):
    """A technique that can replay one structural change on a freshly built network."""

    @classmethod
    def rebuild(cls, net: nn.Module, state: dict[str, Any]) -> None:
        """Apply the change described by ``state`` (as recorded) to ``net`` in place."""
        ...


def history(net: nn.Module) -> list[dict[str, Any]]:
    return list(getattr(net, HISTORY_ATTR, []))


def record(net: nn.Module, converter: type, state: dict[str, Any]) -> None:
    """Append one change to ``net``'s history; ``state`` must be plain data (weights_only-safe)."""
    path = f"{converter.__module__}.{converter.__qualname__}"
    setattr(net, HISTORY_ATTR, history(net) + [{"converter": path, "state": state}])


def _converter(path: str) -> type:
    check_class_path(path, "checkpoint structure (untrusted converter)", DEFAULT_CONVERTER_MODULES)
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"checkpoint structure names converter {path!r} which cannot be imported: {exc}") from None


def replay(net: nn.Module, target: list[dict[str, Any]], source: str = "checkpoint") -> None:
    """Bring ``net``'s history up to ``target`` by replaying the missing changes."""
    done = history(net)
    if not isinstance(target, list) or not all(
            isinstance(e, dict) and isinstance(e.get("converter"), str) and isinstance(e.get("state"), dict) for e in target):
        raise UserError(f"{source}: its structural history is malformed (expected a list of {{converter, state}} entries)")
    if target[: len(done)] != done:
        raise UserError(
            f"{source}: its structural history ({[e['converter'] for e in target]}) does not extend the "
            f"network's ({[e['converter'] for e in done]}); was it made by a different recipe?"
        )
    for entry in target[len(done):]:
        cls = _converter(entry["converter"])
        cls.rebuild(net, entry["state"])
        record(net, cls, entry["state"])
