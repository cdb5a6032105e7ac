"""CPU inference fast path of the block MLP (oneDNN linear with fused GELU and residual add) against the plain
modules and an explicit float64 re-computation; and the conditions under which it must not run."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from slak_mm.analysis import count_macs
from slak_mm.models import SLaK
from slak_mm.ops.cpu_fusion import cpu_fusion_enabled, cpu_fusions_disabled
from slak_mm.ops.fused_mlp import can_fuse_mlp, fused_mlp_residual

ARCH = dict(depths=[1, 1, 2, 1], dims=[8, 16, 24, 32])
FUSED_OP = 'mkldnn::_linear_pointwise'


def _ops(fn) -> set:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_available_on_this_build():
    # CI runs the x86 Linux wheel, which ships oneDNN; if this fails the fast path silently never runs.
    assert cpu_fusion_enabled('mlp', '_linear_pointwise')
    assert cpu_fusion_enabled('conv_add', '_convolution_pointwise')


@pytest.mark.parametrize('with_bias', [True, False])
@pytest.mark.parametrize('gamma', ['fold', 'addcmul', None])
def test_fused_block_mlp_matches_float64_recomputation(gamma, with_bias):
    torch.manual_seed(0)
    C = 8
    fc1, fc2, act = nn.Linear(C, 4 * C, bias=with_bias), nn.Linear(4 * C, C, bias=with_bias), nn.GELU()
    # 'fold': 4C < B·H·W, gamma goes into fc2's weights; 'addcmul': a 1×1 map, gamma applied with the residual.
    hw = (6, 7) if gamma == 'fold' else (1, 1)
    x = torch.randn(2, *hw, C)
    shortcut = torch.randn(2, C, *hw).contiguous(memory_format=torch.channels_last)
    g = torch.rand(C) + 0.5 if gamma else None
    with torch.no_grad():
        assert can_fuse_mlp(x, fc1, act, fc2)
        out = fused_mlp_residual(x, shortcut, fc1, act, fc2, g)
        d = {k: None if v is None else v.double() for k, v in
             dict(w1=fc1.weight, b1=fc1.bias, w2=fc2.weight, b2=fc2.bias).items()}
        h = F.linear(F.gelu(F.linear(x.double(), d['w1'], d['b1'])), d['w2'], d['b2'])
        ref = shortcut.double() + (h * (g.double() if g is not None else 1)).permute(0, 3, 1, 2)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize('layer_scale', [0.5, 0.0])
@pytest.mark.parametrize('deploy', [False, True])
def test_backbone_fast_path_matches_plain_modules(layer_scale, deploy):
    torch.manual_seed(0)
    model = SLaK(ARCH, kernel_size=[13, 11, 9, 7, 3], width_factor=1.0, layer_scale_init_value=layer_scale).eval()
    if deploy:
        model.switch_to_deploy()
    # 64×96 input: stage-1 maps fold the layer scale into fc2 (4C < B·H·W), stage-4 maps (2×3) use addcmul.
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        fast_ops = _ops(lambda: model(x))
        fast = model(x)
    slow_ops = _ops(lambda: model(x))  # gradients on: the plain modules
    slow = [y.detach() for y in model(x)]
    assert FUSED_OP in fast_ops and FUSED_OP not in slow_ops
    assert ('aten::addcmul' in fast_ops) == (layer_scale > 0)
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-5 * s.abs().max().item())


def test_fast_path_stays_off_where_it_could_change_anything():
    model = SLaK(ARCH, kernel_size=[13, 11, 9, 7, 3], width_factor=1.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert FUSED_OP not in _ops(lambda: model.train()(x))  # training mode (drop path, BN batch stats)
        model.eval()
        assert FUSED_OP not in _ops(lambda: model.double()(x.double()))  # float64
        model.float()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert FUSED_OP not in _ops(lambda: model(x))
        # The MAC counter's hooks on every Linear must fire: the plain modules run, and the count is the full one.
        macs = count_macs(model, lambda: model(x))['model']['macs']
        with torch.enable_grad():
            assert count_macs(model, lambda: model(x))['model']['macs'] == macs
        calls = []
        handle = model.stages[0][0].pwconv1.register_forward_hook(lambda *a: calls.append(1))
        ops = _ops(lambda: model(x))
        handle.remove()
        assert calls == [1] and FUSED_OP in ops  # the hooked block runs its modules, the others still fuse
        assert FUSED_OP not in _ops(lambda: torch.jit.trace(model, x, check_trace=False))  # tracing never fuses


def test_disabled_block_runs_plain_modules_and_restores():
    model = SLaK(ARCH, kernel_size=[13, 11, 9, 7, 3], width_factor=1.0).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        with cpu_fusions_disabled('mlp'):
            assert FUSED_OP not in _ops(lambda: model(x))
        assert FUSED_OP in _ops(lambda: model(x))


def test_benchmark_like_for_like_convnext_baseline_computes_the_same():
    # tools/benchmark.py's convnext_tiny_fused must be timm's ConvNeXt-T, only faster, or its ratio means nothing.
    import os.path as osp
    import sys
    sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools'))
    import benchmark
    torch.manual_seed(0)
    plain = benchmark.build('convnext_tiny', torch.device('cpu')).eval()
    fused = benchmark.build('convnext_tiny_fused', torch.device('cpu')).eval()
    for blk in plain.modules():  # non-trivial layer scale, so the residual branch matters
        if getattr(blk, 'gamma', None) is not None:
            blk.gamma.data.uniform_(0.5, 1.5)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ops = _ops(lambda: fused(x))
        ref, out = plain(x), fused(x)
    assert FUSED_OP in ops
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_benchmark_unfused_names_switch_off_the_named_fusions():
    # tools/benchmark.py: NAME_unfused times NAME with every CPU fusion off (FUSIONS: mlp, conv_add, dwconv_kernel),
    # NAME_unfused_conv_add with only that one.
    import os.path as osp
    import sys
    sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools'))
    import benchmark
    from slak_mm.ops.cpu_fusion import FUSIONS
    seen = []
    for name, expect in (('slak_t_unfused', [False, False, False]), ('slak_t_unfused_conv_add', [True, False, True]),
                         ('slak_t_unfused_mlp', [False, True, True]),
                         ('slak_t_unfused_dwconv_kernel', [True, True, False])):
        model = benchmark.build(name, torch.device('cpu'))
        model.model.forward = lambda x: seen.append([cpu_fusion_enabled(n, '_convolution_pointwise') for n in FUSIONS])
        model(torch.randn(1, 3, 32, 32))
        assert seen.pop() == expect, name
    assert [cpu_fusion_enabled(n, '_convolution_pointwise') for n in FUSIONS] == [True, True, True]
    with pytest.raises(ValueError, match='after _unfused_ name one of .*dwconv_kernel'):
        benchmark.build('slak_t_unfused_conv_sum', torch.device('cpu'))


def test_benchmark_reference_execution_runs_three_branches_and_computes_the_same():
    # tools/benchmark.py's slak_t_ref (the reference's way of running SLaK) must compute what our eval path computes,
    # with one conv per branch, no BN folding and no MLP fusion, or its row is not the reference's execution.
    import os.path as osp
    import sys
    sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools'))
    import benchmark
    torch.manual_seed(0)
    ours = benchmark.build('slak_t', torch.device('cpu')).eval()
    ref = benchmark.build('slak_t_ref', torch.device('cpu')).eval()
    for m in ours.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial BN, so folding vs not folding would show
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    ref.model.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ops_ref = _ops(lambda: ref(x))
        expected, out = ours(x), ref(x)
        n_blocks = sum(ours.depths)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ref(x)
        convs = sum(e.count for e in prof.key_averages() if e.key == 'aten::convolution')
        bns = sum(e.count for e in prof.key_averages() if e.key == 'aten::batch_norm')
    assert FUSED_OP not in ops_ref
    assert convs == 3 * n_blocks + 4  # three branches per block, plus the stem and three downsampling convs
    assert bns == 3 * n_blocks
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    with pytest.raises(ValueError, match='training form'):
        benchmark.ReferenceExecution(benchmark.build('slak_t_deploy', torch.device('cpu')))


def test_benchmark_compiled_names_compile_the_named_model():
    # tools/benchmark.py: NAME_compiled times torch.compile(NAME), NAME_frozen with inductor's freezing on while it
    # compiles. Not run here (compiling SLaK-T takes ~20 s); the compiled path's results are tested on a small SLaK in
    # test_cpu_kernel.py.
    import os.path as osp
    import sys
    sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools'))
    import benchmark
    from slak_mm.models import SLaK
    import torch._inductor.config as inductor_config
    compiled = benchmark.build('slak_t_deploy_compiled', torch.device('cpu'))
    frozen = benchmark.build('slak_t_deploy_frozen', torch.device('cpu'))
    for model in (compiled, frozen.compiled):
        assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
        assert isinstance(model._orig_mod, SLaK) and model._orig_mod.deploy
    seen = []
    frozen.compiled.forward = lambda x: seen.append(inductor_config.freezing)
    frozen(None)
    assert seen == [True] and not inductor_config.freezing
