"""slak_mm's C++ CPU kernel for dwconv2d_sum in float32 inference (slak_mm/ops/csrc/dwconv_cpu.cpp).

Every result is compared with a float64 F.conv2d sum (independent reference), tolerance 1e-5 of the output's largest
magnitude (float32 accumulation over up to ~520 taps). The kernel is built on first use; on this project's machines
(and CI) a C++ compiler is present, so a failed build fails these tests rather than skipping them.
"""
import contextlib
import os
import platform
import re
import subprocess
import sys
import warnings

import pytest
import torch

from slak_mm.ops import dwconv2d, dwconv2d_sum
from slak_mm.ops import cpu_kernel
from slak_mm.ops.cpu_fusion import cpu_fusions_disabled
from slak_mm.ops.dwconv import cpu_kernel_applies

from dwconv_cases import float64_sum, random_unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _close(out, ref):
    return (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


class KernelCalls:
    """Runs of the C++ kernel since this object was made (``len``) and the kernel shapes of the latest run (after
    clipping to the map), read from the kernel's own counters: dwconv2d_sum reaches it through either entry."""

    def __init__(self):
        self.kernel = cpu_kernel.load_cpu_kernel()
        assert self.kernel is not None, 'the C++ CPU kernel did not build (is g++ installed?)'
        self.start = self.kernel.calls()

    def __len__(self):
        return self.kernel.calls() - self.start

    @property
    def last(self):
        return [tuple(k) for k in self.kernel.last_kernels()]


@pytest.fixture
def kernel_calls():
    return KernelCalls()


def test_kernel_builds_here():
    assert cpu_kernel.load_cpu_kernel() is not None, 'the C++ CPU kernel did not build (is g++ installed?)'


@pytest.mark.parametrize('shape,kernels', [
    ((1, 124, 32, 32), [(51, 5), (5, 51)]),          # SLaK-T stage-0 width (not a multiple of 16), bands clipped
    ((2, 16, 12, 20), [(9, 3), (3, 9), (5, 5)]),      # exact channel block, batch 2 (block-major), three kernels
    ((3, 17, 9, 13), [(7, 3), (3, 11)]),              # one full block + a 1-channel tail, non-square map
    ((1, 5, 3, 2), [(5, 3)]),                         # fewer channels than a block, map smaller than the kernel
    ((2, 33, 1, 1), [(1, 1), (3, 3)]),                # 1×1 map
    ((1, 40, 21, 7), [(13, 5), (5, 13)]),             # tall band on a narrow map (one partial tile per row)
    ((1, 20, 11, 45), [(21, 3), (3, 33), (1, 1)]),    # kernels of three widths, width not a multiple of 8
    ((1, 8, 30, 19), [(15, 15)]),                     # square kernel
    ((1, 20, 18, 16), [(15, 7), (7, 3)]),             # short sides of 7 and 3 (rows run fully unrolled)
    ((2, 20, 32, 33), [(9, 3), (3, 15)]),             # batch pixels >= 2048: jobs run image-major
    ((24, 20, 9, 10), [(7, 3), (3, 9)]),              # the same on a small map (next job's input prefetched)
    ((2, 998, 7, 7), [(13, 5), (5, 13)])])            # SLaK-T stage 3 at 224
@pytest.mark.parametrize('with_bias', [True, False])
@pytest.mark.parametrize('channels_last', [True, False])
def test_kernel_matches_float64_conv(shape, kernels, with_bias, channels_last, kernel_calls):
    x, ws, b = random_unit(shape, kernels, with_bias, channels_last)
    x0 = x.clone()
    with torch.no_grad():
        out = dwconv2d_sum(x, ws, b)
    assert len(kernel_calls) == 1
    h, w = shape[2:]  # taps that only see zero padding are dropped before the kernel runs
    assert kernel_calls.last == [(min(k[0], 2 * h - 1), min(k[1], 2 * w - 1)) for k in kernels]
    assert out.shape == shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, x0)
    assert _close(out, float64_sum(x, ws, b))


def test_every_tile_width_and_loop_order_matches_float64_conv():
    # The kernel picks 4-8 outputs per register tile (4-7 without AVX-512) from the map and kernel widths, and per
    # tile runs either the taps that reach the map or the map columns its outputs reach (whichever is fewer). Maps
    # 1-40 wide under kernels 1-31 wide run every tile width, partial last tiles and both orders (the second one
    # wherever the map is narrower than the kernel); the tile widths are checked to all occur, so the sweep cannot
    # silently narrow. Maps 5 rows high: on AVX-512 two rows per tile, then the last row alone.
    kernel = cpu_kernel.load_cpu_kernel()
    widths = set()
    with torch.no_grad():
        for w in range(1, 41):
            for kernels in ([(3, 31), (5, 3)], [(1, 13)], [(7, 5), (3, 9), (1, 1)]):
                kernels = [(kh, min(kw, 2 * w - 1)) for kh, kw in kernels]
                x, ws, b = random_unit((1, 17, 5, w), kernels, True, True, seed=w)
                widths.add(kernel.tile_width([k[0] for k in kernels], [k[1] for k in kernels], 5, w))
                out = cpu_kernel.cpu_dwconv_sum(x, ws, b)
                assert _close(out, float64_sum(x, ws, b)), (w, kernels)
    assert widths == set(range(4, kernel.max_tile_width + 1))


def test_tile_width_fits_the_map():
    # tiles of 7 on 7-, 14- and 28-wide maps (no idle outputs), the widest on wide maps
    kernel = cpu_kernel.load_cpu_kernel()
    assert [kernel.tile_width([13, 5], [5, 13], s, s) for s in (7, 14, 28)] == [7, 7, 7]
    assert kernel.tile_width([51, 5], [5, 51], 128, 128) == kernel.max_tile_width
    assert kernel.max_tile_width == (8 if kernel.lanes == 16 else 7)


@pytest.mark.parametrize('shape,kernels,folded', [
    ((2, 40, 7, 7), [(13, 5), (5, 13)], [(4, 9), (5, 5)]),            # SLaK's bands: the tall one's 5 central rows
    ((1, 20, 12, 20), [(9, 3), (3, 9), (5, 5)], [(2, 7), (3, 3), (1, 4)]),  # each offset in its widest kernel
    ((1, 17, 6, 9), [(5, 5), (3, 5), (5, 5)], [(5, 5), (0, 3), (0, 5)]),    # equal widths: the first runs them
    ((1, 24, 2, 3), [(13, 5), (5, 13)], [(3, 3), (0, 3)])])            # both clipped to 3×5: the wide one folds
def test_rows_at_one_offset_run_once_in_the_widest_kernel(shape, kernels, folded, kernel_calls):
    # Kernel rows at the same offset from their kernels' centres are added into the widest of them (the first of equal
    # widths) and run there once, so the deployed cross's N×N centre is not computed twice. Checked: the rows [s0, s1)
    # each kernel left to another (none: kh, kh), and the result against the float64 sum of separate convolutions.
    x, ws, b = random_unit(shape, kernels, True, True)
    with torch.no_grad():
        out = dwconv2d_sum(x, ws, b)
    assert len(kernel_calls) == 1
    assert [tuple(f) for f in kernel_calls.kernel.last_folded_rows()] == folded
    assert _close(out, float64_sum(x, ws, b))


@pytest.mark.parametrize('capability,lanes', [('avx2', 8), ('default', 4)])
def test_builds_for_other_instruction_sets_match_float64_conv(capability, lanes):
    # The kernel is built per instruction set, with one vector of floats per job: 16 on AVX-512, 8 on AVX2, 4 for the
    # compiler's default target (SSE2 on x86-64; NEON on ARM). ATEN_CPU_CAPABILITY makes torch report a lower
    # capability, so this machine builds and runs those variants too: the numerics tests above, in a child process.
    if platform.machine() not in ('x86_64', 'AMD64'):
        pytest.skip('the AVX2 and SSE2 builds are x86-64 only; this machine runs its own build in the tests above')
    if capability == 'avx2' and torch.backends.cpu.get_cpu_capability() not in ('AVX2', 'AVX512'):
        pytest.skip('this CPU has no AVX2')
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    probe = subprocess.run([sys.executable, '-c', 'from slak_mm.ops import cpu_kernel; k = cpu_kernel.load_cpu_kernel(); '
                            'print(cpu_kernel.build_name(), k.lanes, k.max_tile_width)'],
                           env=env, capture_output=True, text=True, cwd=ROOT)
    assert probe.returncode == 0, probe.stderr[-2000:]
    # torch 2.5 reports the default capability on x86 as 'NO AVX'
    isas = [capability] if capability != 'default' else ['default', 'no_avx']
    names = [f'slak_mm_dwconv_cpu_{n}_torch' for n in isas]
    name, *widths = probe.stdout.split()
    assert any(name.startswith(n) for n in names), name
    assert widths == [str(lanes), '7']
    tests = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', __file__, '-k',
                            'matches_float64_conv and not other_instruction_sets or every_tile or fits_the_map '
                            'or strided or thread_count or repadded or rezeroed or one_offset or bf16 or fp16'],
                           env=env, capture_output=True, text=True, cwd=ROOT)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    passed = re.search(r'(\d+) passed', tests.stdout)
    assert passed and int(passed.group(1)) >= 50 and 'skipped' not in tests.stdout, tests.stdout[-500:]


def float64_weight_grad(x, g, kh, kw):
    """d(sum(g * conv(x, w)))/dw of a 'same' depthwise conv with a (C, 1, kh, kw) kernel, by F.conv2d's autograd in
    float64 (independent reference)."""
    w = torch.zeros(x.shape[1], 1, kh, kw, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.conv2d(x.double(), w, padding=(kh // 2, kw // 2), groups=x.shape[1])
    return torch.autograd.grad(y, w, g.double())[0]


@pytest.mark.parametrize('shape,k', [
    ((2, 124, 17, 19), (31, 5)),   # SLaK-T stage-0 width (7 blocks + 12 channels), tall band clipped to the map
    ((1, 20, 10, 30), (5, 31)),    # wide band: tiles of 7 or 8 columns, the last one past the kernel
    ((2, 16, 7, 7), (13, 5)),      # SLaK-T stage 3 at 224: kernel rows past the map both ways
    ((3, 17, 8, 8), (15, 15)),     # square kernel, batch 3, a 1-channel tail
    ((1, 33, 12, 5), (5, 9)),      # map narrower than the kernel
    ((2, 9, 5, 40), (3, 49)),
    ((1, 5, 6, 13), (1, 17)),      # one row
    ((2, 40, 3, 4), (5, 5)),
    ((1, 3, 1, 1), (3, 3)),        # 1×1 map
    ((1, 8, 20, 20), (1, 1)),
    ((1, 12, 70, 9), (7, 3))])     # more output rows than a band (32)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_weight_gradient_matches_float64_conv(shape, k, dtype):
    # The training path's weight gradient (dwconv_weight_grad): float32 sums of the products of x and grad_out (read
    # as bfloat16 under CPU autocast), against float64 autograd of F.conv2d on the same (rounded) values, 1e-5 of the
    # largest (measured <= 7e-7).
    torch.manual_seed(1)
    cl = dict(memory_format=torch.channels_last)
    x, g = (torch.randn(shape).to(dtype).contiguous(**cl) for _ in range(2))
    x0, g0 = x.clone(), g.clone()
    calls = cpu_kernel.load_cpu_kernel().wgrad_calls()
    dw = cpu_kernel.cpu_dwconv_weight_grad(x, g, *k)
    assert cpu_kernel.load_cpu_kernel().wgrad_calls() > calls
    assert dw.shape == (shape[1], 1, *k) and dw.dtype == torch.float32 and dw.is_contiguous()
    assert torch.equal(x, x0) and torch.equal(g, g0)
    assert _close(dw, float64_weight_grad(x, g, *k))


def test_weight_gradient_every_tile_matches_float64_conv():
    # Tiles of kw columns up to 8 (4 without AVX-512), wider kernels in tiles of 7 or 8 (3 or 4) with the last one
    # past the kernel, kernel rows in groups (the register budget's) plus single remainder rows, output rows and
    # columns limited to the taps' reach: kernels 1-17 wide and 1-13 high over maps 1-12 wide, float64 reference.
    for w in (1, 2, 3, 5, 8, 12):
        for kh, kw in ((1, 1), (3, 1), (1, 3), (5, 5), (9, 7), (13, 5), (5, 9), (7, 11), (3, 13), (11, 17)):
            torch.manual_seed(w * 100 + kh * 10 + kw)
            x, g = (torch.randn(2, 19, 6, w).contiguous(memory_format=torch.channels_last) for _ in range(2))
            assert _close(cpu_kernel.cpu_dwconv_weight_grad(x, g, kh, kw), float64_weight_grad(x, g, kh, kw)), \
                (w, kh, kw)


@pytest.mark.parametrize('with_bias', [True, False])
def test_training_runs_the_kernels_for_forward_and_both_gradients(kernel_calls, with_bias):
    # A CPU float32 depthwise conv whose weight needs its gradient (SLaK's training-mode branches) runs on the C++
    # kernels: the forward and the input gradient (the flipped kernel over grad_out) as one kernel call each, the
    # weight gradient on dwconv_weight_grad; no oneDNN convolution, no FFT. Each result against float64 F.conv2d
    # autograd, 1e-5 of the largest. Switched off, the same gradients come from the oneDNN / FFT path.
    from slak_mm.ops import dwconv as dwconv_module
    torch.manual_seed(2)
    x = torch.randn(2, 37, 12, 14).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = (torch.randn(37, 1, 31, 5) / 8).requires_grad_()
    b = torch.randn(37, requires_grad=True) if with_bias else None
    params = [x, w] + ([b] if with_bias else [])
    g = torch.randn(2, 37, 12, 14)
    x64, w64, *b64 = (t.detach().double().requires_grad_() for t in params)
    y64 = torch.nn.functional.conv2d(x64, w64, b64[0] if b64 else None, padding=(15, 2), groups=37)
    expected = torch.autograd.grad(y64, [x64, w64, *b64], g.double())
    wgrad = kernel_calls.kernel.wgrad_calls()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        y = dwconv2d(x, w, b)
        assert len(kernel_calls) == 1 and kernel_calls.last == [(23, 5)]  # clipped to the 12-row map
        got = torch.autograd.grad(y, params, g)
    assert len(kernel_calls) == 2 and kernel_calls.kernel.wgrad_calls() > wgrad
    cl = torch.channels_last
    assert y.is_contiguous(memory_format=cl) and got[0].is_contiguous(memory_format=cl)
    assert _close(y, y64)
    for a, e in zip(got, expected):
        assert a.dtype == torch.float32 and a.shape == e.shape and _close(a, e)
    with cpu_fusions_disabled('dwconv_kernel'):
        y_off = dwconv2d(x, w, b)
    start, wgrad = len(kernel_calls), kernel_calls.kernel.wgrad_calls()
    for a, e in zip(torch.autograd.grad(y_off, params, g), expected):
        assert _close(a, e)
    assert len(kernel_calls) == start and kernel_calls.kernel.wgrad_calls() == wgrad
    assert dwconv_module.cpu_train_kernel_applies(x.detach())
    assert not dwconv_module.cpu_train_kernel_applies(x.detach().contiguous())  # NCHW: the caller converts first
    assert not dwconv_module.cpu_train_kernel_applies(x.detach().double())


@pytest.mark.parametrize('grad', [False, True], ids=['inference', 'training'])
def test_dispatch_modes_and_functorch_get_pytorch_ops_not_the_kernels(kernel_calls, grad):
    # Under FakeTensorMode (fake tensors have no data), FlopCounterMode (it counts the ops it sees) and torch.func
    # transforms, the C++ kernels cannot run: dwconv2d gives PyTorch's convolution there, in inference and training:
    # a fake result of the right shape, the FLOPs F.conv2d counts, torch.func.grad's gradient (float64 reference).
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    F = torch.nn.functional
    torch.manual_seed(4)
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 1, 13, 5)
    with FakeTensorMode() as mode:
        fx, fw = (mode.from_tensor(t).requires_grad_(grad) for t in (x, w))
        y = dwconv2d(fx, fw)
        if grad:
            y.sum().backward()
        assert isinstance(y, FakeTensor) and y.shape == x.shape

    def flops(conv):
        xx, ww = x.clone().requires_grad_(grad), w.clone().requires_grad_(grad)
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad):
            out = conv(xx, ww)
            if grad:
                out.sum().backward()
        return counter.get_total_flops()
    assert flops(dwconv2d) == flops(lambda a, k: F.conv2d(a, k, padding=(6, 2), groups=8)) > 0
    if grad:
        got = torch.func.grad(lambda k: dwconv2d(x, k).square().sum())(w)
        w64 = w.double().requires_grad_()
        F.conv2d(x.double(), w64, padding=(6, 2), groups=8).square().sum().backward()
        assert _close(got, w64.grad)
    assert not kernel_calls


def test_backbone_training_step_on_the_kernels_matches_the_onednn_path(kernel_calls):
    # One training forward + backward of a small SLaK (train-mode BN after each branch, layer scale 1) with the C++
    # kernels and with them off (oneDNN convolutions, FFT / oneDNN weight gradients): every parameter's gradient
    # within 1e-4 of its largest, and the kernels ran for every branch (5 blocks x 3 branches: a forward and an
    # input-gradient call each, one weight-gradient pass per branch).
    model = _small_slak().train()
    x = torch.randn(2, 3, 64, 96)

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(x)
        sum((o * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in out).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    wgrad = kernel_calls.kernel.wgrad_calls()
    on = grads()
    assert len(kernel_calls) == 2 * 15 and kernel_calls.kernel.wgrad_calls() > wgrad
    with cpu_fusions_disabled('dwconv_kernel'):
        off = grads()
    assert on.keys() == off.keys() and any('.large_kernel.' in n for n in on)
    for n in on:
        assert (on[n] - off[n]).abs().max() <= 1e-4 * off[n].abs().max(), n


def test_kernel_takes_strided_inputs_and_channels_last_weights(kernel_calls):
    torch.manual_seed(1)
    x = torch.randn(2, 24, 20, 31)[:, 3:22, :, 5:]  # 19 channels, non-contiguous
    ws = [torch.randn(19, 1, 11, 3).contiguous(memory_format=torch.channels_last), torch.randn(19, 1, 3, 11)]
    with torch.no_grad():
        out = dwconv2d(x, ws[0]) + dwconv2d_sum(x, ws[1:])
    assert len(kernel_calls) == 2
    assert _close(out, float64_sum(x, ws, None))


def test_results_do_not_depend_on_the_thread_count():
    torch.manual_seed(2)
    x = torch.randn(2, 70, 24, 24).contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(70, 1, 21, 5), torch.randn(70, 1, 5, 21)]
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = dwconv2d_sum(x, ws)
            torch.set_num_threads(max(2, threads))
            many = dwconv2d_sum(x, ws)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)  # each job owns its channels: no reduction across threads


def _match_float64_on_one_thread(cases):
    """Each (x, weights, bias) of ``cases`` through dwconv2d_sum on one thread (so every call reuses that thread's
    buffers), checked against the float64 sum."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            for x, ws, b in cases:
                assert _close(dwconv2d_sum(x, ws, b), float64_sum(x, ws, b))
    finally:
        torch.set_num_threads(threads)


def test_reused_buffers_are_repadded_when_the_geometry_changes():
    # Each thread keeps its packing buffer and zeroes the padding only when its layout changes. On one thread
    # every call reuses the same buffer: the second geometry writes map values where the first one's padding was,
    # so the third call (the first geometry again) is wrong unless the padding is zeroed again.
    cases = [random_unit((1, 16, 10, 30), [(5, 21), (9, 3)], True, True, seed=1),
             random_unit((1, 16, 20, 14), [(5, 5)], True, True, seed=2),
             random_unit((1, 16, 10, 30), [(5, 21), (9, 3)], True, True, seed=3),
             random_unit((1, 16, 10, 30), [(5, 13)], True, True, seed=4),  # same map, narrower padding
             # same map and padding, different tile widths (so a different packed row length): 7, then 5 (AVX-512)
             random_unit((1, 16, 10, 20), [(1, 13), (3, 1)], True, True, seed=5),
             random_unit((1, 16, 10, 20), [(9, 13), (3, 1)], True, True, seed=6)]
    kernel = cpu_kernel.load_cpu_kernel()
    widths = [kernel.tile_width([w.shape[2] for w in ws], [w.shape[3] for w in ws], *x.shape[2:])
              for x, ws, _ in cases[-2:]]
    assert widths[0] != widths[1] or kernel.lanes != 16, widths  # the case this test is for
    _match_float64_on_one_thread(cases)


def test_reused_kernel_buffers_are_rezeroed_when_the_layout_changes():
    # Each thread also keeps its re-laid-out kernels and writes their zero taps (T - 1 each side of every row) only
    # when the layout (tile width, kernel sizes) changes; later calls overwrite just the taps. The same 3×9 kernel on a
    # 40-wide map and then on a narrower one with another tile width (AVX-512: 8, then 7 on a 7-wide map) has rows of
    # another length, so the first layout's taps land in the second one's zero taps, which the narrow map reads (its
    # tiles loop over map columns, the kernel being wider than the map).
    kernel = cpu_kernel.load_cpu_kernel()
    wide = kernel.tile_width([3], [9], 4, 40)
    narrow = next(w for w in range(8, 1, -1) if kernel.tile_width([3], [9], 4, w) != wide)
    cases = [random_unit((1, 16, 4, w), [(3, 9)], True, True, seed=s) for s, w in enumerate((40, narrow, 40))]
    _match_float64_on_one_thread(cases)


def test_kept_kernels_of_a_batch_of_small_maps_are_not_reused_by_the_next_call():
    # A batch of small maps (B·H·W >= 2048 pixels, H·W < 512) runs image-major, and each thread keeps every block's
    # re-laid-out kernels for the rest of the call (one slot per block). Calls with the same shapes and new weights
    # must lay them out again, also after a call that used one slot (batch 1) in between.
    shape, kernels = (24, 40, 9, 10), [(7, 3), (3, 9)]
    cases = [random_unit(shape, kernels, True, True, seed=1),
             random_unit(shape, kernels, True, True, seed=2),
             random_unit((1,) + shape[1:], kernels, True, True, seed=3),
             random_unit(shape, kernels, False, True, seed=4)]
    _match_float64_on_one_thread(cases)


def test_kernel_runs_only_for_float32_inference(kernel_calls):
    x = torch.randn(1, 6, 10, 10)
    ws = [torch.randn(6, 1, 7, 3), torch.randn(6, 1, 3, 7)]
    with torch.no_grad():
        assert cpu_kernel_applies(x, ws, None)
        assert not cpu_kernel_applies(x.double(), [w.double() for w in ws], None)
        assert not cpu_kernel_applies(x.bfloat16(), [w.bfloat16() for w in ws], None)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not cpu_kernel_applies(x, ws, None)
        with cpu_fusions_disabled('dwconv_kernel'):
            assert not cpu_kernel_applies(x, ws, None)
        with cpu_fusions_disabled('conv_add'):  # a oneDNN fusion: does not concern the kernel
            assert cpu_kernel_applies(x, ws, None)
    trained = [w.clone().requires_grad_() for w in ws]
    assert not cpu_kernel_applies(x, trained, None)  # the summed call has no backward: training goes kernel by kernel
    out = dwconv2d_sum(x, trained)
    out.sum().backward()  # (the training kernels: test_training_runs_the_kernels_for_forward_and_both_gradients)
    assert all(w.grad is not None for w in trained) and len(kernel_calls) == 2  # one forward each, no input gradient
    start = len(kernel_calls)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        # check_trace=False: the trace check re-runs the function untraced, where the kernel may run
        graph = str(torch.jit.trace(lambda a: dwconv2d_sum(a, ws), x, check_trace=False).graph)
    assert 'aten::_convolution' in graph and len(kernel_calls) == start  # traced / exported graphs stay portable


def test_switching_the_kernel_off_gives_the_onednn_path_and_the_same_result(kernel_calls):
    torch.manual_seed(3)
    x = torch.randn(1, 20, 40, 36).contiguous(memory_format=torch.channels_last)
    ws, b = [torch.randn(20, 1, 31, 5) / 8, torch.randn(20, 1, 5, 31) / 8], torch.randn(20)
    with torch.no_grad():
        ours = dwconv2d_sum(x, ws, b)
        with cpu_fusions_disabled('dwconv_kernel'):
            onednn = dwconv2d_sum(x, ws, b)
    assert len(kernel_calls) == 1
    ref = float64_sum(x, ws, b)
    assert _close(ours, ref) and _close(onednn, ref)


def test_kernel_time_shows_in_the_profiler():
    # a pybind call is invisible to torch.profiler; the kernel names itself so profiles still add up
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(1, 6, 12, 12)
    ws = [torch.randn(6, 1, 7, 3), torch.randn(6, 1, 3, 7)]
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        dwconv2d_sum(x, ws)
    names = [e.name for e in prof.events()]
    assert names.count('slak_mm::dwconv_cpu') == 1 and 'aten::mkldnn_convolution' not in names


def test_env_switch_and_failed_build_fall_back_with_one_clear_warning(monkeypatch):
    x = torch.randn(1, 6, 10, 10)
    ws = [torch.randn(6, 1, 7, 3), torch.randn(6, 1, 3, 7)]
    ref = float64_sum(x, ws, None)
    try:
        cpu_kernel.forget_cpu_kernel()
        monkeypatch.setenv('SLAK_MM_CPU_KERNEL', '0')
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # switched off: no build, no warning
            with torch.no_grad():
                assert not cpu_kernel_applies(x, ws, None)
                assert _close(dwconv2d_sum(x, ws), ref)

        cpu_kernel.forget_cpu_kernel()
        monkeypatch.delenv('SLAK_MM_CPU_KERNEL')

        def no_compiler(verbose=False):
            raise RuntimeError('Error building extension: g++: command not found')
        monkeypatch.setattr(cpu_kernel, 'build_cpu_kernel', no_compiler)
        with pytest.warns(RuntimeWarning, match='C\\+\\+ CPU depthwise kernel.*g\\+\\+: command not found.*'
                                                'falls back to oneDNN: same results.*SLAK_MM_CPU_KERNEL=0') as rec:
            with torch.no_grad():
                out1 = dwconv2d_sum(x, ws)
                out2 = dwconv2d_sum(x, ws)
        assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1  # once, not per call
        assert _close(out1, ref) and torch.equal(out1, out2)
    finally:
        cpu_kernel.forget_cpu_kernel()  # the next test builds / loads the real kernel again


def test_kernel_rejects_what_it_cannot_compute():
    x = torch.randn(1, 4, 8, 8)
    w = torch.randn(4, 1, 3, 3)
    with pytest.raises(RuntimeError, match='channels_last'):
        cpu_kernel.cpu_dwconv_sum(x, [w], None)  # internal entry: the caller converts the layout
    xc = x.contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match='odd kh and kw'):
        cpu_kernel.cpu_dwconv_sum(xc, [torch.randn(4, 1, 4, 3)], None)
    with pytest.raises(RuntimeError, match='float32'):
        cpu_kernel.cpu_dwconv_sum(xc.double(), [w.double()], None)
    with pytest.raises(RuntimeError, match='channels_last'):
        cpu_kernel.cpu_dwconv_weight_grad(x, x, 3, 3)
    with pytest.raises(RuntimeError, match='odd'):
        cpu_kernel.cpu_dwconv_weight_grad(xc, xc, 4, 3)
    with pytest.raises(RuntimeError, match='one shape'):
        cpu_kernel.cpu_dwconv_weight_grad(xc, xc[:, :2], 3, 3)
    with pytest.raises(RuntimeError, match='both float32 or both bfloat16'):
        cpu_kernel.cpu_dwconv_weight_grad(xc, xc.bfloat16(), 3, 3)
    with pytest.raises(RuntimeError, match='both float32 or both bfloat16'):
        cpu_kernel.cpu_dwconv_weight_grad(xc.double(), xc.double(), 3, 3)


def test_build_name_is_per_instruction_set_and_torch_version(monkeypatch):
    name = cpu_kernel.build_name()
    capability = torch.backends.cpu.get_cpu_capability().lower()
    assert name == f"slak_mm_dwconv_cpu_{capability}_torch{re.sub(r'[^0-9a-z]+', '_', torch.__version__.lower())}"
    # every capability torch documents gives its own name that is a valid module name: 'NO AVX' (torch 2.5 on x86
    # without AVX2) once put a bare 'avx' into the compiler's command line, so that build failed
    names = {}
    for capability in ('DEFAULT', 'VSX', 'Z VECTOR', 'NO AVX', 'AVX2', 'AVX512', 'SVE256'):
        monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda c=capability: c)
        names[capability] = cpu_kernel.build_name()
    assert all(n.isidentifier() for n in names.values()), names
    assert len(set(names.values())) == len(names), names
    # each torch version builds in its own directory (torch 2.13 and older hang on the lock file 2.14 leaves)
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'NO AVX')
    versions = {}
    for version in ('2.5.1+cu124', '2.11.0+cu130', '2.14.1+cu130', '2.14.1+cpu', '2.15.0.dev20261201+cu130'):
        monkeypatch.setattr(torch, '__version__', version)
        versions[version] = cpu_kernel.build_name()
    assert versions['2.5.1+cu124'] == 'slak_mm_dwconv_cpu_no_avx_torch2_5_1_cu124'
    assert all(n.isidentifier() for n in versions.values()), versions
    assert len(set(versions.values())) == len(versions), versions


def test_one_call_fast_path_runs_plain_float32_inference(kernel_calls, monkeypatch):
    # Once the kernel is loaded, dwconv2d_sum runs CPU float32 inference through one C++ call (checks, clipping,
    # layout and kernel): the Python path's kernel entry and its oneDNN / torch paths must not run.
    from slak_mm.ops import dwconv as dwconv_module

    def must_not_run(*args, **kwargs):
        raise AssertionError('the fast path did not take this call')
    monkeypatch.setattr(cpu_kernel, 'cpu_dwconv_sum', must_not_run)
    for name in ('_fused_dwconv_sum', '_torch_dwconvs', 'check_dwconv_args'):
        monkeypatch.setattr(dwconv_module, name, must_not_run)
    torch.manual_seed(5)
    x = torch.randn(2, 21, 9, 12)  # NCHW: converted inside
    strided = torch.randn(21, 1, 51, 12)[:, :, :, 3:8]  # a non-contiguous (21, 1, 51, 5) view
    cases = [(x, [strided, torch.randn(21, 1, 5, 51)], torch.randn(21)),
             (x.contiguous(memory_format=torch.channels_last), (torch.randn(21, 1, 3, 3),), torch.randn(42)[::2]),
             (x.requires_grad_(), [torch.randn(21, 1, 7, 1)], None)]  # requires_grad, but no_grad below
    for i, (xi, ws, b) in enumerate(cases):
        with torch.no_grad():
            out = dwconv2d_sum(xi, ws, b)
        assert len(kernel_calls) == i + 1
        assert kernel_calls.last == [(min(w.shape[2], 17), min(w.shape[3], 23)) for w in ws]  # clipped to 9×12
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.requires_grad
        assert _close(out, float64_sum(xi.detach(), ws, b))
    with torch.inference_mode():
        assert _close(dwconv2d_sum(*cases[0]), float64_sum(*cases[0]))


def test_fast_path_hands_everything_else_back(kernel_calls):
    # dwconv_sum_auto returns None (and runs nothing) for any call that is not plain float32 CPU inference (or the
    # same under bfloat16 autocast) with valid arguments; dwconv2d_sum's Python path then raises the clear error or
    # runs the differentiable / traceable / other-dtype path.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    kernel = kernel_calls.kernel
    x, ws, b = random_unit((1, 4, 8, 8), [(5, 3), (3, 5)])

    class Subclass(torch.Tensor):  # may override __torch_function__: only the Python path honours it
        pass

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    bad = {'float64 input': (x.double(), ws, b), 'bfloat16 kernel': (x, [ws[0].bfloat16(), ws[1]], b),
           'float64 bias': (x, ws, b.double()), 'even kernel': (x, [torch.randn(4, 1, 4, 3)], b),
           '(C, 2, kh, kw)': (x, [torch.randn(4, 2, 3, 3)], b), 'channel mismatch': (x, [torch.randn(5, 1, 3, 3)], b),
           '3-D input': (x[0], ws, b), 'empty batch': (x[:0], ws, b), 'bias shape': (x, ws, b[:3]),
           'meta kernel': (x, [ws[0].to('meta')], b), 'no kernels': (x, [], b), 'not a list': (x, ws[0], b),
           'not a tensor': (x, [ws[0], 'w'], b), 'sparse input': (x.to_sparse(), ws, b),
           'trained kernel': (x, [ws[0].clone().requires_grad_(), ws[1]], b),
           'trained input': (x.clone().requires_grad_(), ws, b), 'tensor subclass': (x.as_subclass(Subclass), ws, b)}
    for name, args in bad.items():
        assert kernel.dwconv_sum_auto(*args) is None, name
    with torch.no_grad():
        assert kernel.dwconv_sum_auto(*bad['trained input']) is not None  # no gradient needed: runs
        with torch.autocast('cpu', dtype=torch.float16):  # float16 autocast: the Python path (rounding copies)
            assert kernel.dwconv_sum_auto(x, ws, b) is None
        assert kernel.dwconv_sum_auto(x.bfloat16(), ws, b) is None  # bfloat16 input outside autocast: oneDNN
        with Passthrough():
            assert kernel.dwconv_sum_auto(x, ws, b) is None
        with FakeTensorMode() as mode:
            fake = mode.from_tensor(x)
        assert kernel.dwconv_sum_auto(fake, ws, b) is None
        traced = []
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            torch.jit.trace(lambda a: traced.append(kernel.dwconv_sum_auto(a, ws, b)) or a, x, check_trace=False)
        assert traced == [None]
    assert len(kernel_calls) == 1  # only the 'no gradient needed' call ran
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):  # bfloat16 autocast: runs, as dwconv_sum_bf16
        for xa in (x, x.bfloat16()):
            out = kernel.dwconv_sum_auto(xa, ws, b)
            assert out.dtype == torch.bfloat16
            assert torch.equal(out, kernel.dwconv_sum_bf16(xa.contiguous(memory_format=torch.channels_last), ws, b))
        assert kernel.dwconv_sum_auto(x, [ws[0].bfloat16(), ws[1]], b) is None  # kernels must be float32
    assert len(kernel_calls) == 5


def _rounded(t, dtype):
    return None if t is None else t.to(dtype)


def _assert_rounded_sum(out, x, ws, b, dtype):
    """``out`` against the float64 sum of the operands rounded to ``dtype`` (what autocast's convolutions compute
    before rounding their output), itself rounded to ``dtype``: equal in >= 99.9% of the elements, and nowhere more
    than one rounding step (2^-7 of the value for bfloat16, 2^-10 for float16) plus the float32 partial sums' error
    (1e-6 of the largest output: near zero, in float16's subnormals, that error alone can move the rounding) away."""
    exact = float64_sum(_rounded(x, dtype), [_rounded(w, dtype) for w in ws], _rounded(b, dtype))
    expected = exact.to(dtype)
    assert out.dtype == dtype and out.shape == exact.shape
    step = 2.0 ** (-7 if dtype is torch.bfloat16 else -10)
    assert ((out.double() - expected.double()).abs() <= step * exact.abs() + 1e-6 * exact.abs().max()).all()
    assert (out == expected).double().mean() >= 0.999


@pytest.mark.parametrize('shape,kernels,x_dtype', [
    ((2, 37, 9, 13), [(7, 3), (3, 7), (3, 3)], torch.float32),     # two blocks + a 5-channel tail, batch 2
    ((2, 37, 9, 13), [(7, 3), (3, 7), (3, 3)], torch.bfloat16),    # ... from a bfloat16 input
    ((1, 124, 16, 16), [(51, 5), (5, 51)], torch.float32),         # SLaK-T's width, bands clipped to the map
    ((8, 40, 7, 7), [(13, 5), (5, 13)], torch.bfloat16),           # a batch of small maps (image-major, kept kernels)
])
def test_bf16_autocast_inference_runs_the_kernel_rounding_like_autocast(kernel_calls, shape, kernels, x_dtype):
    """Under CPU bfloat16 autocast, with no gradient needed, dwconv2d_sum runs the C++ kernel: x, the kernels and the
    bias rounded to bfloat16 as autocast rounds a convolution's operands, the products summed in float32, the sum
    rounded once; a bfloat16 channels_last result."""
    x, ws, b = random_unit(shape, kernels, True, True, seed=7)
    x = x.to(x_dtype)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = dwconv2d_sum(x, ws, b)
    assert len(kernel_calls) == 1
    assert out.is_contiguous(memory_format=torch.channels_last)
    _assert_rounded_sum(out, x, ws, b, torch.bfloat16)


def test_bf16_rounding_of_input_and_output_matches_torch():
    """The kernel's own float32 -> bfloat16 rounding (of x as it is read, and of the result) against torch's: a 1×1
    kernel of 1 and no bias returns x rounded; ties to even, infinities, NaN, the largest values, subnormals."""
    kernel = cpu_kernel.load_cpu_kernel()
    one = 1 + 2.0 ** -8  # halfway between two bfloat16 values
    values = torch.tensor([float('nan'), -float('nan'), float('inf'), -float('inf'), 0.0, -0.0, 1.0, one,
                           1 + 3 * 2.0 ** -8, -one, 3.389e38, -3.4e38, 1e-40, -1e-39, 2.0 ** -133])
    values = torch.cat([values, torch.randn(200) * 10.0 ** torch.randint(-30, 30, (200,)).float()])
    x = values.view(1, -1, 1, 1).contiguous(memory_format=torch.channels_last)
    w = torch.ones(x.shape[1], 1, 1, 1)
    out = kernel.dwconv_sum_bf16(x, [w], None)
    expected = x.bfloat16()
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan], expected[~nan])
    assert torch.equal(kernel.dwconv_sum_bf16(expected, [w], None)[~nan], expected[~nan])  # bfloat16 input: exact


def test_bf16_autocast_inference_gives_the_same_result_through_python(kernel_calls, monkeypatch):
    """The first call of a process reaches the kernel through dwconv2d_sum's Python checks (the one-call C++ entry is
    used once the kernel is loaded): the same kernel, the same bits."""
    import slak_mm.ops.dwconv as dwconv_module
    x, ws, b = random_unit((2, 24, 10, 12), [(9, 3), (3, 9)], True, True, seed=5)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        direct = dwconv2d_sum(x, ws, b)
        monkeypatch.setattr(dwconv_module, 'loaded_cpu_kernel', lambda: None)
        through_python = dwconv2d_sum(x, ws, b)
    assert len(kernel_calls) == 2 and torch.equal(direct, through_python)


def test_fp16_autocast_inference_rounds_like_autocast(kernel_calls):
    x, ws, b = random_unit((2, 20, 11, 9), [(9, 3), (3, 9)], True, True, seed=3)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.float16):
        out = dwconv2d_sum(x, ws, b)
    assert len(kernel_calls) == 1
    _assert_rounded_sum(out, x, ws, b, torch.float16)


def test_autocast_inference_takes_the_torch_path_where_the_kernel_does_not_apply(kernel_calls):
    x, ws, b = random_unit((1, 8, 10, 10), [(7, 3), (3, 7)], True, True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        trained = [w.clone().requires_grad_() for w in ws]
        out = dwconv2d_sum(x, trained, b)  # a gradient is needed: kernel by kernel (the training kernels)
        assert len(kernel_calls) == 2
        with torch.no_grad(), cpu_fusions_disabled('dwconv_kernel'):
            off = dwconv2d_sum(x, ws, b)
    assert len(kernel_calls) == 2
    out.float().sum().backward()
    assert all(w.grad is not None and w.grad.dtype == torch.float32 for w in trained)
    bf = torch.bfloat16
    exact = float64_sum(_rounded(x, bf), [_rounded(w, bf) for w in ws], _rounded(b, bf))
    for y in (out, off):  # oneDNN's bfloat16 path rounds each kernel's output before the sum: a looser bound
        assert y.dtype == torch.bfloat16 and (y.double() - exact).abs().max() <= 2e-2 * exact.abs().max()


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('shape,kernels,with_bias', [
    ((2, 37, 9, 13), [(7, 3), (3, 7), (3, 3)], True),    # two blocks + a 5-channel tail, batch 2
    ((1, 124, 16, 16), [(51, 5), (5, 51)], False),       # SLaK-T's width, bands clipped to the map, no bias
    ((8, 40, 7, 7), [(13, 5), (5, 13)], True)])          # a batch of small maps
def test_half_precision_model_inference_runs_the_kernel_rounding_once(kernel_calls, dtype, shape, kernels,
                                                                       with_bias):
    """A bfloat16 / float16 model (x, kernels and bias all in that dtype, no autocast, no gradient needed): the C++
    kernel sums the exact products in float32 and rounds once, so the result is the float64 sum rounded to the dtype
    (>= 99.9% equal, all within one rounding step); oneDNN's path (the kernel off) rounds each band's output and the
    sum again, further from it."""
    x, ws, b = random_unit(shape, kernels, with_bias, True, seed=7)
    x, ws, b = x.to(dtype), [w.to(dtype) for w in ws], _rounded(b, dtype)
    with torch.no_grad():
        out = dwconv2d_sum(x, ws, b)
        assert len(kernel_calls) == 1
        with cpu_fusions_disabled('dwconv_kernel'):
            off = dwconv2d_sum(x, ws, b)
    assert len(kernel_calls) == 1 and out.is_contiguous(memory_format=torch.channels_last)
    _assert_rounded_sum(out, x, ws, b, dtype)
    expected = float64_sum(x, ws, b).to(dtype)
    assert (out == expected).double().mean() >= (off == expected).double().mean()


def test_half_precision_model_inference_leaves_the_kernel_where_it_does_not_apply(kernel_calls):
    """Mixed dtypes (a bfloat16 input with float32 kernels, no autocast: PyTorch's own dtype error, as before), a
    gradient needed, or float16 kernels on a bfloat16 input: the torch path."""
    x, ws, b = random_unit((1, 8, 10, 10), [(7, 3), (3, 7)], True, True)
    xb, wb, bb = x.bfloat16(), [w.bfloat16() for w in ws], b.bfloat16()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match='should be the same|same dtype'):
            dwconv2d_sum(xb, ws, b)
        with pytest.raises(RuntimeError, match='should be the same|same dtype'):
            dwconv2d_sum(xb, [w.half() for w in ws], b.half())
    trained = [w.clone().requires_grad_() for w in wb]
    out = dwconv2d_sum(xb, trained, bb)
    out.float().sum().backward()
    assert not kernel_calls and all(w.grad is not None for w in trained)


def test_bfloat16_backbone_inference_runs_the_kernel(kernel_calls):
    """SLaK converted with .bfloat16(), eval mode: one kernel call per block, outputs within 2e-2 of the largest
    output of the same model in float32 (bfloat16 rounding through 5 blocks measured 0.5-1%)."""
    model, reference = _small_slak().bfloat16(), _small_slak()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = model(x.bfloat16())
        assert len(kernel_calls) == 5
        expected = reference(x)
    for a, b in zip(out, expected):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, rtol=0, atol=2e-2 * b.abs().max().item())


def test_concurrent_callers_get_their_own_results(kernel_calls):
    # the fast path releases the GIL while it computes: two Python threads, different geometries, run at once
    import threading
    cases = [random_unit((2, 40, 9, 15), [(13, 5), (5, 13)], True, True, seed=7),
             random_unit((1, 24, 20, 6), [(7, 3)], False, False, seed=8)]
    refs = [float64_sum(*c) for c in cases]
    errors = []

    def work(i):
        with torch.no_grad():
            for _ in range(20):
                if not _close(dwconv2d_sum(*cases[i]), refs[i]):
                    errors.append(i)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(kernel_calls) == 40


def test_backbone_inference_takes_the_fast_path(kernel_calls, monkeypatch):
    # SLaK's eval (BN-folded) and deployed forwards hand every large-kernel unit to the one-call C++ path
    from slak_mm.ops import dwconv as dwconv_module

    def must_not_run(*args, **kwargs):
        raise AssertionError('a unit left the fast path')
    model = _small_slak()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        monkeypatch.setattr(cpu_kernel, 'cpu_dwconv_sum', must_not_run)
        monkeypatch.setattr(dwconv_module, 'check_dwconv_args', must_not_run)
        start = len(kernel_calls)
        out = model(x)
        assert len(kernel_calls) - start == 5  # one call per block
        model.switch_to_deploy()
        deployed = model(x)
        assert len(kernel_calls) - start == 10
    for a, b, c in zip(ref, out, deployed):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=0, atol=1e-5)


# torch.compile: the compiled model's CPU inference keeps the kernel, as torch.ops.slak_mm.dwconv_sum_cpu.

COMPILE_OP = 'slak_mm.dwconv_sum_cpu'


def _units_if_compile_runs_the_kernel():
    """5 (the small SLaK's blocks) where torch tells torch.compile from torch.export, else 0: torch < 2.7 has no
    torch.compiler.is_exporting, and some later versions' is also true under torch.compile (pytorch#176347); compiled
    graphs there keep oneDNN's convolutions, as before the op existed."""
    is_exporting = getattr(torch.compiler, 'is_exporting', None)
    if is_exporting is None:
        return 0
    torch._dynamo.reset()
    probe = torch.compile(lambda t: t + 1 if is_exporting() else t, backend='eager', fullgraph=True)
    exporting_under_compile = bool(probe(torch.zeros(1)).item())
    torch._dynamo.reset()
    return 0 if exporting_under_compile else 5


@pytest.mark.parametrize('shape,kernels,with_bias,channels_last', [
    ((1, 124, 16, 20), [(51, 5), (5, 51)], True, False),    # SLaK-T stage-0 width, bands clipped to the map
    ((2, 17, 9, 13), [(7, 3), (3, 11)], False, True),      # batch 2, a 1-channel tail, no bias
    ((1, 16, 1, 1), [(13, 5), (5, 13)], True, True)])      # 1×1 map: channels_last strides are ambiguous there
@pytest.mark.parametrize('dtype,x_dtype', [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                           (torch.float16, torch.float16)])
def test_compile_op_matches_the_kernel_and_its_fake(shape, kernels, with_bias, channels_last, dtype, x_dtype,
                                                    kernel_calls):
    """The op torch.compile puts in its graphs: torch.library.opcheck (schema, the fake tensor's shape, dtype and
    strides against the real output's, no aliasing) and the kernel's own result: float32 within 1e-5 of the float64
    sum, the autocast dtypes (and a float16 model) bit-equal to the eager dwconv2d_sum."""
    x, ws, b = random_unit(shape, kernels, with_bias, channels_last)
    x = x.to(x_dtype)
    if x_dtype is torch.float16:  # a float16 model: every operand in float16
        ws, b = [w.half() for w in ws], _rounded(b, torch.float16)
    op = torch.ops.slak_mm.dwconv_sum_cpu
    torch.library.opcheck(op, (x, ws, b, dtype))
    start = len(kernel_calls)
    out = op(x, ws, b, dtype)
    assert len(kernel_calls) > start and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    if dtype is torch.float32:
        assert _close(out, float64_sum(x, ws, b))
    else:  # the eager path's result: under autocast, or as a float16 model
        amp = torch.autocast('cpu', dtype=dtype, enabled=x_dtype is not torch.float16)
        with torch.no_grad(), amp:
            assert torch.equal(out, dwconv2d_sum(x, ws, b))


def _small_slak():
    """A small SLaK in eval mode whose blocks' large-kernel branch counts: layer scale 1 (the default 1e-6 would leave
    each block's output equal to its input to within 1e-6, whatever the unit computed)."""
    from slak_mm.models import SLaK
    torch.manual_seed(0)
    return SLaK(dict(depths=[1, 1, 2, 1], dims=[16, 24, 40, 56]), kernel_size=[31, 29, 27, 13, 5],
                layer_scale_init_value=1.0).eval()


def _dynamo_graph_ops(fn, *args):
    """``fn(*args)`` compiled by dynamo with a backend that records the graphs' calls (and runs them as they are, no
    inductor): (result, names of the called functions / ops)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == 'call_function')
        return gm.forward
    torch._dynamo.reset()
    try:
        return torch.compile(fn, backend=backend)(*args), seen
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize('mode', ['eval', 'deploy', 'bf16_autocast', 'gradients', 'kernel_off'])
def test_compiled_backbone_graph_calls_the_kernel_op_only_where_eager_runs_the_kernel(mode, kernel_calls):
    """Under torch.compile, each large-kernel unit of SLaK's CPU inference is one call of the kernel's op (5 blocks:
    5 calls), in eval and deployed form and under bfloat16 autocast, with the eager model's results; where the eager
    model does not run the kernel (gradients needed, the kernel switched off), neither does the graph."""
    model, x = _small_slak(), torch.randn(1, 3, 64, 96)
    if mode == 'deploy':
        model.switch_to_deploy()
    grad = torch.enable_grad() if mode == 'gradients' else torch.no_grad()
    amp = torch.autocast('cpu', dtype=torch.bfloat16, enabled=mode == 'bf16_autocast')
    off = cpu_fusions_disabled('dwconv_kernel') if mode == 'kernel_off' else contextlib.nullcontext()
    with grad, amp, off:
        ref = model(x)
        out, ops = _dynamo_graph_ops(model, x)
    expected = 0 if mode in ('gradients', 'kernel_off') else _units_if_compile_runs_the_kernel()
    assert sum(COMPILE_OP in name for name in ops) == expected, ops
    for a, b in zip(out, ref):
        # bf16: within 1% of the largest output. Where the graph cannot run the kernel (torch < 2.7, and versions whose
        # is_exporting() is true under compile, e.g. 2.11), its oneDNN fallback rounds each band to bf16 (measured
        # 0.5% on 2.11; 0 where the graph runs the op); a dropped band is off by O(1) (layer scale 1).
        atol = 1e-5 if mode != 'bf16_autocast' else 1e-2 * float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=0, atol=atol)


def test_compiling_before_the_kernel_is_loaded_keeps_one_graph():
    """The first unit torch.compile traces loads (here: builds or loads from the cache) the kernel without tracing
    into the build: one graph, no break, every unit the kernel's op."""
    expected = _units_if_compile_runs_the_kernel()
    cpu_kernel.forget_cpu_kernel()
    model, x = _small_slak(), torch.randn(1, 3, 64, 96)
    try:
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(x)
    finally:
        torch._dynamo.reset()
    assert (cpu_kernel.loaded_cpu_kernel() is not None) == (expected > 0)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == 'call_function']
    assert sum(COMPILE_OP in name for name in ops) == expected


def test_torch_export_keeps_standard_ops():
    """torch.export (an exportable program: no slak_mm op) runs the torch path, even with gradients off, and its
    program gives the eager results."""
    model, x = _small_slak(), torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        program = torch.export.export(model, (x,))
        ops = [str(n.target) for n in program.graph.nodes if n.op == 'call_function']
        assert not [name for name in ops if 'slak_mm' in name] and any('conv2d' in name for name in ops)
        for a, b in zip(program.module()(x), model(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_inductor_compiled_backbone_runs_the_kernel(kernel_calls):
    """The default torch.compile (inductor) of SLaK's CPU inference: the kernel runs once per block per call and the
    outputs equal the eager model's within 1e-5 (the fake tensor's layout is what inductor plans the next ops for)."""
    model, x = _small_slak(), torch.randn(1, 3, 64, 96)
    expected = _units_if_compile_runs_the_kernel()
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            ref = model(x)
            compiled(x)
            start = len(kernel_calls)
            out = compiled(x)
            assert len(kernel_calls) - start == expected
    finally:
        torch._dynamo.reset()
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
