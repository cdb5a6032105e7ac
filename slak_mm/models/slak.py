"""SLaK backbone (Sparse Large Kernel Network, arXiv 2207.03620) for dense prediction.

ConvNeXt's macro design with each 7×7 depthwise conv replaced by :class:`LargeKernelConv` (M×N + N×M + N×N,
each with its own BN) and widths ``int(d * width_factor)``. Returns a tuple of channels-first-LayerNorm'd stage outputs
for ``out_indices``. Needs torch and timm; mmengine is used when present (registration, ``init_cfg``, logging).
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from timm.layers import DropPath, LayerNorm2d, trunc_normal_  # LayerNorm2d: SLaK's 'channels_first' LN (over C)

from ..ops import IMPLS, triton_available
from ..ops.fused_mlp import can_fuse_mlp, fused_mlp_residual
from .layers import LargeKernelConv

try:  # mm stack present: full OpenMMLab integration
    from mmengine.logging import print_log
    from mmengine.model import BaseModule
except ImportError:  # torch + timm only (e.g. a bare GPU box for kernel work): same module, no registry
    BaseModule = None
    print_log = None

if BaseModule is None:
    class BaseModule(nn.Module):  # type: ignore[no-redef]
        def __init__(self, init_cfg: Optional[Dict] = None):
            super().__init__()
            self.init_cfg = init_cfg


def _log(msg: str, level: str = 'INFO') -> None:
    import logging
    if print_log is not None:
        print_log(msg, logger='current', level=getattr(logging, level))
    else:
        logging.getLogger('slak_mm').log(getattr(logging, level), msg)


class Block(nn.Module):
    """large_kernel -> NHWC -> LayerNorm -> Linear(C, 4C) -> GELU -> Linear(4C, C) -> gamma -> NCHW -> residual.

    CPU inference (eval, no grad, float32) runs the MLP and residual fused in oneDNN: see
    :mod:`slak_mm.ops.fused_mlp`.
    """

    def __init__(self, dim: int, long_edge: int, short_edge: int, drop_path: float = 0.,
                 layer_scale_init_value: float = 1e-6, norm_cfg: Optional[Dict] = None,
                 conv_impl: str = 'auto', deploy: bool = False, with_cp: bool = False,
                 kernel_layout: str = 'decomposed'):
        super().__init__()
        self.large_kernel = LargeKernelConv(dim, long_edge, short_edge, norm_cfg or dict(type='BN'),
                                                  conv_impl=conv_impl, deploy=deploy, layout=kernel_layout)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.with_cp = with_cp

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm(self.large_kernel(x).permute(0, 2, 3, 1))
        if not self.training and can_fuse_mlp(x, self.pwconv1, self.act, self.pwconv2):
            return fused_mlp_residual(x, shortcut, self.pwconv1, self.act, self.pwconv2, self.gamma)
        x = self.pwconv2(self.act(self.pwconv1(x)))
        if self.gamma is not None:
            x = x * self.gamma
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_cp and x.requires_grad:
            return cp.checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class SLaK(BaseModule):
    """SLaK backbone.

    Args:
        arch: 'tiny' | 'small' | 'base', or dict(depths=[4 ints], dims=[4 ints]) (dims before ``width_factor``).
        kernel_size: [M0, M1, M2, M3, N]: the long kernel edge of each stage, then the short edge shared by all.
        width_factor: channel multiplier; widths are ``int(d * width_factor)`` (truncated, as the reference).
        drop_path_rate: stochastic depth, linearly increasing over all blocks from 0.
        layer_scale_init_value: initial per-channel layer scale (<= 0 disables it).
        out_indices: stages whose (LayerNorm'd) outputs are returned.
        frozen_stages: stem/downsampling and blocks of stages < frozen_stages are frozen (-1: none).
        norm_eval: keep all BatchNorms in eval mode during training.
        with_cp: gradient checkpointing per block.
        norm_cfg: norm of the large-kernel branches: dict(type='BN') or dict(type='SyncBN').
        conv_impl: depthwise conv implementation: 'auto' (the fused Triton unit for CUDA tensors when Triton is
            installed, PyTorch's convolutions otherwise), 'torch' or 'triton'; see :func:`slak_mm.ops.dwconv2d`.
        deploy: build the merged (re-parameterised) form directly.
        kernel_layout: 'decomposed' (SLaK, default) or 'dense' (M×M + N×N, the reference's ``lkb_origin`` models).
        init_cfg: dict(type='Pretrained', checkpoint=PATH, use_ema=False, pad_kernels=False) to load SLaK weights
            (official ImageNet checkpoints or slak_mm checkpoints); None trains from scratch.
    """
    arch_settings = {
        'tiny': dict(depths=[3, 3, 9, 3], dims=[96, 192, 384, 768]),
        'small': dict(depths=[3, 3, 27, 3], dims=[96, 192, 384, 768]),
        'base': dict(depths=[3, 3, 27, 3], dims=[128, 256, 512, 1024]),
    }
    num_stages = 4

    def __init__(self, arch: Union[str, Dict] = 'tiny', kernel_size: Sequence[int] = (51, 49, 47, 13, 5),
                 width_factor: float = 1.3, drop_path_rate: float = 0., layer_scale_init_value: float = 1e-6,
                 out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1, norm_eval: bool = False,
                 with_cp: bool = False, norm_cfg: Optional[Dict] = None, conv_impl: str = 'auto',
                 deploy: bool = False, kernel_layout: str = 'decomposed', in_channels: int = 3,
                 init_cfg: Optional[Dict] = None):
        super().__init__(init_cfg=init_cfg)
        depths, base_dims = self._parse_arch(arch)
        kernel_size = self._check_kernel_size(kernel_size)
        if width_factor <= 0:
            raise ValueError(f'SLaK: width_factor must be > 0, got {width_factor}')
        self.out_indices = self._check_out_indices(out_indices)
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'SLaK: frozen_stages must be in [-1, {self.num_stages}], got {frozen_stages}')
        self.depths, self.kernel_size, self.width_factor = depths, kernel_size, width_factor
        self.dims = [int(d * width_factor) for d in base_dims]
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        self.deploy, self.kernel_layout = deploy, kernel_layout
        if kernel_layout not in LargeKernelConv.LAYOUTS:
            raise ValueError(f'SLaK: kernel_layout must be one of {LargeKernelConv.LAYOUTS}, '
                             f'got {kernel_layout!r}')
        if conv_impl not in IMPLS:
            raise ValueError(f'SLaK: conv_impl must be one of {IMPLS}, got {conv_impl!r}')
        if conv_impl == 'triton' and not triton_available():
            raise ImportError("SLaK: conv_impl='triton' needs the triton package (it ships with PyTorch's CUDA wheels "
                              "on Linux); use conv_impl='auto' to fall back to PyTorch's convolutions")
        norm_cfg = dict(norm_cfg or dict(type='BN'))
        dims = self.dims

        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_channels, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0]))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)))

        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        for i in range(self.num_stages):
            first = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                Block(dims[i], kernel_size[i], kernel_size[-1], drop_path=rates[first + j],
                      layer_scale_init_value=layer_scale_init_value, norm_cfg=norm_cfg, conv_impl=conv_impl,
                      deploy=deploy, with_cp=with_cp, kernel_layout=kernel_layout)
                for j in range(depths[i])]))
        for i in self.out_indices:
            self.add_module(f'norm{i}', LayerNorm2d(dims[i]))

        self.apply(self._init_module)
        # channels_last conv weights: oneDNN then runs the stem/downsampling convs without a weight reorder per call
        # (about 15% of SLaK-T's CPU forward at 512). load_state_dict and .to(device) keep the format.
        self.to(memory_format=torch.channels_last)
        self._freeze_stages()

    # ------------------------------------------------------------------------------------------------ validation
    @classmethod
    def _parse_arch(cls, arch: Union[str, Dict]) -> Tuple[List[int], List[int]]:
        if isinstance(arch, str):
            if arch not in cls.arch_settings:
                raise ValueError(f"SLaK: unknown arch {arch!r}; use one of {sorted(cls.arch_settings)} "
                                 f"or a dict(depths=[...4 ints], dims=[...4 ints])")
            arch = cls.arch_settings[arch]
        if not isinstance(arch, dict) or set(arch) != {'depths', 'dims'}:
            raise ValueError(f'SLaK: a custom arch must be dict(depths=[4 ints], dims=[4 ints]), got {arch!r}')
        depths, dims = list(arch['depths']), list(arch['dims'])
        if len(depths) != 4 or len(dims) != 4 or min(depths + dims) < 1:
            raise ValueError(f'SLaK: arch needs 4 positive depths and 4 positive dims, got {arch!r}')
        return depths, dims

    @staticmethod
    def _check_kernel_size(kernel_size: Sequence[int]) -> List[int]:
        ks = list(kernel_size)
        if len(ks) != 5:
            raise ValueError(f'SLaK: kernel_size must list 5 sizes, [M0, M1, M2, M3, N] (a long edge per stage, then '
                             f'the short edge), e.g. [51, 49, 47, 13, 5]; got {ks}')
        if any(int(k) != k or k < 1 or k % 2 == 0 for k in ks):
            raise ValueError(f'SLaK: every kernel_size entry must be a positive odd integer ("same" padding needs a '
                             f'centre tap); got {ks}')
        if any(ks[-1] >= m for m in ks[:4]):
            raise ValueError(f'SLaK: the short edge N={ks[-1]} (last entry) must be smaller than every long edge '
                             f'{ks[:4]}; e.g. kernel_size=[51, 49, 47, 13, 5]')
        return [int(k) for k in ks]

    @classmethod
    def _check_out_indices(cls, out_indices: Union[int, Sequence[int]]) -> Tuple[int, ...]:
        idx = [out_indices] if isinstance(out_indices, int) else list(out_indices)
        if not idx or any(not -cls.num_stages <= i < cls.num_stages for i in idx):
            raise ValueError(f'SLaK: out_indices must be stage indices in [0, 3] (or -4..-1), got {out_indices}')
        return tuple(sorted({i % cls.num_stages for i in idx}))

    # ------------------------------------------------------------------------------------------------ init
    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)

    def init_weights(self) -> None:
        """Load ``init_cfg`` Pretrained weights (safely, with key mapping and shape checks), else keep random init."""
        cfg = self.init_cfg
        if cfg is None or (isinstance(cfg, dict) and cfg.get('type') == 'Pretrained' and not cfg.get('checkpoint')):
            _log('SLaK: no pretrained checkpoint given (init_cfg=None): the backbone trains from scratch. Set the '
                 '`checkpoint` variable at the top of the config to fine-tune ImageNet weights.', 'WARNING')
        elif isinstance(cfg, dict) and cfg.get('type') == 'Pretrained':
            from .checkpoint import load_pretrained
            extra = set(cfg) - {'type', 'checkpoint', 'use_ema', 'pad_kernels', 'prefix', 'map_location'}
            if extra:
                raise ValueError(f'SLaK: unsupported init_cfg keys {sorted(extra)}; Pretrained takes checkpoint, '
                                 f'use_ema, pad_kernels, prefix')
            load_pretrained(self, cfg['checkpoint'], use_ema=cfg.get('use_ema', False),
                            pad_kernels=cfg.get('pad_kernels', False))
        else:
            raise ValueError(f"SLaK: init_cfg must be None or dict(type='Pretrained', checkpoint=...), got {cfg!r}")
        self._is_init = True

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        # Run channels_last end to end: the depthwise convs are much faster in it (docs/benchmarks.md), and LayerNorm
        # / Linear see contiguous NHWC after their permutes, so the layout costs one conversion of the RGB input.
        x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        for i in range(self.out_indices[-1] + 1):
            x = self.stages[i](self.downsample_layers[i](x))
            if i in self.out_indices:
                outs.append(getattr(self, f'norm{i}')(x).contiguous())
        return tuple(outs)

    # ------------------------------------------------------------------------------------------------ training state
    def _freeze_stages(self) -> None:
        for i in range(max(self.frozen_stages, 0)):
            for m in (self.downsample_layers[i], self.stages[i]):
                m.eval()
                for p in m.parameters():
                    p.requires_grad = False

    def train(self, mode: bool = True) -> 'SLaK':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # ------------------------------------------------------------------------------------------------ deploy
    def switch_to_deploy(self) -> None:
        """Fold every branch BN and merge each block's three kernels into one M×M kernel + bias (exact in eval).

        Idempotent; raises in training mode (BN folding uses running statistics).
        """
        if self.deploy:
            return
        if self.training:
            raise RuntimeError('SLaK.switch_to_deploy() needs eval mode (BN running statistics are folded): '
                               'call model.eval() first')
        for m in self.modules():
            if isinstance(m, LargeKernelConv):
                m.switch_to_deploy()
        self.deploy = True

    # ------------------------------------------------------------------------------------------------ layer decay
    def get_layer_depth(self, param_name: str, prefix: str = '', decay_type: str = 'layer_wise',
                        num_layers: Optional[int] = None) -> Tuple[int, int]:
        """Layer id of a parameter for learning-rate decay, and the number of ids (ConvNeXt/SLaK rule).

        ``layer_wise``: stem 0; stage 0 -> 1; stage 1 and downsample 1 -> 2; downsample 2 -> 3; stage 2 block b ->
        3 + b // 3; stage 3 and downsample 3 -> num_layers; anything else -> num_layers + 1. ``stage_wise``: all
        downsampling 0, stage i -> i + 1, anything else -> num_layers + 1. Returns (layer_id, num_layers + 2).
        ``num_layers`` defaults to 6 for a 9-block third stage and 12 for deeper ones (reference recipes).
        """
        if num_layers is None:
            num_layers = 12 if self.depths[2] > 9 else 6
        top = num_layers + 1
        if not param_name.startswith(prefix):
            return top, num_layers + 2
        parts = param_name[len(prefix):].split('.')
        if parts[0] not in ('downsample_layers', 'stages'):
            return top, num_layers + 2
        stage = int(parts[1])
        if decay_type == 'stage_wise':
            layer_id = 0 if parts[0] == 'downsample_layers' else stage + 1
        elif decay_type == 'layer_wise':
            if parts[0] == 'downsample_layers':
                layer_id = {0: 0, 1: 2, 2: 3, 3: num_layers}[stage]
            else:
                layer_id = {0: 1, 1: 2, 3: num_layers}.get(stage, None)
                if layer_id is None:
                    layer_id = 3 + int(parts[2]) // 3
        else:
            raise ValueError(f"SLaK.get_layer_depth: decay_type must be 'layer_wise' or 'stage_wise', "
                             f"got {decay_type!r}")
        return layer_id, num_layers + 2
