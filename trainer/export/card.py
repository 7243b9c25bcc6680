"""The model card: one JSON file next to every artifact, saying what it is and how it scored.

Schema (``card_version`` 1)::

    {
      "card_version": 1,
      "format": "onnx-int8-cpu",            "format_options": {...},
      "created": "2026-11-02T10:00:00+00:00",
      "artifact": {"file": "model.onnx", "bytes": 123, "sha256": "..."},
      "source": {"checkpoint": "/path/last.ckpt" | null, "checkpoint_sha256": "..." | null,
                 "model_class": "trainer.models.unet.UNet", "parameters": 12345},
      "input":  {"name": "image", "dtype": "float32", "shape": ["batch", 1, "height", "width"],
                 "dynamic_axes": {"0": "batch", "2": "height", "3": "width"},
                 "channels": 1, "spatial_dims": 2, "divisor": 16, "roi_size": null,
                 "sliding_window_overlap": 0.5},
      "output": {"name": "logits", "dtype": "float32", "shape": ["batch", 3, "height", "width"],
                 "num_classes": 3, "activation": "none (argmax over axis 1 gives the labels)"},
      "opset": 17,
      "class_names": ["background", ...],
      "graph": {"simplifier": "onnxslim 0.1.98", "nodes_before": {"total": n, "by_op": {...}},
                "nodes_after": {...}, "export_warnings": [...]},
      "metrics": {"dice": {"definition": "...", "pytorch": {"per_class": {...}, "mean_foreground": x},
                           "artifact": {...}},
                  "max_abs_diff": 1e-6, "argmax_agreement": 1.0},
      "verification": {"passed": true, "tolerance": {...}, "max_error_in_units": ..., ...},
      "details": {...format-specific: quantization settings, TensorRT layer precisions...},
      "versions": {"python": ..., "torch": ..., "onnx": ..., "onnxruntime": ..., "onnxslim": ...}
    }
"""
from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

CARD_NAME = "model_card.json"
CARD_VERSION = 1


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that made (and will run) the artifact."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnxslim", "tensorrt"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def write_card(card: dict[str, Any], directory: str | Path) -> Path:
    """Write ``card`` as ``model_card.json`` in ``directory`` (strict JSON: no NaN)."""
    path = Path(directory) / CARD_NAME
    path.write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")
    return path


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
