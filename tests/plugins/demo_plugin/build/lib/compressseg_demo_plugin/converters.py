"""A structural technique from outside the repository: drop the segmentation head's bias."""
from __future__ import annotations

from typing import Any

from torch import nn

from trainer.structure import record


class DropHeadBias:
    """Replaces ``net.<head>`` by the same convolution without a bias; replayable from its state."""

    @classmethod
    def apply(cls, net: nn.Module, head: str = "head") -> None:
        state = {"head": head}
        cls.rebuild(net, state)
        record(net, cls, state)

    @classmethod
    def rebuild(cls, net: nn.Module, state: dict[str, Any]) -> None:
        old = net.get_submodule(state["head"])
        new = type(old)(old.in_channels, old.out_channels, old.kernel_size, bias=False)
        new.weight.data.copy_(old.weight.data)
        setattr(net, state["head"], new)
