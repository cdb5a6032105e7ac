"""Summarise a tools/gpu_checks.sh results folder: the issue's GPU targets, met or not, and the tables for
docs/benchmarks.md, from the JSON files alone (nothing is re-measured or estimated).

    python tools/gpu_report.py work_dirs/gpu [--out report.md]

Targets (issue 5, bf16 on H100/H200):
  * the fused depthwise unit, forward + backward, at least 3x faster than the best of ``nn.Conv2d`` NCHW and
    channels_last (three separate branches) at SLaK-T's stage-1 and stage-2 shapes: from dwconv_bf16.json (and
    dwconv_all.json's bf16 rows, a second run), phase fwd_bwd, speed-up = min(nchw ms, cl ms) / ours ms (medians);
  * SLaK-T's training step at most 1/0.6 (1.67x) of ConvNeXt-T's: from backbone_amp.json (bf16 autocast; the fp32
    run is listed too).
A file missing, cut short at its time limit ("complete": false) or without the rows a target needs is reported as
such, never filled in. Runs on CPU outputs too (GPU_CHECKS_SMOKE=1), where the verdicts name the device they came from.
"""
import argparse
import json
import os.path as osp
import sys
from typing import Dict, List, Optional

UNIT_TARGET = 3.0
TRAIN_TARGET = 1 / 0.6
TARGET_STAGES = (1, 2)


def load(folder: str, name: str) -> Optional[dict]:
    path = osp.join(folder, name)
    if not osp.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def status(result: Optional[dict], name: str) -> str:
    if result is None:
        return f'{name}: missing'
    return f"{name}: {'complete' if result.get('complete') else 'cut short (partial rows)'}"


def unit_rows(results: List[Optional[dict]]) -> List[dict]:
    """bf16 fwd_bwd rows at the target stages, each with its speed-up over the faster nn.Conv2d layout."""
    rows = []
    for run, res in enumerate(results):
        for r in (res or {}).get('rows', []):
            if r['dtype'] == 'bfloat16' and r['phase'] == 'fwd_bwd' and r['stage'] in TARGET_STAGES:
                best = min(r['ms']['nchw'], r['ms']['cl'])
                rows.append(dict(r, run=run + 1, speedup_best=best / r['ms']['ours'],
                                 best_baseline='nchw' if r['ms']['nchw'] <= r['ms']['cl'] else 'cl'))
    return rows


def train_rows(result: Optional[dict]) -> List[dict]:
    return [r for r in (result or {}).get('results', []) if r['model'] == 'slak_t' and r.get('train_ratio_vs_base')]


def verdict(ok: bool) -> str:
    return '**met**' if ok else '**not met**'


def report(folder: str) -> str:
    files = ['triton_check.json', 'dwconv_bf16.json', 'backbone_amp.json', 'triton_tiles.json',
             'backbone_fp32.json', 'dwconv_all.json']
    res: Dict[str, Optional[dict]] = {f: load(folder, f) for f in files}
    device = next((r['device'] for r in res.values() if r and r.get('device')), 'unknown device')
    out = [f'# GPU checks on {device}', '', 'Files: ' + '; '.join(status(res[f], f) for f in files) + '.', '']

    check = res['triton_check.json']
    if check:
        worst: Dict[str, float] = {}
        for r in check['rows']:
            err = max(r[k] for k in ('forward', 'input_grad', 'weight_grad', 'summed'))
            worst[r['dtype']] = max(worst.get(r['dtype'], 0.0), err)
        out += [f"Kernel check: {len(check['rows'])} cases, {check['failed']} above tolerance; worst relative error "
                + ', '.join(f'{k} {v:.1e}' for k, v in worst.items()) + '.', '']

    out += ['## Targets', '', '| target | where | measured | verdict |', '|---|---|---|---|']
    units = unit_rows([res['dwconv_bf16.json'], res['dwconv_all.json']])
    for r in units:
        where = f"{r['input']} stage {r['stage']}, {'×'.join(map(str, r['shape']))} (run {r['run']})"
        measured = (f"{r['speedup_best']:.2f}× the faster nn.Conv2d ({r['best_baseline']}); ours "
                    f"({r.get('ours_impl', '?')}) {r['ms']['ours']:.3f} ms, NCHW {r['ms']['nchw']:.3f} ms, "
                    f"channels_last {r['ms']['cl']:.3f} ms")
        out.append(f'| fused unit fwd+bwd ≥ {UNIT_TARGET:.0f}× best nn.Conv2d, bf16 | {where} | {measured} | '
                   f"{verdict(r['speedup_best'] >= UNIT_TARGET)} |")
    if not units:
        out.append('| fused unit fwd+bwd ≥ 3× best nn.Conv2d, bf16 | stages 1–2 | no bf16 fwd_bwd rows | '
                   'not measured |')
    for name, label in (('backbone_amp.json', 'bf16 autocast'), ('backbone_fp32.json', 'fp32')):
        trains = train_rows(res[name])
        for r in trains:
            where = f"{r['size']}, batch {r['batch']}, {label}, depthwise: {res[name].get('dwconv_auto', '?')}"
            measured = (f"{r['train_ratio_vs_base']:.2f}× ConvNeXt-T's step ({r['train_ms']:.1f} ms"
                        + (f", peak {r['peak_train_gib']:.2f} GiB" if r.get('peak_train_gib') else '') + ')')
            out.append(f'| SLaK-T training step ≤ {TRAIN_TARGET:.2f}× ConvNeXt-T | {where} | {measured} | '
                       f"{verdict(r['train_ratio_vs_base'] <= TRAIN_TARGET)} |")
        if not trains:
            out.append(f'| SLaK-T training step ≤ {TRAIN_TARGET:.2f}× ConvNeXt-T | {label} | no slak_t training '
                       'rows | not measured |')

    tiles = res['triton_tiles.json']
    if tiles and any(r.get('ms') for r in tiles['rows']):
        out += ['', f"## Triton tiles (defaults {tiles['defaults']})", '',
                '| input | stage | kernel | fastest tile × warps | vs default |', '|---|---|---|---|---|']
        groups: Dict[tuple, List[dict]] = {}
        for r in tiles['rows']:
            groups.setdefault((r['size'], r['stage'], r['kernel']), []).append(r)
        for (size, stage, kernel), rs in groups.items():
            best = min(rs, key=lambda r: r['ms'])
            out.append(f"| {size} | {stage} | {kernel} | {best['elems']} × {best['warps']} | "
                       f"{best['speedup_vs_default']:.2f}× |")
    if tiles and tiles.get('wrong'):
        out += ['', 'Tile configurations with wrong results: ' + '; '.join(tiles['wrong'])]
    return '\n'.join(out) + '\n'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('folder', help="tools/gpu_checks.sh's $OUT")
    parser.add_argument('--out', help='also write the report here')
    args = parser.parse_args()
    if not osp.isdir(args.folder):
        parser.error(f'{args.folder}: no such folder (run `bash tools/gpu_checks.sh` first; it writes to $OUT)')
    text = report(args.folder)
    print(text, end='')
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
