"""Real mmengine Runner training + validation on the generated data; resume; 2-process CPU DDP (torchrun, gloo)."""
import os
import subprocess
import sys

import pytest
from mmengine.hooks import Hook

from conftest import TINY_ARCH
from helpers import run_options
from slak_mm.apis import build_runner, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _opts(data_root, work_dir, iters, extra=None):
    opts = run_options(data_root, iters, val_interval=iters)
    opts.update(extra or {})
    return opts


class LrRecorder(Hook):
    def __init__(self):
        self.lrs = {}

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.lrs[runner.iter] = runner.optim_wrapper.get_lr()['lr'][0]


def _seg_cfg(demo_data, work_dir, iters, extra=None):
    return load_config(os.path.join(ROOT, 'configs/demo/upernet_slak_demo.py'),
                       _opts(demo_data['ade'], str(work_dir), iters, extra), work_dir=str(work_dir))


def test_upernet_trains_and_validates_with_iou_metric(demo_data, tmp_path):
    runner = build_runner(_seg_cfg(demo_data, tmp_path, 3))
    runner.train()
    assert runner.iter == 3
    metrics = runner.val_loop.run()
    assert 0 <= metrics['mIoU'] <= 100
    assert os.path.isfile(tmp_path / 'iter_3.pth')


def test_runners_in_one_process_each_log_into_their_own_folder(demo_data, tmp_path):
    # mmengine hands back a visualizer by name, and every mm config names its own 'visualizer': without build_runner's
    # renaming, the second runner would write its config and scalars into the first run's (here deleted) folder.
    import shutil
    first = build_runner(_seg_cfg(demo_data, tmp_path / 'a', 1))
    shutil.rmtree(tmp_path / 'a')
    second = build_runner(_seg_cfg(demo_data, tmp_path / 'b', 1))
    assert second.visualizer is not first.visualizer
    second.train()
    logged = [os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(tmp_path) for f in fs
              if f in ('config.py', 'scalars.json')]
    assert sorted(os.path.basename(f) for f in logged) == ['config.py', 'scalars.json'], logged
    assert all(f.startswith('b' + os.sep) for f in logged), logged


def test_faster_rcnn_trains_and_validates_with_coco_metric(demo_data, tmp_path):
    cfg = load_config(os.path.join(ROOT, 'configs/demo/faster_rcnn_slak_demo.py'),
                      _opts(demo_data['coco'], str(tmp_path), 3, {
                          'val_evaluator.ann_file': demo_data['coco'] + 'annotations/instances_val2017.json'}),
                      work_dir=str(tmp_path))
    runner = build_runner(cfg)
    runner.train()
    metrics = runner.val_loop.run()
    assert 'coco/bbox_mAP' in metrics and metrics['coco/bbox_mAP'] >= 0


def test_cascade_mask_rcnn_trains_and_validates_bbox_and_segm(demo_data, tmp_path):
    """The real Cascade config (heads, losses, optimizer) with a reduced backbone and small images."""
    classes = ('disc', 'square', 'triangle', 'cross')
    pipe_train = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
                  dict(type='Resize', scale=(80, 64), keep_ratio=True), dict(type='PackDetInputs')]
    pipe_test = [dict(type='LoadImageFromFile'), dict(type='Resize', scale=(80, 64), keep_ratio=True),
                 dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
                 dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                                                       'scale_factor'))]
    cfg = load_config(os.path.join(ROOT, 'configs/cascade_mask_rcnn_slak_t_fpn_3x_coco.py'), check_data=False,
                      work_dir=str(tmp_path))
    cfg.model.backbone.update(arch=TINY_ARCH, width_factor=1.0, norm_cfg=dict(type='BN'))
    cfg.model.neck.in_channels = TINY_ARCH['dims']
    for head in cfg.model.roi_head.bbox_head:
        head.num_classes = len(classes)
        head.norm_cfg = dict(type='BN', requires_grad=True)
    cfg.model.roi_head.mask_head.num_classes = len(classes)
    cfg.model.test_cfg.rcnn.score_thr = 0.0  # after 2 iterations nothing scores 0.05; CocoMetric needs detections
    for split, pipe in (('train_dataloader', pipe_train), ('val_dataloader', pipe_test),
                        ('test_dataloader', pipe_test)):
        loader = cfg[split]
        loader.update(batch_size=2, num_workers=0, persistent_workers=False)
        loader.dataset.update(data_root=demo_data['coco'], metainfo=dict(classes=classes), pipeline=pipe)
    cfg.train_dataloader.update(sampler=dict(type='InfiniteSampler', shuffle=True), batch_sampler=None)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=2, val_interval=2)
    cfg.param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2)]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=2)
    cfg.log_processor = dict(by_epoch=False)
    for ev in ('val_evaluator', 'test_evaluator'):
        cfg[ev].ann_file = demo_data['coco'] + 'annotations/instances_val2017.json'
    runner = build_runner(cfg)
    runner.train()
    metrics = runner.val_loop.run()
    assert 'coco/bbox_mAP' in metrics and 'coco/segm_mAP' in metrics


def test_resume_continues_at_right_iteration_and_lr(demo_data, tmp_path):
    extra = {'default_hooks.checkpoint.interval': 2, 'default_hooks.checkpoint.max_keep_ckpts': 3,
             'train_cfg.val_interval': 100}
    full = build_runner(_seg_cfg(demo_data, tmp_path / 'full', 4, extra))
    rec_full = LrRecorder()
    full.register_hook(rec_full)
    full.train()
    ckpt = tmp_path / 'full' / 'iter_2.pth'
    assert ckpt.is_file()

    cfg = _seg_cfg(demo_data, tmp_path / 'resumed', 4, extra)
    cfg.resume, cfg.load_from = True, str(ckpt)
    resumed = build_runner(cfg)
    rec = LrRecorder()
    resumed.register_hook(rec)
    resumed.train()
    assert sorted(rec.lrs) == [2, 3]  # continued at iteration 2, not from 0
    for it in (2, 3):
        assert rec.lrs[it] == pytest.approx(rec_full.lrs[it], rel=1e-9)
    assert rec_full.lrs[1] != rec_full.lrs[3]  # the schedule really moves


def test_two_process_ddp_training_completes(demo_data, tmp_path):
    opts = _opts(demo_data['ade'], str(tmp_path), 2)
    args = [f'{k}={v}' for k, v in opts.items() if k != 'randomness']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29641',
           os.path.join(ROOT, 'tools/train.py'), os.path.join(ROOT, 'configs/demo/upernet_slak_demo.py'),
           '--launcher', 'pytorch', '--work-dir', str(tmp_path), '--cfg-options', *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / 'iter_2.pth').is_file()
    assert 'mIoU' in proc.stdout + proc.stderr
