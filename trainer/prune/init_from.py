"""Start a run from a trained checkpoint's network (``init_from``): structure, then weights.

Same contract as ``QuantizationAwareTraining(init_from=...)`` (``trainer/callbacks/qat.py``):
the checkpoint is read with ``weights_only=True``, its structural history (an earlier
pruning or quantization) is replayed on the freshly built net, then its ``net.*`` weights are
loaded strictly. Only the network is taken: optimizer, schedule and data position start
afresh. Kept separate from QAT's private method so either callback can be listed first; the
two should move into one core helper.
"""
from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from trainer.checkpointing import load_checkpoint
from trainer.errors import UserError
from trainer.structure import CHECKPOINT_KEY, replay


def load_initial(net: nn.Module, path: str | Path, owner: str) -> None:
    """Replay ``path``'s structural history on ``net`` and load its ``net.*`` weights."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    replay(net, ckpt.get(CHECKPOINT_KEY, {}).get("structure", []), source=f"{owner}: init_from={path}")
    weights = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    if not weights:
        raise UserError(f"{owner}: init_from={path} has no 'net.*' weights in its state_dict")
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(f"{owner}: init_from={path} does not fit {type(net).__qualname__} (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); was it trained with this model recipe?")
    rank_zero_info(f"{owner}: loaded {len(weights)} tensors from {path}")
