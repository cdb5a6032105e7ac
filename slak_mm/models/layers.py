"""Building blocks of SLaK: channels-first LayerNorm, depthwise conv+BN branches, the decomposed large-kernel module.

Everything here needs torch only. Shapes follow PyTorch: conv weights (C, 1, kh, kw); M is a stage's long kernel edge,
N the short edge (see docs/architecture in README and ../shared/docs/slak_reference.md §2).
"""
import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import dwconv2d, dwconv2d_branches, dwconv2d_sum, resolve_impl
from ..ops.dwconv import _exporting, _functorch_call
from ..ops.fused_mlp import any_hooked

DENSE_DEPLOYED_WARNING = (
    "a deployed SLaK block ran with its merged kernel's gradient on, so it ran the kernel as the dense M×M conv (every "
    "tap gets its gradient; 1-5x the two-band time): for inference, call the model under torch.no_grad() or "
    "torch.inference_mode(), or freeze its weights (model.requires_grad_(False)), and it runs the two bands")

_NORMS = {'BN': nn.BatchNorm2d, 'BN2d': nn.BatchNorm2d, 'SyncBN': nn.SyncBatchNorm}


def build_branch_norm(norm_cfg: Dict, channels: int) -> nn.Module:
    """BatchNorm for a large-kernel branch from an mm-style ``norm_cfg`` ('BN' | 'SyncBN', plus eps/momentum)."""
    cfg = dict(norm_cfg)
    norm_type = cfg.pop('type', None)
    if norm_type not in _NORMS:
        raise ValueError(f"SLaK: norm_cfg type {norm_type!r} is not supported for the large-kernel branches; "
                         f"use one of {sorted(_NORMS)} (e.g. norm_cfg=dict(type='SyncBN') for multi-GPU training)")
    requires_grad = cfg.pop('requires_grad', True)
    norm = _NORMS[norm_type](channels, **cfg)
    for p in norm.parameters():
        p.requires_grad = requires_grad
    return norm


class DepthwiseConv2d(nn.Conv2d):
    """Stride-1 'same' depthwise conv (C groups) running through :func:`slak_mm.ops.dwconv2d`.

    Padding is (kh // 2, kw // 2) per axis, so rectangular kernels keep the map size. Keeps ``nn.Conv2d``'s parameter
    names and shapes, so checkpoints, FLOP counters and the sparse-training hook see an ordinary conv.
    """

    def __init__(self, channels: int, kernel_size: Tuple[int, int], bias: bool = False, conv_impl: str = 'auto'):
        kh, kw = kernel_size
        super().__init__(channels, channels, (kh, kw), padding=(kh // 2, kw // 2), groups=channels, bias=bias)
        self.conv_impl = conv_impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dwconv2d(x, self.weight, self.bias, impl=self.conv_impl)


class ConvBN(nn.Sequential):
    """Depthwise conv (no bias) followed by its own BatchNorm: one branch of the large-kernel module."""

    def __init__(self, channels: int, kernel_size: Tuple[int, int], norm_cfg: Dict, conv_impl: str = 'auto'):
        super().__init__()
        self.conv = DepthwiseConv2d(channels, kernel_size, bias=False, conv_impl=conv_impl)
        self.bn = build_branch_norm(norm_cfg, channels)


def pad_kernel(kernel: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Zero-pad a (C, 1, h, w) kernel symmetrically to (kh, kw): the same 'same'-padded conv, on a larger footprint."""
    dh, dw = kh - kernel.shape[2], kw - kernel.shape[3]
    return F.pad(kernel, (dw // 2, dw // 2, dh // 2, dh // 2))


def fuse_bn(kernel: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BN into the preceding bias-free conv: returns (kernel * g / s, beta - mu * g / s)."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    return kernel * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def is_cross_kernel(kernel: torch.Tensor, n: int) -> bool:
    """True if an M×M kernel is zero outside the central N-wide row and column bands."""
    m = kernel.shape[-1]
    lo, hi = (m - n) // 2, (m + n) // 2
    outside = kernel.detach().clone()
    outside[..., lo:hi, :] = 0
    outside[..., :, lo:hi] = 0
    return not bool(outside.any())


class LargeKernelConv(nn.Module):
    """SLaK's large-kernel module: ``tall(x) + wide(x) + small(x)``, each a depthwise conv with its own BN.

    layout='decomposed' (SLaK): tall (M, N) kernel, padding (M//2, N//2); wide (N, M), padding (N//2, M//2);
    small (N, N), only if N < M. layout='dense' (the reference's ``lkb_origin`` / RepLKNet form): ``dense`` (M, M)
    plus ``small``. After :meth:`switch_to_deploy` the module holds one merged M×M kernel with bias (``merged``).
    """
    LAYOUTS = ('decomposed', 'dense')

    def __init__(self, channels: int, long_edge: int, short_edge: int, norm_cfg: Dict,
                 conv_impl: str = 'auto', deploy: bool = False, layout: str = 'decomposed'):
        super().__init__()
        if layout not in self.LAYOUTS:
            raise ValueError(f'large-kernel layout must be one of {self.LAYOUTS}, got {layout!r}')
        self.channels, self.long_edge, self.short_edge = channels, long_edge, short_edge
        self.conv_impl, self.layout = conv_impl, layout
        self.deploy = deploy
        m, n = long_edge, short_edge
        if deploy:
            self.merged = DepthwiseConv2d(channels, (m, m), bias=True, conv_impl=conv_impl)
            self._register_band_hooks()
        else:
            if layout == 'decomposed':
                self.tall = ConvBN(channels, (m, n), norm_cfg, conv_impl)
                self.wide = ConvBN(channels, (n, m), norm_cfg, conv_impl)
            else:
                self.dense = ConvBN(channels, (m, m), norm_cfg, conv_impl)
            self.small = ConvBN(channels, (n, n), norm_cfg, conv_impl) if n < m else None
        self._bands: Optional[tuple] = None  # deploy: (key, band kernels) derived from merged.weight

    def branches(self) -> list:
        """The ConvBN branches in kernel order: tall, wide, small (decomposed) or dense, small."""
        names = ('tall', 'wide', 'small') if self.layout == 'decomposed' else ('dense', 'small')
        return [getattr(self, name) for name in names if getattr(self, name, None) is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self._forward_merged(x)
        branches = self.branches()
        # Watched branches must really run (FLOP counter): no folding, no fusing.
        hooked = any_hooked(m for b in branches for m in (b, b.conv, b.bn))
        if not hooked and self._can_fold(branches):
            return self._forward_folded(x)
        if not hooked and resolve_impl(self.conv_impl, x) == 'triton':
            # Fused unit: one pass over x produces every branch's conv output; each then goes through its own BN.
            outs = dwconv2d_branches(x, [b.conv.weight for b in branches], impl='triton')
            out = branches[0].bn(outs[0])
            for b, y in zip(branches[1:], outs[1:]):
                out = out + b.bn(y)
            return out
        out = branches[0](x)
        for b in branches[1:]:
            out = out + b(x)
        return out

    def _can_fold(self, branches: list) -> bool:
        """Eval mode with running BN statistics: the branches can run BN-folded, as the deployed model does."""
        return not self.training and all(not b.bn.training and b.bn.running_mean is not None for b in branches)

    def _forward_folded(self, x: torch.Tensor) -> torch.Tensor:
        # Folded every call (~20 small tensor ops): a cache keyed on version counters would go stale when weights are
        # changed through ``.data`` (mmengine's EMA model does), which version counters do not see.
        return dwconv2d_sum(x, *self._folded_kernels(), impl=self.conv_impl)

    def _folded_kernels(self) -> Tuple[list, torch.Tensor]:
        # Eval-mode BN is affine, so conv+BN per branch == conv with a scaled kernel plus a bias, and the N×N kernel
        # adds into the centre of the M×N (or M×M) one: two band convs (one for 'dense') and one bias instead of three
        # convs, three BNs and two adds. The deployed model's arithmetic, computed from the live parameters (so
        # gradients still reach them); equal to the branch-wise result up to float rounding (tested).
        small = fuse_bn(self.small.conv.weight, self.small.bn) if self.small is not None else None
        lead = self.tall if self.layout == 'decomposed' else self.dense
        first, bias = fuse_bn(lead.conv.weight, lead.bn)
        if small is not None:
            first, bias = first + pad_kernel(small[0], *first.shape[2:]), bias + small[1]
        kernels = [first]
        if self.layout == 'decomposed':
            wide, wide_bias = fuse_bn(self.wide.conv.weight, self.wide.bn)
            kernels.append(wide)
            bias = bias + wide_bias
        return kernels, bias

    def _forward_merged(self, x: torch.Tensor) -> torch.Tensor:
        # A cross-shaped M×M kernel runs as two band convs (M×N, and N×M with the shared centre zeroed): ~510 MACs
        # per output instead of M² (2601 at M=51), measured 1-5x faster than one M×M call at every SLaK-T stage shape
        # (docs/benchmarks.md). Any other kernel (e.g. loaded from elsewhere) runs as one M×M conv, and so does a
        # kernel whose gradient is needed (training or fine-tuning a deployed model): the bands would give its
        # corner taps no gradient, where the M×M conv the module holds gives every tap its own.
        w, b = self.merged.weight, self.merged.bias
        if _functorch_call(w) or (torch.is_grad_enabled() and w.requires_grad):
            if not torch.compiler.is_compiling():
                warnings.warn(DENSE_DEPLOYED_WARNING)  # (shown once: the default filter, one location)
            return dwconv2d(x, w, b, impl=self.conv_impl)
        bands = self._band_kernels(w)
        if not bands:
            return dwconv2d(x, w, b, impl=self.conv_impl)
        return dwconv2d_sum(x, bands, b, impl=self.conv_impl)  # Triton: both bands in one pass

    def _band_kernels(self, w: torch.Tensor) -> tuple:
        """:meth:`_split_bands` of ``w``, cached until ``w`` changes: another tensor, device or dtype, or a new value
        written through the parameter (optimizer steps, ``copy_``, ``load_state_dict``: its version counter). Writes
        through ``.data`` bypass the version counter; after them call :meth:`reset_band_cache`. While tracing
        (torch.compile, export), where the cache's key cannot be read, the bands are sliced from ``w`` in the graph
        (so a compiled model reads the live weight), and only whether ``w`` is a cross comes from the cache (the
        last eager call's, or decided here once: a data-dependent check, which breaks a compiled graph)."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or _exporting():
            if self._bands is None:
                self._bands = (None, self._split_bands(w))
            return self._slice_bands(w) if self._bands[1] else ()
        # inference tensors have no version counter: split every call
        key = (w.data_ptr(), None if w.is_inference() else w._version, w.device, w.dtype)
        if self._bands is None or self._bands[0] != key or key[1] is None:
            self._bands = (key, self._split_bands(w))
        return self._bands[1]

    @torch.no_grad()
    def _split_bands(self, w: torch.Tensor) -> tuple:
        """(tall M×N, wide N×M without the centre) contiguous band kernels, or () if ``w`` is not a cross."""
        if not is_cross_kernel(w, self.short_edge):
            return ()
        return self._slice_bands(w)

    def _slice_bands(self, w: torch.Tensor) -> tuple:
        """(tall M×N, wide N×M with its N×N centre zeroed) of a cross-shaped ``w``, by slicing and concatenation
        (traceable and exportable)."""
        m, n = self.long_edge, self.short_edge
        lo, hi = (m - n) // 2, (m + n) // 2
        row = w[:, :, lo:hi, :]
        wide = torch.cat([row[..., :lo], torch.zeros_like(row[..., lo:hi]), row[..., hi:]], dim=3)
        return w[:, :, :, lo:hi].contiguous(), wide

    def reset_band_cache(self, *args, **kwargs) -> None:
        """Forget the cached band kernels of a deployed module (after writing its weight through ``.data``, which
        the cache cannot see; also a ``load_state_dict`` pre-hook)."""
        self._bands = None

    @torch.no_grad()
    def split_bands_now(self, *args, **kwargs) -> None:
        """Split the deployed kernel into its bands now, outside any graph (after ``switch_to_deploy`` and
        ``load_state_dict``), so that ``torch.compile`` finds the cross-kernel check done and traces the model as one
        graph."""
        if self.deploy and not self.merged.weight.is_meta:
            self.reset_band_cache()
            self._band_kernels(self.merged.weight)

    def _register_band_hooks(self) -> None:
        self._register_load_state_dict_pre_hook(self.reset_band_cache)
        self.register_load_state_dict_post_hook(self.split_bands_now)

    @torch.no_grad()
    def merged_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The exact eval-mode equivalent (M×M kernel, bias) of the three BN'd branches."""
        if self.deploy:
            return self.merged.weight.detach(), self.merged.bias.detach()
        kernels, bias = self._folded_kernels()
        m = self.long_edge
        kernel = sum(pad_kernel(k, m, m) for k in kernels)
        return kernel, bias

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Fold the BNs (running statistics) and merge the branches into ``merged``. No-op if already deployed."""
        if self.deploy:
            return
        if self.training:
            raise RuntimeError('switch_to_deploy() needs eval mode (it folds BN running statistics): '
                               'call model.eval() first')
        kernel, bias = self.merged_kernel_bias()
        self.merged = DepthwiseConv2d(self.channels, (self.long_edge, self.long_edge), bias=True,
                                      conv_impl=self.conv_impl).to(kernel)
        self.merged.weight.copy_(kernel)
        self.merged.bias.copy_(bias)
        for name in ('tall', 'wide', 'dense', 'small'):
            if hasattr(self, name):
                delattr(self, name)
        self.deploy = True
        self._register_band_hooks()
        self.split_bands_now()
