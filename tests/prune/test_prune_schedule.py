"""Round ratios (linear, cubic AGP) and epochs of a prune-retrain loop."""
import pytest

from trainer.errors import UserError
from trainer.prune.schedule import Schedule, round_ratios


def test_linear_and_cubic_ratios():
    assert round_ratios(0.6, 3, "linear") == pytest.approx([0.2, 0.4, 0.6])
    cubic = round_ratios(0.5, 4, "cubic")  # Zhu & Gupta: s_t = s_f (1 - (1 - t/n)^3)
    assert cubic == pytest.approx([0.5 * (1 - (1 - t / 4) ** 3) for t in (1, 2, 3, 4)])
    assert cubic[0] > 0.5 / 4 and cubic[-1] == pytest.approx(0.5)  # big steps first


def test_round_epochs():
    s = Schedule(0.5, rounds=3, epochs_per_round=2, start_epoch=1)
    assert [s.epoch_of(i) for i in range(3)] == [1, 3, 5] and s.last_epoch_of(0) == 2 and s.total_epochs == 7
    assert not s.due(0, 0) and s.due(0, 1) and not s.due(1, 2) and s.due(1, 3) and not s.due(3, 9)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "half"])
def test_ratio_outside_open_interval(bad):
    with pytest.raises(UserError, match=r"target_ratio=.*must be"):
        Schedule(bad)
