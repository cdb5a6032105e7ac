"""Shared helpers for Runner-level tests (also used by the torchrun driver)."""
import os

from mmengine.hooks import EMAHook, Hook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')
# deterministic pipeline and no stochastic layers, so runs can be compared bitwise
DET_PIPELINE = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', reduce_zero_label=True),
                dict(type='Resize', scale=(64, 64), keep_ratio=True), dict(type='PackSegInputs')]


def run_options(data_root, iters, val_interval=10_000, ckpt_interval=None):
    """--cfg-options for a short in-process run of a demo config on the small generated data."""
    opts = {f'{s}.dataset.data_root': data_root for s in LOADERS}
    opts.update({f'{s}.num_workers': 0 for s in LOADERS})
    opts.update({f'{s}.persistent_workers': False for s in LOADERS})
    opts.update({'train_cfg.max_iters': iters, 'train_cfg.val_interval': val_interval,
                 'default_hooks.checkpoint.interval': ckpt_interval or iters,
                 'default_hooks.checkpoint.max_keep_ckpts': 10, 'default_hooks.logger.interval': 1,
                 'train_dataloader.batch_size': 2, 'val_dataloader.batch_size': 2,
                 'randomness': dict(seed=0, deterministic=False)})
    return opts


def sparse_cfg_options(data_root, iters, hooks, ckpt_interval=None, deterministic=True):
    opts = run_options(data_root, iters, ckpt_interval=ckpt_interval)
    opts['custom_hooks'] = hooks
    if deterministic:
        opts.update({'train_dataloader.dataset.pipeline': DET_PIPELINE, 'model.backbone.drop_path_rate': 0.0,
                     'model.decode_head.dropout_ratio': 0.0, 'model.auxiliary_head.dropout_ratio': 0.0})
    return opts


def find_hook(runner, cls_name):
    return next((h for h in runner.hooks if type(h).__name__ == cls_name), None)


class ZeroChecker(Hook):
    """After every iteration: every masked position is exactly zero in the model and in the EMA copy."""
    priority = 'LOWEST'

    def __init__(self):
        self.checked = 0
        self.losses = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses.append(float(outputs['loss']))
        sparse = find_hook(runner, 'SparseTrainingHook')
        if sparse is None or sparse.masks is None:
            return
        ema = next((dict(h.ema_model.module.named_parameters()) for h in runner.hooks if isinstance(h, EMAHook)),
                   {})
        for name, mask in sparse.masks.masks.items():
            assert not sparse.masks.params[name][~mask].any(), f'{name}: masked weight nonzero'
            if name in ema:
                assert not ema[name][~mask].any(), f'{name}: masked EMA weight nonzero'
        self.checked += 1
