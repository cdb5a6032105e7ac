"""``dwconv2d``: stride-1 "same" depthwise convolution with rectangular odd kernels.

Semantics are exactly ``F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=C)`` for a weight of shape
(C, 1, kh, kw). The torch path picks the fastest layout for the device: on CPU, oneDNN's channels_last depthwise
kernels run SLaK's long bands an order of magnitude faster than the NCHW path (see docs/benchmarks.md), so NCHW inputs
are converted; results do not depend on the layout. Kernel taps that can only see zero padding (maps smaller than
the kernel) are skipped.
"""
from typing import Optional

import torch
import torch.nn.functional as F

IMPLS = ('auto', 'torch')
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_dwconv_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      impl: str = 'auto') -> None:
    """Raise a clear error for anything ``dwconv2d`` does not support."""
    if impl == 'triton':
        raise NotImplementedError("dwconv2d: impl='triton' is not available yet in slak_mm; use impl='auto' or "
                                  "'torch' (the PyTorch path, channels_last, on any device)")
    if impl not in IMPLS:
        raise ValueError(f"dwconv2d: impl={impl!r} is not one of {IMPLS}")
    if x.dim() != 4:
        raise ValueError(f'dwconv2d: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}')
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f'dwconv2d: weight must have shape (C, 1, kh, kw), got {tuple(weight.shape)}')
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f'dwconv2d: weight has {weight.shape[0]} channels but the input has {x.shape[1]}')
    kh, kw = weight.shape[2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f'dwconv2d: kernel ({kh}, {kw}) must have odd sides ("same" padding needs a centre tap)')
    if x.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f'dwconv2d: floating-point tensors required, got input {x.dtype} and weight {weight.dtype}')
    tensors = [x, weight] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f'dwconv2d: tensors on different devices: {[str(t.device) for t in tensors]}')
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f'dwconv2d: bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}')


def clip_to_input(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Drop kernel rows/columns that can only ever multiply zero padding (exact).

    Under 'same' padding an output pixel reaches at most ``H - 1`` rows away, so only the central
    ``min(kh, 2H - 1)`` × ``min(kw, 2W - 1)`` taps ever touch real pixels (feature maps smaller than the kernel).
    """
    kh, kw = weight.shape[2:]
    kh2, kw2 = min(kh, 2 * height - 1), min(kw, 2 * width - 1)
    if (kh2, kw2) == (kh, kw):
        return weight
    dh, dw = (kh - kh2) // 2, (kw - kw2) // 2
    return weight[:, :, dh:dh + kh2, dw:dw + kw2]


def dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
             impl: str = 'auto') -> torch.Tensor:
    """Depthwise 'same' convolution. x: (N, C, H, W); weight: (C, 1, kh, kw), kh and kw odd; bias: (C,) or None.

    Returns (N, C, H, W). Differentiable w.r.t. x, weight and bias.
    """
    check_dwconv_args(x, weight, bias, impl)
    if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):  # exported graphs keep dynamic sizes
        weight = clip_to_input(weight, x.shape[2], x.shape[3])
    kh, kw = weight.shape[2:]
    # channels_last: oneDNN (CPU) and cuDNN (GPU) depthwise paths; NCHW long bands hit slow generic kernels.
    # A no-op when the caller already runs channels_last (SLaK converts its input once).
    x = x.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=x.shape[1])
