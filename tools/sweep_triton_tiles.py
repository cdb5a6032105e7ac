"""Time the Triton kernels' tile choices (``slak_mm.ops.triton_dwconv.TILES``) at SLaK-T's stage shapes on a GPU.

    python tools/sweep_triton_tiles.py [--sizes 224 512] [--stages 1 2] [--dtype bfloat16] [--repeats 10]
                                       [--json work_dirs/benchmarks/triton_tiles.json]

The defaults were chosen from the sm_90 machine code without a GPU (docs/benchmarks.md, GPU section). For each stage
shape this times the training unit's forward (the M×N, N×M and N×N branches) for each forward tile size and warps
per program, and its three weight gradients for each weight-gradient tile size: milliseconds and the speed-up over
the current defaults, medians of interleaved repeats. Every configuration is first checked against ``F.conv2d`` on
the same inputs (in float64; the kernel check's tolerances), and the script exits non-zero
if one is wrong, so no wrong kernel is timed. Prints a markdown table and writes JSON with the device name.
On CPU (TRITON_INTERPRET=1, --tiny) it checks every configuration on a small shape without timing it, so the
script and the configurations are tested without a GPU.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from slak_mm.benchmark_utils import (SLAK_T_STAGES, device_name, gpu_batch, medians,  # noqa: E402
                                     time_interleaved_samples, write_json)
from slak_mm.ops import dwconv2d_branches  # noqa: E402
from check_triton_gpu import TOL, rel_err  # noqa: E402  (the kernel check's tolerances and error measure)

#: (elements per tile, warps per program) tried for each kernel; the defaults are among them
FORWARD = [(512, 4), (1024, 4), (1024, 8), (2048, 8)]
WGRAD = [(256, 4), (512, 4), (1024, 4), (1024, 8)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', type=int, nargs='+', default=[224, 512])
    parser.add_argument('--stages', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--dtype', default='bfloat16', choices=list(TOL))
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--tiny', action='store_true', help='CPU self-test: tiny channel counts and maps')
    parser.add_argument('--json', default='work_dirs/benchmarks/triton_tiles.json')
    args = parser.parse_args()
    from slak_mm.ops import triton_dwconv as T
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if device.type == 'cpu' and not (args.tiny and T.INTERPRET):
        print('sweep_triton_tiles.py: no CUDA device; on CPU run it with TRITON_INTERPRET=1 and --tiny (self-test)')
        return 1
    dtype = getattr(torch, args.dtype)
    default = dict(T.TILES)
    rows, wrong = [], []
    for size in args.sizes:
        for si in args.stages:
            c, m, stride = SLAK_T_STAGES[si]
            h = w = size // stride
            batch = gpu_batch(size, size) if device.type == 'cuda' else 1
            if args.tiny:
                c, m, h, w = 39 + si, 7, 5, 33  # tiles of every size differ here (33 columns, 40 channels)
            g = torch.Generator(device='cpu').manual_seed(si)
            x = torch.randn(batch, c, h, w, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
            ks = [(torch.randn(c, 1, *k, generator=g) / (k[0] * k[1]) ** 0.5).to(device, dtype)
                  for k in ((m, 5), (5, m), (5, 5))]
            dy = torch.randn(x.shape, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
            ref_dt = torch.float64  # (float32 convs may use TF32 on CUDA)
            xr = x.to(ref_dt).requires_grad_()
            wr = [k.to(ref_dt).requires_grad_() for k in ks]
            refs = [F.conv2d(xr, k, padding=(k.shape[2] // 2, k.shape[3] // 2), groups=c) for k in wr]
            ref_dw = [torch.autograd.grad(r, k, dy.to(ref_dt))[0] for r, k in zip(refs, wr)]
            fns, which = {}, {}
            for phase, configs in (('forward', FORWARD), ('wgrad', WGRAD)):
                for elems, warps in configs:
                    tiles = dict(default, **{phase: elems, 'num_warps': warps})
                    name = f'{phase} {elems}x{warps}'

                    def run(tiles=tiles, phase=phase):
                        T.TILES.update(tiles)
                        with torch.no_grad():
                            if phase == 'forward':
                                return dwconv2d_branches(x, ks, impl='triton')
                            return [T._launch_wgrad(x, dy, k.shape[2:], dtype) for k in ks]
                    got = run()
                    err = max(rel_err(a, r) for a, r in zip(got, refs if phase == 'forward' else ref_dw))
                    if err > TOL[args.dtype]:
                        wrong.append(f'{size} stage {si} {name}: relative error {err:.2e}')
                    fns[name], which[name] = run, (phase, elems, warps, err)
            # (interpreter timings mean nothing: --tiny only checks every configuration)
            ms = {} if args.tiny else medians(time_interleaved_samples(fns, device, args.repeats))
            T.TILES.update(default)
            for name, (phase, elems, warps, err) in which.items():
                base = ms.get(f"{phase} {default[phase]}x{default['num_warps']}")
                rows.append(dict(size=size, stage=si, shape=[batch, c, h, w], kernel=phase, elems=elems, warps=warps,
                                 ms=ms[name] * 1e3 if ms else None,
                                 speedup_vs_default=base / ms[name] if ms else None, rel_err=err,
                                 default=(elems == default[phase] and warps == default['num_warps'])))
    print(f'device: {device_name(device)}, {args.dtype}, defaults {default}')
    print('| input | stage | B×C×H×W | kernel | tile × warps | ms | vs default | rel. error |')
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
        mark = ' (default)' if r['default'] else ''
        timing = f"{r['ms']:.3f} | {r['speedup_vs_default']:.2f}" if r['ms'] is not None else '– | –'
        print(f"| {r['size']} | {r['stage']} | {'×'.join(map(str, r['shape']))} | {r['kernel']} | "
              f"{r['elems']} × {r['warps']}{mark} | {timing} | {r['rel_err']:.1e} |")
    write_json(args.json, dict(device=device_name(device), dtype=args.dtype, defaults=default, rows=rows,
                               wrong=wrong, complete=True))
    for line in wrong:
        print('WRONG:', line)
    return 1 if wrong else 0


if __name__ == '__main__':
    sys.exit(main())
