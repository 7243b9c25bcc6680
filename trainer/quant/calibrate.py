"""Calibration: the initial ranges (``amax``, scale = amax / 127) of every quantizer.

Weights always use their per-channel ``max |w|`` (TensorRT's weight scheme). Activations
(the inputs of quantized layers) are observed on N batches and reduced to one ``amax`` by:

* ``max``: the largest ``|x|`` seen. Exact range, but one outlier wastes most of the grid.
* ``percentile``: the given percentile of ``|x|`` over all observed values (e.g. 99.99),
  read from a histogram; clips the rare outliers.
* ``mse``: the ``amax`` that minimises the mean squared quantization error (rounding plus
  clipping) of the observed ``|x|`` histogram, searched over the histogram's bin edges.

The histogram has ``bins`` equal bins over ``[0, amax seen so far]``; when a later batch
exceeds the range, groups of ``k`` neighbouring bins are merged (bin edges stay aligned, so
no count moves) until the range covers it. Calibration runs without gradients, with its own
random-number state (dropout or a shuffling loader does not shift the training run's RNG),
and leaves BatchNorm running statistics as it found them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch
from torch import nn

from trainer.collectives import gathered
from trainer.errors import UserError
from trainer.quant.fake_quant import QMAX, TensorQuantizer, channel_amax
from trainer.quant.modules import QuantLayer

Method = Literal["max", "percentile", "mse"]
METHODS = ("max", "percentile", "mse")


class MaxObserver:
    """Running ``max |x|``."""

    def __init__(self) -> None:
        self.amax: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        m = x.abs().max().float()
        self.amax = m if self.amax is None else torch.maximum(self.amax, m)

    def compute(self) -> torch.Tensor | None:
        return self.amax


class HistogramObserver:
    """Histogram of ``|x|`` with a growing range; ``compute`` applies ``percentile`` or ``mse``."""

    def __init__(self, method: Method, percentile: float = 99.99, bins: int = 2048) -> None:
        self.method = method
        self.percentile = percentile
        self.bins = bins
        self.hist: torch.Tensor | None = None
        self.width = 0.0

    def observe(self, x: torch.Tensor) -> None:
        x = x.abs().float().flatten()
        top = float(x.max())
        if self.hist is None:
            # a hair above ``top`` so float rounding never leaves the maximum outside the range
            self.width = max(top, 1e-12) * (1 + 2**-20) / self.bins
            self.hist = torch.zeros(self.bins, dtype=torch.float64, device=x.device)
        while top > self.width * self.bins:
            self._grow(top)
        upper = self.width * self.bins
        self.hist += torch.histc(x, bins=self.bins, min=0.0, max=upper).double()

    def _grow(self, top: float) -> None:
        """Merge groups of ``k`` bins so the range ``width * bins`` covers ``top``."""
        k = math.ceil(top / (self.width * self.bins))
        old = self.hist
        target = torch.arange(self.bins, device=old.device) // k  # old bin i lies inside new bin i // k
        self.hist = torch.zeros_like(old).index_add_(0, target, old)
        self.width *= k

    def edges(self) -> torch.Tensor:
        return torch.arange(self.bins + 1, dtype=torch.float64, device=self.hist.device) * self.width

    def compute(self) -> torch.Tensor | None:
        if self.hist is None:
            return None
        if self.method == "percentile":
            return torch.tensor(percentile_amax(self.hist, self.edges(), self.percentile))
        return torch.tensor(mse_amax(self.hist, self.edges()))


def percentile_amax(hist: torch.Tensor, edges: torch.Tensor, percentile: float) -> float:
    """Upper edge of the bin where the cumulative count reaches ``percentile`` % of the total."""
    cdf = hist.cumsum(0) / hist.sum().clamp_min(1e-30)
    idx = int(torch.searchsorted(cdf, torch.tensor([percentile / 100.0], dtype=cdf.dtype, device=cdf.device)))
    return float(edges[min(idx + 1, len(edges) - 1)])


def mse_amax(hist: torch.Tensor, edges: torch.Tensor, candidates: int = 512) -> float:
    """The candidate ``amax`` (a bin edge) with the least expected squared error over ``hist``.

    Values are represented by their bin centres; error of a value ``v`` for a given amax is
    ``(v - clamp(round(v / s), 0, 127) * s) ** 2`` with ``s = amax / 127``.
    """
    centres = (edges[:-1] + edges[1:]) / 2
    n = len(centres)
    first = max(1, n // 64)  # amax below 1/64 of the range clips almost everything
    idx = torch.unique(torch.linspace(first, n, min(candidates, n - first + 1), device=hist.device).round().long())
    amax = edges[idx].unsqueeze(1)  # [C, 1]
    s = amax / QMAX
    q = torch.clamp(torch.round(centres / s), 0, QMAX) * s
    err = ((centres - q) ** 2 * hist).sum(1)
    return float(amax[int(err.argmin())])


def make_observer(method: str, percentile: float = 99.99, bins: int = 2048):
    if method not in METHODS:
        raise UserError(f"calibration={method!r} must be one of {', '.join(METHODS)}")
    return MaxObserver() if method == "max" else HistogramObserver(method, percentile, bins)


@dataclass
class CalibrationReport:
    """What calibration did: ``amax`` per activation quantizer, and those that saw no data."""

    method: str
    batches: int
    activation_amax: dict[str, float] = field(default_factory=dict)
    unobserved: list[str] = field(default_factory=list)


def quant_layers(net: nn.Module) -> dict[str, QuantLayer]:
    """The quantized layers of ``net`` by module path."""
    return {name: m for name, m in net.named_modules() if isinstance(m, QuantLayer)}


def set_weight_ranges(net: nn.Module) -> None:
    """Weight scales from the current weights' per-channel max (skips frozen quantizers).

    Under DeepSpeed ZeRO-3 the weights are partitioned (empty on every rank) outside a
    forward pass: they are gathered for the duration (one all-gather of the quantized
    weights; every rank must call this, as the QAT callback does after each step)."""
    layers = [layer for layer in quant_layers(net).values() if not layer.weight_quant.frozen]
    with gathered([layer.weight for layer in layers]):  # type: ignore[attr-defined]
        for layer in layers:
            layer.weight_quant.set_amax(channel_amax(layer.weight, layer.WEIGHT_AXIS))  # type: ignore[attr-defined]


@torch.no_grad()
def calibrate(
    net: nn.Module,
    images: Iterable[torch.Tensor],
    method: str = "percentile",
    percentile: float = 99.99,
    bins: int = 2048,
    train_mode: bool = False,
) -> CalibrationReport:
    """Set all weight scales (per-channel max) and activation scales (``method`` over ``images``).

    Args:
        net: a network with quantized layers (see ``trainer.quant.convert``).
        images: input batches ``[B, C, *S]`` on the net's device; every one is used.
        method: ``max``, ``percentile`` or ``mse`` for activations.
        percentile: for ``percentile``, in (0, 100]. Default 99.99.
        bins: histogram bins for ``percentile``/``mse``. Default 2048.
        train_mode: run the net in training mode (BatchNorm uses batch statistics, deep
            supervision heads run) as QAT will; ``False`` calibrates the inference path (PTQ).

    Activation quantizers that no batch reached (e.g. deep-supervision heads in eval mode)
    stay disabled (pass-through) and are listed in ``unobserved``.
    """
    layers = quant_layers(net)
    if not layers:
        raise UserError(f"{type(net).__qualname__} has no quantized layers to calibrate")
    set_weight_ranges(net)
    inputs: dict[str, TensorQuantizer] = {name: layer.input_quant for name, layer in layers.items()}
    for q in inputs.values():
        q.observer = make_observer(method, percentile, bins)
    modes = {m: m.training for m in net.modules()}
    norm_state = _norm_buffers(net)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    seen = 0
    try:
        net.train(train_mode)
        with torch.random.fork_rng(devices=devices):
            for x in images:
                net(x)
                seen += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
        _restore(norm_state)
        observers = {name: q.observer for name, q in inputs.items()}
        for q in inputs.values():
            q.observer = None
    if seen == 0:
        raise UserError("calibration got no batches; check the data (calib_batches / --batches)")
    report = CalibrationReport(method=method, batches=seen)
    for name, obs in observers.items():
        amax = obs.compute()
        if amax is None:
            report.unobserved.append(name)
            inputs[name].enabled = False
            continue
        inputs[name].set_amax(amax)
        report.activation_amax[name] = float(amax)
    return report


def _norm_buffers(net: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every normalization buffer (running stats, batch counters)."""
    out = []
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            out += [(b, b.detach().clone()) for b in m.buffers(recurse=False)]
    return out


def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for buf, copy in saved:
        buf.copy_(copy)
