"""Global RNG state in every checkpoint, so a resumed run draws what the uninterrupted one drew.

Added to every run by ``RecipeCLI`` (exact resume is not opt-in). What it guarantees: the
random numbers drawn by training steps (dropout, stochastic layers, random loss terms,
callbacks' ``on_train_batch_start``) after a resume are bitwise those of an uninterrupted run,
on every rank. Randomness of the data pipeline is the datamodule's business (derive it from
``(seed, epoch, index)`` and use a resumable sampler), because Lightning rebuilds data
iterators at different moments in a resumed run than in an uninterrupted one.

How: between two training batches the data pipeline and validation draw a run-dependent
number of values from the global generators (a resumed run builds fresh iterators; a run that
resumes at an epoch boundary may skip a validation). So the state a batch trains with is pinned:

* ``on_train_batch_end`` captures the state ``S`` (python, numpy, torch, CUDA) and moves the
  global generators to a side stream seeded from a hash of ``S``, from which iterators and
  validation draw;
* ``on_train_batch_start`` puts ``S`` back, so the next step draws from ``S`` in both runs;
* the checkpoint stores ``S`` of every rank (gathered at save time); on resume,
  ``on_train_start`` enters the same side stream and the first ``on_train_batch_start``
  restores ``S``.

numpy's state is stored as tensors: checkpoints load with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

RNGSnapshot = dict[str, Any]


def capture() -> RNGSnapshot:
    """The global python, numpy, torch (and CUDA) RNG states as weights_only-safe data."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    snap: RNGSnapshot = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        snap["cuda"] = torch.cuda.get_rng_state_all()
    return snap


def restore(snap: RNGSnapshot) -> None:
    """Set the global generators to ``snap`` (from :func:`capture`)."""
    py = snap["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = snap["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(snap["torch"])
    if "cuda" in snap and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(snap["cuda"])


def enter_side_stream(snap: RNGSnapshot) -> None:
    """Seed the global generators from a hash of ``snap``: a stream that never overlaps ``snap``'s."""
    digest = hashlib.sha256(snap["torch"].numpy().tobytes() + snap["numpy"]["keys"].numpy().tobytes()).digest()
    seed = int.from_bytes(digest[:8], "little")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RNGState(pl.Callback):
    """Saves and restores the global RNG states of every rank (see module docstring).

    No arguments: it is always on. A checkpoint written by a different number of ranks is
    resumed with rank 0's state on every rank (a warning says so).
    """

    def __init__(self) -> None:
        self._batch_state: RNGSnapshot | None = None  # the state the next training batch starts from
        self._loaded: list[RNGSnapshot] | None = None

    # ---------------------------------------------------------------- during training
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded is None:
            return
        states, self._loaded = self._loaded, None
        rank = trainer.global_rank
        if len(states) != trainer.world_size:
            rank_zero_warn(f"RNGState: checkpoint holds RNG states of {len(states)} ranks, this run has "
                           f"{trainer.world_size}; every rank resumes with rank 0's state")
            rank = 0
        self._batch_state = states[rank]
        enter_side_stream(self._batch_state)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._batch_state is not None:
            restore(self._batch_state)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batch_state = capture()
        enter_side_stream(self._batch_state)

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        # Lightning calls this on every rank when saving (trainer.save_checkpoint is collective),
        # so the states of all ranks can be gathered into rank 0's checkpoint.
        mine = self._batch_state if self._batch_state is not None else capture()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
            return {"ranks": everyone}
        return {"ranks": [mine]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = list(state_dict["ranks"])
