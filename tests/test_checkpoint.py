"""Official SLaK checkpoints (all naming eras) load safely and exactly; mismatches are errors that name the fix."""
import argparse
import logging
import os
import subprocess
import sys

import pytest
import torch

from reference_impl import randomize_bn_and_scales, reference_forward, to_reference_layout
from slak_mm.models import SLaK
from slak_mm.models.checkpoint import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = dict(depths=[1, 1, 2, 1], dims=[16, 32, 64, 128])
KS = [13, 11, 9, 7, 3]


def _official_file(tmp_path, era='LoRA', wrap='model', module_prefix=False, seed=0, ks=KS, width=1.3):
    """An 'official' ImageNet checkpoint: reference keys, head + final norm, argparse args, EMA copy."""
    torch.manual_seed(seed)
    layout = 'dense' if era == 'lkb_origin' else 'decomposed'
    src = SLaK(ARCH, kernel_size=ks, width_factor=width, kernel_layout=layout, out_indices=(3,)).eval()
    randomize_bn_and_scales(src, seed)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith('norm3')}
    ref = to_reference_layout(sd, era=era, head=10, prefix='module.' if module_prefix else '')
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in ref.items()}
    ckpt = {wrap: ref, 'model_ema': ema, 'epoch': 299, 'args': argparse.Namespace(model='SLaK_tiny', Decom=True)}
    path = tmp_path / f'official_{era}_{wrap}_{int(module_prefix)}.pth'
    torch.save(ckpt, path)
    return str(path), ref, ema


def _loaded(path, **init):
    layout = 'dense' if 'lkb_origin' in path else 'decomposed'
    model = SLaK(ARCH, kernel_size=init.pop('kernel_size', KS), kernel_layout=layout,
                 init_cfg=dict(type='Pretrained', checkpoint=path, **init))
    model.init_weights()
    return model.eval()


@pytest.mark.parametrize('era,wrap,module_prefix', [('LoRA', 'model', False), ('Decom', 'model', True),
                                                    ('lkb_origin', 'model', False), ('LoRA', 'state_dict', True)])
def test_official_checkpoint_reproduces_reference_features(tmp_path, era, wrap, module_prefix):
    path, ref_sd, _ = _official_file(tmp_path, era, wrap, module_prefix)
    model = _loaded(path)
    # The ImageNet model has no output norms norm0..3; ours are new layers at their init (weight 1, bias 0),
    # so the reference gets the same identity-affine LayerNorms.
    ref_sd = dict(ref_sd)
    for i, c in enumerate(model.dims):
        ref_sd[f'norm{i}.weight'], ref_sd[f'norm{i}.bias'] = torch.ones(c), torch.zeros(c)
    x = torch.randn(2, 3, 72, 104)  # non-square; stage-3 map 2x3 is smaller than its 7-tap kernels
    with torch.no_grad():
        ours = model(x)
        ref = reference_forward(ref_sd, x, ARCH['depths'], KS, era=era)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_ema_weights_are_selectable(tmp_path):
    path, ref_sd, ema_sd = _official_file(tmp_path)
    live, ema = _loaded(path), _loaded(path, use_ema=True)
    key = 'stages.0.0.large_kernel.tall.conv.weight'
    torch.testing.assert_close(live.state_dict()[key], ref_sd['stages.0.0.large_kernel.LoRA1.conv.weight'])
    torch.testing.assert_close(ema.state_dict()[key], ema_sd['stages.0.0.large_kernel.LoRA1.conv.weight'])


def test_load_report_counts_and_no_warning_for_head(tmp_path):
    from mmengine.logging import MMLogger
    path, ref_sd, _ = _official_file(tmp_path)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        _loaded(path)
    finally:
        logger.removeHandler(handler)
    text = '\n'.join(r.getMessage() for r in records)
    n_backbone = len(ref_sd) - 4  # minus head.weight/bias, norm.weight/bias
    assert f'{n_backbone} tensors matched' in text and '8 missing' in text and '0 unexpected' in text
    assert 'unexpected keys' not in text


def test_converter_writes_tensor_only_mm_checkpoint(tmp_path):
    path, ref_sd, _ = _official_file(tmp_path, module_prefix=True)
    dst = tmp_path / 'converted.pth'
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tools/convert_slak_checkpoint.py'), path, str(dst)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    ckpt = torch.load(dst, weights_only=True)  # no allow-list needed
    assert all(k.startswith('backbone.') for k in ckpt['state_dict'])
    assert not any('LoRA' in k or 'head.' in k for k in ckpt['state_dict'])
    a, b = _loaded(path), _loaded(str(dst), prefix='backbone.')
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k])


def test_kernel_size_mismatch_names_the_matching_config(tmp_path):
    path, _, _ = _official_file(tmp_path)
    with pytest.raises(CheckpointError, match=r'stage kernels 13/11/9/7 .*set kernel_size=\[13, 11, 9, 7, 3\]'):
        _loaded(path, kernel_size=[15, 13, 11, 9, 3])


def test_pad_kernels_opt_in_loads_smaller_kernels_exactly(tmp_path):
    path, _, _ = _official_file(tmp_path)
    small = _loaded(path)
    big = _loaded(path, kernel_size=[17, 13, 11, 9, 5], pad_kernels=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(small(x), big(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_width_mismatch_is_an_error(tmp_path):
    path, _, _ = _official_file(tmp_path, width=1.0)
    with pytest.raises(CheckpointError, match='widths'):
        _loaded(path)


def test_layout_mismatch_is_an_error(tmp_path):
    path, _, _ = _official_file(tmp_path, era='lkb_origin')
    model = SLaK(ARCH, kernel_size=KS, init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(CheckpointError, match="kernel_layout='dense'"):
        model.init_weights()


def test_resnet_checkpoint_is_rejected(tmp_path):
    import torchvision
    path = tmp_path / 'resnet18.pth'
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(CheckpointError, match='not a SLaK checkpoint'):
        _loaded(str(path))


@pytest.mark.parametrize('content', [b'not a checkpoint at all', None])
def test_garbage_and_truncated_files(tmp_path, content):
    path = tmp_path / 'bad.pth'
    if content is None:  # truncated real checkpoint
        good, _, _ = _official_file(tmp_path)
        content = open(good, 'rb').read()[:2000]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match='not a PyTorch checkpoint or is truncated'):
        _loaded(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match='does not exist'):
        _loaded(str(tmp_path / 'nope.pth'))


def test_code_executing_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ('echo pwned',))
    path = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'payload': Evil()}, path)
    with pytest.raises(CheckpointError, match='allow-list'):
        _loaded(str(path))
