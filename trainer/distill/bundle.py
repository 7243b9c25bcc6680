"""A MONAI bundle folder as a distillation teacher.

A bundle (``monai.bundle`` layout) holds ``configs/inference.json`` (or ``.yaml``) and
``models/model.pt`` (a state dict). The network is its ``network_def``: ``_target_`` (a
``monai.networks.nets`` name, or a dotted path under a trusted module) and keyword arguments.
Nothing in the config is evaluated: ``$`` expressions are refused, ``@name`` references are
resolved only to plain values at the top of the config. The teacher's input expectations are
read from the ``preprocessing`` transforms it recognises -- ``ScaleIntensityRange(d)`` (a
voxel-wise ``range``), ``NormalizeIntensity(d)`` (per-case z-score, ``nonzero`` over non-zero
voxels) and ``Spacing(d)`` (``pixdim``) -- and the axis order: MONAI's loaders give arrays as
``[C, x, y, z]`` (2D: ``[C, x, y]``) while ``data convert`` stores ``[C, z, y, x]`` (2D slices
``[C, y, x]``), so the teacher sees its input with the spatial axes reversed. Other intensity transforms are named in the
teacher's description and left to the user (``Distillation.teacher_input: as_is``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from trainer.errors import UserError
from trainer.trust import check_class_path

CONFIGS = ("inference.json", "inference.yaml", "inference.yml")
WEIGHTS = ("models/model.pt",)
_INTENSITY = ("ScaleIntensityRange", "NormalizeIntensity")
_IGNORED = ("LoadImage", "EnsureChannelFirst", "Orientation", "Spacing", "EnsureType", "ToTensor", "CropForeground",
            "AsChannelFirst", "AddChannel", "CastToType")


def is_bundle(path: Path) -> bool:
    return path.is_dir() and any((path / "configs" / c).is_file() for c in CONFIGS)


def _config(path: Path) -> tuple[dict[str, Any], Path]:
    for name in CONFIGS:
        file = path / "configs" / name
        if file.is_file():
            try:
                text = file.read_text()
                data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
            except (OSError, ValueError, yaml.YAMLError, RecursionError) as exc:
                raise UserError(f"MONAI bundle {file} is not readable ({str(exc).splitlines()[0][:120]})") from None
            if not isinstance(data, dict):
                raise UserError(f"MONAI bundle {file} is not a mapping")
            return data, file
    raise UserError(f"MONAI bundle {path}: no configs/{' or configs/'.join(CONFIGS)}")


def _resolve(value: Any, config: dict[str, Any], where: str) -> Any:
    """Plain data only: ``@name`` to a plain top-level value, ``$``/``%`` refused."""
    if isinstance(value, str) and value[:1] in ("$", "%"):
        raise UserError(f"{where} is an expression ({value[:60]!r}); a teacher's network_def must be plain values")
    if isinstance(value, str) and value.startswith("@"):
        key = value[1:]
        if key not in config or isinstance(config[key], (dict, list)) or isinstance(config[key], str) and config[key][:1] in "$@%":
            raise UserError(f"{where} refers to {value!r}, which is not a plain value at the top of the config")
        return config[key]
    if isinstance(value, dict):
        return {k: _resolve(v, config, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, config, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def build_network(path: Path) -> tuple[nn.Module, dict[str, Any], str]:
    """``(network with the bundle's weights, expected input, class path)``."""
    config, file = _config(path)
    spec = config.get("network_def")
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise UserError(f"MONAI bundle {file}: no network_def with a _target_")
    spec = _resolve(spec, config, f"{file.name}: network_def")
    target = str(spec.pop("_target_"))
    class_path = target if "." in target else f"monai.networks.nets.{target}"
    check_class_path(class_path, f"MONAI bundle {file}: network_def")
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(__import__(module, fromlist=[name]), name)
        net = cls(**{k: v for k, v in spec.items() if not k.startswith("_")})
    except (ImportError, AttributeError, TypeError, ValueError) as exc:
        raise UserError(f"MONAI bundle {file}: network_def {class_path} cannot be built: {str(exc).splitlines()[0][:200]}") from None
    weights = next((path / w for w in WEIGHTS if (path / w).is_file()), None)
    if weights is None:
        raise UserError(f"MONAI bundle {path}: no {' or '.join(WEIGHTS)}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"MONAI bundle weights {weights} are not readable ({type(exc).__name__}: {str(exc)[:120]})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise UserError(f"MONAI bundle weights {weights} do not fit {class_path}: {' '.join(str(exc).split())[:200]}") from None
    dims = int(spec.get("spatial_dims", spec.get("dimensions", 3)))
    return net, expected_input(config, dims, file), class_path


def expected_input(config: dict[str, Any], dims: int, file: Path) -> dict[str, Any]:
    transforms = ((config.get("preprocessing") or {}).get("transforms") or []) if isinstance(config.get("preprocessing"), dict) else []
    channels, spacing, unknown = [], [], []
    for t in transforms:
        if not isinstance(t, dict):
            continue
        kind = str(t.get("_target_", "")).rsplit(".", 1)[-1].rstrip("d")
        args = _resolve({k: v for k, v in t.items() if k != "_target_"}, config, f"{file.name}: preprocessing {kind}")
        if kind == "ScaleIntensityRange":
            channels = [{"name": "", "scheme": "range", **{k: float(args[k]) for k in ("a_min", "a_max", "b_min", "b_max")},
                         "clip": bool(args.get("clip", False))}]
        elif kind == "NormalizeIntensity":
            channels = [{"name": "", "scheme": "zscore_nonzero" if args.get("nonzero") else "zscore"}]
        elif kind == "Spacing" and args.get("pixdim") is not None:
            spacing = [float(s) for s in reversed(list(args["pixdim"]))]  # MONAI x y z -> z y x
        elif not kind.startswith(_IGNORED) and ("Intensity" in kind or "Normalize" in kind):
            unknown.append(kind)
    expected: dict[str, Any] = {"channels": channels, "spacing": spacing, "source": f"MONAI bundle {file}"}
    # MONAI's readers give [C, x, y(, z)]; data convert stores [C, z, y, x] (2D: slices [C, y, x] along z)
    expected["transpose"] = [2, 1, 0] if dims == 3 else [0, 2, 1]
    if unknown:
        expected["unrecognised_transforms"] = unknown
    return expected
