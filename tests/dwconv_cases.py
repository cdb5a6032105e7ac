"""Shared inputs and the independent reference for the summed depthwise unit's tests (torch only)."""
import torch
import torch.nn.functional as F


def random_unit(shape, kernels, with_bias=True, channels_last=False, seed=0):
    """(x, kernels, bias) of a summed depthwise unit: kernels scaled by 1/8 so sums stay O(1)."""
    torch.manual_seed(seed)
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(shape[1], 1, *k) / 8 for k in kernels]
    return x, ws, torch.randn(shape[1]) if with_bias else None


def float64_sum(x, ws, b):
    """``b + sum_k F.conv2d(x, ws[k])`` ('same' padding, depthwise) in float64."""
    ref = sum(F.conv2d(x.double(), w.double(), padding=(w.shape[2] // 2, w.shape[3] // 2), groups=x.shape[1])
              for w in ws)
    return ref if b is None else ref + b.double().reshape(1, -1, 1, 1)
