"""When to prune and how much: the per-round cumulative ratios of a prune-retrain loop.

A loop has ``rounds`` pruning events, one at the start of each round, ``epochs_per_round``
epochs apart, the first at ``start_epoch``. Round ``i`` (0-based) brings the cumulative
ratio to ``ratios[i]``; the last round reaches ``target``.

* ``"linear"``: equal steps, ``r_i = target * (i + 1) / rounds``.
* ``"cubic"``: gradual pruning of Zhu & Gupta 2017 ("To prune, or not to prune", AGP),
  ``r_i = target * (1 - (1 - (i + 1) / rounds) ** 3)``: large steps first, while the
  network still has redundancy, small steps near the target.

What a ratio means (fraction of each layer's original channels, or of all weights) is
decided by the pruning method, not here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainer.errors import UserError

ScheduleKind = Literal["linear", "cubic"]
SCHEDULES = ("linear", "cubic")


def check_ratio(value: float, what: str) -> float:
    """``value`` as a float in the open interval (0, 1); a one-line UserError otherwise."""
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what}={value!r}: must be a number in (0, 1)") from None
    if not 0.0 < ratio < 1.0:
        raise UserError(f"{what}={value!r}: must be in (0, 1) (fraction removed; 0.5 removes half)")
    return ratio


def round_ratios(target: float, rounds: int, kind: ScheduleKind = "linear") -> list[float]:
    """Cumulative ratio reached after each round; the last one equals ``target``."""
    if kind not in SCHEDULES:
        raise UserError(f"PruneRetrain.schedule={kind!r}: must be one of {list(SCHEDULES)}")
    if rounds < 1:
        raise UserError(f"PruneRetrain.rounds={rounds}: must be >= 1")
    fractions = [(i + 1) / rounds for i in range(rounds)]
    if kind == "cubic":
        fractions = [1.0 - (1.0 - f) ** 3 for f in fractions]
    return [target * f for f in fractions]


@dataclass(frozen=True)
class Schedule:
    """The rounds of a prune-retrain loop.

    Args:
        target: cumulative ratio after the last round, in (0, 1).
        rounds: number of pruning events (>= 1).
        epochs_per_round: retraining epochs between two pruning events (>= 1).
        start_epoch: epoch at whose start the first round prunes (>= 0).
        kind: ``"linear"`` or ``"cubic"`` (AGP).
    """

    target: float
    rounds: int = 3
    epochs_per_round: int = 2
    start_epoch: int = 0
    kind: ScheduleKind = "linear"

    def __post_init__(self):
        check_ratio(self.target, "PruneRetrain.target_ratio")
        if self.epochs_per_round < 1:
            raise UserError(f"PruneRetrain.epochs_per_round={self.epochs_per_round}: must be >= 1")
        if self.start_epoch < 0:
            raise UserError(f"PruneRetrain.start_epoch={self.start_epoch}: must be >= 0")
        round_ratios(self.target, self.rounds, self.kind)  # validates rounds and kind

    @property
    def ratios(self) -> list[float]:
        return round_ratios(self.target, self.rounds, self.kind)

    def epoch_of(self, round_index: int) -> int:
        """The epoch at whose start round ``round_index`` prunes."""
        return self.start_epoch + round_index * self.epochs_per_round

    def last_epoch_of(self, round_index: int) -> int:
        """The last retraining epoch of round ``round_index``."""
        return self.epoch_of(round_index) + self.epochs_per_round - 1

    @property
    def total_epochs(self) -> int:
        """Epochs needed for every round to prune and retrain."""
        return self.epoch_of(self.rounds)

    def due(self, rounds_done: int, epoch: int) -> bool:
        """Whether the next round should prune at the start of ``epoch``."""
        return rounds_done < self.rounds and epoch >= self.epoch_of(rounds_done)
