"""Correctness of the Triton depthwise kernels on a real GPU at SLaK-T's stage shapes (the CPU tests use Triton's
interpreter on small shapes; this is the device-side counterpart, run before any GPU benchmark).

    python tools/check_triton_gpu.py [--sizes 224 512] [--batch 2] [--json work_dirs/benchmarks/triton_check.json]

For every stage, dtype (fp32, bf16, fp16) and layout (NCHW, channels_last): the fused unit (M×N, N×M, N×N) forward,
input gradient and weight gradients against F.conv2d computed in float64 from the same rounded inputs, plus the
summed deploy bands. Prints the worst relative error per case and exits non-zero if any exceeds the tolerance used
by tests/test_triton_ops.py (fp32 1e-4, fp16 2e-3, bf16 1.6e-2, relative to the largest reference value).
Runs on CPU too (TRITON_INTERPRET=1, --tiny) so the script itself is tested without a GPU.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slak_mm.benchmark_utils import SLAK_T_STAGES, device_name, write_json  # noqa: E402
from slak_mm.ops import dwconv2d_branches, dwconv2d_sum  # noqa: E402

TOL = {'float32': 1e-4, 'float16': 2e-3, 'bfloat16': 1.6e-2}


def rel_err(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def check_case(x, kernels):
    """Worst relative errors of the fused unit (forward, dx, dw) and of the summed bands vs float64 F.conv2d."""
    def conv64(a, k):
        return F.conv2d(a, k.double(), padding=(k.shape[2] // 2, k.shape[3] // 2), groups=a.shape[1])
    xg = x.detach().requires_grad_()
    ws = [k.detach().requires_grad_() for k in kernels]
    outs = dwconv2d_branches(xg, ws, impl='triton')
    x64 = x.detach().double().requires_grad_()
    w64 = [k.detach().double().requires_grad_() for k in kernels]
    refs = [conv64(x64, k) for k in w64]
    gs = [torch.randn_like(r).to(x.dtype) for r in refs]
    got = torch.autograd.grad(outs, [xg, *ws], gs)
    exp = torch.autograd.grad(refs, [x64, *w64], [g.double() for g in gs])
    with torch.no_grad():
        summed = dwconv2d_sum(x, kernels[:2], None, impl='triton')
        ref_sum = conv64(x.double(), kernels[0]) + conv64(x.double(), kernels[1])
    return dict(forward=max(rel_err(o, r) for o, r in zip(outs, refs)), input_grad=rel_err(got[0], exp[0]),
                weight_grad=max(rel_err(a, e) for a, e in zip(got[1:], exp[1:])), summed=rel_err(summed, ref_sum))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', type=int, nargs='+', default=[224, 512])
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--dtypes', nargs='+', default=list(TOL))
    parser.add_argument('--tiny', action='store_true', help='CPU self-test: tiny channel counts and maps')
    parser.add_argument('--json', default='work_dirs/benchmarks/triton_check.json')
    args = parser.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    stages = [(5, 13, 4), (7, 11, 8)] if args.tiny else SLAK_T_STAGES
    sizes = [24] if args.tiny else args.sizes
    print(f'device: {device_name(device)}; torch {torch.__version__}')
    rows, failed = [], 0
    result = dict(device=device_name(device), torch=torch.__version__, rows=rows)
    torch.manual_seed(0)
    for size in sizes:
        for si, (c, m, stride) in enumerate(stages):
            h = w = size // stride
            for dt in args.dtypes:
                dtype = getattr(torch, dt)
                for layout in ('nchw', 'channels_last'):
                    x = torch.randn(args.batch, c, h, w, device=device).to(dtype)
                    if layout == 'channels_last':
                        x = x.contiguous(memory_format=torch.channels_last)
                    kernels = [(torch.randn(c, 1, *k, device=device) / (k[0] * k[1]) ** 0.5).to(dtype)
                               for k in ((m, 5), (5, m), (5, 5))]
                    errs = check_case(x, kernels)
                    ok = max(errs.values()) <= TOL[dt]
                    failed += not ok
                    rows.append(dict(size=size, stage=si, shape=[args.batch, c, h, w], dtype=dt, layout=layout,
                                     ok=ok, **errs))
                    print(f'{size} stage {si} {args.batch}x{c}x{h}x{w} {dt:9s} {layout:13s} ' +
                          ' '.join(f'{k}={v:.1e}' for k, v in errs.items()) + ('  ok' if ok else '  FAIL'),
                          flush=True)
                    write_json(args.json, dict(result, failed=failed, complete=False))
    write_json(args.json, dict(result, failed=failed, complete=True))
    print(f'{failed} of {len(rows)} cases above tolerance; wrote {args.json}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
