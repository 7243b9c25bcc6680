"""Which layers of a network get quantized, the conversion itself, and its structural record.

Quantized: leaf layers whose type is exactly ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``
(groups=1) or ``Linear``. Left in float by design: normalization layers (TensorRT folds
BatchNorm into the preceding convolution), parameter-free layers and containers.
Anything else that owns parameters (an attention block, a custom conv subclass with its own
forward, a grouped ConvTranspose) is *unsupported*: an error naming it, or, with
``on_unsupported="warn"``, a warning and float. ``skip_modules`` names modules (or whole
sub-trees) to keep in float.

The conversion is recorded in the network's structural history (``trainer.structure``) as
``("trainer.quant.convert.FakeQuantConversion", state)`` with the plain-data state::

    {"version": 1, "scheme": "int8-symmetric-zp0",
     "weight_range": [-127, 127], "input_range": [-128, 127],   # [-63, 63] with weight_bits=7
     "learnable_scales": false,
     "layers": ["encoders.0.0", ...],        # module paths that were quantized, in order
     "float_layers": ["head", ...]}          # skipped or unsupported, left in float

so a checkpoint rebuilds the quantized structure on a freshly built (and, earlier in the
history, re-pruned) network before its weights and scales are loaded.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

from torch import nn

from trainer.errors import UserError
from trainer.quant.fake_quant import ACT_QMIN, QMAX, WEIGHT_BITS, WEIGHT_QMIN, weight_qmax
from trainer.quant.modules import QUANT_CLASSES, QuantLayer, quantize_layer
from trainer.structure import history

STATE_VERSION = 1
OnUnsupported = Literal["error", "warn"]
ON_UNSUPPORTED = ("error", "warn")
# Layers with parameters that stay float on purpose.
FLOAT_BY_DESIGN: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.PReLU,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


@dataclass
class QuantPlan:
    """Layers to quantize and layers left in float, by module path."""

    layers: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)  # "path (Type: reason)"


def converter_path() -> str:
    return f"{FakeQuantConversion.__module__}.{FakeQuantConversion.__qualname__}"


def is_quantized(net: nn.Module) -> bool:
    return any(isinstance(m, QuantLayer) for m in net.modules())


def quantization_entry(net: nn.Module) -> dict[str, Any] | None:
    """The recorded quantization state of ``net``, if its history holds one."""
    for entry in history(net):
        if entry["converter"] == converter_path():
            return entry["state"]
    return None


def check_skip_modules(net: nn.Module, skip_modules: Iterable[str], owner: str = "skip_modules") -> None:
    """``UserError`` for a name in ``skip_modules`` that is not a module of ``net``."""
    names = {name for name, _ in net.named_modules() if name}
    for name in skip_modules:
        if name not in names:
            examples = ", ".join(sorted(names, key=len)[:4])
            raise UserError(f"{owner}: {name!r} is not a module of {type(net).__qualname__} (e.g. {examples})")


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why a parameter-owning leaf cannot be quantized; None if it is fine (or float by design)."""
    if type(module) in QUANT_CLASSES:
        if isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups != 1:
            return f"grouped ConvTranspose (groups={module.groups}) has no per-output-channel weight axis"
        return None
    if isinstance(module, FLOAT_BY_DESIGN) or not any(True for _ in module.parameters(recurse=False)):
        return None
    return "no quantized counterpart"


def _within(name: str, roots: Sequence[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def plan_quantization(
    net: nn.Module, skip_modules: Sequence[str] = (), on_unsupported: OnUnsupported = "error"
) -> QuantPlan:
    """Decide which layers to quantize; raise (or warn) for layers that cannot be."""
    if on_unsupported not in ON_UNSUPPORTED:
        raise UserError(f"on_unsupported={on_unsupported!r} must be one of {', '.join(ON_UNSUPPORTED)}")
    check_skip_modules(net, skip_modules)
    if is_quantized(net):
        raise UserError(f"{type(net).__qualname__} is already quantized; quantize a float network")
    plan = QuantPlan()
    skip = tuple(skip_modules)
    unsupported: list[str] = []  # their sub-trees are not looked into
    for name, module in net.named_modules():
        if not name:
            continue
        if _within(name, skip):
            if type(module) in QUANT_CLASSES:
                plan.skipped.append(name)
            continue
        if _within(name, unsupported):
            continue
        reason = _unsupported_reason(module)
        if reason is not None:
            unsupported.append(name)
            plan.unsupported.append(f"{name} ({type(module).__qualname__}: {reason})")
        elif type(module) in QUANT_CLASSES:
            plan.layers.append(name)
    if plan.unsupported:
        msg = (f"cannot quantize {', '.join(plan.unsupported)} in {type(net).__qualname__}; supported: "
               f"{', '.join(c.__name__ for c in QUANT_CLASSES)}; add them to skip_modules or set on_unsupported='warn'")
        if on_unsupported == "error":
            raise UserError(msg)
        warnings.warn(msg.replace("; add them to skip_modules or set on_unsupported='warn'", "; left in float"), stacklevel=2)
    if not plan.layers:
        raise UserError(f"{type(net).__qualname__} has no layer to quantize (skip_modules={list(skip)})")
    return plan


def conversion_state(plan: QuantPlan, learnable_scales: bool, weight_bits: int = 8) -> dict[str, Any]:
    """The plain-data record of a conversion (see module docstring)."""
    qmax = weight_qmax(weight_bits)
    return {
        "version": STATE_VERSION,
        "scheme": "int8-symmetric-zp0",
        "weight_range": [-qmax, qmax],
        "input_range": [ACT_QMIN, QMAX],
        "learnable_scales": bool(learnable_scales),
        "layers": list(plan.layers),
        "float_layers": [*plan.skipped, *[u.split(" ", 1)[0] for u in plan.unsupported]],
    }


def apply_state(net: nn.Module, state: dict[str, Any], source: str = "checkpoint") -> None:
    """Quantize the layers listed in ``state`` (idempotent on layers already quantized)."""
    if state.get("version") != STATE_VERSION:
        raise UserError(f"{source}: quantization record version {state.get('version')!r} is not supported "
                        f"(this code reads version {STATE_VERSION})")
    learnable = bool(state["learnable_scales"])
    bits = _weight_bits(state, source)
    for name in state["layers"]:
        try:
            layer = net.get_submodule(name)
        except AttributeError:
            raise UserError(f"{source}: quantized layer {name!r} is not a module of the rebuilt "
                            f"{type(net).__qualname__}; was it built from a different recipe?") from None
        if not isinstance(layer, QuantLayer) and type(layer) not in QUANT_CLASSES:
            raise UserError(f"{source}: quantized layer {name!r} is a {type(layer).__qualname__} in the rebuilt "
                            f"{type(net).__qualname__}, not a quantizable layer")
        quantize_layer(layer, name, learnable, bits)


def _weight_bits(state: dict[str, Any], source: str) -> int:
    """8 or 7 from the record's ``weight_range`` (records before 7-bit weights say [-127, 127])."""
    qmax = int(state.get("weight_range", [WEIGHT_QMIN, QMAX])[1])
    for bits in WEIGHT_BITS:
        if weight_qmax(bits) == qmax:
            return bits
    raise UserError(f"{source}: quantization record has weight_range {state.get('weight_range')}; "
                    f"supported: {[[-weight_qmax(b), weight_qmax(b)] for b in WEIGHT_BITS]}")


class FakeQuantConversion:
    """Structure converter of QAT and PTQ: replays a recorded quantization on a fresh net."""

    @classmethod
    def rebuild(cls, net: nn.Module, state: dict[str, Any]) -> None:
        apply_state(net, state)


def quantize_net(
    net: nn.Module,
    skip_modules: Sequence[str] = (),
    on_unsupported: OnUnsupported = "error",
    learnable_scales: bool = False,
    weight_bits: int = 8,
) -> dict[str, Any]:
    """Plan and apply the conversion; returns its state (the caller records it).

    The quantizers start uncalibrated (pass-through); ``trainer.quant.calibrate`` sets them.
    ``weight_bits=7`` gives weights on [-63, 63] (onnxruntime-CPU-safe, see ``fake_quant``).
    """
    weight_qmax(weight_bits)  # a bad value fails before the net is touched
    state = conversion_state(plan_quantization(net, skip_modules, on_unsupported), learnable_scales, weight_bits)
    apply_state(net, state, source=type(net).__qualname__)
    return state
