"""Canaries: fail loudly when Lightning changes the private code this project leans on.

``trainer.strategies.DeepSpeedZeroStrategy`` (CPU path) replaces or bypasses private methods
of Lightning's ``DeepSpeedStrategy``; ``trainer.checkpointing.LastBatchResumeFix`` works around
the fit loop's restart logic; ``RequeueOnSignal`` replaces the SIGTERM handler that
``_SignalConnector`` installs. Their sources are pinned by hash (Lightning 2.6.6). When one
changes, re-read it against the named file, fix if needed, and update the hash.
"""
from __future__ import annotations

import hashlib
import inspect

import pytest
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from trainer.strategies import RELIES_ON, DeepSpeedZeroStrategy

PINNED = {
    # trainer/strategies.py: the CPU path copies these, minus the CUDA-only bits
    (DeepSpeedStrategy, "setup_environment"): "de7e179a7fc99ab5",
    (DeepSpeedStrategy, "setup_distributed"): "78cee79c7c131102",
    (DeepSpeedStrategy, "_setup_model_and_optimizer"): "6a7d1e7daa636a60",
    (DeepSpeedStrategy, "_initialize_deepspeed_inference"): "dc47d956a17bc6ac",
    (DeepSpeedStrategy, "_init_deepspeed_distributed"): "4a4df8858860216f",
    (DeepSpeedStrategy, "save_checkpoint"): "c49b25ab28f4489a",
    (DDPStrategy, "setup_environment"): "1e06686893832bc8",
    # trainer/checkpointing.py LastBatchResumeFix: the restart logic it steers
    (_FitLoop, "reset"): "ee34bf3662fe2739",
    (_FitLoop, "update_restart_stage"): "f0a84f5e08328f31",
    (_TrainingEpochLoop, "reset"): "0014631aabe0ac52",
    # trainer/callbacks/requeue.py: whose SIGTERM handler RequeueOnSignal takes back
    (_SignalConnector, "register_signal_handlers"): "cd4b642fd86bfc6f",
}


def _digest(owner: type, name: str) -> str:
    return hashlib.sha256(inspect.getsource(getattr(owner, name)).encode()).hexdigest()[:16]


@pytest.mark.parametrize("owner,name", list(PINNED), ids=[f"{o.__name__}.{n}" for o, n in PINNED])
def test_pinned_lightning_source_unchanged(owner, name):
    assert hasattr(owner, name), f"Lightning removed {owner.__name__}.{name}; trainer/ relies on it"
    got = _digest(owner, name)
    assert got == PINNED[(owner, name)], (
        f"Lightning changed {owner.__name__}.{name} (sha {got}); re-check the code that relies on it "
        "(trainer/strategies.py, trainer/checkpointing.py LastBatchResumeFix, trainer/callbacks/requeue.py) "
        "and update PINNED")


def test_every_relied_on_strategy_method_is_pinned():
    assert {n for o, n in PINNED if o is DeepSpeedStrategy} == set(RELIES_ON)


def test_private_helpers_still_importable_and_used_by_the_stock_strategy():
    from lightning.fabric.utilities.seed import reset_seed  # noqa: F401
    from lightning.pytorch.strategies.deepspeed import remove_module_hooks  # noqa: F401

    stock = inspect.getsource(DeepSpeedStrategy)
    for needle in ("_validate_device_index_selection(self.parallel_devices)", "device_rank=self.root_device.index",
                   "only supported on CUDA GPUs", "self.set_world_ranks()"):
        assert needle in stock, f"DeepSpeedStrategy no longer contains {needle!r}; re-check trainer/strategies.py"
    assert issubclass(DeepSpeedZeroStrategy, DeepSpeedStrategy)
