"""What a pruned network costs: parameters, non-zero weights, MACs, channels kept.

MACs are those of the conv/ConvTranspose/Linear layers, counted by forward hooks for one
input of the given shape in eval mode (one multiply-accumulate counts once).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch_pruning as tp
from torch import nn

from trainer.prune.structured import example_input, original_out_channels

_CONVS = (nn.modules.conv._ConvNd, nn.Linear)


def count_params(net: nn.Module) -> int:
    """Parameters the network stores (after physical pruning; a masked weight still counts)."""
    seen, total = set(), 0
    for name, p in net.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_nonzero_weights(net: nn.Module) -> tuple[int, int]:
    """(non-zero, total) entries of conv/linear weights as the forward sees them (masks applied)."""
    nonzero = total = 0
    for m in net.modules():
        if isinstance(m, _CONVS):
            w = m.weight.detach()
            nonzero += int(torch.count_nonzero(w))
            total += w.numel()
    return nonzero, total


@torch.no_grad()
def count_macs(net: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of the conv/ConvTranspose/Linear layers in one forward of ``example``.

    Counted with forward hooks and ``isinstance``, so layers swapped for quantized subclasses
    (QAT) and physically pruned layers count by what they compute. Norms and activations are
    left out (they are a few percent of a U-Net's work and not where compression acts).
    """
    total = [0]

    def hook(module, inputs, output):
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            # each input element is spread over out_channels/groups x kernel outputs
            per_input = module.out_channels // module.groups * int(torch.tensor(module.kernel_size).prod())
            total[0] += inputs[0].numel() * per_input
        elif isinstance(module, nn.modules.conv._ConvNd):
            per_output = module.in_channels // module.groups * int(torch.tensor(module.kernel_size).prod())
            total[0] += output.numel() * per_output
        elif isinstance(module, nn.Linear):
            total[0] += output.numel() * module.in_features

    was_training = net.training
    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, _CONVS)]
    try:
        net.eval()(example)
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return int(total[0])


def out_channels(net: nn.Module) -> dict[str, int]:
    """Output channels of every conv/linear layer."""
    return {n: int(getattr(m, "out_channels", getattr(m, "out_features", 0))) for n, m in net.named_modules() if isinstance(m, _CONVS)}


def channels_kept(net: nn.Module, protected: Sequence[str] = ()) -> tuple[int, int]:
    """(kept, original) output channels summed over the conv/linear layers, from the history.

    Layers in ``protected`` (and layers never pruned, whose counts are unchanged) are counted
    as they are; the ratio kept/original is the network's "fraction of channels kept".
    """
    now = out_channels(net)
    first = original_out_channels(net)
    kept = sum(c for n, c in now.items() if n not in protected)
    original = sum(first.get(n, c) for n, c in now.items() if n not in protected)
    return kept, original


def measure(net: nn.Module, example_shape: Sequence[int] | None = None, protected: Sequence[str] = ()) -> dict[str, float]:
    """``{"params", "macs", "channels_kept", "channels_original", "channels_fraction",
    "weights_nonzero_fraction"}`` for a batch-1 input (``example_shape`` or the net's default)."""
    example = example_input(net, example_shape)[:1]
    kept, original = channels_kept(net, protected)
    nonzero, total = count_nonzero_weights(net)
    return {
        "params": count_params(net),
        "macs": count_macs(net, example),
        "channels_kept": kept,
        "channels_original": original,
        "channels_fraction": kept / original if original else 1.0,
        "weights_nonzero_fraction": nonzero / total if total else 1.0,
    }
