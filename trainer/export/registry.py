"""The export-format registry: one small class per artifact kind, found by name.

A format turns a verified PyTorch network into one file (plus optional side files) and says
how to run that file, so that ``export_artifact`` can score it against PyTorch with the same
whole-image inference code. Adding a format is adding a module under
``trainer/export/formats/`` with a class decorated by ``@register_format``; the package imports
every module in that folder on first lookup, so no other file needs editing::

    @register_format
    class OnnxQdq(ExportFormat):
        name = "onnx-qdq"
        summary = "QDQ ONNX from a QAT checkpoint, for TensorRT explicit quantization"
        tolerance = Tolerance(atol=2.0, unit="quant_step", max_exceed_fraction=1e-3)

        def build(self, ctx: BuildContext) -> BuildResult:
            path = ctx.simplified_onnx()          # exported + simplified once, shared
            ...
            return BuildResult(artifact=..., nodes_before=..., nodes_after=...)

A package outside this repository adds a format by declaring it as an entry point (found when
the package is installed; nothing here is edited)::

    [project.entry-points."compressseg.export_formats"]
    my-format = "mypkg.formats:MyFormat"

Constructor keyword arguments are the format's options; ``add_arguments`` exposes them on the
command line under the same ``dest`` names (``python launch.py export --format F --help``).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
from importlib import metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from trainer.errors import UserError
from trainer.export.verify import Tolerance

if TYPE_CHECKING:
    from trainer.export.api import ExportMeta

Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class BuildResult:
    """What a format's ``build`` hands back.

    Attributes:
        artifact: the file to verify and keep (inside ``ctx.out_dir``).
        nodes_before: ONNX node counts before simplification (``node_counts`` layout).
        nodes_after: node counts of the kept graph.
        output_step: quantization step of the output logits, if the artifact quantizes them;
            used by tolerances with ``unit="quant_step"``.
        details: format-specific card section (quantization settings, layer precisions...).
    """

    artifact: Path
    nodes_before: dict[str, Any] | None = None
    nodes_after: dict[str, Any] | None = None
    output_step: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildContext:
    """Everything a format may need while building, plus the shared FP32 ONNX export.

    Attributes:
        net: the network in eval mode on CPU (a private copy; formats may not modify it).
        example: one real input ``[1, C, *S]`` (padded to the divisor) used for tracing.
        batches: the validation batches that verification will use (image/label tensors).
        meta: shapes, classes, roi size and divisor.
        opset: ONNX opset for the export.
        out_dir: staging folder; the artifact and side files go here.
        work_dir: scratch folder, deleted before the artifact is published.
        input_shapes: every input shape verification will feed the artifact (for TensorRT
            optimization profiles).
        threads: onnxruntime intra-op threads for anything the format runs (0 = all cores).
        exporter: ``"torchscript"`` or ``"dynamo"``: which torch exporter ``simplified_onnx`` uses.
        tolerance: the user's overrides of the format's default tolerance, as given to
            ``export_artifact`` (a format that tunes itself to pass verification aims at these).
        probe: the shape-probe input verification also runs (batch 2, other spatial sizes).
    """

    net: torch.nn.Module
    example: torch.Tensor
    batches: list[dict[str, torch.Tensor]]
    meta: "ExportMeta"
    opset: int
    out_dir: Path
    work_dir: Path
    input_shapes: list[tuple[int, ...]]
    threads: int = 0
    exporter: str = "torchscript"
    tolerance: Tolerance | dict[str, Any] | None = None
    probe: torch.Tensor | None = None
    _onnx: tuple[Path, dict, dict] | None = field(default=None, repr=False)
    export_warnings: list[str] = field(default_factory=list)

    def simplified_onnx(self) -> tuple[Path, dict, dict]:
        """FP32 ONNX of ``net`` (dynamic batch and spatial axes), simplified with onnxslim.

        Exported once per context and shared by every format that derives from it.
        Returns ``(path in work_dir, node counts before, node counts after)``.
        """
        if self._onnx is None:
            from trainer.export.onnx_tools import export_onnx, simplify_onnx

            raw = self.work_dir / "raw.onnx"
            self.export_warnings = export_onnx(self.net, self.example, raw, opset=self.opset, exporter=self.exporter)
            slim = self.work_dir / "simplified.onnx"
            before, after = simplify_onnx(raw, slim)
            self._onnx = (slim, before, after)
        return self._onnx


class ExportFormat:
    """Base class of an export format. Subclasses set the class attributes and ``build``.

    Class attributes:
        name: the ``--format`` value.
        summary: one line for ``--help`` and error messages.
        filename: artifact file name inside the output folder.
        tolerance: default verification tolerance (``tolerance_for`` may refine it).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    filename: ClassVar[str] = "model.onnx"
    tolerance: ClassVar[Tolerance] = Tolerance()

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """Add this format's options; each ``dest`` must be a constructor keyword."""

    @staticmethod
    def add_exporter_argument(group: argparse._ArgumentGroup) -> None:
        """``--exporter``, for formats built on the plain FP32 export (``BuildContext.simplified_onnx``)."""
        from trainer.export.onnx_tools import EXPORTERS

        group.add_argument("--exporter", dest="exporter", choices=EXPORTERS, default="torchscript",
                           help="torch's ONNX exporter: torchscript (default, deprecated by torch) or dynamo "
                                "(torch.export + onnxscript, opset >= 18)")

    def options(self) -> dict[str, Any]:
        """The constructor options, recorded in the model card."""
        if dataclasses.is_dataclass(self):
            return dataclasses.asdict(self)
        return {}

    def check_available(self) -> None:
        """Raise ``UserError`` naming what is missing; called before anything is written."""

    def build(self, ctx: BuildContext) -> BuildResult:
        raise NotImplementedError

    def predictor(self, artifact: Path, threads: int = 0) -> Predictor:
        """A callable ``[b, C, *S] float32 -> [b, K, *S] float32`` running the artifact
        (``threads``: runtime threads, 0 = all cores)."""
        from trainer.export.onnx_tools import OrtPredictor, ort_session

        return OrtPredictor(ort_session(artifact, threads=threads))

    def static_checks(self, artifact: Path) -> dict[str, Any]:
        """Checks of the file itself that need no data and hold on every machine; run before the
        artifact is executed, at export and by ``launch.py verify``. Returns the card's
        ``verification.static_checks`` section; raises ``VerificationError`` on a defect."""
        return {}

    def tolerance_for(self, result: BuildResult) -> Tolerance:
        """The default tolerance for this build (e.g. depending on the precision built)."""
        return self.tolerance


_REGISTRY: dict[str, type[ExportFormat]] = {}
_DISCOVERED = False


def register_format(cls: type[ExportFormat]) -> type[ExportFormat]:
    """Class decorator: make ``cls`` available as ``--format cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__}: export formats need a non-empty `name`")
    other = _REGISTRY.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise TypeError(
            f"export format {cls.name!r} is registered twice: {other.__module__}.{other.__qualname__} "
            f"and {cls.__module__}.{cls.__qualname__}"
        )
    _REGISTRY[cls.name] = cls
    return cls


ENTRY_POINT_GROUP = "compressseg.export_formats"


def _discover() -> None:
    """Import every module in ``trainer.export.formats`` so their decorators run, then the formats
    installed packages declare under the entry-point group ``compressseg.export_formats``
    (``my-format = "mypkg.formats:MyFormat"``; the class needs no decorator)."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    import trainer.export.formats as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{mod.name}")
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry.load()
        except Exception as exc:  # a broken plugin is named, not a traceback
            raise UserError(f"export format plugin {entry.name!r} ({entry.value}, package "
                            f"{entry.dist.name if entry.dist else '?'}) cannot be loaded: {type(exc).__name__}: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, ExportFormat)) or cls.name != entry.name:
            raise UserError(f"export format plugin {entry.name!r} ({entry.value}) must name an ExportFormat subclass "
                            f"whose name is {entry.name!r}")
        if _REGISTRY.get(cls.name) is not cls:
            register_format(cls)


def known_formats() -> dict[str, type[ExportFormat]]:
    """Registered formats by name, sorted."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def format_class(name: str) -> type[ExportFormat]:
    """The class registered as ``name``; ``UserError`` listing the known ones otherwise."""
    formats = known_formats()
    if name not in formats:
        raise UserError(f"unknown export format {name!r}; known formats: {', '.join(formats)}")
    return formats[name]


def get_format(name: str, **options: Any) -> ExportFormat:
    """An instance of format ``name`` built with its options."""
    cls = format_class(name)
    try:
        return cls(**options)
    except TypeError as err:  # unknown keyword: name the format and the bad option
        raise UserError(f"export format {name!r}: {err}") from None
