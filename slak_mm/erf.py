"""Effective receptive field (ERF), the large-kernel literature's method (RepLKNet / SLaK, slak_reference.md §10).

For each image: the gradient of sum(ReLU(feature[:, :, H/2, W/2])) (the centre position of the chosen stage's
*feature map*, all channels; not pooled features) w.r.t. the input, ReLU, summed over batch and colour channels;
the maps are averaged over images. Quantified on log10(map + 1) normalised to [0, 1]: for each threshold t, the area
ratio of the smallest centred square holding a fraction t of the total contribution.
"""
from typing import Callable, Dict, Iterable, Sequence

import numpy as np
import torch

DEFAULT_THRESHOLDS = (0.2, 0.3, 0.5, 0.99)


def check_thresholds(thresholds: Sequence[float]) -> None:
    bad = [t for t in thresholds if not 0 < t <= 1]
    if bad:
        raise ValueError(f'ERF thresholds must be in (0, 1], got {bad}')


def input_gradient(features: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """d sum(ReLU(f(x)[:, :, H//2, W//2])) / dx, raw (N, 3, H, W)."""
    x = x.detach().requires_grad_(True)
    fmap = features(x)
    if fmap.dim() != 4:
        raise ValueError(f'ERF needs a feature map (N, C, H, W), got shape {tuple(fmap.shape)}')
    h, w = fmap.shape[2:]
    centre = torch.relu(fmap[:, :, h // 2, w // 2]).sum()
    return torch.autograd.grad(centre, x)[0]


def erf_map(features: Callable[[torch.Tensor], torch.Tensor], images: Iterable[torch.Tensor]) -> np.ndarray:
    """Mean over images of ReLU(input gradient) summed over batch and channels: an (H, W) float64 map."""
    total, n = None, 0
    for x in images:
        contrib = torch.relu(input_gradient(features, x)).sum(dim=(0, 1)).double().numpy()
        total = contrib if total is None else total + contrib
        n += 1
    if n == 0:
        raise ValueError('ERF: no images')
    return total / n


def area_ratios(erf: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> Dict[float, float]:
    """High-contribution area ratio r(t) = (side / size)² of the smallest centred square holding fraction t."""
    check_thresholds(thresholds)
    m = np.log10(erf + 1)
    m = (m - m.min()) / max(m.max() - m.min(), 1e-30)
    size = min(m.shape)
    cy, cx = m.shape[0] // 2, m.shape[1] // 2
    total = m.sum()
    out = {}
    for t in thresholds:
        for half in range(0, size // 2 + 1):
            side = 2 * half + 1
            box = m[max(cy - half, 0):cy + half + 1, max(cx - half, 0):cx + half + 1]
            if box.sum() >= t * total or side >= size:
                out[t] = min(side / size, 1.0) ** 2
                break
    return out
