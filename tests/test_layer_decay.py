"""The SLaK layer-decay constructor reproduces the reference's lr scales (slak_reference.md §7.3-7.4)."""
import pytest
import torch.nn as nn

from slak_mm.engine import LayerDecayOptimizerConstructor
from slak_mm.models import SLaK


class Segmentor(nn.Module):
    def __init__(self, arch):
        super().__init__()
        self.backbone = SLaK(arch)
        self.decode_head = nn.Conv2d(4, 4, 1)


def _scales(model, **paramwise):
    ctor = LayerDecayOptimizerConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.05)), paramwise)
    wrapper = ctor(model)
    out = {}
    for g in wrapper.optimizer.param_groups:
        for name in g['param_names']:
            out[name] = (g['lr'] / 1e-4, g['weight_decay'])
    return out


@pytest.fixture(scope='module')
def tiny():
    return Segmentor('tiny')


def test_stage_wise_tiny_matches_reference_table(tiny):
    s = _scales(tiny, decay_rate=0.9, decay_type='stage_wise', num_layers=6)
    expect = {'backbone.downsample_layers.0.0.weight': 0.478, 'backbone.downsample_layers.3.1.weight': 0.478,
              'backbone.stages.0.1.pwconv1.weight': 0.531, 'backbone.stages.1.0.pwconv1.weight': 0.590,
              'backbone.stages.2.8.pwconv1.weight': 0.656, 'backbone.stages.3.2.pwconv1.weight': 0.729,
              'backbone.norm0.weight': 1.0, 'decode_head.weight': 1.0}
    for name, scale in expect.items():
        assert s[name][0] == pytest.approx(scale, abs=5e-4), name


def test_layer_wise_tiny_matches_reference_table(tiny):
    s = _scales(tiny, decay_rate=0.7, decay_type='layer_wise', num_layers=6)
    expect = {'backbone.downsample_layers.0.0.weight': 0.082, 'backbone.stages.0.0.gamma': 0.118,
              'backbone.stages.1.0.gamma': 0.168, 'backbone.downsample_layers.1.1.weight': 0.168,
              'backbone.downsample_layers.2.1.weight': 0.240, 'backbone.stages.2.2.gamma': 0.240,
              'backbone.stages.2.3.gamma': 0.343, 'backbone.stages.2.8.gamma': 0.490,
              'backbone.stages.3.0.gamma': 0.700, 'backbone.downsample_layers.3.1.weight': 0.700,
              'backbone.norm3.bias': 1.0, 'decode_head.weight': 1.0}
    for name, scale in expect.items():
        assert s[name][0] == pytest.approx(scale, abs=5e-4), name


def test_no_weight_decay_on_norms_biases_and_layer_scales(tiny):
    s = _scales(tiny, decay_rate=0.9, decay_type='stage_wise', num_layers=6)
    assert s['backbone.stages.0.0.gamma'][1] == 0
    assert s['backbone.stages.0.0.large_kernel.tall.bn.weight'][1] == 0
    assert s['backbone.stages.0.0.pwconv1.bias'][1] == 0
    assert s['backbone.norm1.weight'][1] == 0
    assert s['backbone.stages.0.0.large_kernel.tall.conv.weight'][1] == 0.05
    assert s['backbone.stages.0.0.pwconv1.weight'][1] == 0.05


def test_small_stage_wise_12_layers():
    s = _scales(Segmentor('small'), decay_rate=0.9, decay_type='stage_wise', num_layers=12)
    for name, scale in {'backbone.downsample_layers.0.0.weight': 0.254, 'backbone.stages.0.0.gamma': 0.282,
                        'backbone.stages.3.0.gamma': 0.387}.items():
        assert s[name][0] == pytest.approx(scale, abs=5e-4), name


@pytest.mark.parametrize('paramwise,err', [(dict(decay_type='vit'), ValueError),
                                           (dict(decay_rate=1.5), ValueError),
                                           (dict(decay_rate=0.9, layers=6), ValueError)])
def test_bad_paramwise_cfg(tiny, paramwise, err):
    with pytest.raises(err):
        _scales(tiny, **paramwise)


def test_rejects_backbone_without_layer_depth():
    model = nn.Module()
    model.backbone = nn.Conv2d(3, 3, 1)
    with pytest.raises(TypeError, match='get_layer_depth'):
        _scales(model, decay_rate=0.9)
