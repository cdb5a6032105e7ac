"""SLaK backbone: shapes, fidelity to an independent re-computation, training-state knobs, bad input."""
import pytest
import torch

from conftest import TINY_ARCH
from reference_impl import randomize_bn_and_scales, reference_forward, to_reference_layout
from slak_mm.models import SLaK


@pytest.mark.parametrize('arch,channels', [('tiny', [124, 249, 499, 998]), ('small', [124, 249, 499, 998]),
                                           ('base', [166, 332, 665, 1331])])
def test_output_shapes_t_s_b_on_non_square_input(arch, channels):
    model = SLaK(arch).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert [o.shape[1] for o in outs] == channels
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_parameter_count_matches_reference_imagenet_model():
    # Reference SLaK-T ImageNet model: 50,703,838 params = backbone - norm0..3 + final norm (998*2) + head.
    model = SLaK('tiny')
    n = sum(p.numel() for p in model.parameters())
    norms = sum(p.numel() for name, p in model.named_parameters() if name.startswith('norm'))
    assert n - norms + 998 * 2 + 998 * 1000 + 1000 == 50_703_838


@pytest.mark.parametrize('kernel_size', [[13, 11, 9, 7, 3], [51, 49, 47, 13, 5]])
def test_forward_matches_independent_reference(kernel_size):
    torch.manual_seed(0)
    model = SLaK(TINY_ARCH, kernel_size=kernel_size, width_factor=1.3, layer_scale_init_value=0.5).eval()
    randomize_bn_and_scales(model)
    x = torch.randn(2, 3, 72, 104)  # non-square; stage maps 18x26 .. 2x3 (smaller than the kernels)
    with torch.no_grad():
        ours = model(x)
        ref = reference_forward(to_reference_layout(model.state_dict()), x, model.depths, kernel_size)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_widths_are_truncated_not_rounded():
    model = SLaK(dict(depths=[1, 1, 1, 1], dims=[96, 192, 384, 768]), width_factor=1.3)
    assert model.dims == [124, 249, 499, 998]  # int(99.84, 249.6, 499.2, 998.4)


def test_drop_path_rates_increase_linearly_over_all_blocks():
    model = SLaK(dict(depths=[1, 2, 1, 1], dims=[8, 8, 8, 8]), drop_path_rate=0.4)
    rates = [getattr(b.drop_path, 'drop_prob', 0.) for s in model.stages for b in s]
    assert rates == pytest.approx([0., 0.1, 0.2, 0.3, 0.4])


def test_block_layout_branch_shapes_and_padding():
    model = SLaK(TINY_ARCH, kernel_size=[13, 11, 9, 7, 3], width_factor=1.0)
    lk = model.stages[1][0].large_kernel
    assert lk.tall.conv.weight.shape == (32, 1, 11, 3) and lk.tall.conv.padding == (5, 1)
    assert lk.wide.conv.weight.shape == (32, 1, 3, 11) and lk.wide.conv.padding == (1, 5)
    assert lk.small.conv.weight.shape == (32, 1, 3, 3)
    assert isinstance(lk.tall.bn, torch.nn.BatchNorm2d)
    sync = SLaK(TINY_ARCH, norm_cfg=dict(type='SyncBN'))
    assert isinstance(sync.stages[0][0].large_kernel.wide.bn, torch.nn.SyncBatchNorm)


def test_out_indices_select_and_norm_outputs():
    model = SLaK(TINY_ARCH, out_indices=(1, 3)).eval()
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [41, 166]
    assert hasattr(model, 'norm1') and not hasattr(model, 'norm0')


def test_frozen_stages_and_norm_eval():
    model = SLaK(TINY_ARCH, frozen_stages=2, norm_eval=True)
    model.train()
    for i in range(2):
        assert not any(p.requires_grad for p in model.stages[i].parameters())
        assert not any(p.requires_grad for p in model.downsample_layers[i].parameters())
    assert all(p.requires_grad for p in model.stages[2].parameters())
    assert not model.stages[2][0].large_kernel.tall.bn.training  # norm_eval
    assert model.stages[2][0].training


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = SLaK(TINY_ARCH, with_cp=False)
    b = SLaK(TINY_ARCH, with_cp=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for m in (a, b):
        sum(o.sum() for o in m(x)).backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize('kwargs,match', [
    (dict(arch='huge'), "unknown arch 'huge'"),
    (dict(arch=dict(depths=[1, 1, 1])), 'custom arch'),
    (dict(kernel_size=[51, 49, 47, 5]), 'must list 5 sizes'),
    (dict(kernel_size=[51, 49, 48, 13, 5]), 'positive odd integer'),
    (dict(kernel_size=[51, 49, 47, 13, 13]), 'short edge N=13'),
    (dict(out_indices=(0, 4)), 'out_indices'),
    (dict(frozen_stages=5), 'frozen_stages'),
    (dict(norm_cfg=dict(type='GN')), "norm_cfg type 'GN'"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SLaK(**kwargs)


def test_layer_depth_follows_convnext_rule():
    model = SLaK('tiny')
    ld = model.get_layer_depth
    assert ld('backbone.downsample_layers.0.0.weight', 'backbone.') == (0, 8)
    assert ld('backbone.stages.0.2.pwconv1.weight', 'backbone.') == (1, 8)
    assert ld('backbone.downsample_layers.1.1.weight', 'backbone.') == (2, 8)
    assert ld('backbone.stages.2.4.gamma', 'backbone.') == (4, 8)
    assert ld('backbone.stages.3.0.gamma', 'backbone.') == (6, 8)
    assert ld('backbone.norm2.weight', 'backbone.') == (7, 8)
    assert ld('decode_head.conv_seg.weight', 'backbone.') == (7, 8)
    assert ld('backbone.stages.2.4.gamma', 'backbone.', decay_type='stage_wise') == (3, 8)
    assert SLaK('small').get_layer_depth('stages.2.26.gamma') == (11, 14)
