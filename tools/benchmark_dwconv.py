"""Depthwise large-kernel conv benchmark at SLaK-T's four stage shapes.

    python tools/benchmark_dwconv.py [--sizes 224 512 800x1344] [--batch 1] [--dtypes float32] [--autocast]
                                     [--quick] [--json results.json]

For each stage shape (input size -> stage map, channels, long edge M, short edge N=5), times SLaK's depthwise unit
(the M×N, N×M and N×N branches of one input) for forward, input-gradient, weight-gradient and forward+backward
(both gradients) separately, and ``eval_sum``: the unit as eval mode and the deployed model run it, BN folded into
two bands (M×N with the N×N kernel in its centre, N×M) plus a bias, summed, gradients off:
  ours       slak_mm.ops.dwconv2d_branches, impl='auto', NCHW input (what a user passes; layout handled inside):
             the fused Triton unit on CUDA; on CPU, when a gradient is needed, slak_mm's C++ kernels for the
             forward, the input gradient and the weight gradient (the forward phase, gradients off: oneDNN
             channels_last; SLaK's eval mode runs eval_sum instead).
             eval_sum: dwconv2d_sum on a channels_last input (as inside the backbone); on CPU slak_mm's C++ kernel
             (slak_mm/ops/cpu_kernel.py)
  nchw       three F.conv2d (nn.Conv2d) calls on NCHW (eval_sum: two, added)
  cl         the same calls on a channels_last input
  onednn     (CPU) ours with the C++ kernel off: in eval_sum oneDNN channels_last, the tall band run as a wide one
             over the transposed map, the second band accumulated inside its convolution (sum post-op); in the
             training phases oneDNN's convolutions (NCHW for the last stage's 7×7 maps) with FFT weight gradients for
             kernels of >= 49 taps
and reports GF/s (dense MACs, 3× for forward+backward; for eval_sum the taps of the cross the two bands make,
2·M·N − N² per output: its N×N centre is one set of taps, so counted once) and the fraction of this
machine's fp32 GEMM rate: a 1024³ GEMM is timed in every repeat, in the same shuffled round as the unit, and the
fraction is the median of the per-repeat rate ratios (one GEMM figure at the start of a run moved by up to 1.5×
between runs on a shared VM). The fraction is given twice: for the dense MACs (every tap of every output, as if the
map were infinite; an implementation that skips taps in the zero padding can pass 100% on small maps) and for the
in-map MACs (only the taps that land inside the map: the work any exact implementation must do, so 100% means
running that work at the GEMM's rate). For eval_sum, 'in-map bound' is the in-map fraction of a unit that ran its
in-map work at the GEMM's rate and then read its input and wrote its output as fast as ``torch.relu`` does (timed
as 'pass' in the same shuffled rounds, so in the same cold state): t_arith / (t_arith + t_pass). Only overlapping
memory traffic with arithmetic beats it; weights are not counted, so it is generous. The nchw/ours and cl/ours
speed-ups are medians of per-repeat ratios (each repeat times all three back to back). Prints a markdown table and
writes JSON with the device name. Each sample is one call, right after a different function (cold caches, as inside
a network, where the unit follows the MLP's GEMMs); ``--calls N`` times N back-to-back calls per sample instead
(warm caches, as the 13 ms GEMM is for most of its run), which shows how much of a small unit's time is cold-start.
``--autocast``: for each of --dtypes other than float32 (default: bfloat16), float32 activations and kernels with
every implementation run under ``torch.autocast(dtype=...)``, as a model trained or run with AMP calls them (on CPU:
ours takes float32 weight gradients in training and the C++ kernel with bfloat16 input and output in eval_sum; the
``F.conv2d`` baselines run oneDNN in bfloat16); the dtype column says e.g. 'bfloat16 autocast'.
"""
import argparse
import contextlib
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slak_mm.benchmark_utils import (SLAK_T_STAGES, device_name, gemm_gflops, gpu_batch, medians,  # noqa: E402
                                     paired_ratio, parse_size, size_label, time_interleaved_samples,
                                     write_json)
from slak_mm.models.layers import pad_kernel  # noqa: E402
from slak_mm.ops import dwconv2d_branches, dwconv2d_sum  # noqa: E402
from slak_mm.ops.cpu_fusion import cpu_fusions_disabled  # noqa: E402
from slak_mm.ops.dwconv import resolve_impl  # noqa: E402

SHORT = 5
GEMM_N = 1024  # the fp32 GEMM timed next to the unit in every repeat (% GEMM column)


PHASES = ('forward', 'input_grad', 'weight_grad', 'fwd_bwd', 'eval_sum')


def folded_bands(kernels):
    """(M×N with the N×N kernel added into its centre, N×M): the two bands of the BN-folded / deployed unit."""
    tall, wide, small = kernels
    return [tall + pad_kernel(small, *tall.shape[2:]), wide]


def in_map_taps(size: int, k: int) -> int:
    """Sum over the ``size`` output positions of one dimension of the taps (of ``k``, 'same' padding) that land
    inside the map."""
    return sum(min(o + k // 2, size - 1) - max(o - k // 2, 0) + 1 for o in range(size))


def in_map_macs(batch: int, c: int, h: int, w: int, kernel_shapes) -> int:
    """Multiply-adds of depthwise kernels of ``kernel_shapes`` whose input lands inside an h×w map."""
    return batch * c * sum(in_map_taps(h, kh) * in_map_taps(w, kw) for kh, kw in kernel_shapes)


def cross_in_map_macs(batch: int, c: int, h: int, w: int, m: int, n: int) -> int:
    """In-map multiply-adds of the cross-shaped kernel an M×N and an N×M band make (their shared N×N centre once)."""
    return in_map_macs(batch, c, h, w, [(m, n), (n, m)]) - in_map_macs(batch, c, h, w, [(n, n)])


def make_fns(x: torch.Tensor, kernels, phase: str, autocast: torch.dtype = None):
    """One callable per implementation computing the whole unit (all ``kernels`` on ``x``) for ``phase``; with
    ``autocast``, each runs its forward under ``torch.autocast(dtype=autocast)``."""
    c = x.shape[1]

    def amp():
        return torch.autocast(x.device.type, dtype=autocast) if autocast else contextlib.nullcontext()

    x_cl = x.contiguous(memory_format=torch.channels_last)
    if phase == 'eval_sum':
        bands, bias = folded_bands(kernels), torch.randn(c, device=x.device, dtype=x.dtype)

        def added(a):
            return sum(F.conv2d(a, k, bias if i == 0 else None, padding=(k.shape[2] // 2, k.shape[3] // 2),
                                groups=c) for i, k in enumerate(bands))

        def no_grad(f):
            def run():
                with torch.no_grad(), amp():
                    return f()
            return run

        def onednn():
            with cpu_fusions_disabled('dwconv_kernel'):
                return dwconv2d_sum(x_cl, bands, bias)
        # channels_last input for ours too: inside the backbone the activations already are
        fns = {'ours': no_grad(lambda: dwconv2d_sum(x_cl, bands, bias)), 'nchw': no_grad(lambda: added(x)),
               'cl': no_grad(lambda: added(x_cl))}
        if x.device.type == 'cpu':
            fns['onednn'] = no_grad(onednn)
        return fns

    def separate(a, ks):
        return [F.conv2d(a, k, padding=(k.shape[2] // 2, k.shape[3] // 2), groups=c) for k in ks]

    def kernel_off(a, ks):  # decided in the forward: the backward keeps the oneDNN / FFT path
        with cpu_fusions_disabled('dwconv_kernel'):
            return dwconv2d_branches(a, ks)
    impls = {'ours': lambda a, ks: dwconv2d_branches(a, ks), 'nchw': separate, 'cl': separate}
    inputs = {'ours': x, 'nchw': x, 'cl': x_cl}
    if x.device.type == 'cpu':
        impls['onednn'], inputs['onednn'] = kernel_off, x

    def fn(name):
        a = inputs[name].detach().requires_grad_(phase in ('input_grad', 'fwd_bwd'))
        ks = [k.detach().requires_grad_(phase in ('weight_grad', 'fwd_bwd')) for k in kernels]
        if phase == 'forward':
            def run():
                with torch.no_grad(), amp():
                    return impls[name](a, ks)
            return run
        targets = [a] if phase == 'input_grad' else ks if phase == 'weight_grad' else [a, *ks]
        with amp():
            gs = [torch.ones_like(y) for y in impls[name](a, ks)]

        def step():
            with amp():
                ys = impls[name](a, ks)
            return torch.autograd.grad(ys, targets, gs)
        return step
    return {name: fn(name) for name in impls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', nargs='+', default=['224', '512', '800x1344'], help='N or HxW')
    parser.add_argument('--batch', type=int, default=None, help='default: 8 at 224, 1 otherwise (CPU); 32/8/2 GPU')
    parser.add_argument('--dtypes', nargs='+', default=None, help='default: float32 on CPU; float32 bfloat16 '
                                                                  'float16 on GPU')
    parser.add_argument('--autocast', action='store_true', help='float32 tensors, every implementation under '
                        'torch.autocast(dtype) for each of --dtypes but float32 (default bfloat16)')
    parser.add_argument('--phases', nargs='+', default=list(PHASES), choices=PHASES)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--calls', type=int, default=1, help='back-to-back calls per timed sample (default 1: each '
                                                               'call after a different function, cold caches)')
    parser.add_argument('--quick', action='store_true', help='224 only, batch 2, 3 repeats')
    parser.add_argument('--json', default='work_dirs/benchmarks/dwconv.json')
    args = parser.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if args.calls < 1:
        parser.error(f'--calls must be >= 1, got {args.calls}')
    if args.quick:
        args.sizes, args.batch, args.repeats = ['224'], 2, 3
    try:
        sizes = [parse_size(s) for s in args.sizes]
    except ValueError as e:
        parser.error(str(e))
    dtypes = args.dtypes or (['float32'] if device.type == 'cpu' else ['float32', 'bfloat16', 'float16'])
    if args.autocast:
        dtypes = [d for d in (args.dtypes or ['bfloat16']) if d != 'float32']
        if not dtypes:
            parser.error('--autocast needs a --dtypes entry other than float32 (bfloat16 or float16)')
    gemm = gemm_gflops(device)
    dev = device_name(device)
    ga, gb = torch.randn(GEMM_N, GEMM_N, device=device), torch.randn(GEMM_N, GEMM_N, device=device)
    print(f'device: {dev}; fp32 GEMM (2048^3) at the start of this run: {gemm:.1f} GF/s')
    rows = []
    result = dict(device=dev, torch=torch.__version__, gemm_gflops_fp32=gemm, rows=rows, calls_per_sample=args.calls,
                  command=' '.join(sys.argv))
    print('| input | stage | B×C×H×W | dtype | phase | unit ours (ms) | nchw (ms) | cl (ms) | nchw/ours | cl/ours '
          '| onednn/ours | ours GF/s | % GEMM (dense) | % GEMM (in-map) | in-map bound |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|')
    for h_in, w_in in sizes:
        size = size_label((h_in, w_in))
        batch = args.batch or ((8 if h_in <= 224 else 1) if device.type == 'cpu' else gpu_batch(h_in, w_in))
        for si, (c, m, stride) in enumerate(SLAK_T_STAGES):
            h, w = h_in // stride, w_in // stride
            for dt in dtypes:
                dtype = torch.float32 if args.autocast else getattr(torch, dt)
                label = f'{dt} autocast' if args.autocast else dt
                x = torch.randn(batch, c, h, w, device=device, dtype=dtype)
                x_pass = x.contiguous(memory_format=torch.channels_last)
                kernels = [torch.randn(c, 1, *k, device=device, dtype=dtype) * 0.05
                           for k in ((m, SHORT), (SHORT, m), (SHORT, SHORT))]
                macs = batch * c * h * w * sum(k.shape[2] * k.shape[3] for k in kernels)
                macs_eval = batch * c * h * w * (2 * m - SHORT) * SHORT
                inmap = in_map_macs(batch, c, h, w, [k.shape[2:] for k in kernels])
                inmap_eval = cross_in_map_macs(batch, c, h, w, m, SHORT)  # the folded bands' cross
                for phase in args.phases:
                    fns = make_fns(x, kernels, phase, getattr(torch, dt) if args.autocast else None)
                    if label == 'float32':  # the GEMM rate, timed in every repeat next to the unit (see the docstring)
                        fns['gemm'] = lambda: ga @ gb
                    if phase == 'eval_sum':  # one pass over the activations in the same cache state (see bound below)
                        fns['pass'] = lambda: torch.relu(x_pass)
                    samples = time_interleaved_samples(fns, device, args.repeats, calls=args.calls)
                    total = medians(samples)
                    vs_ours = {k: paired_ratio(samples, k, 'ours')[0] for k in samples
                               if k not in ('ours', 'gemm', 'pass')}
                    times = 3 if phase == 'fwd_bwd' else 1
                    work = macs_eval if phase == 'eval_sum' else macs * times
                    work_in_map = inmap_eval if phase == 'eval_sum' else inmap * times
                    gfs = 2 * work / total['ours'] / 1e9
                    # per repeat: (unit GF/s) / (GEMM GF/s) = work / GEMM work * t_gemm / t_ours
                    gemm_ratio = paired_ratio(samples, 'gemm', 'ours')[0] if label == 'float32' else None
                    frac_gemm = work / GEMM_N ** 3 * gemm_ratio if gemm_ratio else None
                    frac_in_map = work_in_map / GEMM_N ** 3 * gemm_ratio if gemm_ratio else None
                    bound = None
                    if gemm_ratio and 'pass' in total:  # in-map work at the GEMM rate, then one activation pass
                        t_arith = work_in_map / GEMM_N ** 3 * total['gemm']
                        bound = t_arith / (t_arith + total['pass'])
                    row = dict(input=size, stage=si, shape=[batch, c, h, w], dtype=label, phase=phase,
                               ours_impl=resolve_impl('auto', x),  # on CUDA: 'triton' unless Triton is missing
                               ms={k: v * 1e3 for k, v in total.items()}, speedup_vs=vs_ours, gflops_ours=gfs,
                               frac_gemm=frac_gemm, frac_gemm_in_map=frac_in_map, macs=work,
                               macs_in_map=work_in_map, frac_gemm_in_map_bound=bound)
                    rows.append(row)
                    frac = (f'{100 * frac_gemm:.0f}% | {100 * frac_in_map:.0f}%' if label == 'float32'
                            else '– | –')
                    frac += f' | {100 * bound:.0f}%' if bound is not None else ' | –'
                    onednn = f'{vs_ours["onednn"]:.2f}' if 'onednn' in vs_ours else '–'
                    print(f'| {size} | {si} | {batch}×{c}×{h}×{w} | {label} | {phase} | {total["ours"] * 1e3:.2f} | '
                          f'{total["nchw"] * 1e3:.2f} | {total["cl"] * 1e3:.2f} | '
                          f'{vs_ours["nchw"]:.2f} | {vs_ours["cl"]:.2f} | {onednn} | {gfs:.1f} | '
                          f'{frac} |', flush=True)
                    write_json(args.json, dict(result, complete=False))
    write_json(args.json, dict(result, complete=True))
    print(f'wrote {args.json}')


if __name__ == '__main__':
    main()
