"""``export_artifact``: build, verify, describe, then publish one artifact.

The artifact is built in a staging folder next to the output folder and renamed into place
only after it matched PyTorch on the validation data; a failed verification deletes the
staging folder and raises ``VerificationError`` with the worst mismatch. The output folder
never holds a half-written or unverified artifact.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from trainer.errors import UserError
from trainer.inputs import make_dirs, remove_dirs
from trainer.export import card as cards
from trainer.export.bundle import DEFAULT_MAX_MB, write_bundle
from trainer.export.machine import machine_info
from trainer.export.onnx_tools import INPUT_NAME, OUTPUT_NAME, axis_names
from trainer.export.registry import BuildContext, ExportFormat, get_format
from trainer.export.verify import Tolerance, VerificationError, verify_artifact
from trainer.inference import pad_to_multiple, predict_logits

log = logging.getLogger(__name__)


@dataclass
class ExportMeta:
    """What the exporter must know about the model and its data.

    Args:
        spatial_dims: 2 or 3.
        num_classes: output channels, background included.
        class_names: one per class; defaults to ``class0..``.
        divisor: spatial sizes the network accepts are multiples of this. Default 16.
        roi_size: sliding-window size for 3D (``None``: whole images).
        overlap: sliding-window overlap. Default 0.5.
        in_channels: image channels; read from the data when ``None``.
        checkpoint: the source checkpoint, recorded with its sha256.
        preprocessing: how the training data was made from raw scans (orientation, spacing,
            intensity normalisation: ``datamodules.preprocess``), copied into the card so a
            deployed model knows its input; ``None`` when the data file records none.
    """

    spatial_dims: int
    num_classes: int
    class_names: Sequence[str] | None = None
    divisor: int = 16
    roi_size: Sequence[int] | None = None
    overlap: float = 0.5
    in_channels: int | None = None
    checkpoint: str | Path | None = None
    preprocessing: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise UserError(f"spatial_dims={self.spatial_dims} must be 2 or 3")
        if self.class_names is None:
            self.class_names = [f"class{i}" for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise UserError(
                f"class_names has {len(self.class_names)} entries but num_classes={self.num_classes}"
            )
        if self.roi_size is not None and len(self.roi_size) != self.spatial_dims:
            raise UserError(f"roi_size={list(self.roi_size)} must have {self.spatial_dims} entries")

    @classmethod
    def from_run(cls, run: Any, checkpoint: str | Path | None = None) -> "ExportMeta":
        """Read the fields from ``trainer.restore.restore_run``'s result: the module's own
        inference settings (``model.sw_overlap`` too, as validation used them) and the data
        file's preprocessing record."""
        settings = run.module.inference
        return cls(
            spatial_dims=run.spatial_dims,
            num_classes=run.num_classes,
            class_names=list(run.class_names) if run.class_names else None,
            divisor=settings.divisor,
            roi_size=list(settings.roi_size) if settings.roi_size is not None else None,
            overlap=settings.overlap,
            in_channels=getattr(run, "in_channels", None),
            checkpoint=checkpoint,
            preprocessing=getattr(run.datamodule, "preprocessing", None),
        )


def check_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """``out_dir`` as a Path; ``UserError`` if it exists, is not empty and ``overwrite`` is off."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        n = sum(1 for _ in out.iterdir())
        raise UserError(f"output directory {out} is not empty ({n} entries); pass --overwrite or choose another --out")
    return out


# where each image lies in its case: metrics rebuild whole cases and HD95 needs the spacing
CASE_KEYS = ("case", "spacing", "slice", "depth", "size")


def take_batches(batches: Iterable[Mapping[str, Any]], max_batches: int | None) -> list[dict[str, torch.Tensor]]:
    """The first ``max_batches`` batches as ``{"image", "label"}`` CPU tensors (plus the case
    metadata in ``CASE_KEYS`` where the batch has it), checked."""
    out = []
    for i, batch in enumerate(itertools.islice(batches, max_batches)):
        if not isinstance(batch, Mapping) or "image" not in batch or "label" not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise UserError(f"validation batch {i} must be a dict with 'image' and 'label'; got {keys}")
        image, label = batch["image"], batch["label"]
        if image.dim() != label.dim() + 1 or image.shape[0] != label.shape[0] or image.shape[2:] != label.shape[1:]:
            raise UserError(
                f"validation batch {i}: image shape {tuple(image.shape)} does not match label shape "
                f"{tuple(label.shape)} (expected [B, C, *S] and [B, *S])"
            )
        meta = {k: batch[k].cpu() if isinstance(batch[k], torch.Tensor) else batch[k] for k in CASE_KEYS if k in batch}
        out.append({"image": image.detach().float().cpu(), "label": label.detach().long().cpu(), **meta})
    if not out:
        raise UserError("the validation dataloader yielded no batches; export needs data to verify on")
    return out


def _example_input(batches: list[dict[str, torch.Tensor]], meta: ExportMeta) -> torch.Tensor:
    """One real input for tracing: an roi-sized crop (3D) or the padded first image."""
    image = batches[0]["image"][:1]
    if meta.roi_size is not None:
        image = _fit(image, meta.roi_size)
    return pad_to_multiple(image, meta.divisor)[0]


def _fit(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop (from the start) or zero-pad the spatial dims of ``image`` to ``size``."""
    image = image[(slice(None), slice(None), *[slice(0, s) for s in size])]
    pads: list[int] = []
    for have, want in zip(reversed(image.shape[2:]), reversed(list(size))):
        pads += [0, want - have]
    return F.pad(image, pads) if any(pads) else image


def _probe_input(example: torch.Tensor, divisor: int) -> torch.Tensor:
    """A batch of two with every spatial dim one divisor larger than the traced example."""
    x = torch.cat([example, example.flip(-1)])
    pads: list[int] = []
    for _ in example.shape[2:]:
        pads += [0, divisor]
    return F.pad(x, pads, mode="replicate")


def _observed_shapes(batches: list[dict[str, torch.Tensor]], meta: ExportMeta, probe: torch.Tensor) -> list[tuple[int, ...]]:
    """Every input shape verification will feed the artifact (cheap: the model is not run)."""
    seen: list[tuple[int, ...]] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return x.new_zeros((x.shape[0], meta.num_classes, *x.shape[2:]))

    for batch in batches:
        predict_logits(record, batch["image"], roi_size=meta.roi_size, overlap=meta.overlap, divisor=meta.divisor)
    seen.append(tuple(probe.shape))
    return sorted(set(seen))


def _stage_dir(out: Path) -> tuple[Path, list[str]]:
    """A staging folder next to ``out`` and the parent folders made for it (removed on failure)."""
    created = make_dirs(out.parent, f"--out {out}")
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent)), created
    except OSError as e:
        remove_dirs(created)
        raise UserError(f"cannot write --out {out}: {e.strerror or e}") from None


def _publish(staging: Path, out: Path) -> None:
    """Move the verified staging folder to ``out``, replacing an old one only now."""
    old = None
    try:
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "previous")
        staging.rename(out)
    except OSError as e:
        if old is not None and (old / "previous").exists() and not out.exists():
            (old / "previous").rename(out)  # put the old artifact back
        raise UserError(f"cannot write --out {out}: {e.strerror or e}") from None
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def export_artifact(
    net: torch.nn.Module,
    format: str | ExportFormat,
    out_dir: str | Path,
    val_batches: Iterable[Mapping[str, Any]],
    meta: ExportMeta,
    *,
    opset: int = 17,
    overwrite: bool = False,
    tolerance: Tolerance | Mapping[str, Any] | None = None,
    max_batches: int | None = None,
    threads: int = 0,
    format_options: Mapping[str, Any] | None = None,
    bundle_max_mb: float = DEFAULT_MAX_MB,
) -> Path:
    """Export ``net`` as ``format`` into ``out_dir``, verify it, write its model card.

    Args:
        net: the segmentation network (not modified: a CPU copy in eval mode is exported).
        format: a registered format name (see ``known_formats()``) or a format instance.
        out_dir: output folder; must be absent or empty unless ``overwrite``.
        val_batches: batches ``{"image": [B, C, *S] float, "label": [B, *S] int}``;
            used for verification (and calibration, for formats that calibrate).
        meta: model and data description (``ExportMeta.from_run`` for a restored run).
        opset: ONNX opset, 17 or newer. Default 17.
        overwrite: replace a non-empty ``out_dir`` (only after the new artifact verified).
        tolerance: a ``Tolerance`` replacing the format's default, or a mapping of fields to
            override in it (e.g. ``{"min_argmax_agreement": 0.995}``).
        max_batches: verify on at most this many batches (``None``: all).
        threads: onnxruntime threads during verification (0: all cores).
        format_options: keyword options for the format when ``format`` is a name.
        bundle_max_mb: size cap of the verification data written next to the artifact for
            ``launch.py verify`` (inputs, labels, PyTorch logits); 0 writes none. Default 64.

    Returns:
        Path of the artifact file inside ``out_dir``.

    Raises:
        UserError: bad arguments, untraceable model, missing runtime (nothing written).
        VerificationError: the artifact did not match PyTorch (nothing kept).
    """
    if isinstance(format, str):
        fmt = get_format(format, **dict(format_options or {}))
    elif format_options:
        raise UserError(f"format_options are for a format given by name; {format.name!r} is already built")
    else:
        fmt = format
    _tolerance(fmt.tolerance, tolerance)  # bad overrides fail now, not after the build
    out = check_out_dir(out_dir, overwrite)
    fmt.check_available()
    batches = take_batches(val_batches, max_batches)
    in_channels = batches[0]["image"].shape[1]
    if meta.in_channels is not None and meta.in_channels != in_channels:
        raise UserError(f"meta.in_channels={meta.in_channels} but validation images have {in_channels} channels")
    if batches[0]["image"].dim() != meta.spatial_dims + 2:
        raise UserError(
            f"validation image shape {tuple(batches[0]['image'].shape)} does not have spatial_dims={meta.spatial_dims}"
        )
    model = copy.deepcopy(net).cpu().eval()
    example = _example_input(batches, meta)
    probe = _probe_input(example, meta.divisor)
    with torch.no_grad():
        logits = model(example)
    if isinstance(logits, torch.Tensor) and logits.shape[1] != meta.num_classes:
        raise UserError(
            f"{type(net).__name__} outputs {logits.shape[1]} channels for input {tuple(example.shape)} "
            f"but num_classes={meta.num_classes}"
        )

    staging, created = _stage_dir(out)
    try:
        work = staging / "_work"
        work.mkdir()
        ctx = BuildContext(
            net=model, example=example, batches=batches, meta=meta, opset=opset, out_dir=staging,
            work_dir=work, input_shapes=_observed_shapes(batches, meta, probe), threads=threads, tolerance=tolerance,
            probe=probe, exporter=getattr(fmt, "exporter", "torchscript"),
        )
        result = fmt.build(ctx)
        static = fmt.static_checks(result.artifact)  # data-free checks that hold on every machine
        tol = _tolerance(fmt.tolerance_for(result), tolerance)
        references: list[torch.Tensor] = []
        report = verify_artifact(
            lambda x: model(x), fmt.predictor(result.artifact, ctx.threads), batches,
            num_classes=meta.num_classes, class_names=meta.class_names, tolerance=tol,
            roi_size=meta.roi_size, divisor=meta.divisor, overlap=meta.overlap,
            output_step=result.output_step, probe=probe, keep_references=references,
        )
        if not report.passed:
            raise VerificationError(report.message(f"{fmt.name} artifact of {type(net).__name__}"))
        shutil.rmtree(work)
        with torch.no_grad():
            probe_reference = model(probe)
        bundle = write_bundle(staging, batches, references, probe, probe_reference, max_mb=bundle_max_mb)
        card = _card(fmt, result, report, ctx, net, in_channels, opset)
        card["verification"].update(output_step=result.output_step, static_checks=static, machine=machine_info(), bundle=bundle)
        cards.write_card(card, staging)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_dirs(created)
        raise
    dice = card["metrics"]["dice"]
    log.info(
        "exported %s to %s: Dice pytorch %s / artifact %s, max abs diff %.3g",
        fmt.name, out, dice["pytorch"].get("mean_foreground"), dice["artifact"].get("mean_foreground"),
        report.max_abs_diff,
    )
    return out / result.artifact.name


def _tolerance(default: Tolerance, given: Tolerance | Mapping[str, Any] | None) -> Tolerance:
    if given is None or isinstance(given, Tolerance):
        return given or default
    unknown = set(given) - {f.name for f in dataclasses.fields(Tolerance)}
    if unknown:
        raise UserError(f"unknown tolerance fields {sorted(unknown)}; known: {[f.name for f in dataclasses.fields(Tolerance)]}")
    return dataclasses.replace(default, **given)


def _card(fmt, result, report, ctx: BuildContext, net, in_channels: int, opset: int) -> dict[str, Any]:
    meta = ctx.meta
    names = axis_names(meta.spatial_dims)
    dynamic = {"0": names[0], **{str(i + 2): n for i, n in enumerate(names[1:])}}
    metrics, verification = report.to_card()
    ckpt = Path(meta.checkpoint) if meta.checkpoint is not None else None
    versions = cards.library_versions()
    return {
        "card_version": cards.CARD_VERSION,
        "format": fmt.name,
        "format_options": fmt.options(),
        "created": cards.utc_now(),
        "artifact": {
            "file": result.artifact.name,
            "bytes": result.artifact.stat().st_size,
            "sha256": cards.sha256_file(result.artifact),
        },
        "source": {
            "checkpoint": str(ckpt) if ckpt else None,
            "checkpoint_sha256": cards.sha256_file(ckpt) if ckpt and ckpt.is_file() else None,
            "model_class": f"{type(net).__module__}.{type(net).__qualname__}",
            "parameters": sum(p.numel() for p in net.parameters()),
        },
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": [names[0], in_channels, *names[1:]],
            "dynamic_axes": dynamic,
            "channels": in_channels,
            "spatial_dims": meta.spatial_dims,
            "divisor": meta.divisor,
            "roi_size": list(meta.roi_size) if meta.roi_size is not None else None,
            "sliding_window_overlap": meta.overlap if meta.roi_size is not None else None,
            "verified_shapes": [list(s) for s in ctx.input_shapes],
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": [names[0], meta.num_classes, *names[1:]],
            "num_classes": meta.num_classes,
            "activation": "none (raw logits; argmax over axis 1 gives the labels)",
        },
        "opset": opset,
        "class_names": list(meta.class_names),
        "graph": {
            "exporter": f"torch.onnx ({ctx.exporter})",
            "simplifier": f"onnxslim {versions.get('onnxslim')}",
            "nodes_before": result.nodes_before,
            "nodes_after": result.nodes_after,
            "export_warnings": _dedupe(ctx.export_warnings),
        },
        "preprocessing": _preprocessing_section(meta.preprocessing),
        "metrics": metrics,
        "verification": verification,
        "details": result.details,
        "versions": versions,
    }


def _preprocessing_section(record: dict[str, Any] | None) -> dict[str, Any]:
    """The card's ``preprocessing``: the data file's record plus the steps in words, so a
    deployed model's user prepares its input the way the training data was prepared."""
    if not record:
        return {"recorded": False, "note": "the training data file records no preprocessing (made by hand or by an "
                "older version); the model expects images prepared like that file's"}
    from datamodules.preprocess import describe_record

    return {"recorded": True, **record, "steps": describe_record(record)}


def _dedupe(lines: list[str]) -> list[str]:
    return [f"{line} (x{n})" if n > 1 else line for line, n in Counter(lines).items()]
