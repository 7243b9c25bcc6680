"""Reading checkpoints safely: ``weights_only=True``, and errors that name the file."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UserError


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint file on CPU with ``weights_only=True``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory; pass the .ckpt file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise UserError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{path} is not a Lightning checkpoint (no 'state_dict' key)")
    return ckpt
