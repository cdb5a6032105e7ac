"""ERF tool and single-image inference tool."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import run_options
from slak_mm.erf import area_ratios, erf_map, input_gradient
from slak_mm.models import SLaK

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(*args, ok=True):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=900)
    if ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_centre_gradient_is_nonzero_exactly_within_theoretical_receptive_field():
    torch.manual_seed(0)
    # stem 4x4/4, then one block with a 7x3 + 3x7 + 3x3 cross: the stage-0 centre (8, 8) sees the stem patches of
    # the stage-0 cross {|di| <= 3, |dj| <= 1} U {|di| <= 1, |dj| <= 3}, each patch 4x4 input pixels.
    model = SLaK(dict(depths=[1, 1, 1, 1], dims=[8, 16, 32, 64]), kernel_size=[7, 5, 5, 5, 3], out_indices=(0,),
                 layer_scale_init_value=1.0).eval()
    x = torch.randn(1, 3, 64, 64)
    grad = input_gradient(lambda t: model(t)[0], x).abs().sum(dim=(0, 1))
    expected = torch.zeros(64, 64, dtype=torch.bool)
    for di in range(-3, 4):
        for dj in range(-3, 4):
            if (abs(di) <= 3 and abs(dj) <= 1) or (abs(di) <= 1 and abs(dj) <= 3):
                i, j = 8 + di, 8 + dj
                expected[4 * i:4 * i + 4, 4 * j:4 * j + 4] = True
    assert torch.equal(grad > 0, expected)


def test_area_ratios_monotone_in_threshold_and_bad_thresholds():
    model = SLaK(dict(depths=[1, 1, 1, 1], dims=[8, 16, 32, 64]), kernel_size=[13, 11, 9, 7, 3],
                 out_indices=(3,)).eval()
    m = erf_map(lambda t: model(t)[0], (torch.randn(1, 3, 96, 96) for _ in range(2)))
    r = area_ratios(m, (0.2, 0.3, 0.5, 0.99))
    values = [r[t] for t in (0.2, 0.3, 0.5, 0.99)]
    assert values == sorted(values) and 0 < values[0] and values[-1] <= 1
    for bad in ((0.0,), (1.5,)):
        with pytest.raises(ValueError, match=r'\(0, 1\]'):
            area_ratios(m, bad)


def test_erf_cli_two_models_side_by_side(tmp_path):
    out = str(tmp_path / 'erf.png')
    proc = _tool('tools/analysis/erf.py', 'configs/demo/upernet_slak_demo.py', '--synthetic', '1', '--size', '96',
                 '--compare', 'timm:convnext_atto', '--out', out)
    assert 'r(0.2)' in proc.stdout and proc.stdout.count('r(0.99)') == 2
    assert os.path.getsize(out) > 1000
    assert np.load(str(tmp_path / 'erf_0.npy')).shape == (96, 96)


def test_erf_cli_bad_input(tmp_path):
    bad_cfg = tmp_path / 'nobackbone.py'
    bad_cfg.write_text("model = dict(type='RetinaNet')\ndefault_scope = 'mmdet'\n")
    p = _tool('tools/analysis/erf.py', str(bad_cfg), '--synthetic', '1', '--size', '64', ok=False)
    assert p.returncode != 0 and 'no model.backbone' in p.stderr
    p = _tool('tools/analysis/erf.py', 'configs/demo/upernet_slak_demo.py', '--synthetic', '1', '--thresholds',
              '0.5', '1.2', ok=False)
    assert p.returncode != 0 and '(0, 1]' in p.stderr
    p = _tool('tools/analysis/erf.py', 'configs/demo/upernet_slak_demo.py', '--images', str(tmp_path / 'nope'),
              ok=False)
    assert p.returncode != 0 and 'not a directory' in p.stderr


def test_infer_tool_writes_overlay_png_of_image_size(demo_data, tmp_path):
    from PIL import Image

    from slak_mm.apis import build_runner, load_config
    opts = run_options(demo_data['ade'], 1)
    cfg = os.path.join(ROOT, 'configs/demo/upernet_slak_demo.py')
    build_runner(load_config(cfg, opts, work_dir=str(tmp_path))).train()
    img = os.path.join(demo_data['ade'], 'images/validation/ADE_val_00000000.jpg')
    out = str(tmp_path / 'pred.png')
    _tool('tools/infer.py', cfg, str(tmp_path / 'iter_1.pth'), img, '--out', out)
    assert Image.open(out).size == Image.open(img).size
    p = _tool('tools/infer.py', cfg, str(tmp_path / 'iter_1.pth'), str(tmp_path / 'missing.jpg'), ok=False)
    assert p.returncode != 0 and 'does not exist' in p.stderr
    notimg = tmp_path / 'notes.jpg'
    notimg.write_text('not an image')
    p = _tool('tools/infer.py', cfg, str(tmp_path / 'iter_1.pth'), str(notimg), ok=False)
    assert p.returncode != 0 and 'not a readable image' in p.stderr


@pytest.mark.parametrize('config,metric,root', [('configs/demo/upernet_slak_demo.py', 'mIoU', 'ade'),
                                                ('configs/demo/faster_rcnn_slak_demo.py', 'coco/bbox_mAP', 'coco')])
def test_demo_run_reports_metrics_and_draws(demo_data, tmp_path, config, metric, root):
    """tools/demo.py's run(): untrained + trained validation, checkpoint, overlay PNG, JSON-serialisable summary."""
    import json
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    import demo
    opts = run_options(demo_data[root], 2, val_interval=2)
    if root == 'coco':
        opts['val_evaluator.ann_file'] = demo_data['coco'] + 'annotations/instances_val2017.json'
    out = str(tmp_path / 'pred.png')
    result = demo.run(config, str(tmp_path / 'wd'), metric, out, cfg_options=opts)
    json.dumps(result)
    assert set(result) >= {'untrained', 'trained', 'checkpoint', 'prediction_png'}
    assert os.path.isfile(result['checkpoint']) and os.path.getsize(out) > 1000
