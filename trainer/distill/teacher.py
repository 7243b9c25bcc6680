"""Loading, freezing and ensembling the teacher networks of a distillation run.

A teacher is one of:

* a checkpoint of this framework (``launch.py fit`` wrote it; the network is rebuilt by
  :func:`trainer.restore.restore_run`, pruned/QAT structure included);
* any ``nn.Module`` named by ``class_path`` (+ ``init_args``) plus a weights file (a raw
  ``state_dict``, or a checkpoint holding one under ``"state_dict"``; a ``net.``/``model.``/
  ``module.`` prefix is stripped) -- a MONAI network's plain state dict, say;
* a trained **nnU-Net v2** model folder (``plans.json``, ``dataset.json``,
  ``fold_X/checkpoint_final.pth``; :mod:`trainer.distill.nnunet`);
* a **MONAI bundle** folder (``configs/inference.json``, ``models/model.pt``;
  :mod:`trainer.distill.bundle`).

The last two carry their own preprocessing (normalisation, axis order, spacing): they are
wrapped in :class:`trainer.distill.teacher_input.PreprocessedTeacher`, and
:func:`bind_to_data` checks the student's data against what they expect before training
(the teacher's normalisation is applied to raw channels, other mismatches are refused).
Files are read with ``weights_only=True``.

Teachers are frozen (eval mode, ``requires_grad=False``) and are never registered in the
student's LightningModule: they stay out of its ``state_dict``, its optimizer and the
reach of pruning/QAT callbacks (which act on ``pl_module.net``). Each teacher is identified by
its path and the sha256 of its file, which the student's checkpoint records.
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from trainer.distill import bundle, nnunet
from trainer.distill.teacher_input import PreprocessedTeacher, bind, spacing_warning
from trainer.export.card import sha256_file  # noqa: F401  (re-exported for trainer.distill.cache)
from trainer.errors import UserError
from trainer.inputs import file_problem

EnsembleMode = Literal["probs", "logits"]
ENSEMBLE_MODES = ("probs", "logits")
_PREFIXES = ("", "net.", "model.", "module.")


def freeze(net: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` for every parameter; returns ``net``."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def main_output(out: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The full-resolution logits of a network output (first item of a deep-supervision list)."""
    return out[0] if isinstance(out, (list, tuple)) else out


def load_teacher(path: str | Path, class_path: str | None = None,
                 init_args: dict[str, Any] | None = None,
                 hasher: Callable[[str], str] | None = None) -> tuple[nn.Module, dict[str, str]]:
    """Load and freeze one teacher; returns ``(net, {"path", "sha256", "class_path"})``.

    Args:
        path: a framework checkpoint, an nnU-Net v2 model folder (configuration or fold folder,
            or its checkpoint file) or a MONAI bundle folder (``class_path=None``), or a
            weights file.
        class_path: import path of the teacher's ``nn.Module`` class, for plain weights files.
        init_args: keyword arguments of that class.
        hasher: ``path -> sha256`` (default: hash the file here); a training run passes one
            that hashes once per node and shares the result with the other ranks.
    """
    path = Path(path)
    if class_path is None and nnunet.is_nnunet(path):
        return _from_nnunet(path)
    if class_path is None and bundle.is_bundle(path):
        net, expected, cls = bundle.build_network(path)
        weights = next(path / w for w in bundle.WEIGHTS if (path / w).is_file())
        info = {"path": str(path), "sha256": sha256_file(weights), "class_path": cls, "input": expected["source"]}
        return freeze(PreprocessedTeacher(net, expected)), info
    if problem := file_problem(path):
        raise UserError(f"teacher checkpoint {path} {problem} (Distillation.teacher)")
    if class_path is None:
        net = _from_framework_checkpoint(path)
    else:
        net = _from_class_path(path, class_path, init_args or {})
    info = {"path": str(path), "sha256": (hasher or sha256_file)(str(path)),
            "class_path": class_path or f"{type(net).__module__}.{type(net).__qualname__}"}
    return freeze(net), info


def _from_nnunet(path: Path) -> tuple[nn.Module, dict[str, str]]:
    model = nnunet.locate(path)
    net = nnunet.build_network(model)
    expected = nnunet.expected_input(model)
    info = {"path": str(path), "sha256": sha256_file(model.checkpoint),
            "class_path": f"{type(net).__module__}.{type(net).__qualname__}", "input": expected["source"]}
    return freeze(PreprocessedTeacher(net, expected)), info


def bind_to_data(teacher: "TeacherEnsemble", infos: Sequence[dict[str, str]], datamodule, mode: str = "check") -> list[str]:
    """Check each teacher's expected input against the data's preprocessing record
    (``datamodule.preprocessing``, written by ``data convert``) and set the transforms that
    give it its input; returns the sentences said (one per teacher). One-line ``UserError``
    when the data cannot be given a teacher's way (see :mod:`trainer.distill.teacher_input`)."""
    record = getattr(datamodule, "preprocessing", None)
    data = getattr(datamodule, "path", None) or type(datamodule).__name__
    said = []
    for member, info in zip(teacher.members, infos):
        expected = member.expected if isinstance(member, PreprocessedTeacher) else None
        transforms, sentence = bind(expected, record, str(data), info["path"], mode)
        if isinstance(member, PreprocessedTeacher):
            member.bind(transforms)
        if expected and expected.get("unrecognised_transforms"):
            sentence += f"; not applied (check them): {expected['unrecognised_transforms']}"
        if (warning := spacing_warning(expected, record, info["path"])) is not None:
            rank_zero_warn(warning)
        rank_zero_info(f"Distillation: {sentence}")
        said.append(sentence)
    return said


def _from_framework_checkpoint(path: Path) -> nn.Module:
    from trainer.restore import restore_run  # imports datamodules: only when needed

    try:
        return restore_run(path, with_data=False).net
    except UserError as err:
        raise UserError(f"teacher {err}; for a plain weights file set Distillation.teacher_class "
                        "(and teacher_init_args)") from None


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"teacher_class {class_path!r} cannot be imported ({exc})") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise UserError(f"teacher_class {class_path!r} is not an nn.Module class")
    return cls


def _from_class_path(path: Path, class_path: str, init_args: dict[str, Any]) -> nn.Module:
    cls = _import(class_path)
    try:
        net = cls(**init_args)
    except (TypeError, ValueError) as exc:
        raise UserError(f"teacher_class {class_path} rejected teacher_init_args {init_args}: {exc}") from None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling/zip errors of every kind
        raise UserError(f"teacher weights {path} are not readable ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"teacher weights {path} hold no state_dict of tensors")
    net.load_state_dict(_match_state(net, state, path, class_path))
    return net


def _match_state(net: nn.Module, state: dict[str, torch.Tensor], path: Path, class_path: str) -> dict[str, torch.Tensor]:
    """Pick the key prefix under which ``state`` fits ``net``; a one-line error if nothing fits."""
    expected = net.state_dict()
    candidates = [{k[len(p):]: v for k, v in state.items() if k.startswith(p)} for p in _PREFIXES]
    best = max(candidates, key=lambda c: len(expected.keys() & c.keys()))
    missing = sorted(expected.keys() - best.keys())
    unexpected = sorted(best.keys() - expected.keys())
    shapes = [f"{k} {tuple(best[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in best and best[k].shape != v.shape]
    if missing or unexpected or shapes:
        def few(items):
            return f"{items[:3]}{'...' if len(items) > 3 else ''}"
        raise UserError(
            f"teacher weights {path} do not match {class_path}: missing {few(missing)}, "
            f"unexpected {few(unexpected)}, shape mismatches {few(shapes)}; check teacher_init_args"
        )
    return best


class TeacherEnsemble(nn.Module):
    """One or more frozen teachers seen as one network that returns logits.

    Several teachers (e.g. the folds of a cross-validation) are combined per voxel:

    * ``"probs"`` (default): average the tempered probabilities,
      ``p = 1/M sum_m softmax(z_m / T)``, returned as the logits ``T * log p`` (so that
      ``softmax(. / T)`` of the result is exactly ``p``). The combined logits depend on ``T``.
    * ``"logits"``: average the logits, ``z = 1/M sum_m z_m`` (independent of ``T``).

    A single teacher's logits are returned unchanged in both modes. Feature hooks read the
    first teacher only (independently trained networks do not share channel meanings).

    Args:
        members: frozen networks mapping ``[B, C, *S]`` to ``[B, K, *S]`` (or a DS list).
        mode: ``"probs"`` or ``"logits"``.
        temperature: ``T`` of the ``"probs"`` average.
    """

    def __init__(self, members: Sequence[nn.Module], mode: EnsembleMode = "probs", temperature: float = 1.0):
        super().__init__()
        if mode not in ENSEMBLE_MODES:
            raise UserError(f"Distillation.ensemble={mode!r}: must be one of {list(ENSEMBLE_MODES)}")
        if not members:
            raise UserError("Distillation: no teacher given")
        self.members = nn.ModuleList(members)
        self.mode, self.temperature = mode, float(temperature)

    @property
    def first(self) -> nn.Module:
        """The first teacher's network (feature hooks use its own module paths)."""
        member = self.members[0]
        return member.net if isinstance(member, PreprocessedTeacher) else member

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        return super().train(False)  # a teacher is always in eval mode

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        outs = [main_output(m(image)) for m in self.members]
        if len(outs) == 1:
            return outs[0]
        shapes = {tuple(o.shape) for o in outs}
        if len(shapes) > 1:
            raise UserError(f"teacher ensemble members disagree on output shape: {sorted(shapes)}")
        if self.mode == "logits":
            return torch.stack([o.float() for o in outs]).mean(0)
        t = self.temperature
        logp = torch.stack([F.log_softmax(o.float() / t, dim=1) for o in outs]).logsumexp(0) - math.log(len(outs))
        return t * logp
