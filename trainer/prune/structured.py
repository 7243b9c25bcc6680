"""Structured (channel) pruning with physical removal, on Torch-Pruning's dependency graph.

Torch-Pruning traces the network once and groups the layers whose channels are coupled (a
conv, its norm, the next conv's inputs, every branch of a skip concatenation or residual add,
ConvTranspose in/out); removing channel ``c`` of a group removes it from every member, so the
network stays shape-correct without anyone listing coupled layers by hand. This module adds:

* **Ratios with one meaning**: the ratio of a round is the *cumulative fraction of each
  prunable layer's original output channels removed* (``0.5`` keeps half of every layer).
  Kept channels are ``clamp(round_half_up(orig * (1 - ratio) / round_to) * round_to,
  round_to, orig)``; layers narrower than ``round_to`` are not pruned. With
  ``global_pruning`` the same fraction applies to the sum of all prunable channels and
  importance decides where they go (each layer then rounded the same way).
* **Importance** (Torch-Pruning's scorers): ``l1``/``l2`` group weight magnitude,
  ``bn_scale`` |gamma| of the Batch/Instance norms in the group (Network Slimming; groups
  without a norm, e.g. ConvTranspose outputs, fall back to ``l1``), ``taylor`` first-order
  Taylor |w * dL/dw| (Molchanov et al. 2019; needs ``.grad``, see :func:`taylor_gradients`).
* **Protected layers**: the layers that produce the network's outputs (the head and deep
  supervision heads, whose out channels are the classes) are found by tracing and never lose
  output channels; ``protected`` names more. Protected layers may still lose *input* channels.
* **A replayable record**: :func:`prune_channels` returns, per layer, the kept channel indices
  as plain lists (``weights_only``-safe); :func:`apply_plan` replays it on a freshly built
  network without tracing, and checks every layer's channel count first.
* **Constraints read from the network, not asked of the user** (what MONAI's and nnU-Net's
  networks need):

  - *GroupNorm*: a group of coupled layers that contains a GroupNorm of ``G`` groups keeps a
    multiple of ``lcm(round_to, G)`` channels and loses the same number from each of its
    groups, so every remaining GroupNorm group normalizes the channels it did before.
  - *PReLU with one shared slope* (MONAI's default activation): it has no channel axis, so it
    is traced as an element-wise op (Torch-Pruning would ask it for a channel count, get
    ``None`` and fail in its concat index mapping with ``int + None``).
  - *Broadcast gates* (``x * sigmoid(psi)`` with a one-channel ``psi``, MONAI's
    ``AttentionUnet``): the multiplication broadcasts over channels, so it couples nothing;
    Torch-Pruning would tie the one-channel gate to ``x``'s channels.
  - *Depthwise convolutions* (``groups == in == out``) lose channels with their inputs;
    other grouped convolutions keep their channels whole (listed in the plan's
    ``kept_whole``).
  - *Output layers* are found by walking back from the returned tensors through non-learned
    ops (``torch.stack`` of deep-supervision heads, upsampling, residual adds), so a head
    behind such an op keeps its class channels.
  - *Example inputs* come from the data (:class:`PruneRetrain` passes the datamodule's
    ``patch_size`` and ``in_channels``), else from the network (``trainer.models.netinfo``).
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops
from torch_pruning.pruner import function as tpf

from trainer.errors import UserError
from trainer.models import netinfo
from trainer.precision import param_device, param_dtype
from trainer.prune.schedule import check_ratio
from trainer.structure import history

Importance = Literal["l1", "l2", "bn_scale", "taylor"]
IMPORTANCES = ("l1", "l2", "bn_scale", "taylor")
PLAN_FORMAT = 1
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_ROOTS = (nn.modules.conv._ConvNd, nn.Linear)
# Module types whose channels Torch-Pruning can cut (convs, linears, norms, PReLU, ...).
_PRUNABLE_TYPES = tuple({ops.type2class(t) for t in tpf.PrunerBox} - {None})


# ---------------------------------------------------------------- importance
class NormScaleImportance(tp.importance.GroupMagnitudeImportance):
    """|gamma| of the Batch/Instance norms of a group (Liu et al. 2017, Network Slimming).

    Torch-Pruning's ``BNScaleImportance`` reads BatchNorm only; InstanceNorm(affine) U-Nets
    need the same score. Groups without an affine norm fall back to L1 weight magnitude.
    """

    def __init__(self):
        super().__init__(p=1, group_reduction="mean", normalizer="mean", target_types=list(_NORMS))
        self._fallback = tp.importance.MagnitudeImportance(p=1)

    @torch.no_grad()
    def __call__(self, group):
        scores, root_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if isinstance(layer, _NORMS) and layer.affine:
                scores.append(layer.weight.data[idxs].abs())
                root_idxs.append(group[i].root_idxs)
        if not scores:
            return self._fallback(group)
        return self._normalize(self._reduce(scores, root_idxs), self.normalizer)


def make_importance(name: str) -> tp.importance.Importance:
    """Torch-Pruning scorer for ``name`` (one of ``IMPORTANCES``)."""
    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "bn_scale":
        return NormScaleImportance()
    if name == "taylor":
        return tp.importance.TaylorImportance()
    raise UserError(f"PruneRetrain.importance={name!r}: must be one of {list(IMPORTANCES)}")


# ---------------------------------------------------------------- names and inputs
def torch_type(module: nn.Module) -> str:
    """Name of the torch.nn class a layer is (``QuantConv2d`` of QAT is a ``Conv2d``)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn."):
            return cls.__name__
    return type(module).__name__


def same_kind(a: str, b: str) -> bool:
    """Whether two recorded layer types are the same layer for replay. A BatchNorm is one kind
    whatever its class: under ``trainer.sync_batchnorm`` Lightning swaps ``BatchNorm2d`` for
    ``SyncBatchNorm`` inside DDP, so a round pruned mid-run records ``SyncBatchNorm`` while the
    network rebuilt for resume or export holds ``BatchNorm2d`` again."""
    def kind(name: str) -> str:
        return "BatchNorm" if name == "SyncBatchNorm" or name.startswith("BatchNorm") else name
    return kind(a) == kind(b)


def module_names(net: nn.Module) -> list[str]:
    return [n for n, _ in net.named_modules() if n]


def available(net: nn.Module, limit: int = 12) -> str:
    """A short list of layer names of ``net`` for error messages."""
    names = module_names(net)
    shallow = sorted(names, key=lambda n: (n.count("."), names.index(n)))[:limit]
    more = len(names) - len(shallow)
    return ", ".join(shallow) + (f", ... ({more} more)" if more > 0 else "")


def resolve(net: nn.Module, names: Sequence[str], what: str) -> list[nn.Module]:
    """The submodules called ``names``; a one-line UserError naming the first unknown one."""
    modules = dict(net.named_modules())
    out = []
    for name in names:
        if not name or name not in modules:
            raise UserError(f"{what}: {type(net).__name__} has no layer {name!r}; available: {available(net)}")
        out.append(modules[name])
    return out


def example_input(net: nn.Module, shape: Sequence[int] | None = None) -> torch.Tensor:
    """A dummy input for tracing: ``shape`` or ``[2, in_channels, *(2 * divisor,) * dims]``.

    Batch 2 and twice the divisor keep BatchNorm's training-mode forward valid at the
    deepest level (which deep-supervision heads need, see :func:`_tracing`). Without
    ``shape``, channels, dimensions and divisor are read from the network
    (:mod:`trainer.models.netinfo`); :class:`PruneRetrain` passes the data's patch instead.
    """
    # on the net's device and in its dtype (a `*-true` precision casts the net mid-run)
    device, dtype = param_device(net), param_dtype(net)
    gen = torch.Generator().manual_seed(0)  # fixed: tracing must not draw from the global RNG
    if shape is not None:
        return torch.randn(*[int(s) for s in shape], generator=gen).to(device, dtype)
    dims, cin = netinfo.spatial_dims(net), netinfo.in_channels(net)
    if dims is None or cin is None:
        raise UserError(f"cannot tell the input of {type(net).__name__} (no convolution to read channels and dimensions "
                        "from); prune inside a run with a datamodule, or set PruneRetrain.example_shape, e.g. [2, 1, 64, 64]")
    size = 2 * netinfo.divisor(net)
    return torch.randn(2, int(cin), *([size] * int(dims)), generator=gen).to(device, dtype)


@contextmanager
def _tracing(net: nn.Module) -> Iterator[None]:
    """Run ``net`` for tracing without side effects.

    Training mode, because deep-supervision heads only run in training; buffers (BatchNorm
    running statistics) restored afterwards; ReLUs made out-of-place, because an in-place
    ReLU after InstanceNorm turns the norm's output into an ``as_strided`` view and hides the
    norm from the autograd graph Torch-Pruning reads (the concat index mapping then fails).
    """
    was_training = net.training
    buffers = {k: v.detach().clone() for k, v in net.named_buffers()}
    inplace = [m for m in net.modules() if getattr(m, "inplace", False) is True]
    for m in inplace:
        m.inplace = False
    try:
        yield
    finally:
        for m in inplace:
            m.inplace = True
        with torch.no_grad():
            for k, v in net.named_buffers():
                if k in buffers and v.shape == buffers[k].shape:
                    v.copy_(buffers[k])
        net.train(was_training)


@contextmanager
def _naming_failures(net: nn.Module, what: str) -> Iterator[None]:
    """Turn an exception inside ``net``'s forward into a UserError naming the layer that raised."""
    names = {m: n for n, m in net.named_modules()}
    stack: list[nn.Module] = []
    failed: list[str] = []

    def pre(m, _):
        stack.append(m)

    def post(m, _, __):
        if stack and stack[-1] is m:
            stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in net.modules()]
    handles += [m.register_forward_hook(post) for m in net.modules()]
    try:
        yield
    except UserError:
        raise
    except Exception as exc:
        layer = stack[-1] if stack else net
        failed.append(names.get(layer) or "<root>")
        raise UserError(
            f"{what}: layer {failed[0]!r} ({type(layer).__name__}) failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        ) from None
    finally:
        for h in handles:
            h.remove()


def output_layers(net: nn.Module, example: torch.Tensor) -> tuple[list[str], list[tuple[int, ...]]]:
    """Names of the layers whose output channels are the network's output channels, and the
    output shapes (training-mode forward, so deep-supervision heads are included).

    Walks back from every returned tensor through the autograd graph: through non-learned ops
    (``torch.stack``/``cat`` of heads, interpolation, residual adds, activations) and through
    learned per-channel layers (norms, PReLU) until a convolution or linear layer is reached.
    """
    producer: dict[Any, str] = {}  # grad_fn of a layer's output -> layer name
    keep_alive = []

    def remember(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.grad_fn is not None:
                producer.setdefault(output.grad_fn, name)
                keep_alive.append(output)
        return hook

    owners = [(n, m) for n, m in net.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
    hooks = [m.register_forward_hook(remember(n)) for n, m in owners]
    kinds = dict(owners)
    try:
        with _tracing(net), torch.enable_grad(), _naming_failures(net, f"cannot run {type(net).__name__}"):
            net.train()
            outputs = tp.utils.flatten_as_list(net(example))
            names = _walk_to_layers([o.grad_fn for o in outputs if o.grad_fn is not None], producer, kinds)
    finally:
        for h in hooks:
            h.remove()
    return names, [tuple(o.shape) for o in outputs]


def _walk_to_layers(starts: list, producer: dict[Any, str], kinds: dict[str, nn.Module]) -> list[str]:
    found: list[str] = []
    stack, seen = list(starts), set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        name = producer.get(fn)
        if name is not None and name not in found:
            found.append(name)
        if name is not None and isinstance(kinds[name], _ROOTS):
            continue  # a convolution/linear layer: its inputs are not output channels
        stack.extend(f for f, _ in getattr(fn, "next_functions", ()) if f is not None and type(f).__name__ != "AccumulateGrad")
    return found


def channel_free_layers(net: nn.Module) -> list[nn.Module]:
    """Layers with parameters but no channel axis: PReLU with one slope shared by all channels."""
    return [m for m in net.modules() if isinstance(m, nn.PReLU) and m.num_parameters == 1]


class _Graph(tp.DependencyGraph):
    """Torch-Pruning's dependency graph, minus two couplings that do not exist:

    * a channel-broadcast multiplication ``x * g`` with a one-channel ``g`` (an attention gate)
      applies ``g`` to every channel of ``x``; removing a channel of ``x`` removes nothing
      from ``g``;
    * a PReLU with one shared slope (traced as an element-wise op, see
      :func:`channel_free_layers`) reads its slope through a reshape whose channel count
      Torch-Pruning cannot infer; the slope is not a data input.
    """

    def _build_dependency(self, module2node):
        for node in module2node.values():
            for side in _broadcast_inputs(node) + _slope_inputs(node):
                for other in [n for n in node.inputs if n.grad_fn is side]:
                    node.inputs.remove(other)
                    other.outputs.remove(node)
        return super()._build_dependency(module2node)


def _slope_inputs(node) -> list:
    """The non-data autograd inputs of a PReLU traced as an element-wise op."""
    fn = node.grad_fn
    if node.type != ops.OPTYPE.ELEMENTWISE or not type(fn).__name__.startswith("Prelu"):
        return []
    return [f for f, _ in fn.next_functions[1:] if f is not None]


def _broadcast_inputs(node) -> list:
    """The autograd inputs of an element-wise Mul/Div node that are broadcast over channels."""
    fn = node.grad_fn
    if node.type != ops.OPTYPE.ELEMENTWISE or type(fn).__name__ not in ("MulBackward0", "DivBackward0"):
        return []
    try:
        shapes = [tuple(getattr(fn, "_saved_self").shape), tuple(getattr(fn, "_saved_other").shape)]
    except (AttributeError, RuntimeError):  # a side without gradient is not saved (and not in the graph)
        return []
    if any(len(sh) < 2 for sh in shapes) or shapes[0][1] == shapes[1][1]:
        return []
    narrow = 0 if shapes[0][1] == 1 else 1 if shapes[1][1] == 1 else None
    if narrow is None:
        return []
    return [fn.next_functions[narrow][0]]


def build_graph(net: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``net``; one-line UserError naming an untraceable layer."""
    unsupported = [(n, type(m).__name__) for n, m in net.named_modules()
                   if any(True for _ in m.parameters(recurse=False)) and not isinstance(m, _PRUNABLE_TYPES)]
    if unsupported:
        name, kind = unsupported[0]
        raise UserError(
            f"Torch-Pruning cannot trace {type(net).__name__}: layer {name!r} ({kind}) holds parameters of a "
            f"type it cannot prune (supported: Conv/ConvTranspose, Linear, Batch/Instance/Group/LayerNorm, "
            f"PReLU); build the network from standard layers or use method: unstructured"
        )

    def forward(model, inputs):
        model.train()  # Torch-Pruning switches to eval; deep-supervision heads need training mode
        return model(inputs[0])

    with _tracing(net), warnings.catch_warnings(), _naming_failures(net, f"Torch-Pruning cannot trace {type(net).__name__}"):
        warnings.simplefilter("ignore")
        try:
            return _Graph().build_dependency(net, example_inputs=(example,), forward_fn=forward, verbose=False,
                                             ignored_layers=channel_free_layers(net))
        except (TypeError, ValueError, RuntimeError, AssertionError, KeyError, IndexError) as exc:
            raise UserError(f"Torch-Pruning cannot trace {type(net).__name__}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200]}{_suspect(net)}") from None


def _suspect(net: nn.Module) -> str:
    """A hint naming the first layer whose channel count Torch-Pruning cannot read, if any."""
    free = set(channel_free_layers(net))
    for name, m in net.named_modules():
        pruner = tpf.PrunerBox.get(ops.module2type(m)) if isinstance(m, _PRUNABLE_TYPES) else None
        if pruner is not None and m not in free and pruner.get_out_channels(m) is None:
            return f"; layer {name!r} ({type(m).__name__}) has no channel count Torch-Pruning can read"
    return ""


def check_forward(net: nn.Module, example: torch.Tensor, what: str,
                  expected: Sequence[tuple[int, ...]] | None = None) -> None:
    """Run ``net`` once (no side effects); UserError naming the layer if shapes no longer fit,
    or if the output shapes differ from ``expected`` (training-mode outputs)."""
    with _tracing(net), torch.no_grad(), _naming_failures(net, what):
        net.train()
        shapes = [tuple(o.shape) for o in tp.utils.flatten_as_list(net(example))]
        net.eval()
        net(example)
    if expected is not None and shapes != [tuple(s) for s in expected]:
        raise UserError(f"{what}: output shapes {shapes} != {list(expected)}")


# ---------------------------------------------------------------- ratios
def keep_count(original: int, ratio: float, round_to: int = 1) -> int:
    """Channels a layer of ``original`` channels keeps at cumulative ``ratio`` (see module doc)."""
    round_to = max(1, int(round_to))
    if original <= round_to:
        return original
    units = math.floor(original * (1.0 - ratio) / round_to + 0.5)
    return min(max(units * round_to, round_to), original)


def original_out_channels(net: nn.Module) -> dict[str, int]:
    """Output channels each layer had before any recorded channel pruning (from the history)."""
    first: dict[str, int] = {}
    for entry in history(net):
        if entry["converter"].endswith(".StructuredPrune"):
            for name, layer in entry["state"]["layers"].items():
                if "out" in layer:
                    first.setdefault(name, int(layer["out"]["before"]))
    return first


def _layer_ratio(name: str, ratio: float, layer_ratios: dict[str, float]) -> float:
    """The ratio of layer ``name``: the longest matching ``layer_ratios`` key (a layer or a container)."""
    matches = [k for k in layer_ratios if name == k or name.startswith(k + ".")]
    return layer_ratios[max(matches, key=len)] if matches else ratio


@dataclass
class _Candidate:
    root: nn.Module
    name: str
    fn: Callable
    imp: torch.Tensor  # importance of each current output channel of ``root``
    original: int
    ratio: float
    scoped: bool  # has its own ratio (layer_ratios), excluded from global ranking
    unit: int = 1  # kept counts are multiples of this (round_to and GroupNorm groups)
    blocks: list[list[int]] | None = None  # root channels that must shrink evenly (GroupNorm groups)

    @property
    def current(self) -> int:
        return int(self.imp.numel())


def _constraints(group, names: dict[nn.Module, str], current: int, round_to: int) -> tuple[int, list[list[int]] | None, str | None]:
    """``(unit, blocks, reason to keep the group whole)`` that the group's layers impose.

    Each GroupNorm in the group splits the root's channels into blocks (the channels that land
    in one of its groups, wherever a concatenation puts them); keeping the same number from
    every block keeps each group's members, and a multiple of every ``num_groups`` keeps the
    norm valid after concatenations. A grouped convolution that is not depthwise keeps the
    group whole (Torch-Pruning slices its input weights as if every group lost the same
    offsets).
    """
    labels: list[list[tuple[int, int]]] = [[] for _ in range(current)]
    groups = []
    for item in group:
        m = item.dep.target.module
        if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not m.groups == m.in_channels == m.out_channels:
            return 1, None, f"grouped convolution {names.get(m, '?')!r} (groups={m.groups}) in the group"
        if not isinstance(m, nn.GroupNorm) or m.num_groups <= 1:
            continue
        per = m.num_channels // m.num_groups
        for r, i in zip(item.root_idxs, item.idxs):
            labels[int(r)].append((id(m), int(i) // per))
        groups.append(m.num_groups)
    if not groups:
        return max(1, round_to), None, None
    blocks: dict[tuple, list[int]] = {}
    for r, label in enumerate(labels):
        blocks.setdefault(tuple(sorted(set(label))), []).append(r)
    if len({len(b) for b in blocks.values()}) != 1:
        return 1, None, "its channels fall unevenly into GroupNorm groups"
    return math.lcm(max(1, round_to), len(blocks), *groups), list(blocks.values()), None


def _candidates(net, DG, importance, protected, ratio, layer_ratios, originals, round_to,
                kept_whole: dict[str, str]) -> list[_Candidate]:
    names = {m: n for n, m in net.named_modules()}
    scorer = make_importance(importance)
    fallback = make_importance("l1")
    out = []
    for group in DG.get_all_groups(ignored_layers=protected, root_module_types=list(_ROOTS)):
        root, fn = group[0].dep.target.module, group[0].dep.handler
        name = names[root]
        current = DG.get_out_channels(root)
        unit, blocks, whole = _constraints(group, names, current, round_to)
        if whole:
            kept_whole[name] = whole
            continue
        imp = scorer(group)
        if imp is None:
            imp = fallback(group)
        if imp is None:
            continue
        out.append(_Candidate(root, name, fn, imp.detach().float().cpu(), originals.get(name, current),
                              _layer_ratio(name, ratio, layer_ratios), any(name == k or name.startswith(k + ".") for k in layer_ratios),
                              unit, blocks))
    return out


def _top(imp: torch.Tensor, k: int, blocks: list[list[int]] | None = None) -> list[int]:
    """Indices of the ``k`` most important channels, ascending; ties keep the lower index.
    With ``blocks``, the ``k / len(blocks)`` most important of each block."""
    if blocks is None:
        return sorted(torch.argsort(-imp, stable=True)[:k].tolist())
    per = k // len(blocks)
    kept = []
    for block in blocks:
        index = torch.tensor(block)
        kept += index[torch.argsort(-imp[index], stable=True)[:per]].tolist()
    return sorted(kept)


def _global_keep(cands: list[_Candidate], ratio: float) -> dict[int, int]:
    """Per-candidate kept counts for one global ranking over ``cands``."""
    total_original = sum(c.original for c in cands)
    budget = round(total_original * (1.0 - ratio))
    n_remove = sum(c.current for c in cands) - budget
    counts = {id(c): c.current for c in cands}
    if n_remove <= 0:
        return counts
    scores = torch.cat([c.imp for c in cands])
    owner = torch.cat([torch.full((c.current,), i) for i, c in enumerate(cands)])
    removed = owner[torch.argsort(scores, stable=True)[:n_remove]]
    for i, c in enumerate(cands):
        keep = c.current - int((removed == i).sum())
        rounded = keep_count(c.current, 1.0 - keep / c.current, c.unit) if c.current > c.unit else c.current
        counts[id(c)] = min(rounded, c.current)
    return counts


def prune_channels(
    net: nn.Module,
    ratio: float,
    *,
    importance: Importance = "l1",
    global_pruning: bool = False,
    layer_ratios: dict[str, float] | None = None,
    protected: Sequence[str] = (),
    round_to: int = 1,
    example_shape: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Physically remove channels of ``net`` in place so each layer reaches cumulative ``ratio``.

    Args:
        net: the network (its parameters are replaced by smaller ones: rebuild optimizers).
        ratio: cumulative fraction of original output channels removed, in (0, 1).
        importance: ``l1``, ``l2``, ``bn_scale`` or ``taylor`` (needs ``.grad`` on the weights).
        global_pruning: rank channels of all layers together instead of layer by layer.
        layer_ratios: ``{layer or container name: ratio}`` overriding ``ratio`` (ranked per layer).
        protected: layer names whose output channels are kept, besides the output layers.
        round_to: kept channel counts are multiples of this (8 suits tensor cores / SIMD);
            groups with a GroupNorm also keep multiples of its ``num_groups`` (see module doc).
        example_shape: input shape for tracing (e.g. ``[2, C, *patch]`` from the data);
            default from the network (:mod:`trainer.models.netinfo`).

    Returns:
        The plan (plain data): ``{"format", "ratio", "example_shape", "layers": {name:
        {"type": class name, "out"/"in": {"before": n, "keep": [indices]}}}, "kept_whole":
        {root layer: why its group was not pruned}}``; replay it with :func:`apply_plan`.
    """
    check_ratio(ratio, "pruning ratio")
    layer_ratios = {k: check_ratio(v, f"layer_ratios[{k!r}]") for k, v in (layer_ratios or {}).items()}
    resolve(net, list(layer_ratios), "PruneRetrain.layer_ratios")
    example = example_input(net, example_shape)
    outputs, out_shapes = output_layers(net, example)
    # a protected name covers its whole subtree (as Torch-Pruning's ignored_layers does)
    protected_modules = [sub for m in resolve(net, [*protected, *outputs], "PruneRetrain.protected") for sub in m.modules()]
    DG = build_graph(net, example)
    if importance == "taylor":
        if all(p.grad is None for p in net.parameters()):
            raise UserError("importance 'taylor' needs gradients: call taylor_gradients() first")
        for p in net.parameters():  # layers the loss did not reach (eval-mode DS heads): no signal
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    originals = {**{n: DG.get_out_channels(m) for n, m in net.named_modules() if m in DG.module2node and isinstance(m, _ROOTS)},
                 **original_out_channels(net)}
    kept_whole: dict[str, str] = {}
    cands = _candidates(net, DG, importance, protected_modules, ratio, layer_ratios, originals, round_to, kept_whole)
    keep = {id(c): min(keep_count(c.original, c.ratio, c.unit), c.current) for c in cands}
    pooled = [c for c in cands if not c.scoped]
    if global_pruning and pooled:
        keep.update(_global_keep(pooled, ratio))

    names = {m: n for n, m in net.named_modules()}
    layers: dict[str, dict[str, Any]] = {}
    for c in cands:
        if keep[id(c)] >= c.current:
            continue
        kept_root = set(_top(c.imp, keep[id(c)], c.blocks))
        group = DG.get_pruning_group(c.root, c.fn, [i for i in range(c.current) if i not in kept_root])
        if not DG.check_pruning_group(group):
            continue  # would empty a layer
        for dep, idxs in group:
            m = dep.target.module
            if m not in names or not isinstance(m, _PRUNABLE_TYPES):
                continue  # Torch-Pruning's placeholder nodes (concat, add, reshape)
            dim = "out" if DG.is_out_channel_pruning_fn(dep.handler) else "in"
            size = DG.get_out_channels(m) if dim == "out" else DG.get_in_channels(m)
            entry = layers.setdefault(names[m], {"type": torch_type(m)})
            slot = entry.setdefault(dim, {"before": int(size), "keep": list(range(int(size)))})
            gone = set(int(i) for i in idxs)
            slot["keep"] = [k for j, k in enumerate(slot["keep"]) if j not in gone]
        group.prune()
    for p in net.parameters():
        p.grad = None
    check_forward(net, example, f"{type(net).__name__} no longer runs after channel pruning", out_shapes)
    return {"format": PLAN_FORMAT, "ratio": float(ratio), "example_shape": list(example.shape),
            "output_shapes": [list(s) for s in out_shapes], "layers": layers, "kept_whole": kept_whole}


def apply_plan(net: nn.Module, plan: dict[str, Any], source: str = "pruning history") -> None:
    """Replay a plan of :func:`prune_channels` on a freshly built ``net`` (no tracing).

    Every layer's type and channel count are checked before anything is cut, so a history
    from another network is refused with a one-line UserError and leaves ``net`` untouched.
    Uses Torch-Pruning's per-layer pruning functions (running statistics, ``out_channels``
    attributes and ``.grad`` are cut with the weights).
    """
    if plan.get("format") != PLAN_FORMAT:
        raise UserError(f"{source}: pruning plan format {plan.get('format')!r} is not {PLAN_FORMAT}")
    modules = dict(net.named_modules())
    steps = []
    for name, entry in plan["layers"].items():
        m = modules.get(name)
        if m is None:
            raise UserError(f"{source} does not match the model: {type(net).__name__} has no layer {name!r}; "
                            f"was the checkpoint made with another network?")
        if not same_kind(torch_type(m), entry["type"]):
            raise UserError(f"{source} does not match the model: layer {name!r} is {torch_type(m)}, "
                            f"the history expects {entry['type']}")
        pruner = tpf.PrunerBox[ops.module2type(m)]
        for dim in ("out", "in"):
            if dim not in entry:
                continue
            size = pruner.get_out_channels(m) if dim == "out" else pruner.get_in_channels(m)
            if size != entry[dim]["before"]:
                raise UserError(f"{source} does not match the model: layer {name!r} has {size} {dim}put channels, "
                                f"the history expects {entry[dim]['before']}; was the checkpoint made with another network?")
            keep = set(entry[dim]["keep"])
            remove = [i for i in range(size) if i not in keep]
            steps.append((pruner.prune_out_channels if dim == "out" else pruner.prune_in_channels, m, remove))
    for fn, m, remove in steps:
        fn(m, remove)
    # No forward check here: on resume a later technique (QAT) may already have converted the
    # layers and re-sizes its own quantizers when its record is replayed next.


class StructuredPrune:
    """Structural record of one channel-pruning round; its state is a :func:`prune_channels` plan."""

    @classmethod
    def rebuild(cls, net: nn.Module, state: dict[str, Any]) -> None:
        apply_plan(net, state, source="checkpoint pruning history")


# ---------------------------------------------------------------- Taylor
def taylor_gradients(
    net: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]] | Iterator[dict[str, torch.Tensor]],
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    accumulate: Literal["sum", "abs"] = "sum",
) -> int:
    """Put the loss gradients of ``batches`` into ``.grad`` for first-order Taylor importance;
    ``loss_fn(net(batch["image"]), batch)`` gives each batch's loss.

    Eval mode (running statistics untouched, deterministic). ``accumulate="sum"`` sums the
    gradients over batches, so the score is ``|w * sum_b g_b|`` per weight (Torch-Pruning's
    examples); ``"abs"`` sums their magnitudes, ``sum_b |w * g_b|``: near a fit the per-batch
    gradients of a useful channel point different ways and their sum cancels, their
    magnitudes do not. Under DDP the result is summed over ranks by ``all_reduce`` so every
    rank ranks channels identically. Returns the batch count.
    """
    if accumulate not in ("sum", "abs"):
        raise UserError(f"taylor accumulate={accumulate!r}: must be 'sum' or 'abs'")
    was_training = net.training
    net.eval()
    params = list(net.parameters())
    for p in params:
        p.grad = None
    total: dict[int, torch.Tensor] = {}
    n = 0
    with torch.enable_grad():
        for batch in batches:
            loss_fn(net(batch["image"]), batch).backward()
            n += 1
            if accumulate == "abs":
                for i, p in enumerate(params):
                    if p.grad is not None:
                        total[i] = total[i] + p.grad.abs() if i in total else p.grad.abs()
                        p.grad = None
    for i, g in total.items():
        params[i].grad = g
    if all_reduce is not None:
        for p in net.parameters():
            if p.grad is not None:
                p.grad = all_reduce(p.grad)
    net.train(was_training)
    return n
