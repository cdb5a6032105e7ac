"""Triton depthwise kernels on CPU through Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py).

Every kernel (forward, input-gradient, weight-gradient, fused three-branch unit, summed bands + bias) is compared
with F.conv2d computed in float64 from the same (rounded) inputs. Tolerances: fp32 1e-4 relative to the largest
reference value (accumulation is fp32, reference fp64); fp16 2e-3 and bf16 1.6e-2 (one rounding of the output in
the storage dtype, 2^-10 and 2^-7 relative, plus fp32 accumulation). Shapes are small because the interpreter
executes every program in Python; the kernels are also compiled for sm_90 (H100) without a GPU to catch code the
interpreter accepts but the compiler does not.
"""
import pytest
import torch
import torch.nn.functional as F

from slak_mm.ops import dwconv2d, dwconv2d_branches, dwconv2d_sum, resolve_impl

import triton  # noqa: E402,F401  (ships with PyTorch's Linux wheels; a declared test dependency in pyproject.toml)
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _conv64(x, w, b=None):
    return F.conv2d(x.double(), w.double(), None if b is None else b.double(),
                    padding=(w.shape[2] // 2, w.shape[3] // 2), groups=x.shape[1])


def _close(actual, expected, dtype, what):
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual.double() - expected).abs().max() / scale
    assert err <= TOL[dtype], f'{what}: relative error {err:.2e} > {TOL[dtype]:.0e}'


def _inputs(shape, kernels, dtype, channels_last, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ws = [(torch.randn(shape[1], 1, *k, generator=g) / (k[0] * k[1]) ** 0.5).to(dtype) for k in kernels]
    return x, ws


def _check_branches(shape, kernels, dtype, channels_last):
    """Fused forward and all gradients against separate float64 F.conv2d branches."""
    x, ws = _inputs(shape, kernels, dtype, channels_last)
    x.requires_grad_()
    for w in ws:
        w.requires_grad_()
    outs = dwconv2d_branches(x, ws, impl='triton')
    assert len(outs) == len(ws)
    x64 = x.detach().double().requires_grad_()
    w64 = [w.detach().double().requires_grad_() for w in ws]
    refs = [_conv64(x64, w) for w in w64]
    for k, (o, r) in enumerate(zip(outs, refs)):
        assert o.dtype == dtype and o.shape == r.shape
        assert o.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        _close(o, r, dtype, f'forward branch {k} {tuple(ws[k].shape[2:])}')
    gs = [torch.randn(r.shape, generator=torch.Generator().manual_seed(1)).to(dtype) for r in refs]
    grads = torch.autograd.grad(outs, [x, *ws], gs)
    grads64 = torch.autograd.grad(refs, [x64, *w64], [g.double() for g in gs])
    _close(grads[0], grads64[0], dtype, 'input gradient')
    for k, (a, r) in enumerate(zip(grads[1:], grads64[1:])):
        assert a.dtype == dtype and a.shape == ws[k].shape
        _close(a, r, dtype, f'weight gradient {k} {tuple(ws[k].shape[2:])}')


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('shape,kernel', [
    ((2, 5, 9, 13), (7, 3)),      # C=5: not a multiple of any block size
    ((1, 6, 4, 5), (51, 5)),      # map smaller than the kernel (4 rows, 51-tall kernel)
    ((1, 3, 6, 9), (5, 51)),
    ((1, 37, 3, 4), (51, 51)),    # square 51, 37 channels (> one 32-channel block), tiny map
    ((2, 4, 5, 6), (1, 9)),
])
def test_single_kernel_forward_and_gradients_fp32(shape, kernel, channels_last):
    _check_branches(shape, [kernel], torch.float32, channels_last)


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('shape,m,n', [((2, 6, 7, 9), 13, 3), ((1, 37, 5, 6), 51, 5)])
def test_fused_unit_three_branches_fp32(shape, m, n, channels_last):
    """SLaK's M×N, N×M, N×N branches in one pass (the N×N branch shares the M×N branch's loads)."""
    _check_branches(shape, [(m, n), (n, m), (n, n)], torch.float32, channels_last)


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_branches_in_any_order_fp32(channels_last):
    """Kernels are grouped per launch (same orientation and width, the taller first): outputs still come back in the
    caller's order, here the N×N branch first, two tall ones of different heights and a wide one."""
    _check_branches((1, 5, 6, 7), [(3, 3), (9, 3), (3, 11), (5, 3)], torch.float32, channels_last)


def test_launch_plan_shares_loads_where_it_can():
    """SLaK's unit is two launches: the M×N band with the N×N kernel (same width: it reuses the band's input loads)
    and the N×M band on the transposed map; the taller kernel of a pair comes first (its rows cover the other's)."""
    from slak_mm.ops.triton_dwconv import _groups

    def plan(*shapes):
        return _groups([torch.empty(1, 1, *k) for k in shapes])
    assert plan((51, 5), (5, 51), (5, 5)) == [[0, 2], [1]]
    assert plan((5, 5), (5, 51), (51, 5)) == [[2, 0], [1]]
    assert plan((51, 5), (5, 51)) == [[0], [1]]      # deployed bands: one launch each
    assert plan((7, 7)) == [[0]]
    assert plan((3, 9), (3, 11), (9, 3)) == [[1, 0], [2]]  # two wide kernels 3 high pair up (transposed: 11 × 3 first)


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('kernel', [(13, 3), (3, 13)], ids=['tall', 'wide'])
def test_weight_gradient_in_row_chunks(kernel, channels_last):
    """The weight gradient split into the most chunks of output rows (four rows each, the last one shorter: H = 9),
    summed afterwards, equals the float64 reference."""
    from slak_mm.ops.triton_dwconv import _launch_wgrad
    x, (w,) = _inputs((2, 5, 9, 6), [kernel], torch.float32, channels_last)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    w64 = w.double().requires_grad_()
    (ref,) = torch.autograd.grad(_conv64(x, w64), w64, dy.double())
    got = _launch_wgrad(x, dy, kernel, torch.float32, min_programs=10 ** 6)
    _close(got, ref, torch.float32, 'weight gradient, chunked rows')


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_half_precision_within_stated_tolerance(dtype, channels_last):
    _check_branches((2, 6, 7, 9), [(13, 3), (3, 13), (3, 3)], dtype, channels_last)


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_summed_bands_with_bias_equal_merged_cross_kernel(channels_last):
    """Deploy form: tall band + wide band (centre zeroed) + bias == one M×M cross-shaped kernel with bias."""
    m, n, c = 11, 3, 7
    x, (tall, wide) = _inputs((2, c, 8, 10), [(m, n), (n, m)], torch.float32, channels_last)
    lo = (m - n) // 2
    wide[:, :, :, lo:lo + n] = 0
    bias = torch.randn(c)
    cross = F.pad(tall, (lo, lo, 0, 0)) + F.pad(wide, (0, 0, lo, lo))
    x.requires_grad_()
    y = dwconv2d_sum(x, [tall, wide], bias, impl='triton')
    x64 = x.detach().double().requires_grad_()
    ref = _conv64(x64, cross, bias)
    _close(y, ref, torch.float32, 'summed bands')
    g = torch.randn_like(y)
    _close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x64, g.double())[0], torch.float32, 'dx')


def test_bias_gradient_and_single_kernel_api():
    x, (w,) = _inputs((2, 5, 6, 7), [(5, 3)], torch.float32, False)
    b = torch.randn(5, requires_grad=True)
    y = dwconv2d(x, w, b, impl='triton')
    _close(y, _conv64(x, w, b), torch.float32, 'forward with bias')
    g = torch.randn_like(y)
    (db,) = torch.autograd.grad(y, b, g)
    torch.testing.assert_close(db, g.sum((0, 2, 3)), rtol=1e-5, atol=1e-5)


def test_autocast_casts_like_conv2d():
    """Under autocast the Triton path computes in the autocast dtype (as F.conv2d does) and the gradient reaches the
    fp32 parameter in fp32 (bf16 tolerance)."""
    x, (w,) = _inputs((1, 5, 6, 7), [(9, 3)], torch.float32, True)
    w.requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = dwconv2d(x, w, impl='triton')
    assert y.dtype == torch.bfloat16
    xb, wb = x.to(torch.bfloat16), w.detach().to(torch.bfloat16)
    _close(y, _conv64(xb, wb), torch.bfloat16, 'autocast forward')
    g = torch.randn(y.shape)
    (dw,) = torch.autograd.grad(y, w, g.to(torch.bfloat16))
    assert dw.dtype == torch.float32
    w64 = wb.double().requires_grad_()
    _close(dw, torch.autograd.grad(_conv64(xb, w64), w64, g.double())[0], torch.bfloat16, 'autocast weight grad')


def test_padding_only_taps_are_never_read():
    """Kernel rows/columns that can only meet zero padding are skipped, not multiplied by zero: NaNs placed there
    do not reach the output (F.conv2d would return NaN everywhere), and the result equals the clipped kernel's."""
    x, (w,) = _inputs((1, 4, 3, 5), [(15, 13)], torch.float32, True)
    poisoned = w.clone()
    poisoned[:, :, :5] = float('nan')    # rows 0-4: offsets -7..-3, beyond the 3-row map
    poisoned[:, :, :, -2:] = float('nan')  # columns 11-12: offsets +5, +6, beyond the 5-column map
    y = dwconv2d(x, poisoned, impl='triton')
    assert torch.isfinite(y).all()
    _close(y, _conv64(x, w[:, :, 5:10, 2:11]), torch.float32, 'clipped')


def test_large_kernel_module_triton_matches_torch_path():
    """LargeKernelConv with conv_impl='triton' (fused unit, training-mode BN; eval; deployed two-band form) gives
    the torch path's outputs and gradients."""
    from slak_mm.models.layers import LargeKernelConv
    torch.manual_seed(0)
    ref = LargeKernelConv(6, 13, 3, dict(type='BN'), conv_impl='torch')
    tri = LargeKernelConv(6, 13, 3, dict(type='BN'), conv_impl='triton')
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 7, 9).contiguous(memory_format=torch.channels_last)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1), tri(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
    for (name, p1), p2 in zip(ref.named_parameters(), tri.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(tri.tall.bn.running_var, ref.tall.bn.running_var)  # BN saw the same branch outputs
    ref.eval()
    tri.eval()
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(tri(x), expected, rtol=1e-4, atol=1e-5)
        tri.switch_to_deploy()
        torch.testing.assert_close(tri(x), expected, rtol=1e-4, atol=1e-5)


def test_hooked_branches_run_module_by_module_under_triton():
    """Forward hooks on a branch (the FLOP counter's) make the Triton module call every branch module, so hook-based
    tools count the same convs whatever conv_impl is."""
    from slak_mm.models.layers import LargeKernelConv
    m = LargeKernelConv(4, 7, 3, dict(type='BN'), conv_impl='triton')
    seen = []
    for b in m.branches():
        b.conv.register_forward_hook(lambda mod, i, o: seen.append(tuple(mod.weight.shape[2:])))
    y = m(torch.randn(1, 4, 5, 6))
    assert sorted(seen) == [(3, 3), (3, 7), (7, 3)] and y.shape == (1, 4, 5, 6)


def test_backbone_with_triton_matches_torch():
    from conftest import TINY_ARCH
    from slak_mm.models import SLaK
    torch.manual_seed(0)
    a = SLaK(arch=TINY_ARCH, kernel_size=[13, 11, 9, 7, 3], conv_impl='torch').eval()
    b = SLaK(arch=TINY_ARCH, kernel_size=[13, 11, 9, 7, 3], conv_impl='triton').eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        for fa, fb in zip(a(x), b(x)):
            torch.testing.assert_close(fb, fa, rtol=1e-4, atol=1e-4)


def test_auto_uses_torch_for_cpu_tensors():
    assert resolve_impl('auto', torch.zeros(1, 2, 3, 3)) == 'torch'
    assert resolve_impl('triton', torch.zeros(1, 2, 3, 3)) == 'triton'  # interpreter (conftest)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv('TRITON_INTERPRET')
    with pytest.raises(ValueError, match='runs on CUDA tensors.*TRITON_INTERPRET=1'):
        dwconv2d(torch.zeros(1, 2, 5, 5), torch.zeros(2, 1, 3, 3), impl='triton')


def test_missing_triton_is_a_clear_error(monkeypatch):
    import slak_mm.models.slak as slak_module
    import slak_mm.ops.dwconv as dw
    monkeypatch.setattr(dw, 'triton_available', lambda: False)
    monkeypatch.setattr(slak_module, 'triton_available', lambda: False)
    with pytest.raises(ImportError, match='triton package'):
        dwconv2d(torch.zeros(1, 2, 5, 5), torch.zeros(2, 1, 3, 3), impl='triton')
    from conftest import TINY_ARCH
    with pytest.raises(ImportError, match="conv_impl='auto'"):
        slak_module.SLaK(arch=TINY_ARCH, conv_impl='triton')
    assert dw.resolve_impl('auto', torch.zeros(1, 2, 3, 3)) == 'torch'


@pytest.mark.parametrize('call,err,match', [
    (lambda: dwconv2d(torch.zeros(1, 2, 5, 5, dtype=torch.float64), torch.zeros(2, 1, 3, 3, dtype=torch.float64),
                      impl='triton'), TypeError, "impl='torch' for other dtypes"),
    (lambda: dwconv2d(torch.zeros(1, 2, 5, 5), torch.zeros(2, 1, 3, 3, dtype=torch.float16), impl='triton'),
     TypeError, 'dtypes differ'),
    (lambda: dwconv2d_branches(torch.zeros(1, 2, 5, 5), [torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 4, 3)],
                               impl='triton'), ValueError, 'odd'),
])
def test_triton_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_backbone_rejects_unknown_conv_impl():
    from conftest import TINY_ARCH
    from slak_mm.models import SLaK
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        SLaK(arch=TINY_ARCH, conv_impl='cutlass')


_COMPILE = r"""
import sys
sys.path.insert(0, 'tools')
from triton_sass_stats import compile_cubin
from slak_mm.ops import triton_dwconv as T

def build(fn, ptrs, constexprs):
    for arch in (90, 80):
        assert compile_cubin(fn, ptrs, constexprs, arch=arch).asm['cubin'], f'no sm_{arch} cubin'
    return 2

n = 0
for dtype in ('fp32', 'bf16', 'fp16'):
    ptrs = {name: '*' + dtype for name in T._dw_rows_kernel.arg_names if name.endswith('_ptr')}
    ptrs.update(w0_ptr='*fp32', w1_ptr='*fp32', part_ptr='*fp32')  # padded float32 weights, float32 partial sums
    for consts in (dict(NK=2, SAME_X=True, SUM=False, PARTIAL_IN=False, HAS_BIAS=False, BLOCK_W=32, BLOCK_C=32),
                   dict(NK=2, SAME_X=False, SUM=True, PARTIAL_IN=False, HAS_BIAS=False, BLOCK_W=8, BLOCK_C=128),
                   dict(NK=1, SAME_X=True, SUM=True, PARTIAL_IN=True, HAS_BIAS=True, BLOCK_W=32, BLOCK_C=32),
                   dict(NK=1, SAME_X=True, SUM=False, PARTIAL_IN=False, HAS_BIAS=False, BLOCK_W=16, BLOCK_C=64)):
        n += build(T._dw_rows_kernel, ptrs, consts)
    wptrs = {'x_ptr': '*' + dtype, 'dy_ptr': '*' + dtype, 'part_ptr': '*fp32'}
    for consts in (dict(BLOCK_W=16, BLOCK_C=32), dict(BLOCK_W=4, BLOCK_C=128)):
        n += build(T._dw_wgrad_kernel, wptrs, consts)
print('compiled', n)
"""


def test_kernels_compile_for_h100_and_a100_without_a_gpu():
    """The interpreter accepts some code the GPU compiler rejects: build every kernel variant (forward: two kernels
    sharing loads, summed with separate inputs, one kernel with bias and partial sum, one alone; weight-gradient;
    fp32/bf16/fp16) to sm_90 (H100) and sm_80 (A100) cubins with Triton's bundled ptxas. A subprocess,
    because this process defined the kernels for the interpreter."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET='0')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, '-c', _COMPILE], env=env, cwd=root, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'compiled 36' in proc.stdout


def test_compiled_inner_loops_reuse_each_load(tmp_path):
    """The point of the kernels' register blocking, checked on their sm_90 machine code (tools/triton_sass_stats.py,
    no GPU needed): each global load in the hottest inner loop feeds several FMAs (one per FMA before the blocking:
    0.9 products per load, docs/benchmarks.md), and nothing spills to local memory."""
    import json
    import os
    import subprocess
    import sys
    out = tmp_path / 'sass.json'
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, 'tools/triton_sass_stats.py', '--dtype', 'bf16', '--json', str(out)],
                          cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r['variant']: r for r in json.loads(out.read_text())['rows']}
    assert rows['forward: one band']['ffma_per_ldg'] >= 2.5
    assert rows['forward: M×N + N×N from the same loads']['ffma_per_ldg'] >= 3.5
    assert rows['weight gradient']['ffma_per_ldg'] >= 1.9
    assert all(r['local_bytes'] == 0 for r in rows.values())

