"""An export format from outside the repository: FP32 ONNX plus a sidecar file describing it."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

from trainer.export.registry import BuildContext, BuildResult, ExportFormat
from trainer.export.verify import Tolerance


@dataclass
class OnnxWithSidecar(ExportFormat):
    note: str = "made by a plugin"

    name = "demo-onnx-sidecar"
    summary = "FP32 ONNX and a JSON sidecar (a plugin format)"
    filename = "model.onnx"
    tolerance = Tolerance(atol=1e-3, unit="logit_scale")

    def build(self, ctx: BuildContext) -> BuildResult:
        src, before, after = ctx.simplified_onnx()
        artifact = ctx.out_dir / self.filename
        shutil.copyfile(src, artifact)
        (ctx.out_dir / "sidecar.json").write_text(json.dumps({"note": self.note, "classes": list(ctx.meta.class_names)}))
        return BuildResult(artifact=artifact, nodes_before=before, nodes_after=after, details={"note": self.note})
