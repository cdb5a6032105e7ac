"""Per-layer and global density of a checkpoint's backbone weights (and of its saved sparse-training masks).

    python tools/sparsity_report.py CHECKPOINT [--trust-checkpoint] [--all]

Downloaded files are read with weights_only=True; your own mmengine training checkpoints pickle logging objects and
need --trust-checkpoint.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402

from slak_mm.models.checkpoint import (CheckpointError, convert_slak_state_dict, extract_state_dict,  # noqa: E402
                                       load_checkpoint_file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoint')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='your own training checkpoint: allow full unpickling (never for downloaded files)')
    parser.add_argument('--all', action='store_true', help='list every layer (default: the large-kernel summary '
                                                           'per stage plus the 10 sparsest layers)')
    args = parser.parse_args()
    try:
        if args.trust_checkpoint:
            if not osp.isfile(args.checkpoint):
                raise CheckpointError(f'checkpoint {args.checkpoint} does not exist')
            ckpt = torch.load(args.checkpoint, map_location='cpu', weights_only=False)
        else:
            ckpt = load_checkpoint_file(args.checkpoint)
        sd, _ = convert_slak_state_dict(extract_state_dict(ckpt))
    except CheckpointError as e:
        raise SystemExit(f'error: {e}')
    layers = {k: v for k, v in sd.items() if v.dim() in (2, 4) and k.startswith(('stages.', 'downsample_layers.'))}
    if not layers:
        raise SystemExit(f'error: {args.checkpoint} has no SLaK backbone weights')
    rows = [(k, v.numel(), int(v.count_nonzero())) for k, v in layers.items()]
    total, nnz = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f'{args.checkpoint}: {len(rows)} conv/linear weights, {total / 1e6:.2f} M parameters')
    print(f'global density {nnz / total:.4f} (sparsity {1 - nnz / total:.4f}); {nnz / 1e6:.2f} M non-zero')
    shown = rows if args.all else sorted(rows, key=lambda r: r[2] / r[1])[:10]
    print('| layer | numel | density |\n|---|---|---|')
    for k, n, z in shown:
        print(f'| {k} | {n} | {z / n:.4f} |')
    masks = ckpt.get('sparse_training', {}).get('masks') if isinstance(ckpt, dict) else None
    if masks:
        mt, mn = sum(m.numel() for m in masks.values()), sum(int(m.sum()) for m in masks.values())
        print(f'saved sparse-training masks: {len(masks)} layers, mask density {mn / mt:.4f}, optimizer step '
              f'{ckpt["sparse_training"]["step"]}, {ckpt["sparse_training"]["updates"]} updates')


if __name__ == '__main__':
    main()
