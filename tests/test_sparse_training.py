"""SparseTrainingHook in a real mmengine Runner: zeros after every step (fp32, accumulation, AMP, EMA), resume,
dense mode, fixed mode, DDP without mask communication, bad input."""
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from helpers import ROOT, ZeroChecker, find_hook, sparse_cfg_options
from slak_mm.apis import build_runner, load_config
from slak_mm.engine import SparseTrainingHook
from slak_mm.sparse import mask_checksum

CONFIG = os.path.join(ROOT, 'configs/demo/upernet_slak_demo.py')
HOOK = dict(type='slak_mm.SparseTrainingHook', init='ERK', grow='random', update_interval=2, prune_rate=0.3)


def _runner(demo_data, work_dir, iters, hooks, extra=None, ckpt_interval=None):
    opts = sparse_cfg_options(demo_data['ade'], iters, hooks, ckpt_interval)
    opts.update(extra or {})
    runner = build_runner(load_config(CONFIG, opts, work_dir=str(work_dir)))
    checker = ZeroChecker()
    runner.register_hook(checker)
    return runner, checker


@pytest.mark.parametrize('variant', ['fp32', 'accumulation', 'amp_bf16_dynamic_scaler'])
def test_masked_weights_exactly_zero_after_every_step_with_ema(demo_data, tmp_path, variant):
    extra, hooks = {}, [dict(HOOK, update_interval=1), dict(type='EMAHook', momentum=0.1)]
    if variant == 'accumulation':
        extra['optim_wrapper.accumulative_counts'] = 2
    patch = mock.patch('mmengine.optim.optimizer.amp_optimizer_wrapper.is_cuda_available', return_value=True)
    if variant.startswith('amp'):
        extra.update({'optim_wrapper.type': 'AmpOptimWrapper', 'optim_wrapper.dtype': 'bfloat16'})
    with patch:
        runner, checker = _runner(demo_data, tmp_path, 4, hooks, extra)
        if variant.startswith('amp'):
            # a live dynamic loss scaler (CPU): scaled backward, unscale, inf checks, skipped steps
            runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
            runner.optim_wrapper.loss_scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 16)
        runner.train()
    sparse = find_hook(runner, 'SparseTrainingHook')
    assert checker.checked == 4
    expected_steps = 2 if variant == 'accumulation' else 4
    assert sparse.step <= expected_steps and sparse.step >= (1 if variant.startswith('amp') else expected_steps)
    assert sparse.masks.global_density() == pytest.approx(0.6, abs=2e-3)


def test_resume_restores_masks_and_reproduces_losses_bitwise(demo_data, tmp_path):
    full, full_check = _runner(demo_data, tmp_path / 'full', 6, [HOOK], ckpt_interval=3)
    full.train()
    full_hook = find_hook(full, 'SparseTrainingHook')
    assert full_hook.updates == 3

    ckpt = torch.load(tmp_path / 'full' / 'iter_3.pth', weights_only=False)
    assert set(ckpt['sparse_training']['masks']) and ckpt['sparse_training']['step'] == 3
    assert all(m.dtype == torch.bool for m in ckpt['sparse_training']['masks'].values())

    resumed, res_check = _runner(demo_data, tmp_path / 'resumed', 6, [HOOK], ckpt_interval=3,
                                 extra={'resume': True, 'load_from': str(tmp_path / 'full' / 'iter_3.pth')})
    resumed.train()
    res_hook = find_hook(resumed, 'SparseTrainingHook')
    assert res_hook.step == 6 and res_hook.updates == 3
    assert mask_checksum(res_hook.masks.masks) == mask_checksum(full_hook.masks.masks)
    for name, mask in full_hook.masks.masks.items():
        assert torch.equal(mask, res_hook.masks.masks[name])
    assert res_check.losses == full_check.losses[3:]  # bitwise equal floats


def test_dense_mode_is_bit_identical_to_no_hook(demo_data, tmp_path):
    plain, plain_check = _runner(demo_data, tmp_path / 'plain', 3, [])
    plain.train()
    dense, dense_check = _runner(demo_data, tmp_path / 'dense', 3, [dict(HOOK, mode='dense')])
    dense.train()
    assert dense_check.losses == plain_check.losses
    for (n, a), b in zip(plain.model.state_dict().items(), dense.model.state_dict().values()):
        assert torch.equal(a, b), n


def test_fixed_mode_keeps_pretrained_zeros_and_auto_detects_them(demo_data, tmp_path):
    runner, _ = _runner(demo_data, tmp_path / 'src', 1, [])
    runner.train()
    sd = {k[len('backbone.'):]: v.clone() for k, v in runner.model.state_dict().items() if k.startswith('backbone.')}
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():
        if v.dim() in (2, 4) and ('stages' in k or 'downsample' in k):
            v.mul_((torch.rand(v.shape, generator=g) > 0.4).to(v.dtype))
    path = tmp_path / 'sparse_pretrained.pth'
    torch.save({'state_dict': sd}, path)
    for mode in ('fixed', 'auto'):
        runner, checker = _runner(demo_data, tmp_path / mode, 3, [dict(type='slak_mm.SparseTrainingHook', mode=mode)],
                                  {'model.backbone.init_cfg': dict(type='Pretrained', checkpoint=str(path))})
        runner.train()
        hook = find_hook(runner, 'SparseTrainingHook')
        assert hook.mode == 'fixed' and hook.updates == 0 and checker.checked == 3
        for name, mask in hook.masks.masks.items():
            assert torch.equal(mask, sd[name[len('backbone.'):]] != 0)


def test_fixed_mode_with_dense_weights_is_an_error(demo_data, tmp_path):
    runner, _ = _runner(demo_data, tmp_path, 2, [dict(type='slak_mm.SparseTrainingHook', mode='fixed')])
    with pytest.raises(RuntimeError, match='no zeros'):
        runner.train()


def test_resume_with_different_masked_parameter_set_is_an_error(demo_data, tmp_path):
    first, _ = _runner(demo_data, tmp_path / 'a', 2, [HOOK])
    first.train()
    other, _ = _runner(demo_data, tmp_path / 'b', 4, [dict(HOOK, params='large_kernel')],
                       extra={'resume': True, 'load_from': str(tmp_path / 'a' / 'iter_2.pth')})
    with pytest.raises(RuntimeError, match='different parameter set'):
        other.train()


def test_selection_matching_nothing_is_an_error(demo_data, tmp_path):
    runner, _ = _runner(demo_data, tmp_path, 2, [dict(HOOK, params=r'no\.such\.layer')])
    with pytest.raises(ValueError, match='matches no'):
        runner.train()


@pytest.mark.parametrize('kwargs,match', [(dict(sparsity=1.0), 'sparsity'), (dict(sparsity=-0.1), 'sparsity'),
                                          (dict(prune_rate=0), 'prune_rate'), (dict(prune_rate=1.5), 'prune_rate'),
                                          (dict(update_interval=0), 'update_interval'),
                                          (dict(init='erk'), 'case-sensitive'), (dict(grow='mix'), 'grow'),
                                          (dict(prune='SET'), 'prune'), (dict(mode='sparse'), 'mode')])
def test_bad_hook_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseTrainingHook(**kwargs)


def _torchrun(args, tmp_path, port):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}',
           os.path.join(ROOT, 'tests/ddp_sparse_driver.py'), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_ddp_masks_identical_on_all_ranks_without_sending_masks(demo_data, tmp_path):
    proc = _torchrun([demo_data['ade'], str(tmp_path)], tmp_path, 29653)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (open(tmp_path / f'rank{r}.txt').read().split() for r in (0, 1))
    assert r0[0] == r1[0]  # identical masks
    assert r0[1] == r1[1] == '3'  # three updates each
    assert r0[2] == r1[2] == '0'  # no mask (bool or mask-shaped tensor) broadcast during training


def test_ddp_divergent_ranks_are_detected(demo_data, tmp_path):
    proc = _torchrun([demo_data['ade'], str(tmp_path), '--diverge'], tmp_path, 29654)
    assert proc.returncode != 0
    assert 'masks differ between ranks' in proc.stdout + proc.stderr
