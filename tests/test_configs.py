"""Every config in configs/ loads, builds its model and runs a loss and a predict forward on a small input."""
import glob
import os

import pytest
import torch
from mmengine.registry import MODELS, init_default_scope

from slak_mm.apis import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'configs', '**', '*.py'),
                                                                    recursive=True)
                 if '_base_' not in p)


def test_all_documented_configs_exist():
    names = {os.path.basename(c) for c in CONFIGS}
    for s in 'tsb':
        assert {f'upernet_slak_{s}_ade20k.py', f'faster_rcnn_slak_{s}_fpn_1x_coco.py',
                f'cascade_mask_rcnn_slak_{s}_fpn_3x_coco.py'} <= names


def _seg_batch(num_classes, n=2, h=64, w=80):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(n):
        s = SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
        s.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, h, w), generator=g))
        samples.append(s)
    return dict(inputs=[torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for _ in range(n)],
                data_samples=samples)


@pytest.mark.parametrize('path', CONFIGS)
def test_config_builds_and_runs_loss_and_predict(path):
    cfg = load_config(os.path.join(ROOT, path), check_data=False)
    init_default_scope(cfg.default_scope)
    if cfg.default_scope == 'mmseg':
        cfg.model.data_preprocessor.size = (64, 80)  # small input instead of 512x512 crops
        if cfg.model.test_cfg.get('mode') == 'slide':
            cfg.model.test_cfg.update(crop_size=(64, 64), stride=(43, 43))
    model = MODELS.build(cfg.model)
    assert type(model.backbone).__name__ == 'SLaK'
    torch.manual_seed(0)
    if cfg.default_scope == 'mmseg':
        batch = _seg_batch(cfg.model.decode_head.num_classes)
    else:
        from mmdet.testing import demo_mm_inputs
        with_mask = 'mask_head' in cfg.model.get('roi_head', {})
        num_classes = cfg.model.roi_head.bbox_head[0].num_classes if isinstance(
            cfg.model.roi_head.bbox_head, list) else cfg.model.roi_head.bbox_head.num_classes
        batch = demo_mm_inputs(2, [[3, 64, 80], [3, 64, 80]], num_items=[3, 2], num_classes=num_classes,
                               with_mask=with_mask)
    model.train()
    losses = model(**model.data_preprocessor(batch, True), mode='loss')
    total = sum(v.sum() for k, v in losses.items() if 'loss' in k and isinstance(v, torch.Tensor)) + sum(
        sum(x.sum() for x in v) for k, v in losses.items() if 'loss' in k and isinstance(v, list))
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.stages[0][0].large_kernel.tall.conv.weight.grad is not None
    model.eval()
    with torch.no_grad():
        preds = model(**model.data_preprocessor(batch, False), mode='predict')
    assert len(preds) == 2
    if cfg.default_scope == 'mmseg':
        assert preds[0].pred_sem_seg.data.shape[-2:] == (64, 80)
    else:
        assert 'bboxes' in preds[0].pred_instances
