"""Parameters and MACs of a config's backbone and whole model, dense and non-zero.

    python tools/get_flops.py CONFIG [--shape H W] [--checkpoint CKPT]

Dense counts treat every weight as executed; non-zero counts only non-zero weights (how the SLaK paper reports its
sparse models). Without --checkpoint the freshly initialised (dense) model is counted.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402
from mmengine.runner import load_checkpoint  # noqa: E402

from slak_mm.analysis import count_macs  # noqa: E402
from slak_mm.apis import load_config  # noqa: E402
from slak_mm.env import trust_local_mmengine_checkpoints  # noqa: E402


def build(config: str, checkpoint: str = None) -> torch.nn.Module:
    cfg = load_config(config, check_data=False)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    if checkpoint:
        trust_local_mmengine_checkpoints()
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    return model.eval()


def whole_model_forward(model: torch.nn.Module, x: torch.Tensor):
    """The tensor-mode forward of a segmentor or a two-stage detector (RPN proposals included)."""
    if hasattr(model, 'decode_head'):
        return lambda: model._forward(x)
    from mmdet.structures import DetDataSample
    h, w = x.shape[2:]
    sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                                         batch_input_shape=(h, w), scale_factor=(1., 1.)))
    return lambda: model._forward(x, [sample])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('--shape', type=int, nargs=2, default=[224, 224], metavar=('H', 'W'))
    parser.add_argument('--checkpoint', help='count the non-zero weights of this (own, trusted) checkpoint')
    args = parser.parse_args()
    model = build(args.config, args.checkpoint)
    x = torch.randn(1, 3, *args.shape)
    r = count_macs(model, whole_model_forward(model, x), parts=dict(backbone=model.backbone))
    print(f'{args.config} @ {args.shape[0]}x{args.shape[1]}')
    print('| part | params dense | params non-zero | MACs dense | MACs non-zero |')
    print('|---|---|---|---|---|')
    for part in ('backbone', 'model'):
        p = r[part]
        print(f'| {part} | {p["params"] / 1e6:.2f} M | {p["nonzero_params"] / 1e6:.2f} M | '
              f'{p["macs"] / 1e9:.2f} G | {p["nonzero_macs"] / 1e9:.2f} G |')
    print('Dense: every weight executed (what a dense GPU kernel runs). Non-zero: only non-zero weights, as the SLaK '
          'paper counts. Norms/activations are not counted. The reference ImageNet models also count a 1000-way '
          'head (1.0 M params, 1 M MACs).')


if __name__ == '__main__':
    main()
