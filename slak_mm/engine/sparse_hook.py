"""``SparseTrainingHook``: SLaK's dynamic sparse training as an mmengine hook, correct under AMP, DDP and resume.

    custom_hooks = [dict(type='slak_mm.SparseTrainingHook', sparsity=0.4, init='snip', grow='random',
                         prune_rate=0.3, update_interval=100, prune_rate_decay='cosine')]

Masks are applied by a post-step hook on the *torch optimizer*, so every optimizer step is covered whatever the
wrapper (``OptimWrapper``, ``AmpOptimWrapper`` fp16/bf16, gradient accumulation) and steps skipped by the loss scaler
are not counted. ``update_interval`` counts optimizer steps. Masks (bool) and the schedule state are saved in
checkpoints and restored on resume. Under DDP every decision is a deterministic function of the (identical) weights
and a shared seed, so no mask is ever sent; a checksum all-reduce at each update raises if ranks diverge.

Modes: ``dynamic`` (initialise, then prune and regrow), ``fixed`` (masks = zeros of the loaded pretrained weights,
kept; the reference's fine-tuning behaviour), ``dense`` (the hook does nothing at all), ``auto`` (the shipped configs:
``fixed`` when the loaded weights are sparse, i.e. a sparse SLaK checkpoint, else ``dense``; decided and logged once).
"""
import math
from typing import Dict, Optional

import torch
import torch.distributed as dist
from mmengine.dist import get_world_size, is_distributed
from mmengine.hooks import EMAHook, Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper

from ..registry import HOOKS
from ..sparse import GROW_METHODS, INIT_METHODS, SparseMasks, cosine_prune_rate, mask_checksum, select_parameters

MODES = ('dynamic', 'fixed', 'dense', 'auto')
AUTO_FIXED_MIN_SPARSITY = 0.05  # below this, loaded weights count as dense for mode='auto'
CKPT_KEY = 'sparse_training'


@HOOKS.register_module()
class SparseTrainingHook(Hook):
    """Dynamic sparse training (SLaK §6). See the module docstring.

    Args:
        sparsity: fraction of zero weights in the masked parameters, in [0, 1).
        init: 'snip' | 'ERK' | 'uniform' | 'from_weights' (mask = weight != 0).
        prune: 'magnitude' (the only working reference option).
        grow: 'random' | 'gradient' | 'momentum'.
        prune_rate: initial fraction of each layer's active weights pruned (and regrown) per update, in (0, 1].
        update_interval: optimizer steps between prune-and-regrow updates (>= 1).
        prune_rate_decay: 'cosine' (to ``min_prune_rate`` at the last step, as the reference) or 'constant'.
        mode: 'dynamic' | 'fixed' | 'dense' | 'auto'.
        params: 'backbone' (every conv/linear weight of the backbone), 'large_kernel' (the M×N/N×M branches only) or
            a regex over parameter names.
        dense_threshold: layers initialised at or above this density are left dense (decided once, globally).
        seed: shared by all ranks; masks are a function of it and the weights.
    """
    priority = 'LOW'  # after EMAHook (NORMAL), so the EMA copy is re-masked after its update

    def __init__(self, sparsity: float = 0.4, init: str = 'snip', prune: str = 'magnitude', grow: str = 'random',
                 prune_rate: float = 0.3, update_interval: int = 100, prune_rate_decay: str = 'cosine',
                 min_prune_rate: float = 0.005, mode: str = 'dynamic', params: str = 'backbone',
                 dense_threshold: float = 0.99, seed: int = 0, verify_ranks: bool = True):
        if mode not in MODES:
            raise ValueError(f'SparseTrainingHook: mode must be one of {MODES}, got {mode!r}')
        if not 0 <= sparsity < 1:
            raise ValueError(f'SparseTrainingHook: sparsity must be in [0, 1), got {sparsity}')
        if not 0 < prune_rate <= 1:
            raise ValueError(f'SparseTrainingHook: prune_rate must be in (0, 1], got {prune_rate}')
        if not (isinstance(update_interval, int) and update_interval >= 1):
            raise ValueError(f'SparseTrainingHook: update_interval must be an integer >= 1 (optimizer steps), '
                             f'got {update_interval!r}')
        if init not in INIT_METHODS:
            raise ValueError(f'SparseTrainingHook: init must be one of {INIT_METHODS} (case-sensitive), got {init!r}')
        if prune != 'magnitude':
            raise ValueError(f"SparseTrainingHook: prune must be 'magnitude', got {prune!r}")
        if grow not in GROW_METHODS:
            raise ValueError(f'SparseTrainingHook: grow must be one of {GROW_METHODS}, got {grow!r}')
        if prune_rate_decay not in ('cosine', 'constant'):
            raise ValueError(f"SparseTrainingHook: prune_rate_decay must be 'cosine' or 'constant', "
                             f"got {prune_rate_decay!r}")
        self.sparsity, self.init_method, self.grow = sparsity, init, grow
        self.prune_rate, self.update_interval, self.prune_rate_decay = prune_rate, update_interval, prune_rate_decay
        self.min_prune_rate, self.mode, self.params = min_prune_rate, mode, params
        self.dense_threshold, self.seed, self.verify_ranks = dense_threshold, seed, verify_ranks
        self.masks: Optional[SparseMasks] = None
        self.step = 0       # optimizer steps taken under this hook
        self.updates = 0    # prune-and-regrow updates done
        self.total_steps = 1
        self._restored: Optional[Dict] = None
        self._handle = None
        self._optimizer = None

    # ------------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _model(runner) -> torch.nn.Module:
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def current_prune_rate(self) -> float:
        if self.prune_rate_decay == 'constant':
            return self.prune_rate
        return cosine_prune_rate(self.prune_rate, self.step, self.total_steps, self.min_prune_rate)

    def _ema_params(self, runner) -> Optional[Dict[str, torch.Tensor]]:
        for hook in runner.hooks:
            if isinstance(hook, EMAHook) and hasattr(hook, 'ema_model'):
                return dict(hook.ema_model.module.named_parameters())
        return None

    # ------------------------------------------------------------------------------------------------ lifecycle
    def before_train(self, runner) -> None:
        model = self._model(runner)
        if self.mode == 'auto':
            params = select_parameters(model, self.params)
            zeros = sum(int((p == 0).sum()) for p in params.values()) / sum(p.numel() for p in params.values())
            self.mode = 'fixed' if zeros >= AUTO_FIXED_MIN_SPARSITY else 'dense'
            print_log(f"SparseTrainingHook(mode='auto'): loaded backbone weights have sparsity {zeros:.4f}: "
                      f"{'keeping their zeros (fixed masks)' if self.mode == 'fixed' else 'training dense'}",
                      logger='current')
        if self.mode == 'dense':
            return
        self.masks = SparseMasks(select_parameters(model, self.params), seed=self.seed)
        accum = getattr(runner.optim_wrapper, '_accumulative_counts', 1)
        self.total_steps = max(1, math.ceil(runner.max_iters / accum))
        if self._restored is not None:
            self._restore(self._restored)
        elif self.mode == 'fixed':
            self.masks.init('from_weights', 0.0)
            found = 1 - self.masks.global_density()
            if found == 0:
                raise RuntimeError("SparseTrainingHook(mode='fixed'): the loaded weights have no zeros (sparsity 0), "
                                   "so there is no sparsity pattern to keep. Load a sparse SLaK checkpoint (init_cfg) "
                                   "or use mode='dense' / 'dynamic'.")
            print_log(f'SparseTrainingHook: fixed masks from the pretrained zeros: sparsity {found:.4f} over '
                      f'{len(self.masks.params)} parameters', logger='current')
        else:
            scores = self._snip_scores(runner, model) if self.init_method == 'snip' else None
            self.masks.init(self.init_method, self.sparsity, scores, self.dense_threshold, average=self._average)
            print_log(f'SparseTrainingHook: {self.init_method} init: global density '
                      f'{self.masks.global_density():.4f} over {len(self.masks.params)} parameters '
                      f'({len(self.masks.masks)} masked, {len(self.masks.params) - len(self.masks.masks)} left dense)',
                      logger='current')
        self._check_ranks('init')
        self._optimizer = runner.optim_wrapper.optimizer
        self._handle = self._optimizer.register_step_post_hook(self._after_optimizer_step)

    def after_train(self, runner) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.masks is not None and self.masks.masks:
            ema = self._ema_params(runner)
            if ema is not None:  # EMA copy keeps the live model's sparsity pattern
                self.masks.apply(extra=[ema])

    def _after_optimizer_step(self, optimizer, args, kwargs) -> None:
        self.masks.apply()
        self.step += 1
        if self.mode == 'dynamic' and self.step % self.update_interval == 0:
            rate = self.current_prune_rate()
            self.updates += 1
            changed = self.masks.prune_and_regrow(rate, self.grow, self.updates, optimizer)
            self._check_ranks(f'update {self.updates}')
            print_log(f'SparseTrainingHook: update {self.updates} at optimizer step {self.step}: prune rate '
                      f'{rate:.4f}, {sum(changed.values())} weights pruned and regrown in {len(changed)} layers',
                      logger='current')

    # ------------------------------------------------------------------------------------------------ SNIP
    def _snip_scores(self, runner, model) -> Dict[str, torch.Tensor]:
        """|w · dL/dw| on the first training batch (the reference's SNIP), without touching optimizer state.

        The batch comes from a separate loader built from the config, so the training data order is untouched.
        """
        import copy
        loader_cfg = copy.deepcopy(runner.cfg.train_dataloader)
        loader_cfg.update(num_workers=0, persistent_workers=False)
        batch = next(iter(runner.build_dataloader(loader_cfg, seed=runner.seed)))
        data = model.data_preprocessor(batch, True)
        losses = model(**data, mode='loss')
        loss, _ = model.parse_losses(losses)
        names = list(self.masks.params)
        grads = torch.autograd.grad(loss, [self.masks.params[n] for n in names], allow_unused=True)
        return {n: (self.masks.params[n].detach() * (g if g is not None else 0)).abs()
                for n, g in zip(names, grads)}

    # ------------------------------------------------------------------------------------------------ DDP
    @staticmethod
    def _average(t: torch.Tensor) -> torch.Tensor:
        if is_distributed():
            t = t.clone()
            dist.all_reduce(t)
            t /= get_world_size()
        return t

    def _check_ranks(self, when: str) -> None:
        if not (self.verify_ranks and is_distributed()):
            return
        c = mask_checksum(self.masks.masks)
        lo, hi = c.clone(), c.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if lo != hi:
            raise RuntimeError(f'SparseTrainingHook: sparse masks differ between ranks at {when} (checksums {int(lo)} '
                               f'vs {int(hi)}); weights or seeds diverged')

    # ------------------------------------------------------------------------------------------------ checkpoint
    def before_save_checkpoint(self, runner, checkpoint: Dict) -> None:
        if self.masks is None:
            return
        checkpoint[CKPT_KEY] = dict(
            masks={n: m.cpu() for n, m in self.masks.masks.items()}, params=sorted(self.masks.params),
            step=self.step, updates=self.updates, mode=self.mode, sparsity=self.sparsity)

    def after_load_checkpoint(self, runner, checkpoint: Dict) -> None:
        if self.mode != 'dense' and CKPT_KEY in checkpoint and runner._resume:
            self._restored = checkpoint[CKPT_KEY]

    def _restore(self, state: Dict) -> None:
        names = sorted(self.masks.params)
        if state['params'] != names:
            extra, missing = set(state['params']) - set(names), set(names) - set(state['params'])
            raise RuntimeError(f'SparseTrainingHook: the checkpoint masks a different parameter set than this model '
                               f'and params={self.params!r} select ({len(extra)} only in the checkpoint, e.g. '
                               f'{sorted(extra)[:2]}; {len(missing)} only in the model, e.g. {sorted(missing)[:2]}). '
                               f'Resume with the config the checkpoint was trained with.')
        self.masks._set({n: m for n, m in state['masks'].items()})
        self.step, self.updates = state['step'], state['updates']
        print_log(f'SparseTrainingHook: restored {len(state["masks"])} masks at optimizer step {self.step} '
                  f'({self.updates} updates done)', logger='current')
