"""Convert an official SLaK ImageNet checkpoint into a standard mm checkpoint for ``init_cfg`` / ``load_from``.

    python tools/convert_slak_checkpoint.py SRC DST [--ema]

Reads SRC safely (weights_only), maps every naming era (LoRA1/LoRA2, Decom1/Decom2, lkb_origin; ``module.``
prefixes) to slak_mm's keys, drops the ImageNet head and final norm, and writes ``{'state_dict': {'backbone.*': ...},
'meta': {...}}`` with tensors only. Use it as ``init_cfg=dict(type='Pretrained', checkpoint=DST, prefix='backbone.')``.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402

from slak_mm.models.checkpoint import (CheckpointError, convert_slak_state_dict, describe_state_dict,  # noqa: E402
                                       extract_state_dict, load_checkpoint_file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='official checkpoint (.pth)')
    parser.add_argument('dst', help='output path')
    parser.add_argument('--ema', action='store_true', help='take the model_ema weights instead of model')
    args = parser.parse_args()
    try:
        sd, ignored = convert_slak_state_dict(extract_state_dict(load_checkpoint_file(args.src), use_ema=args.ema))
    except CheckpointError as e:
        raise SystemExit(f'error: {e}')
    info = describe_state_dict(sd)
    if info['layout'] is None:
        raise SystemExit(f'error: {args.src} is not a SLaK checkpoint (no large-kernel tensors found)')
    torch.save(dict(state_dict={'backbone.' + k: v.contiguous() for k, v in sd.items()},
                    meta=dict(source=osp.basename(args.src), ema=args.ema, **{k: v for k, v in info.items()})),
               args.dst)
    print(f'wrote {args.dst}: {len(sd)} backbone tensors ({info["layout"]}, depths {info["depths"]}, widths '
          f'{info["dims"]}, kernel_size {info["kernels"] + [info["short_edge"]]}); skipped {len(ignored)} '
          f'head/norm tensors')


if __name__ == '__main__':
    main()
