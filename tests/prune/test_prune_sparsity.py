"""Unstructured global-magnitude sparsity: masks in the state dict, replay, permanence."""
from __future__ import annotations

import torch

from prune_helpers import tiny_unet, trained_unet
from trainer.prune.measure import count_nonzero_weights
from trainer.prune.sparsity import has_masks, make_permanent, masked_layers, sparsify
from trainer.structure import history, replay

OUTPUTS = ["head", "ds_heads.0"]


def test_global_magnitude_sparsity_is_cumulative_and_spares_protected_layers():
    net = trained_unet()
    head = net.head.weight.detach().clone()
    first = sparsify(net, 0.25, protected=OUTPUTS)
    zero_after_first = {n: (m.weight_mask == 0).clone() for n, m in net.named_modules() if hasattr(m, "weight_mask")}
    second = sparsify(net, 0.5, protected=OUTPUTS)
    assert abs(first["ratio"] - 0.25) < 1e-3 and abs(second["ratio"] - 0.5) < 1e-3
    for name, zeros in zero_after_first.items():  # zeros stay zeros
        assert bool((dict(net.named_modules())[name].weight_mask[zeros] == 0).all())
    assert "head" not in masked_layers(net) and torch.equal(net.head.weight, head)
    per_layer = {n: float((m.weight_mask == 0).float().mean()) for n, m in net.named_modules() if hasattr(m, "weight_mask")}
    assert len({round(v, 2) for v in per_layer.values()}) > 1  # global ranking, not per layer
    assert any(k.endswith("weight_mask") for k in net.state_dict())
    assert len([e for e in history(net) if e["converter"].endswith("SparsityMasks")]) == 1


def test_masks_replay_on_a_fresh_net_and_become_permanent():
    net = trained_unet()
    sparsify(net, 0.5, protected=OUTPUTS)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        want = net(x)
    fresh = tiny_unet(seed=3)
    replay(fresh, history(net))
    fresh.load_state_dict(net.state_dict())  # strict: weight_orig + weight_mask keys exist
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), want)

    layers = make_permanent(net)
    assert layers and not has_masks(net) and not any(k.endswith(("_orig", "_mask")) for k in net.state_dict())
    nonzero, total = count_nonzero_weights(net)
    assert nonzero < total * 0.6
    with torch.no_grad():
        assert torch.equal(net(x), want)
    again = tiny_unet(seed=4)
    replay(again, history(net))  # masks, then permanent: plain weights again
    again.load_state_dict(net.state_dict())
    assert make_permanent(again) == []
