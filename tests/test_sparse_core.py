"""Sparse masks: initialisation densities, prune-and-regrow semantics, schedule (slak_reference.md §6)."""
import math

import pytest
import torch
import torch.nn as nn

from slak_mm.sparse import SparseMasks, cosine_prune_rate, erk_densities, mask_checksum, select_parameters
from slak_mm.models import SLaK


def _params(seed=0):
    torch.manual_seed(seed)
    return {'a': nn.Parameter(torch.randn(64, 1, 13, 5)), 'b': nn.Parameter(torch.randn(128, 32)),
            # channels_last, as SLaK's conv weights are
            'c': nn.Parameter(torch.randn(16, 8, 3, 3).contiguous(memory_format=torch.channels_last))}


def test_uniform_init_gives_exact_per_layer_density():
    m = SparseMasks(_params())
    m.init('uniform', 0.4)
    for n, p in m.params.items():
        assert int(m.masks[n].sum()) == round(0.6 * p.numel())
        assert bool((p[~m.masks[n]] == 0).all())  # masked weights are exactly zero
    assert m.global_density() == pytest.approx(0.6, abs=1e-3)


def test_erk_init_follows_erdos_renyi_kernel_budget():
    params = _params()
    shapes = {n: p.shape for n, p in params.items()}
    dens = erk_densities(shapes, 0.6)
    raw = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    scale = {n: dens[n] / raw[n] for n in shapes if dens[n] < 1}
    assert max(scale.values()) == pytest.approx(min(scale.values()))  # density ∝ sum(shape)/prod(shape)
    budget = sum(dens[n] * math.prod(s) for n, s in shapes.items())
    assert budget == pytest.approx(0.6 * sum(math.prod(s) for s in shapes.values()))
    m = SparseMasks(params)
    m.init('ERK', 0.4, dense_threshold=1.01)
    for n in params:
        assert int(m.masks[n].sum()) == round(dens[n] * params[n].numel())


def test_snip_init_keeps_the_top_scores_budget_per_layer():
    params = _params()
    scores = {n: p.detach().abs() for n, p in params.items()}  # any saliency
    m = SparseMasks(params)
    m.init('snip', 0.4, scores, dense_threshold=1.01)
    flat = torch.cat([s.flatten() for s in scores.values()])
    thr = torch.topk(flat, round(0.6 * flat.numel())).values[-1]
    for n, p in params.items():
        assert int(m.masks[n].sum()) == round(float((scores[n] >= thr).sum()))
    assert m.global_density() == pytest.approx(0.6, abs=1e-3)


def test_layers_at_dense_threshold_stay_dense():
    params = _params()
    scores = {n: torch.full_like(p, 10.0) if n == 'b' else torch.rand_like(p) for n, p in params.items()}
    m = SparseMasks(params)
    m.init('snip', 0.4, scores)  # 'b' gets density 1.0 -> left dense (no mask)
    assert 'b' not in m.masks and 'a' in m.masks


def test_from_weights_init_reads_zeros():
    params = _params()
    with torch.no_grad():
        params['a'][:, :, :3] = 0
    m = SparseMasks(params)
    m.init('from_weights', 0.0)
    assert torch.equal(m.masks['a'], params['a'] != 0)


@pytest.mark.parametrize('grow', ['random', 'gradient', 'momentum'])
def test_prune_and_regrow_exact_counts_smallest_pruned_regrown_from_inactive_at_zero(grow):
    params = _params()
    m = SparseMasks(params)
    m.init('uniform', 0.4)
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    loss = sum((p ** 2).sum() for p in params.values())
    loss.backward()
    opt.step()
    m.apply()
    before = {n: mask.clone() for n, mask in m.masks.items()}
    weights = {n: p.detach().clone() for n, p in params.items()}
    changed = m.prune_and_regrow(0.3, grow, update_index=1, optimizer=opt)
    for n, old in before.items():
        new = m.masks[n]
        k = math.ceil(0.3 * int(old.sum()))
        pruned, grown = old & ~new, new & ~old
        assert int(pruned.sum()) == int(grown.sum()) == k == changed[n]  # exactly as many regrown as pruned
        assert int(new.sum()) == int(old.sum())
        kept_min = weights[n][old & new].abs().min()
        assert bool((weights[n][pruned].abs() <= kept_min).all())  # the smallest-magnitude active weights
        assert not bool((grown & old).any())  # regrown only from previously inactive positions
        assert bool((params[n][grown] == 0).all()) and bool((params[n][~new] == 0).all())


def test_random_regrowth_is_deterministic_from_seed_and_weights():
    a, b = SparseMasks(_params(), seed=3), SparseMasks(_params(), seed=3)
    for m in (a, b):
        m.init('uniform', 0.4)
        m.prune_and_regrow(0.5, 'random', update_index=7)
    assert mask_checksum(a.masks) == mask_checksum(b.masks)
    c = SparseMasks(_params(), seed=4)
    c.init('uniform', 0.4)
    assert mask_checksum(c.masks) != mask_checksum(a.masks)


def test_cosine_prune_rate_schedule():
    assert cosine_prune_rate(0.3, 0, 100) == pytest.approx(0.3)
    assert cosine_prune_rate(0.3, 50, 100) == pytest.approx(0.005 + 0.295 / 2)
    assert cosine_prune_rate(0.3, 100, 100) == pytest.approx(0.005)


def test_selection_backbone_and_large_kernel():
    model = nn.Module()
    model.backbone = SLaK(dict(depths=[1, 1, 1, 1], dims=[8, 8, 8, 8]), kernel_size=[7, 7, 7, 7, 3])
    model.decode_head = nn.Conv2d(8, 2, 1)
    every = select_parameters(model, 'backbone')
    assert 'backbone.downsample_layers.0.0.weight' in every and 'decode_head.weight' not in every
    assert 'backbone.stages.0.0.pwconv1.weight' in every and 'backbone.stages.0.0.gamma' not in every
    lk = select_parameters(model, 'large_kernel')
    assert sorted({n.split('.')[-3] for n in lk}) == ['tall', 'wide']
    with pytest.raises(ValueError, match='matches no'):
        select_parameters(model, r'nothing\.here')
