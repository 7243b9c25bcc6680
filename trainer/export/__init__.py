"""Export a trained segmentation network to a verified artifact with a model card.

Formats live in ``trainer/export/formats/`` (one file each, registered by name); every
artifact is simplified, run in its runtime on validation data, compared with PyTorch and only
then kept. See ``README_export.md``.
"""
from trainer.export.api import ExportMeta, export_artifact
from trainer.export.onnx_tools import OrtPredictor, export_onnx, node_counts, ort_session, simplify_onnx
from trainer.export.registry import (
    BuildContext,
    BuildResult,
    ExportFormat,
    format_class,
    get_format,
    known_formats,
    register_format,
)
from trainer.export.verify import Tolerance, VerificationError, verify_artifact

__all__ = [
    "BuildContext",
    "BuildResult",
    "ExportFormat",
    "ExportMeta",
    "OrtPredictor",
    "Tolerance",
    "VerificationError",
    "export_artifact",
    "export_onnx",
    "format_class",
    "get_format",
    "known_formats",
    "node_counts",
    "ort_session",
    "register_format",
    "simplify_onnx",
    "verify_artifact",
]
