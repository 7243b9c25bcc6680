"""The verification set that travels with an artifact: ``verification_data.npz``.

Export verifies an artifact against PyTorch on the build machine; the deployment machine may
have another CPU (INT8 results can depend on it, see ``int8_safety``) and usually neither the
checkpoint nor PyTorch's exact numbers. So the export writes the inputs, labels and PyTorch
reference logits it verified on next to the artifact (compressed, size-capped), and
``launch.py verify ARTIFACT_DIR`` replays them there with the card's tolerance.

Layout (``numpy.savez_compressed``, no pickled objects)::

    image_0000 [B, C, *S] float32, label_0000 [B, *S] int16, reference_0000 [B, K, *S] float32, ...
    probe [b, C, *S] float32, probe_reference [b, K, *S] float32      (the shape probe, if any)
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from trainer.errors import UserError
from trainer.export.card import sha256_file

BUNDLE_NAME = "verification_data.npz"
DEFAULT_MAX_MB = 64.0


def write_bundle(
    directory: Path,
    batches: Sequence[dict[str, torch.Tensor]],
    references: Sequence[torch.Tensor],
    probe: torch.Tensor | None = None,
    probe_reference: torch.Tensor | None = None,
    max_mb: float = DEFAULT_MAX_MB,
) -> dict[str, Any] | None:
    """Write the first batches that fit in ``max_mb`` (uncompressed; at least one batch).

    Returns the card's ``verification.bundle`` section, or None when ``max_mb`` is 0.
    """
    if max_mb <= 0:
        return None
    arrays: dict[str, np.ndarray] = {}
    budget, used = max_mb * 2**20, 0
    for i, (batch, ref) in enumerate(zip(batches, references)):
        part = {
            f"image_{i:04d}": batch["image"].float().numpy(),
            f"label_{i:04d}": batch["label"].numpy().astype(np.int16),
            f"reference_{i:04d}": ref.float().numpy(),
        }
        size = sum(a.nbytes for a in part.values())
        if arrays and used + size > budget:
            break
        arrays.update(part)
        used += size
    kept = len(arrays) // 3
    if probe is not None and probe_reference is not None:
        arrays["probe"] = probe.float().numpy()
        arrays["probe_reference"] = probe_reference.float().numpy()
    path = directory / BUNDLE_NAME
    np.savez_compressed(path, **arrays)
    return {
        "file": BUNDLE_NAME,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "batches": kept,
        "of_batches": len(batches),
        "probe": "probe" in arrays,
    }


def read_bundle(directory: Path, section: dict[str, Any] | None) -> tuple[list[dict[str, torch.Tensor]], list[torch.Tensor],
                                                                          torch.Tensor | None, torch.Tensor | None]:
    """``(batches, references, probe, probe_reference)`` from the bundle the card describes."""
    if not section:
        raise UserError(f"{directory}: the model card lists no verification data (exported without it, or by an older "
                        "version); pass --data FILE --ckpt CKPT to verify against PyTorch on data you give")
    path = directory / section["file"]
    if not path.is_file():
        raise UserError(f"{path}: verification data named in the model card is missing")
    digest = sha256_file(path)
    if digest != section.get("sha256"):
        raise UserError(f"{path}: sha256 {digest[:12]}... does not match the model card ({str(section.get('sha256'))[:12]}...); "
                        "the verification data was modified or is corrupt")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"{path}: cannot read the verification data: {err}") from None
    batches, references = [], []
    for i in range(int(section.get("batches", 0))):
        keys = (f"image_{i:04d}", f"label_{i:04d}", f"reference_{i:04d}")
        if any(k not in arrays for k in keys):
            raise UserError(f"{path}: batch {i} is incomplete (expected {', '.join(keys)})")
        batches.append({"image": torch.from_numpy(arrays[keys[0]]), "label": torch.from_numpy(arrays[keys[1]].astype(np.int64))})
        references.append(torch.from_numpy(arrays[keys[2]]))
    probe = torch.from_numpy(arrays["probe"]) if "probe" in arrays else None
    probe_ref = torch.from_numpy(arrays["probe_reference"]) if "probe_reference" in arrays else None
    return batches, references, probe, probe_ref
