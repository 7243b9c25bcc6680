"""A teacher sees its input the way it was trained to: normalisation and axis order honoured.

A teacher trained elsewhere (nnU-Net, a MONAI bundle) expects its own preprocessing: CT
clipped to the dataset's foreground percentiles and z-scored with the dataset's constants,
MRI z-scored per case, maybe its axes transposed. The student's batches carry whatever the
data file holds, and the data file says what that is: ``data convert`` writes a
preprocessing record (``datamodule.preprocessing``: per channel ``scheme`` -- ``CT`` with
``clip``/``mean``/``std``, ``zscore``, ``zscore_nonzero``, ``noNorm``, ``rescale_to_0_1``,
``rgb_to_0_1`` -- and the target spacing; :mod:`datamodules.preprocess`).
:func:`bind` compares, channel by channel, what the teacher expects with that record:

* the same scheme (and, for CT, the same constants): the batch goes in as it is;
* raw intensities in the data (``noNorm``) and a voxel-wise scheme in the teacher (CT,
  ``rgb_to_0_1``, MONAI's ``range``): :class:`PreprocessedTeacher` applies the teacher's
  normalisation to each batch before its network runs -- exact on patches, since it depends
  on no statistic of the case;
* raw intensities and a per-case scheme (z-score, min-max): refused -- a patch does not know
  its case's mean; convert the data with that scheme (``data convert --normalize zscore``);
* anything else (the data normalised another way, a file that records nothing): refused in
  one line naming both, unless ``Distillation.teacher_input: as_is`` says the user vouches
  for it.

Spacing: a teacher's target spacing that differs from the data's record by more than 5% is
warned about (distilling across resolutions is sometimes wanted). Axis order: nnU-Net's
``transpose_forward`` (MONAI's reversed ``x y z`` for bundles) is applied to the input and
undone on the logits; a 2D teacher that was trained on slices along another axis than z is
refused (no permutation of a z slice gives it what it saw).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from trainer.errors import UserError

VOXELWISE = ("CT", "rgb_to_0_1", "range", "noNorm")
PER_CASE = ("zscore", "zscore_nonzero", "rescale_to_0_1")
MODES = ("check", "as_is")


def describe(channel: dict[str, Any]) -> str:
    scheme = channel.get("scheme")
    if scheme == "CT":
        lo, hi = channel["clip"]
        return f"CT (clip [{lo:.6g}, {hi:.6g}], subtract {channel['mean']:.6g}, divide by {channel['std']:.6g})"
    if scheme == "range":
        return (f"range ([{channel['a_min']:g}, {channel['a_max']:g}] -> [{channel['b_min']:g}, {channel['b_max']:g}]"
                f"{', clipped' if channel.get('clip') else ''})")
    return {"zscore": "z-score per case", "zscore_nonzero": "z-score per case over non-zero voxels",
            "noNorm": "none (raw intensities)", "rescale_to_0_1": "min-max per case",
            "rgb_to_0_1": "divide by 255"}.get(scheme, str(scheme))


def _contract(channel: dict[str, Any]) -> tuple:
    keys = {"CT": ("clip", "mean", "std"), "range": ("a_min", "a_max", "b_min", "b_max", "clip")}.get(channel.get("scheme"), ())
    return (channel.get("scheme"), *[_rounded(channel.get(k)) for k in keys])


def _rounded(value):
    if isinstance(value, (list, tuple)):
        return tuple(_rounded(v) for v in value)
    return round(float(value), 4) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def voxelwise(channel: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The teacher's normalisation of one raw channel, voxel by voxel."""
    scheme = channel["scheme"]
    if scheme == "CT":
        lo, hi = channel["clip"]
        mean, std = float(channel["mean"]), max(float(channel["std"]), 1e-8)
        return lambda x: (x.clamp(lo, hi) - mean) / std
    if scheme == "rgb_to_0_1":
        return lambda x: x / 255.0
    if scheme == "range":
        a0, a1, b0, b1 = (float(channel[k]) for k in ("a_min", "a_max", "b_min", "b_max"))
        clip = bool(channel.get("clip"))

        def scale(x):
            y = (x - a0) / (a1 - a0) * (b1 - b0) + b0
            return y.clamp(min(b0, b1), max(b0, b1)) if clip else y
        return scale
    return lambda x: x  # noNorm


def bind(expected: dict[str, Any] | None, record: dict[str, Any] | None, data: str, teacher: str,
         mode: str = "check") -> tuple[list[Callable] | None, str]:
    """Per-channel input transforms for a teacher (``None``: the batch as it is) and a sentence
    for the log; a one-line ``UserError`` when the data cannot be given the teacher's way."""
    if mode not in MODES:
        raise UserError(f"Distillation.teacher_input={mode!r}: must be one of {list(MODES)}")
    if not expected or not expected.get("channels"):
        return None, f"{teacher}: batches as they are (the teacher records no preprocessing)"
    want = expected["channels"]
    words = "; ".join(f"channel {i}: {describe(c)}" for i, c in enumerate(want))
    if mode == "as_is":
        return None, f"{teacher}: batches as they are (teacher_input: as_is; it expects {words})"
    if not record or not isinstance(record.get("channels"), list):
        raise UserError(f"{data} records no intensity normalisation, but teacher {teacher} expects {words}; convert the "
                        "scans with `launch.py data convert` (its record says what the data holds), or set "
                        "Distillation.teacher_input: as_is if the data already is normalised that way")
    have = record["channels"]
    if len(have) != len(want):
        raise UserError(f"{data} has {len(have)} channels, teacher {teacher} expects {len(want)} ({words})")
    transforms, needed = [], False
    for i, (h, w) in enumerate(zip(have, want)):
        if _contract(h) == _contract(w):
            transforms.append(None)
        elif h.get("scheme") == "noNorm" and w["scheme"] in VOXELWISE:
            transforms.append(voxelwise(w))
            needed = True
        elif h.get("scheme") == "noNorm":
            raise UserError(f"{data} channel {i} holds raw intensities, teacher {teacher} expects {describe(w)}, which needs "
                            f"the whole case; convert the data with --normalize {w['scheme']}")
        else:
            raise UserError(f"{data} channel {i} is normalised as {describe(h)}, teacher {teacher} expects {describe(w)}; "
                            f"convert the data the teacher's way (--normalize {w['scheme'] if w['scheme'] != 'range' else 'noNorm'})")
    if not needed:
        return None, f"{teacher}: batches as they are (the data is normalised as the teacher expects: {words})"
    return transforms, f"{teacher}: raw channels normalised the teacher's way before it runs ({words})"


def spacing_warning(expected: dict[str, Any] | None, record: dict[str, Any] | None, teacher: str) -> str | None:
    """A sentence when the teacher's spacing and the data's differ by more than 5% on some axis."""
    want = [float(s) for s in (expected or {}).get("spacing") or []]
    have = ((record or {}).get("resampling") or {}).get("target_spacing_zyx_mm")
    if not want or not have:
        return None
    have = [float(s) for s in have][-len(want):]
    off = [(w, h) for w, h in zip(want, have) if w > 0 and h > 0 and not math.isclose(w, h, rel_tol=0.05)]
    if not off:
        return None
    return (f"teacher {teacher} was trained at spacing {want} mm (z y x), the data is resampled to {have} mm; its "
            "logits may be off at this resolution (resample the data to the teacher's spacing with data convert --target-spacing)")


class PreprocessedTeacher(nn.Module):
    """A frozen network behind the preprocessing its training used.

    Args:
        net: the teacher network (``[B, C, *S] -> [B, K, *S]``).
        expected: what it expects (``channels``, optional ``transpose``, ``spacing``, ``source``).
    """

    def __init__(self, net: nn.Module, expected: dict[str, Any] | None = None):
        super().__init__()
        self.net = net
        self.expected = expected or {}
        self.transforms: list[Callable] | None = None
        forward = list(self.expected.get("transpose") or [])
        self._axes = forward if forward and forward != sorted(forward) else None

    def bind(self, transforms: Sequence[Callable | None] | None) -> None:
        self.transforms = list(transforms) if transforms is not None else None

    def forward(self, image: torch.Tensor):
        x = image
        if self.transforms is not None:
            x = torch.cat([t(x[:, c:c + 1]) if t else x[:, c:c + 1] for c, t in enumerate(self.transforms)], 1)
        if self._axes is None:
            return self.net(x)
        spatial = x.dim() - 2
        if spatial == 2 and len(self._axes) == 3 and self._axes[0] != 0:
            # a 2D teacher saw slices along its first (transposed) axis; the data's 2D slices
            # are along z: the teacher never saw such slices, no permutation of them makes it so
            raise UserError(f"teacher {self.expected.get('source', '?')} was trained on 2D slices along axis "
                            f"{self._axes[0]} (z y x) of the volumes (transpose {self._axes}), the data's slices are "
                            "along z; a 2D teacher cannot read them")
        axes = self._axes[-spatial:]
        offset = min(axes)
        perm = [0, 1, *[2 + a - offset for a in axes]]
        out = self.net(x.permute(*perm))
        inverse = [perm.index(i) for i in range(len(perm))]
        return [o.permute(*inverse) for o in out] if isinstance(out, (list, tuple)) else out.permute(*inverse)
