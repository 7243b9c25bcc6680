"""What the CPU knew about a batch before Lightning moved it to the GPU.

Small per-sample facts (which samples are labelled, their dataset keys) and the label itself
are read on the host by the loss and by offline distillation. Read from the GPU copy, each
of them is a device-to-host transfer that waits for every queued kernel: a host sync per
training step. :class:`SegmentationModule.on_before_batch_transfer` stores this view under
:data:`KEY`; Lightning's transfer and precision plugins leave it alone (it is neither a tensor
nor a collection). Batches that never went through the transfer (a callback's own loader)
have none, and readers fall back to the batch itself.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

KEY = "_host"


class HostCopy:
    """CPU-side facts of one batch. A plain class on purpose: Lightning's ``apply_to_collection``
    (device transfer, precision casts) walks dataclasses, mappings and sequences, not this.

    Attributes:
        index: dataset keys of the samples (``batch["index"]``), or None.
        label: the label tensor on the CPU (``batch["label"]`` before the transfer), or None.
        labelled: per-sample flags (``batch["labelled"]``), or None when the batch has none.
    """

    __slots__ = ("index", "label", "labelled")

    def __init__(self, index: list[int] | None, label: torch.Tensor | None, labelled: list[bool] | None):
        self.index, self.label, self.labelled = index, label, labelled

    @property
    def labelled_index(self) -> list[int]:
        return [i for i, flag in enumerate(self.labelled or []) if flag]


def remember(batch: Any) -> Any:
    """``batch`` with its :class:`HostCopy` added (dict batches on the CPU only)."""
    if not isinstance(batch, dict) or KEY in batch:
        return batch
    label = batch.get("label")
    if isinstance(label, torch.Tensor) and label.device.type != "cpu":
        return batch  # already on a device: nothing to save
    index, labelled = batch.get("index"), batch.get("labelled")
    batch[KEY] = HostCopy(
        index=index.tolist() if isinstance(index, torch.Tensor) else None,
        label=label if isinstance(label, torch.Tensor) else None,
        labelled=[bool(v) for v in labelled.tolist()] if isinstance(labelled, torch.Tensor) else None,
    )
    return batch


def of(batch: Mapping[str, Any]) -> HostCopy | None:
    host = batch.get(KEY) if isinstance(batch, Mapping) else None
    return host if isinstance(host, HostCopy) else None
