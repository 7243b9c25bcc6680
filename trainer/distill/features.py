"""Intermediate features read through forward hooks on module paths (torchdistill's way).

Neither student nor teacher is edited or wrapped: a :class:`FeatureTap` registers a forward
hook on each named submodule (paths as in ``net.named_modules()``, e.g. ``decoders.3``) and
keeps the latest output while recording is switched on.

Hooks hold on to module *objects*. Techniques that swap a student's modules (QAT replacing a
``Conv2d`` by its fake-quantized version, a pruner rebuilding a layer) would leave a hook on
a module that no longer runs, so :meth:`FeatureTap.attach` is idempotent and re-resolves
every path, moving a hook only where the module at that path changed. The distillation
callback calls it at ``on_fit_start`` and at every ``on_train_batch_start`` (a dictionary
walk per path, negligible next to a training step), so any swap made before a batch -- in
another callback's ``setup``, ``on_fit_start`` or ``on_train_epoch_start`` -- is followed.
"""
from __future__ import annotations

import difflib
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from trainer.collectives import gathered
from trainer.errors import UserError
from trainer.precision import param_dtype

_LISTED = 24  # names shown in the "available" list of an error


def module_names(root: nn.Module) -> list[str]:
    """Paths of all submodules of ``root`` (the root itself excluded)."""
    return [name for name, _ in root.named_modules() if name]


def _available(root: nn.Module, path: str) -> str:
    """A readable, truncated list of module paths, shallow ones first, close matches first."""
    names = module_names(root)
    close = difflib.get_close_matches(path, names, n=3, cutoff=0.6)
    shallow = sorted((n for n in names if n.count(".") <= 1), key=lambda n: (n.count("."), names.index(n)))
    shown = list(dict.fromkeys([*close, *shallow, *names]))[:_LISTED]
    more = len(names) - len(shown)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"{hint}available: {', '.join(shown)}{f', ... ({more} more)' if more > 0 else ''}"


def resolve(root: nn.Module, path: str, role: str) -> nn.Module:
    """The submodule of ``root`` at ``path``; a one-line :class:`UserError` listing the
    available names when there is none. ``role`` names the network in the message."""
    modules = dict(root.named_modules())
    if path in modules and path:
        return modules[path]
    raise UserError(f"{role} ({type(root).__name__}) has no layer {path!r}; {_available(root, path)}")


class FeatureTap:
    """Records the outputs of named submodules of one network.

    Args:
        paths: module paths, relative to the network.
        role: ``"student"`` or ``"teacher"``, for error messages.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        >>> tap = FeatureTap(["0"], "student"); tap.attach(net)
        >>> with tap.recording():
        ...     _ = net(torch.zeros(1, 1, 8, 8))
        >>> tap.take()["0"].shape
        torch.Size([1, 4, 6, 6])
    """

    def __init__(self, paths: list[str], role: str):
        self.paths = list(dict.fromkeys(paths))
        self.role = role
        self._hooked: dict[str, tuple[nn.Module, RemovableHandle]] = {}
        self._features: dict[str, torch.Tensor] = {}
        self._recording = False

    def attach(self, root: nn.Module) -> bool:
        """Hook every path of ``root``; returns True if any hook was (re)placed."""
        moved = False
        for path in self.paths:
            module = resolve(root, path, self.role)
            current = self._hooked.get(path)
            if current is not None and current[0] is module:
                continue
            if current is not None:
                current[1].remove()
            self._hooked[path] = (module, module.register_forward_hook(self._hook(path)))
            moved = True
        return moved

    def detach(self) -> None:
        for _, handle in self._hooked.values():
            handle.remove()
        self._hooked.clear()
        self._features.clear()

    def module(self, path: str) -> nn.Module:
        return self._hooked[path][0]

    def _hook(self, path: str):
        def record(module: nn.Module, args, output) -> None:
            if not self._recording:
                return
            out = output[0] if isinstance(output, (list, tuple)) and output else output
            if not isinstance(out, torch.Tensor):
                raise UserError(f"{self.role} layer {path!r} ({type(module).__name__}) returns "
                                f"{type(output).__name__}, not a tensor; pick a layer that outputs a feature map")
            self._features[path] = out

        return record

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record hooked outputs inside the block (also across blocks until :meth:`take`)."""
        self.start()
        try:
            yield
        finally:
            self.stop()

    def start(self) -> None:
        self._features.clear()
        self._recording = True

    def stop(self) -> None:
        self._recording = False

    def clear(self) -> None:
        """Drop recorded features (frees the graph they hold on to)."""
        self._features = {}

    def take(self) -> dict[str, torch.Tensor]:
        """The recorded features (path -> tensor); clears them. Missing paths raise: the layer
        did not run during the forward pass."""
        missing = [p for p in self.paths if p not in self._features]
        if missing:
            raise UserError(f"{self.role} layers {missing} did not run in the forward pass "
                            "(are they used by the network's forward?)")
        out, self._features = self._features, {}
        return out


# ---------------------------------------------------------------------------- adapters
_CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def make_adapter(spatial_dims: int, in_channels: int, out_channels: int) -> nn.Module:
    """FitNets regressor: a learned 1x1 convolution from student to teacher channels, or the
    identity when the counts agree."""
    if in_channels == out_channels:
        return nn.Identity()
    return _CONV[int(spatial_dims)](in_channels, out_channels, kernel_size=1)


def _drop_from_parent_state(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    if prefix:  # saved as part of a parent (the LightningModule): leave the keys out
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]


def _keep_when_absent(module: nn.Module, state_dict, prefix: str, *args) -> None:
    if prefix and not any(k.startswith(prefix) for k in state_dict):
        for name, value in module.state_dict().items():  # loading a parent without them: no-op
            state_dict[prefix + name] = value


def detach_from_parent_state(module: nn.Module) -> nn.Module:
    """Make ``module`` invisible to its parent's ``state_dict``/``load_state_dict``.

    The distillation adapters are a submodule of the student's LightningModule so that they
    are optimised and DDP-synchronised with it, but they are training state, not part of the
    student: the callback saves them in its own checkpoint section. Hiding them keeps the
    student's ``state_dict`` loadable by ``restore_run``/export and by runs without
    distillation, and lets the adapters exist in a module loaded from any checkpoint.
    """
    module.register_state_dict_post_hook(_drop_from_parent_state)
    module.register_load_state_dict_pre_hook(_keep_when_absent)
    return module


def kept_output_channels(structure: list[dict], path: str, before: int, after: int) -> list[int] | None:
    """Which of ``before`` output channels of the layer at ``path`` survive as ``after``,
    read from the latest channel-pruning plan in the net's structural history (entries whose
    state has ``layers: {name: {"out": {"before", "keep"}}}``, as ``trainer.prune`` records).

    A hooked module is often a container (``decoders.1``): its output channels are those of
    the last layer under it that the plan cut from ``before`` to ``after``. ``None`` when no
    plan says (the caller then starts the adapter afresh).
    """
    for entry in reversed(structure):
        layers = (entry.get("state") or {}).get("layers") or {}
        hits = [
            slot["keep"] for name, layer in layers.items()
            if (name == path or name.startswith(path + ".")) and (slot := layer.get("out"))
            and int(slot["before"]) == before and len(slot["keep"]) == after
        ]
        if hits:
            return [int(i) for i in hits[-1]]
    return None


def resized_adapter(adapter: nn.Module, spatial_dims: int, keep: list[int] | None, in_channels: int,
                    out_channels: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The adapter for a student layer that now has ``in_channels`` (``keep``: which of the old
    input channels remain). Kept columns keep their learned weights; an identity adapter
    becomes the 1x1 conv that selects the kept channels, so the loss is continuous.

    ``device``/``dtype``: where the student trains (an identity adapter has no parameters to
    tell: a new conv would land on the CPU, in fp32, next to a student on a GPU in bf16)."""
    new = _CONV[int(spatial_dims)](in_channels, out_channels, kernel_size=1).to(
        device=device or _device_of(adapter), dtype=dtype or param_dtype(adapter))
    if keep is None:
        return new
    index = torch.tensor(keep, dtype=torch.long, device=new.weight.device)
    with torch.no_grad():
        if isinstance(adapter, nn.Identity):
            new.weight.zero_()
            new.bias.zero_()
            new.weight[index, torch.arange(len(keep), device=index.device)] = 1.0
        else:
            new.weight.copy_(adapter.weight.index_select(1, index.to(adapter.weight.device)))
            new.bias.copy_(adapter.bias)
    return new


def _device_of(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


class Adapters:
    """The trainable FitNets adapters of one run, one per feature term (by term name).

    They live on the LightningModule as ``pl_module.distill_adapters`` (an ``nn.ModuleDict``
    hidden from its state dict, see :func:`detach_from_parent_state`), so Lightning's
    optimizer and DDP wrapper include them; their weights travel in the distillation
    callback's checkpoint section (:meth:`state` / :meth:`load`).
    """

    ATTR = "distill_adapters"

    def __init__(self) -> None:
        self.modules: nn.ModuleDict | None = None
        self.channels: dict[str, tuple[int, int]] = {}  # term name -> (student, teacher) channels
        self.dims = 2

    def __getitem__(self, name: str) -> nn.Module:
        return self.modules[name]

    def register(self, pl_module: nn.Module, spatial_dims: int, channels: dict[str, tuple[int, int]]) -> None:
        """Create the adapters on ``pl_module`` (call before the optimizer exists)."""
        self.dims = int(spatial_dims)
        modules = getattr(pl_module, self.ATTR, None)
        if modules is None:
            modules = detach_from_parent_state(nn.ModuleDict())
            setattr(pl_module, self.ATTR, modules)
        for name, (cin, cout) in channels.items():
            self.channels[name] = (int(cin), int(cout))
            if name not in modules:
                modules[name] = make_adapter(self.dims, cin, cout)
        self.modules = modules.to(_device_of(pl_module))

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The adapters' weights (on the CPU). Under ZeRO-3 their parameters are partitioned
        (empty on every rank) and are gathered first: every rank calls this, as Lightning
        collects callback states on every rank when it saves."""
        if self.modules is None:
            return {}
        with gathered(list(self.modules.parameters())):
            return {name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                    for name, m in self.modules.items()}

    def load(self, saved: dict[str, dict[str, torch.Tensor]], optimizer_exists: bool) -> None:
        """Load saved weights; an adapter saved at another shape (its student layer was pruned
        before the checkpoint) is rebuilt at that shape, only possible before the optimizer
        exists (Lightning restores callbacks before building it, except DeepSpeed)."""
        for name, state in saved.items():
            if self.modules is None or name not in self.modules:
                continue
            current = self.modules[name]
            weight = state.get("weight")
            have = getattr(current, "weight", None)
            # ZeRO-3 (DeepSpeed restores after building its engine) partitions the parameters:
            # their shape is ``ds_shape``, and they take values only while gathered
            if weight is not None and have is not None and tuple(getattr(have, "ds_shape", have.shape)) == tuple(weight.shape):
                with gathered(list(current.parameters()), modifier_rank=0), torch.no_grad():
                    for key, value in state.items():
                        getattr(current, key).copy_(value)
                continue
            if optimizer_exists:
                raise UserError(f"Distillation: adapter {name} in the checkpoint has another shape than the student's "
                                "layer and this strategy restores after building the optimizer; cannot resume it")
            if weight is None:
                self.modules[name] = nn.Identity()
                continue
            cout, cin = int(weight.shape[0]), int(weight.shape[1])
            rebuilt = make_adapter(self.dims, cin, cout)
            rebuilt.load_state_dict(state)
            self.modules[name] = rebuilt.to(weight.device)
            self.channels[name] = (cin, cout)

    def follow(self, trainer, pl_module: nn.Module, widths: dict[str, tuple[str, int]], structure: list[dict]) -> None:
        """Resize the adapters whose student layer changed width (``widths``: term name ->
        (student path, channels now)) after channel pruning mid-fit. Kept input columns keep
        their weights (the pruning plan in ``structure`` says which); then DDP, optimizers and
        schedulers are rebuilt with their state carried over by the pruner's own
        ``trainer.prune.rebuild``."""
        changed = {}
        device, dtype = _device_of(pl_module), param_dtype(pl_module)
        for name, (path, have) in widths.items():
            before, teacher_channels = self.channels[name]
            if have == before:
                continue
            keep = kept_output_channels(structure, path, before, have)
            if keep is None:
                warnings.warn(f"Distillation: student layer {path!r} changed from {before} to {have} channels with no "
                              f"pruning plan naming them; adapter {name} starts afresh", stacklevel=2)
            new = resized_adapter(self.modules[name], self.dims, keep, have, teacher_channels, device, dtype)
            changed[name] = (new, before, keep)
        if not changed:
            return
        from trainer.prune.rebuild import rebuild_optimizers, snapshot

        before_state = snapshot(trainer, pl_module)
        layers = {}
        for name, (new, before, keep) in changed.items():
            self.modules[name] = new
            self.channels[name] = (new.in_channels, self.channels[name][1])
            if keep is not None:
                layers[f"{self.ATTR}.{name}"] = {"in": {"before": before, "keep": keep}}
        rebuild_optimizers(trainer, pl_module, before_state, plan={"layers": layers}, net_prefix="")
