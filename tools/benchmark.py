"""Backbone benchmark: SLaK vs timm ConvNeXt in the same run, on the same device.

    python tools/benchmark.py [MODEL ...] [--sizes 224 512 800x1344] [--batch N] [--amp | --dtype bfloat16]
                              [--train] [--quick]
                              [--json results.json]

MODEL: slak_t | slak_s | slak_b (training form, conv_impl='auto': the fused Triton unit on CUDA), slak_t_torch
(conv_impl='torch': PyTorch's convolutions), slak_t_deploy (merged kernels), convnext_tiny (timm),
convnext_tiny_fused (timm's ConvNeXt-T with the CPU inference MLP fusion and channels_last weights SLaK's blocks use:
a like-for-like baseline), or a config path (its backbone); any name + '_unfused' runs that model with the CPU
inference fusions off (slak_mm.ops.cpu_fusion: the MLP's and the band sum's), + '_unfused_mlp' or
'_unfused_conv_add' only that one; slak_t_ref (slak_s_ref, slak_b_ref) runs SLaK the reference's way (three
nn.Conv2d + BN branches, no folding or fusion, whole model channels_last); any name + '_compiled' (last) runs that
model through torch.compile (inductor, default mode, static shapes: one graph per input size, compiled on the untimed
warm-up call), + '_frozen' the same with inductor's freezing (``torch._inductor.config.freezing``: weights folded in as
constants, PyTorch's advice for CPU inference).
Default: slak_t slak_t_deploy convnext_tiny, plus convnext_tiny_fused on CPU and slak_t_torch on CUDA. Inputs are
plain NCHW tensors, as a user passes them. Reports inference images/s and time per batch (gradients off), optionally
the training-step time (forward + backward + SGD step), and peak memory on CUDA; ratios are against the last model
listed, measured round-robin in the same run. The inference ratio is the median of the per-repeat ratios (each repeat
times every model back to back), with their 25th–75th percentiles in brackets.
"""
import argparse
import contextlib
import os.path as osp
import sys
import types

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402

from slak_mm.benchmark_utils import (device_name, gpu_batch, medians, paired_ratio, parse_size,  # noqa: E402
                                     size_label, time_interleaved, time_interleaved_samples, write_json)
from slak_mm.models import SLaK  # noqa: E402
from slak_mm.models.layers import LargeKernelConv  # noqa: E402
from slak_mm.ops.cpu_fusion import FUSIONS, cpu_fusions_disabled  # noqa: E402
from slak_mm.ops.dwconv import resolve_impl  # noqa: E402
from slak_mm.ops.fused_mlp import can_fuse_mlp, fused_mlp_residual  # noqa: E402

ARCHS = {'slak_t': 'tiny', 'slak_s': 'small', 'slak_b': 'base'}


class Unfused(torch.nn.Module):
    """Runs the wrapped model with the named CPU inference fusions (all if none) off: same-run A/B of them."""

    def __init__(self, model: torch.nn.Module, fusions=()):
        super().__init__()
        self.model, self.fusions = model, tuple(fusions)

    def forward(self, x):
        with cpu_fusions_disabled(*self.fusions):
            return self.model(x)


class ReferenceExecution(torch.nn.Module):
    """Runs a SLaK backbone the way the reference code does on CPU: every large-kernel module as three separate
    ``nn.Conv2d`` + BatchNorm branches (no BN folding), the MLP unfused, and the whole model channels_last (input
    converted inside the timed call). The issue's "reference, whole model channels_last" configuration, in the same
    run as ours."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        for m in model.modules():
            if isinstance(m, LargeKernelConv):
                if m.deploy:
                    raise ValueError('the _ref suffix needs the training form (three branches), not a deployed model')
                m.forward = types.MethodType(_branch_sum, m)

    def forward(self, x):
        with cpu_fusions_disabled():
            return self.model(x.contiguous(memory_format=torch.channels_last))


class Frozen(torch.nn.Module):
    """torch.compile of the wrapped model with inductor's freezing on while it compiles (the global setting:
    ``torch.compile(..., options={'freezing': True})`` does not freeze, measured with torch 2.14)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.compiled = torch.compile(model, dynamic=False)

    def forward(self, x):
        import torch._inductor.config as inductor_config
        with inductor_config.patch(freezing=True):
            return self.compiled(x)


def _branch_sum(self, x):
    return sum(b(x) for b in self.branches())


def build(name: str, device: torch.device) -> torch.nn.Module:
    if name.endswith('_compiled'):  # compiled on the warm-up call (outside the timings), for each size's own shapes
        return torch.compile(build(name[:-len('_compiled')], device), dynamic=False)
    if name.endswith('_frozen'):
        return Frozen(build(name[:-len('_frozen')], device))
    if name.endswith('_ref'):
        return ReferenceExecution(build(name[:-len('_ref')] + '_torch', device))
    if '_unfused' in name:  # NAME_unfused: every CPU fusion off; NAME_unfused_FUSION (e.g. _unfused_conv_add): one
        base, _, fusion = name.partition('_unfused')
        if fusion and fusion[1:] not in FUSIONS:
            raise ValueError(f'{name}: after _unfused_ name one of {FUSIONS}, e.g. {base}_unfused_{FUSIONS[-1]}')
        return Unfused(build(base, device), [fusion[1:]] if fusion else [])
    if name.endswith('_deploy'):
        model = build(name[:-len('_deploy')], device).eval()
        model.switch_to_deploy()
        return model
    if name in ARCHS:
        return SLaK(ARCHS[name]).to(device)
    if name.endswith('_torch') and name[:-len('_torch')] in ARCHS:
        return SLaK(ARCHS[name[:-len('_torch')]], conv_impl='torch').to(device)
    if osp.isfile(name):
        from mmengine.registry import MODELS, init_default_scope

        from slak_mm.apis import load_config
        cfg = load_config(name, check_data=False)
        init_default_scope(cfg.get('default_scope', 'mmseg'))
        cfg.model.backbone.init_cfg = None
        return MODELS.build(cfg.model.backbone).to(device)
    import timm
    fused = name.endswith('_fused')
    model = timm.create_model(name[:-len('_fused')] if fused else name, pretrained=False, num_classes=0,
                              global_pool='').to(device)
    return fuse_timm_convnext_mlp(model) if fused else model


def fuse_timm_convnext_mlp(model: torch.nn.Module) -> torch.nn.Module:
    """Give timm's ConvNeXt blocks the CPU inference MLP fusion and the channels_last weights SLaK's blocks use
    (slak_mm.ops.fused_mlp), for a like-for-like ratio: part of SLaK-T's CPU speed is these two, which timm's
    ConvNeXt does not do by default."""
    from timm.layers.activations import GELU as TimmGELU
    from timm.models.convnext import ConvNeXtBlock

    def forward(self, x):
        y = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))
        mlp = self.mlp
        if not self.training and can_fuse_mlp(y, mlp.fc1, mlp.act, mlp.fc2):
            return fused_mlp_residual(y, x, mlp.fc1, mlp.act, mlp.fc2, self.gamma)
        y = mlp(y).permute(0, 3, 1, 2)
        if self.gamma is not None:
            y = y.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.drop_path(y) + self.shortcut(x)

    blocks = [m for m in model.modules() if isinstance(m, ConvNeXtBlock)]
    if not blocks or any(b.use_conv_mlp or not isinstance(b.shortcut, torch.nn.Identity) for b in blocks):
        raise ValueError('the _fused suffix needs a timm ConvNeXt with Linear MLPs and identity shortcuts')
    for b in blocks:
        if isinstance(b.mlp.act, TimmGELU):  # timm's wrapper around F.gelu (exact): the same function as nn.GELU()
            b.mlp.act = torch.nn.GELU()
        if not isinstance(b.mlp.act, torch.nn.GELU):
            raise ValueError(f'the _fused suffix needs GELU MLPs, got {type(b.mlp.act).__name__}')
        b.forward = types.MethodType(forward, b)
    # channels_last weights, as SLaK keeps them: activations then stay NHWC, so the fused residual needs no copy.
    return model.to(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='*', default=None)
    parser.add_argument('--sizes', nargs='+', default=['224', '512'], help='N or HxW (e.g. 800x1344)')
    parser.add_argument('--batch', type=int, default=None,
                        help='default: 1 on CPU; 32 (224) / 8 (512) / 2 (larger) on GPU')
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument('--amp', action='store_true', help='bf16 autocast (CPU and GPU)')
    precision.add_argument('--dtype', choices=['float32', 'bfloat16', 'float16'], default='float32',
                           help='the models and the input in this dtype (model.to(dtype), no autocast)')
    parser.add_argument('--train', action='store_true', help='also time a training step')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--quick', action='store_true', help='224 only, 3 repeats')
    parser.add_argument('--json', default='work_dirs/benchmarks/backbone.json')
    args = parser.parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if args.quick:
        args.sizes, args.repeats = ['224'], 3
    try:
        sizes = [parse_size(s) for s in args.sizes]
    except ValueError as e:
        parser.error(str(e))
    dev = device_name(device)
    if not args.models:
        args.models = (['slak_t', 'slak_t_torch', 'slak_t_deploy'] if device.type == 'cuda' else
                       ['slak_t', 'slak_t_deploy', 'convnext_tiny_fused']) + ['convnext_tiny']
    dtype = getattr(torch, args.dtype)
    print(f'device: {dev}; torch {torch.__version__}; {"bf16 autocast" if args.amp else args.dtype}')
    models = {n: build(n, device).to(dtype) for n in args.models}
    base = args.models[-1]
    results = []
    # what conv_impl='auto' (slak_t) runs here: Triton on CUDA tensors when it is installed
    payload = dict(device=dev, torch=torch.__version__, amp=args.amp, dtype=args.dtype, base=base, results=results,
                   dwconv_auto=resolve_impl('auto', torch.empty(1, device=device)),
                   command=' '.join(sys.argv))
    for h, w in sizes:
        size = size_label((h, w))
        batch = args.batch or (1 if device.type == 'cpu' else gpu_batch(h, w))
        x = torch.randn(batch, 3, h, w, device=device, dtype=dtype)
        ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else contextlib.nullcontext

        def infer(m):
            def run():
                with torch.no_grad(), ctx():
                    return m(x)
            return run

        for m in models.values():
            m.eval()
        s_inf = time_interleaved_samples({n: infer(m) for n, m in models.items()}, device, args.repeats)
        t_inf = medians(s_inf)
        r_inf = {n: paired_ratio(s_inf, n, base) for n in models}
        t_train, train_mem = {}, {}
        if args.train:
            opts = {n: torch.optim.SGD(m.parameters(), lr=1e-6) for n, m in models.items() if not n.endswith('deploy')}

            def step(n):
                def run():
                    with ctx():
                        out = models[n](x)
                    loss = sum(o.float().mean() for o in (out if isinstance(out, (tuple, list)) else [out]))
                    loss.backward()
                    opts[n].step()
                    opts[n].zero_grad(set_to_none=True)
                return run
            for n in opts:
                models[n].train()
            t_train = time_interleaved({n: step(n) for n in opts}, device, max(2, args.repeats // 2))
            train_mem = {}
            if device.type == 'cuda':
                for n in opts:
                    torch.cuda.reset_peak_memory_stats(device)
                    step(n)()
                    train_mem[n] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        print(f'\n| model @ {size}, batch {batch} | inference ms/batch | images/s | vs {base} | train step ms | '
              f'vs {base} | peak mem |')
        print('|---|---|---|---|---|---|---|')
        for n in models:
            mem = '–'
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
                infer(models[n])()
                mem = f'{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB (inference)'
                if n in train_mem:
                    mem += f', {train_mem[n]:.2f} GiB (train)'
            tr = t_train.get(n)
            tr_ratio = f'{tr / t_train[base]:.2f}×' if tr and base in t_train else '–'
            ratio, q1, q3 = r_inf[n]
            train_cols = f'{tr * 1e3:.1f} | {tr_ratio}' if tr else '– | –'
            print(f'| {n} | {t_inf[n] * 1e3:.1f} | {batch / t_inf[n]:.1f} | {ratio:.2f}× ({q1:.2f}–{q3:.2f}) | '
                  f'{train_cols} | {mem} |')
            results.append(dict(model=n, size=size, batch=batch, infer_ms=t_inf[n] * 1e3,
                                train_ms=tr * 1e3 if tr else None, ratio_vs_base=ratio, ratio_quartiles=[q1, q3],
                                train_ratio_vs_base=tr / t_train[base] if tr and base in t_train else None,
                                peak_train_gib=train_mem.get(n)))
        write_json(args.json, dict(payload, complete=False))
    write_json(args.json, dict(payload, complete=True))
    print(f'\nwrote {args.json}')


if __name__ == '__main__':
    main()
