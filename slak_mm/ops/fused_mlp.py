"""CPU inference fast path for the ConvNeXt-style block MLP: ``shortcut + gamma * fc2(GELU(fc1(x)))``.

PyTorch runs this as two ``addmm`` calls that first copy the bias into the output, a separate GELU pass, a layer-scale
multiply and a residual add: four extra passes over the activations. oneDNN's linear op with post-ops (the op
inductor's CPU fusions use, ``torch.ops.mkldnn._linear_pointwise``) fuses bias + GELU into fc1 and bias + residual add
into fc2, so only the two GEMMs touch the activations. The layer scale is folded into fc2 where that is cheaper than a
pass over the activations (``4 C < B·H·W``), else applied together with the residual add in one ``addcmul``.

Same math, different rounding: results agree with the unfused path to float32 rounding (tests: ≤ 1e-5 relative).
The fast path runs only where it cannot change anything else: CPU float32, gradients off, no autocast, not tracing /
exporting / compiling, mkldnn enabled, and nothing hooked on the linear or activation modules (the MAC counter's
hooks must see every layer). Everywhere else the caller uses its ordinary modules.
"""
from typing import Iterable, Optional

import torch
from torch import nn

from .cpu_fusion import cpu_fusion_enabled

__all__ = ['any_hooked', 'can_fuse_mlp', 'fused_mlp_residual']


def any_hooked(modules: Iterable[nn.Module]) -> bool:
    """Whether anything watches these modules (e.g. the MAC counter's forward hooks): fast paths that bypass a
    module's own forward must then stay off, so the watcher still sees it run."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def can_fuse_mlp(x: torch.Tensor, fc1: nn.Linear, act: nn.Module, fc2: nn.Linear) -> bool:
    """Whether :func:`fused_mlp_residual` may replace ``fc2(act(fc1(x)))`` plus the residual for this input."""
    return (x.device.type == 'cpu' and x.dtype == torch.float32 and x.is_contiguous()
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled('cpu')
            and isinstance(act, nn.GELU) and fc1.weight.dtype == torch.float32 and fc2.weight.dtype == torch.float32
            and not torch.jit.is_tracing() and not torch.jit.is_scripting() and not torch.onnx.is_in_onnx_export()
            and not torch.compiler.is_compiling() and cpu_fusion_enabled('mlp', '_linear_pointwise')
            and not any_hooked((fc1, act, fc2)))


def fused_mlp_residual(x: torch.Tensor, shortcut: torch.Tensor, fc1: nn.Linear, act: nn.GELU, fc2: nn.Linear,
                       gamma: Optional[torch.Tensor]) -> torch.Tensor:
    """``shortcut + gamma * fc2(act(fc1(x)))`` with ``x`` NHWC ``(B, H, W, C)`` and ``shortcut`` NCHW; returns NCHW
    (channels_last memory). Call only where :func:`can_fuse_mlp` is true."""
    linear = torch.ops.mkldnn._linear_pointwise
    hidden = linear(x, fc1.weight, fc1.bias, 'gelu', [], act.approximate)
    residual = shortcut.permute(0, 2, 3, 1).contiguous()  # no copy for channels_last activations
    weight, bias = fc2.weight, fc2.bias
    if gamma is not None and weight.numel() >= residual.numel():
        # Small maps (e.g. stage 4 at 224): scaling the weights would cost more than one pass over the activations.
        return torch.addcmul(residual, linear(hidden, weight, bias, 'none', [], ''), gamma).permute(0, 3, 1, 2)
    if gamma is not None:
        weight = weight * gamma[:, None]
        bias = bias * gamma if bias is not None else None
    return linear.binary(hidden, residual, weight, bias, 'add').permute(0, 3, 1, 2)
