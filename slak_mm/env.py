"""The one home for environment workarounds (see docs/environment.md). Imported by the entry points in tools/.

1. mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since torch 2.6 that means ``weights_only=True`` and
   every full mmengine checkpoint (it pickles ``HistoryBuffer`` and numpy objects) fails to resume or ``load_from``.
   :func:`trust_local_mmengine_checkpoints` re-registers mmengine's *local-file* checkpoint loader with
   ``weights_only=False``; it is used for the user's own resume / ``load_from`` files only. Downloaded (http) files keep
   torch's safe default, and SLaK pretrained weights go through :mod:`slak_mm.models.checkpoint` with
   ``weights_only=True``.
2. mmengine DDP on a machine without CUDA: ``init_dist`` calls ``torch.cuda.set_device`` and the DDP wrapper passes
   ``device_ids``; SyncBN needs GPUs. :func:`setup_cpu_distributed` initialises a gloo process group itself and
   selects :class:`CPUDistributedDataParallel`, which drops ``device_ids`` and reverts SyncBN to BN.
"""
import os
from typing import Any

import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm
from mmengine.runner.checkpoint import CheckpointLoader

from .registry import MODEL_WRAPPERS

_TRUSTED = False


def trust_local_mmengine_checkpoints() -> None:
    """Let mmengine load local checkpoint files (resume, load_from) that pickle non-tensor objects."""
    global _TRUSTED
    if _TRUSTED:
        return

    def load_from_local(filename: str, map_location: Any = None) -> Any:
        filename = os.path.expanduser(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        return torch.load(filename, map_location=map_location, weights_only=False)

    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)
    _TRUSTED = True


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` for CPU processes (gloo): no ``device_ids``; SyncBN reverted to BN first."""

    def __init__(self, module: torch.nn.Module, **kwargs):
        kwargs.pop('device_ids', None)
        kwargs.pop('output_device', None)
        super().__init__(module=revert_sync_batchnorm(module), device_ids=None, **kwargs)


def setup_cpu_distributed(cfg: Config, launcher: str) -> None:
    """For a distributed launch without CUDA: gloo process group + CPU DDP wrapper. No-op otherwise."""
    if launcher == 'none' or torch.cuda.is_available():
        return
    if launcher != 'pytorch':
        raise RuntimeError(f'--launcher {launcher} without CUDA is not supported; use torchrun (--launcher pytorch)')
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo')
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper.pop('type', None)
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters', False)
    cfg.model_wrapper_cfg = dict(type='slak_mm.CPUDistributedDataParallel', **wrapper)


def finish_distributed() -> None:
    """Destroy the process group before the interpreter exits (a live gloo group can abort the process at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def apply_runtime_fixes(cfg: Config, launcher: str = 'none') -> None:
    """Everything the entry points need before ``Runner.from_cfg(cfg)``."""
    trust_local_mmengine_checkpoints()
    setup_cpu_distributed(cfg, launcher)
