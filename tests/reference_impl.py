"""An independent SLaK forward written from slak_reference.md §2, for fidelity tests.

Reads a state dict in the *reference's* key layout (§4.1-4.2: LoRA1/LoRA2/small_conv, or Decom1/Decom2, or the dense
lkb_origin, optionally with the ImageNet head/norm and a ``module.`` prefix) and computes eval-mode stage outputs with
explicit per-branch F.conv2d calls, BatchNorm in its eval form (x - mean) / sqrt(var + eps) * w + b, and LayerNorm by
hand. Shares no code with slak_mm.
"""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

EPS_LN, EPS_BN = 1e-6, 1e-5


def _ln_channels_first(x, w, b):
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS_LN) * w[:, None, None] + b[:, None, None]


def _ln_last(x, w, b):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS_LN) * w + b


def _conv_bn(x, sd, prefix, pad):
    w = sd[prefix + 'conv.weight']
    y = F.conv2d(x, w, None, padding=pad, groups=x.shape[1])
    mean, var = sd[prefix + 'bn.running_mean'], sd[prefix + 'bn.running_var']
    g, b = sd[prefix + 'bn.weight'], sd[prefix + 'bn.bias']
    return (y - mean[:, None, None]) / torch.sqrt(var[:, None, None] + EPS_BN) * g[:, None, None] + b[:, None, None]


def reference_forward(sd: Dict[str, torch.Tensor], x: torch.Tensor, depths: Sequence[int],
                      kernel_size: Sequence[int], out_indices=(0, 1, 2, 3), era: str = 'LoRA') -> List[torch.Tensor]:
    sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
    n = kernel_size[-1]
    outs = []
    for i in range(4):
        d = f'downsample_layers.{i}.'
        if i == 0:  # stem: conv 4x4/4, then LN
            x = F.conv2d(x, sd[d + '0.weight'], sd[d + '0.bias'], stride=4)
            x = _ln_channels_first(x, sd[d + '1.weight'], sd[d + '1.bias'])
        else:  # LN, then conv 2x2/2
            x = _ln_channels_first(x, sd[d + '0.weight'], sd[d + '0.bias'])
            x = F.conv2d(x, sd[d + '1.weight'], sd[d + '1.bias'], stride=2)
        m = kernel_size[i]
        for j in range(depths[i]):
            p = f'stages.{i}.{j}.'
            if era == 'lkb_origin':
                y = _conv_bn(x, sd, p + 'large_kernel.lkb_origin.', (m // 2, m // 2))
            else:
                y = (_conv_bn(x, sd, p + f'large_kernel.{era}1.', (m // 2, n // 2))
                     + _conv_bn(x, sd, p + f'large_kernel.{era}2.', (n // 2, m // 2)))
            if n < m:
                y = y + _conv_bn(x, sd, p + 'large_kernel.small_conv.', (n // 2, n // 2))
            y = y.permute(0, 2, 3, 1)
            y = _ln_last(y, sd[p + 'norm.weight'], sd[p + 'norm.bias'])
            y = y @ sd[p + 'pwconv1.weight'].t() + sd[p + 'pwconv1.bias']
            y = 0.5 * y * (1 + torch.erf(y / 2 ** 0.5))  # exact GELU
            y = y @ sd[p + 'pwconv2.weight'].t() + sd[p + 'pwconv2.bias']
            if p + 'gamma' in sd:
                y = y * sd[p + 'gamma']
            x = x + y.permute(0, 3, 1, 2)
        if i in out_indices:
            outs.append(_ln_channels_first(x, sd[f'norm{i}.weight'], sd[f'norm{i}.bias']))
    return outs


def randomize_bn_and_scales(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial running stats / affine and every gamma/LN non-trivial values (eval fidelity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith('running_mean') or (name.endswith('bias') and t.dim() == 1):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith('gamma') or (name.endswith('weight') and t.dim() == 1):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)


def to_reference_layout(sd: Dict[str, torch.Tensor], era: str = 'LoRA', head: int = 0,
                        prefix: str = '') -> Dict[str, torch.Tensor]:
    """slak_mm backbone keys -> the reference ImageNet model's keys (era 'LoRA', 'Decom' or 'lkb_origin')."""
    names = {'tall': f'{era}1', 'wide': f'{era}2', 'small': 'small_conv', 'dense': 'lkb_origin'}
    out = {}
    for k, v in sd.items():
        for ours, theirs in names.items():
            k = k.replace(f'.large_kernel.{ours}.', f'.large_kernel.{theirs}.')
        out[prefix + k] = v
    if head:
        c = sd['stages.3.0.norm.weight'].shape[0]
        out[prefix + 'norm.weight'], out[prefix + 'norm.bias'] = torch.ones(c), torch.zeros(c)
        out[prefix + 'head.weight'], out[prefix + 'head.bias'] = torch.randn(head, c), torch.zeros(head)
    return out
