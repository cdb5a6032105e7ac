"""slak_mm.ops.dwconv2d against F.conv2d: forward and gradients, rectangular kernels, small maps, layouts, dtypes."""
import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from slak_mm.ops import dwconv2d
from slak_mm.ops import dwconv2d_branches
from slak_mm.ops import dwconv2d_sum
from slak_mm.ops.cpu_fusion import cpu_fusions_disabled
from slak_mm.ops.cpu_kernel import load_cpu_kernel
from slak_mm.ops.dwconv import (clip_to_input, fft_weight_grad, fft_weight_grad_wins, fused_sum_applies, nchw_wins,
                                transposed_kernels)

from dwconv_cases import float64_sum, random_unit


def _ref(x, w, b=None):
    return F.conv2d(x.float().contiguous(), w.float(), None if b is None else b.float(),
                    padding=(w.shape[2] // 2, w.shape[3] // 2), groups=x.shape[1])


@pytest.mark.parametrize('shape,k', [((2, 5, 9, 13), (7, 3)), ((1, 6, 4, 5), (51, 5)),  # map smaller than kernel
                                     ((2, 3, 12, 8), (5, 51)), ((1, 4, 7, 7), (13, 13)), ((2, 3, 6, 10), (1, 9))])
@pytest.mark.parametrize('channels_last', [False, True])
def test_forward_and_gradients_match_conv2d(shape, k, channels_last):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], 1, *k, dtype=torch.float64)
    b = torch.randn(shape[1], dtype=torch.float64)
    x1, w1, b1 = (t.clone().requires_grad_() for t in (x, w, b))
    x2, w2, b2 = (t.clone().requires_grad_() for t in (x, w, b))
    y1 = dwconv2d(x1, w1, b1)
    y2 = F.conv2d(x2, w2, b2, padding=(k[0] // 2, k[1] // 2), groups=shape[1])
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y2)
    y1.backward(g)
    y2.backward(g)
    for a, c in ((x1, x2), (w1, w2), (b1, b2)):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_reduced_precision_within_stated_tolerance(dtype, tol):
    torch.manual_seed(0)
    x, w = torch.randn(2, 8, 16, 20), torch.randn(8, 1, 13, 5) / 8
    y = dwconv2d(x.to(dtype), w.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), _ref(x.to(dtype), w.to(dtype)), rtol=tol, atol=tol)


def test_clipping_removes_only_padding_taps():
    w = torch.randn(3, 1, 51, 5)
    assert clip_to_input(w, 7, 7).shape[2:] == (13, 5)
    assert clip_to_input(w, 40, 2).shape[2:] == (51, 3)
    assert clip_to_input(w, 26, 3) is w


@pytest.mark.parametrize('args,err,match', [
    (dict(w=(4, 1, 4, 3)), ValueError, 'odd'),
    (dict(w=(4, 2, 3, 3)), ValueError, r'\(C, 1, kh, kw\)'),
    (dict(w=(5, 1, 3, 3)), ValueError, '5 channels but the input has 4'),
    (dict(x_dtype=torch.int32), TypeError, 'floating-point'),
    (dict(impl='cuda-magic'), ValueError, 'impl'),
    (dict(x=(4, 8, 8)), ValueError, '4-D'),
    (dict(w_device='meta'), ValueError, 'different devices'),  # a second device without needing a GPU
    (dict(bias=(3,)), ValueError, r'bias must have shape \(4,\)'),
])
@pytest.mark.parametrize('grad,autocast', [(True, False), (False, False), (False, True)])
def test_bad_input_raises(args, err, match, grad, autocast):
    # without gradients (and under CPU bfloat16 autocast), with the C++ CPU kernel loaded: its one-call fast path
    # must hand bad input back to the checks
    assert load_cpu_kernel() is not None
    x = torch.zeros(args.get('x', (1, 4, 8, 8)), dtype=args.get('x_dtype', torch.float32))
    w = torch.zeros(args.get('w', (4, 1, 3, 3)), device=args.get('w_device', 'cpu'))
    bias = torch.zeros(args['bias']) if 'bias' in args else None
    with pytest.raises(err, match=match), torch.set_grad_enabled(grad), \
            torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
        dwconv2d(x, w, bias, impl=args.get('impl', 'auto'))


@pytest.mark.parametrize('shape,k', [((2, 3, 11, 9), (7, 3)), ((1, 4, 6, 20), (5, 31)), ((2, 2, 5, 4), (9, 7)),
                                     ((1, 3, 8, 8), (1, 5))])
def test_fft_weight_gradient_equals_conv_weight_gradient(shape, k):
    """The FFT cross-correlation against PyTorch's own depthwise weight gradient, float64 (tolerance 1e-10)."""
    torch.manual_seed(0)
    x, g = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    w = torch.randn(shape[1], 1, *k, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, padding=(k[0] // 2, k[1] // 2), groups=shape[1])
    (expected,) = torch.autograd.grad(y, w, g)
    torch.testing.assert_close(fft_weight_grad(x, g, *k), expected, rtol=1e-10, atol=1e-10)


def test_cpu_training_uses_fft_weight_gradient_for_long_bands(monkeypatch):
    """On CPU without slak_mm's C++ kernel (switched off here; also float64, NCHW inputs), a 51×5 band on a 32×32 map
    takes the FFT weight gradient (cost model), with the forward bit-identical to F.conv2d and every gradient within
    fp32 rounding of a float64 reference (1e-5 relative to the largest)."""
    assert fft_weight_grad_wins(51, 5) and fft_weight_grad_wins(5, 51) and fft_weight_grad_wins(13, 5)
    assert not fft_weight_grad_wins(5, 5)
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32, 32).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(8, 1, 51, 5) / 16).requires_grad_()
    b = torch.randn(8, requires_grad=True)
    with cpu_fusions_disabled('dwconv_kernel'):  # decided in the forward: the backward keeps the FFT
        y = dwconv2d(x, w, b)
    assert '_CPUDepthwise' in type(y.grad_fn).__name__
    from slak_mm.ops import dwconv as dwconv_module
    fft_calls = []
    real_fft = dwconv_module.fft_weight_grad
    monkeypatch.setattr(dwconv_module, 'fft_weight_grad', lambda *a: fft_calls.append(1) or real_fft(*a))
    with torch.no_grad():
        torch.testing.assert_close(y, F.conv2d(x, w, b, padding=(25, 2), groups=8), rtol=0, atol=0)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), g)
    assert fft_calls == [1]  # the weight gradient came from the FFT
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = F.conv2d(x64, w64, b64, padding=(25, 2), groups=8)
    for a, e in zip(got, torch.autograd.grad(y64, (x64, w64, b64), g.double())):
        assert a.dtype == torch.float32
        assert (a.double() - e).abs().max() <= 1e-5 * e.abs().max()
    with torch.no_grad():  # inference never takes the custom-autograd path
        assert dwconv2d(x, w, b).grad_fn is None


def _graph_has(t, name):
    """Whether ``t``'s autograd graph (a few nodes deep: layout copies may follow) has a node whose type contains
    ``name``."""
    nodes = [t.grad_fn]
    for _ in range(3):
        if any(name in type(n).__name__ for n in nodes):
            return True
        nodes = [m for n in nodes for m, _ in n.next_functions if m is not None]
    return False


@pytest.mark.parametrize('kernel', [True, False], ids=['cpp_kernel', 'kernel_off'])
@pytest.mark.parametrize('case', ['fft band, channels_last', '5x5, NCHW input', 'three bands, 7x7 map'])
def test_cpu_autocast_training_keeps_autocast_forward_and_takes_float32_weight_gradients(case, kernel):
    """Under CPU bf16 autocast the forward and the input gradient are in bf16 (as F.conv2d gives them; slak_mm's C++
    kernels round the float32 sum once); the weight and bias gradients are float32 and within 1e-5 (relative to the
    largest) of a float64 reference computed from the same bf16-rounded operands, which oneDNN's bf16 weight gradient
    (~2e-3 off) does not reach. With the kernel off: oneDNN's forward and input gradient, FFT or oneDNN float32 weight
    gradients (the 7×7 unit NCHW, see nchw_wins)."""
    torch.manual_seed(0)
    kernel_lib = load_cpu_kernel()
    wgrad_calls = kernel_lib.wgrad_calls()
    off = contextlib.nullcontext() if kernel else cpu_fusions_disabled('dwconv_kernel')
    cl = dict(memory_format=torch.channels_last)
    if case == 'fft band, channels_last':
        x, ks = torch.randn(2, 8, 20, 20).contiguous(**cl), [(51, 5)]  # clipped to 39×5 on this map: FFT
    elif case == '5x5, NCHW input':
        x, ks = torch.randn(2, 8, 12, 12), [(5, 5)]
    else:
        x, ks = torch.randn(2, 6, 7, 7).contiguous(**cl), [(13, 5), (5, 13), (5, 5)]
    x.requires_grad_()
    ws = [(torch.randn(x.shape[1], 1, *k) / 8).requires_grad_() for k in ks]
    b = torch.randn(x.shape[1], requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16), off:
        outs = dwconv2d_branches(x, ws) if len(ws) > 1 else [dwconv2d(x, ws[0], b)]
        refs = [F.conv2d(x, w, b if len(ws) == 1 else None, padding=(w.shape[2] // 2, w.shape[3] // 2),
                         groups=x.shape[1]) for w in ws]
    params = [x, *ws] + ([b] if len(ws) == 1 else [])
    assert all(o.dtype == torch.bfloat16 and _graph_has(o, '_CPUDepthwise') for o in outs)
    g = [torch.randn(o.shape).bfloat16() for o in outs]
    got = torch.autograd.grad(outs, params, g)
    assert (kernel_lib.wgrad_calls() > wgrad_calls) == kernel
    autocast_grads = torch.autograd.grad(refs, params, g)
    x64, *rest = (t.detach().bfloat16().double().requires_grad_() for t in params)
    w64, b64 = rest[:len(ws)], (rest[len(ws)] if len(ws) == 1 else None)
    ref64 = [F.conv2d(x64, w, b64, padding=(w.shape[2] // 2, w.shape[3] // 2), groups=x.shape[1]) for w in w64]
    exp = torch.autograd.grad(ref64, [x64, *rest], [t.double() for t in g])
    for o, r in zip(outs, ref64):  # the forward: bf16 rounding of the exact result
        assert (o.double() - r).abs().max() <= 1e-2 * r.abs().max()
    assert (got[0].double() - exp[0]).abs().max() <= 1e-2 * exp[0].abs().max()  # dx in bf16, as autocast's
    for a, e, bf in zip(got[1:], exp[1:], autocast_grads[1:]):
        assert a.dtype == torch.float32
        assert (a.double() - e).abs().max() <= 1e-5 * e.abs().max()
    assert any((bf.double() - e).abs().max() > 1e-4 * e.abs().max() for bf, e in zip(autocast_grads[1:], exp[1:]))


def test_layout_rule_picks_nchw_only_for_training_short_kernels_on_small_maps():
    cl = dict(memory_format=torch.channels_last)
    bands = [torch.randn(4, 1, 13, 5, requires_grad=True), torch.randn(4, 1, 5, 13, requires_grad=True)]
    small, big = torch.randn(1, 4, 7, 7).contiguous(**cl), torch.randn(1, 4, 16, 16).contiguous(**cl)
    eight = torch.randn(1, 4, 8, 8).contiguous(**cl)
    assert load_cpu_kernel() is not None and not nchw_wins(small, bands)  # the C++ kernels run channels_last
    with cpu_fusions_disabled('dwconv_kernel'):  # the rule was measured against oneDNN's channels_last path
        assert nchw_wins(small, bands)
        assert not nchw_wins(big, bands)  # 256 pixels: channels_last is as fast
        assert nchw_wins(eight, bands)
        assert not nchw_wins(eight, [torch.randn(4, 1, 21, 5, requires_grad=True)])  # clipped to 15 > 13
        assert nchw_wins(small, [torch.randn(4, 1, 51, 5, requires_grad=True)])  # ... but 51 clips to 13 on a 7×7 map
        assert not nchw_wins(small, [b.detach() for b in bands])  # nothing needs a gradient: inference
        with torch.no_grad():
            assert not nchw_wins(small, bands)


@pytest.fixture
def cpp_kernel_off():
    with cpu_fusions_disabled('dwconv_kernel'):
        yield


def test_nchw_layout_choice_gives_the_same_unit_and_gradients(monkeypatch, cpp_kernel_off):
    """Without slak_mm's C++ kernel, a SLaK stage-4-like unit (channels_last activations and weights) on a 7×7 map
    runs its convs NCHW, returns channels_last outputs, and matches a float64 F.conv2d reference (forward and
    gradients, 1e-5 relative)."""
    torch.manual_seed(0)
    cl = dict(memory_format=torch.channels_last)
    x = torch.randn(2, 6, 7, 7).contiguous(**cl).requires_grad_()
    ws = [(torch.randn(6, 1, *k) / 8).contiguous(**cl).requires_grad_() for k in ((13, 5), (5, 13), (5, 5))]
    seen = []
    conv2d = F.conv2d
    monkeypatch.setattr(F, 'conv2d', lambda inp, w, *a, **kw: seen.append(
        (inp.is_contiguous(), w.stride(1) != 1 or w.shape[2] * w.shape[3] == 1)) or conv2d(inp, w, *a, **kw))
    outs = dwconv2d_branches(x, ws)
    monkeypatch.undo()
    assert seen == [(True, True)] * 3  # NCHW input and NCHW-strided weights reached the convs
    assert all(o.is_contiguous(**cl) for o in outs)
    g = [torch.randn_like(o) for o in outs]
    got = torch.autograd.grad(outs, [x, *ws], g)
    x64, *w64 = (t.detach().double().requires_grad_() for t in (x, *ws))
    ref = [F.conv2d(x64, w, padding=(w.shape[2] // 2, w.shape[3] // 2), groups=6) for w in w64]
    exp = torch.autograd.grad(ref, [x64, *w64], [t.double() for t in g])
    for o, r in zip(outs, ref):
        assert (o.double() - r).abs().max() <= 1e-5 * r.abs().max()
    for a, e in zip(got, exp):
        assert (a.double() - e).abs().max() <= 1e-5 * e.abs().max()


def test_transpose_rule_only_for_inference_sums_with_long_tall_bands():
    x = torch.randn(1, 4, 24, 45).contiguous(memory_format=torch.channels_last)
    unit = [torch.randn(4, 1, 19, 5), torch.randn(4, 1, 5, 19), torch.randn(4, 1, 5, 5)]
    assert transposed_kernels(x, unit) == [True, False, False]
    assert transposed_kernels(x, [torch.randn(4, 1, 15, 5), unit[1]]) == [False, False]  # 15 < 17 taps
    assert transposed_kernels(x[:, :, :, :40], unit) == [False] * 3  # 960 < 32×32 pixels: the copies would dominate
    assert transposed_kernels(x[:, :, :8].repeat(1, 1, 1, 4), unit) == [False] * 3  # 19 rows clip to 15 on 8 rows
    assert transposed_kernels(x, unit[:1]) == [False]  # nothing left to add a transposed output into
    trained = [w.clone().requires_grad_() for w in unit]
    assert transposed_kernels(x, trained) == [False] * 3  # training: the measured gain is inference only
    with torch.no_grad():
        assert transposed_kernels(x, trained) == [True, False, False]


def _conv_calls(fn):
    """Run ``fn`` under the profiler: its result, and (op, input H×W, kernel kh×kw) of every depthwise convolution
    oneDNN ran, plus the names of all ops."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fn()
    convs = [(e.name, tuple(e.input_shapes[0][2:]), tuple(e.input_shapes[1][2:]))
             if e.name == 'aten::mkldnn_convolution'
             else (e.name, tuple(e.input_shapes[1][2:]), tuple(e.input_shapes[2][2:]))
             for e in prof.events() if e.name in ('aten::mkldnn_convolution', 'mkldnn::_convolution_pointwise_')]
    return out, convs, {e.name for e in prof.events()}


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('channels_last', [False, True])
def test_transposed_tall_band_gives_the_same_sum(channels_last, fused):
    """Inference of a unit with a long tall band on a non-square map: the tall band reaches its conv as a wide band
    over the transposed input, the result is channels_last and matches a float64 F.conv2d sum (1e-5 relative), with
    the band-sum fusion on (the tall band accumulates into the sum's transposed view) and off."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 24, 45)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(6, 1, *k) / 8 for k in ((19, 5), (5, 19), (5, 5))]
    b = torch.randn(6)
    off = ('dwconv_kernel',) if fused else ('dwconv_kernel', 'conv_add')  # the oneDNN path (the C++ kernel's fallback)
    with torch.no_grad(), cpu_fusions_disabled(*off):
        out, convs, _ = _conv_calls(lambda: dwconv2d_sum(x, ws, b))
    # (input H×W, kernel) of every convolution: the 19×5 band only ever runs as 5×19 over the 45×24 transpose
    assert {(shape, k) for _, shape, k in convs} == {((45, 24), (5, 19)), ((24, 45), (5, 19)), ((24, 45), (5, 5))}
    assert any(name == 'mkldnn::_convolution_pointwise_' for name, *_ in convs) == fused
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = float64_sum(x, ws, b)
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize('shape,kernels', [
    ((2, 5, 12, 9), [(7, 3), (3, 7)]),                 # small map: no transposition, true oneDNN sum post-op
    ((1, 4, 6, 5), [(51, 5), (5, 51), (5, 5)]),        # map smaller than the kernels: clipped taps
    ((1, 3, 40, 33), [(19, 5), (5, 19), (5, 5)]),      # tall band transposed, the others fused
    ((2, 6, 9, 9), [(13, 13), (3, 3)])])
@pytest.mark.parametrize('with_bias', [True, False])
@pytest.mark.parametrize('channels_last', [False, True])
def test_fused_band_sum_matches_float64(shape, kernels, with_bias, channels_last):
    """On the oneDNN path (C++ kernel off), CPU float32 inference sums accumulate each later kernel inside its
    convolution (oneDNN sum post-op): same result as a float64 F.conv2d sum (1e-5 relative), channels_last, input
    untouched, no separate add."""
    x, ws, b = random_unit(shape, kernels, with_bias, channels_last)
    x0 = x.clone()
    with torch.no_grad(), cpu_fusions_disabled('dwconv_kernel'):
        out, convs, ops = _conv_calls(lambda: dwconv2d_sum(x, ws, b))
    transposed = any(t for t in transposed_kernels(x, ws))
    assert [name for name, *_ in convs].count('mkldnn::_convolution_pointwise_') == len(ws) - 1
    assert 'aten::add' not in ops and ('aten::add_' in ops) == transposed  # only the transposed band's view add
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.float32
    assert torch.equal(x, x0)
    ref = float64_sum(x, ws, b)
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fused_band_sum_only_where_it_cannot_change_anything():
    x = torch.randn(1, 4, 10, 10)
    ws = [torch.randn(4, 1, 7, 3), torch.randn(4, 1, 3, 7)]
    with torch.no_grad():
        assert fused_sum_applies(x, ws, None)
        assert not fused_sum_applies(x, ws[:1], None)  # one kernel: nothing to add
        assert not fused_sum_applies(x.double(), [w.double() for w in ws], None)  # oneDNN has no float64 path
        assert not fused_sum_applies(x.bfloat16(), [w.bfloat16() for w in ws], None)  # measured for float32 only
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not fused_sum_applies(x, ws, None)
        with cpu_fusions_disabled('conv_add'):
            assert not fused_sum_applies(x, ws, None)
        with cpu_fusions_disabled('mlp'):
            assert fused_sum_applies(x, ws, None)
    trained = [w.clone().requires_grad_() for w in ws]
    assert not fused_sum_applies(x, trained, None)  # the post-op has no backward
    out = dwconv2d_sum(x, trained)
    out.sum().backward()
    assert all(w.grad is not None for w in trained)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)  # shape checks become constants, as intended
        graph = str(torch.jit.trace(lambda a: dwconv2d_sum(a, ws), x).graph)
    assert '_convolution_pointwise' not in graph and 'aten::_convolution' in graph  # traced graphs stay portable


def test_cpu_fusion_switch_nests_restores_and_rejects_unknown_names():
    from slak_mm.ops.cpu_fusion import cpu_fusion_enabled
    enabled = lambda: [cpu_fusion_enabled(n, '_convolution_pointwise') for n in ('mlp', 'conv_add')]  # noqa: E731
    assert enabled() == [True, True]
    with cpu_fusions_disabled('mlp'):
        assert enabled() == [False, True]
        with cpu_fusions_disabled():
            assert enabled() == [False, False]
        assert enabled() == [False, True]
    assert enabled() == [True, True]
    with pytest.raises(ValueError, match="unknown CPU fusion.*'conv_sum'.*choose from"):
        with cpu_fusions_disabled('conv_sum'):
            pass
    assert enabled() == [True, True]


@pytest.mark.parametrize('phase', ['forward', 'fwd_bwd', 'eval_sum'])
def test_dwconv_benchmark_compares_equal_computations(phase):
    # tools/benchmark_dwconv.py times 'ours' against nn.Conv2d calls and (CPU) ours with the C++ kernel off: they must
    # compute the same unit, or the ratio means nothing (eval_sum: the BN-folded two-band form with the N×N kernel in
    # the tall band's centre; fwd_bwd: the input and the three kernels' gradients).
    import os.path as osp
    import sys
    sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools'))
    import benchmark_dwconv
    torch.manual_seed(0)
    x = torch.randn(1, 4, 40, 36)
    kernels = [torch.randn(4, 1, *k) for k in ((19, 5), (5, 19), (5, 5))]
    outs = {name: fn() for name, fn in benchmark_dwconv.make_fns(x, kernels, phase).items()}
    ref = outs['nchw']
    if phase == 'eval_sum':
        x64 = x.double()
        sep = sum(F.conv2d(x64, k.double(), padding=(k.shape[2] // 2, k.shape[3] // 2), groups=4) for k in kernels)
        bias = ref.double() - sep  # the benchmark's random bias, the same for every pixel of a channel
        assert (bias - bias[:, :, :1, :1]).abs().max() <= 1e-4 * sep.abs().max()
    assert set(outs) == {'ours', 'nchw', 'cl', 'onednn'}
    if phase != 'eval_sum':
        assert len(ref) == (4 if phase == 'fwd_bwd' else 3)  # dx and 3 kernels' gradients / 3 branch outputs
    for name in set(outs) - {'nchw'}:
        for a, b in zip(outs[name] if phase != 'eval_sum' else [outs[name]], ref if phase != 'eval_sum' else [ref]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_dwconv_benchmark_counts_in_map_work():
    # The benchmark's '% GEMM (in-map)' divides by the multiply-adds whose tap lands inside the map. Independent
    # count: a depthwise conv of an all-ones map with an all-ones kernel (zero padding) gives, at each output, the
    # number of its taps inside the map.
    import os.path as osp
    import sys
    sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'tools'))
    import benchmark_dwconv
    for (h, w), shapes in [((7, 7), [(13, 5), (5, 13)]), ((16, 9), [(51, 5), (5, 51), (5, 5)]), ((3, 40), [(1, 1)])]:
        ref = sum(F.conv2d(torch.ones(1, 1, h, w, dtype=torch.float64), torch.ones(1, 1, kh, kw, dtype=torch.float64),
                           padding=(kh // 2, kw // 2)).sum().item() for kh, kw in shapes)
        assert benchmark_dwconv.in_map_macs(2, 3, h, w, shapes) == 2 * 3 * ref
        assert ref < h * w * sum(kh * kw for kh, kw in shapes) or shapes == [(1, 1)]  # padding taps are not counted
    # eval_sum's unit is the cross the two folded bands make: the same count with a cross-shaped all-ones kernel
    for (h, w), (m, n) in [((7, 7), (13, 5)), ((16, 9), (51, 5)), ((5, 30), (9, 3))]:
        cross = torch.zeros(1, 1, m, m, dtype=torch.float64)
        cross[:, :, (m - n) // 2:(m + n) // 2, :] = 1
        cross[:, :, :, (m - n) // 2:(m + n) // 2] = 1
        ref = F.conv2d(torch.ones(1, 1, h, w, dtype=torch.float64), cross, padding=m // 2).sum().item()
        assert benchmark_dwconv.cross_in_map_macs(2, 3, h, w, m, n) == 2 * 3 * ref


def test_torch_func_vmap_and_per_sample_gradients_match_a_loop():
    # Under torch.func transforms the op is PyTorch's own convolutions (functorch cannot batch slak_mm's kernels or
    # query memory formats inside vmap): vmap over a batch of maps and per-sample weight gradients (vmap of grad, as
    # DP-SGD computes them) equal a Python loop of F.conv2d calls, float64 (1e-12 of the largest).
    torch.manual_seed(0)
    x = torch.randn(3, 2, 8, 12, 12, dtype=torch.float64)
    w, w2 = torch.randn(8, 1, 13, 5, dtype=torch.float64), torch.randn(8, 1, 5, 13, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)

    def conv(a, k, bias=None):
        return F.conv2d(a, k, bias, padding=(k.shape[2] // 2, k.shape[3] // 2), groups=8)
    got = torch.func.vmap(lambda a: dwconv2d_sum(a, [w, w2], b))(x)
    exp = torch.stack([conv(a, w, b) + conv(a, w2) for a in x])
    assert (got - exp).abs().max() <= 1e-12 * exp.abs().max()
    got = torch.func.vmap(lambda a: torch.stack(dwconv2d_branches(a, [w, w2])))(x)
    exp = torch.stack([torch.stack([conv(a, w), conv(a, w2)]) for a in x])
    assert (got - exp).abs().max() <= 1e-12 * exp.abs().max()
    per_sample = torch.func.vmap(torch.func.grad(lambda k, a: dwconv2d(a[None], k).square().sum()),
                                 in_dims=(None, 0))(w, x[:, 0])
    for a, g in zip(x[:, 0], per_sample):
        k = w.clone().requires_grad_()
        conv(a[None], k).square().sum().backward()
        assert (g - k.grad).abs().max() <= 1e-12 * k.grad.abs().max()
