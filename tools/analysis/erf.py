"""Effective receptive field of a backbone stage: .npy matrix, heat-map PNG, area ratios; two models side by side.

    python tools/analysis/erf.py CONFIG [CHECKPOINT] (--images DIR | --synthetic N) [--size 1024] [--stage 3]
                                 [--compare CONFIG2 [CHECKPOINT2]] [--thresholds 0.2 0.3 0.5 0.99] --out erf.png

CONFIG is an mmseg/mmdet config with a backbone, or ``timm:MODEL`` (e.g. ``timm:convnext_tiny``, random weights
unless a checkpoint is given) for a baseline. The stage's feature map (not pooled features) is used.
"""
import argparse
import os
import os.path as osp
import sys
from typing import Callable, Iterator, List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from slak_mm.erf import DEFAULT_THRESHOLDS, area_ratios, check_thresholds, erf_map  # noqa: E402

MEAN, STD = torch.tensor([123.675, 116.28, 103.53]), torch.tensor([58.395, 57.12, 57.375])
IMAGE_EXT = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


def load_features(spec: str, checkpoint: Optional[str], stage: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function image batch -> the chosen stage's feature map, from a config's backbone or a timm model."""
    if spec.startswith('timm:'):
        import timm
        model = timm.create_model(spec[5:], pretrained=False, features_only=True, out_indices=(stage,))
        if checkpoint:
            from slak_mm.models.checkpoint import extract_state_dict, load_checkpoint_file
            model.load_state_dict(extract_state_dict(load_checkpoint_file(checkpoint)), strict=False)
        model.eval().requires_grad_(False)  # only the input's gradient is needed
        return lambda x: model(x)[0]
    from mmengine.registry import MODELS, init_default_scope

    from slak_mm.apis import load_config
    cfg = load_config(spec, check_data=False)
    if 'backbone' not in cfg.get('model', {}):
        raise SystemExit(f'error: {spec} has no model.backbone; the ERF tool needs a backbone config '
                         f'(segmentor/detector with a backbone, or timm:MODEL)')
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    bb_cfg = cfg.model.backbone
    bb_cfg.init_cfg = dict(type='Pretrained', checkpoint=checkpoint) if checkpoint and 'SLaK' in bb_cfg.type else None
    bb_cfg.out_indices = (stage,)
    backbone = MODELS.build(bb_cfg)
    if checkpoint:
        if 'SLaK' in bb_cfg.type:
            backbone.init_weights()  # official or converted SLaK weights, safely, with shape checks
        else:
            from mmengine.runner import load_checkpoint
            load_checkpoint(backbone, checkpoint, map_location='cpu', revise_keys=[(r'^backbone\.', '')])
    # only the input's gradient is needed: no weight gradients (a deployed SLaK would otherwise run its merged
    # kernels as dense M×M convs, which give every tap its gradient)
    backbone.eval().requires_grad_(False)
    return lambda x: backbone(x)[0]


def image_batches(images: Optional[str], synthetic: int, size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    if images is not None:
        if not osp.isdir(images):
            raise SystemExit(f'error: --images {images} is not a directory')
        files = sorted(f for f in os.listdir(images) if f.lower().endswith(IMAGE_EXT))
        if not files:
            raise SystemExit(f'error: no images ({", ".join(IMAGE_EXT)}) in {images}')
        from PIL import Image, UnidentifiedImageError
        for f in files:
            try:
                img = Image.open(osp.join(images, f)).convert('RGB').resize((size, size), Image.BICUBIC)
            except (UnidentifiedImageError, OSError) as e:
                raise SystemExit(f'error: {osp.join(images, f)} is not a readable image ({e})')
            t = torch.from_numpy(np.asarray(img, np.float32)).permute(2, 0, 1)
            yield ((t - MEAN[:, None, None]) / STD[:, None, None])[None]
    else:
        g = torch.Generator().manual_seed(seed)
        for _ in range(synthetic):
            yield torch.randn(1, 3, size, size, generator=g)


def save_figure(maps: List[np.ndarray], titles: List[str], out: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(maps), figsize=(5 * len(maps), 4.6), squeeze=False)
    for ax, m, title in zip(axes[0], maps, titles):
        m = np.log10(m + 1)
        im = ax.imshow(m / max(m.max(), 1e-30), cmap='RdYlGn', vmin=0, vmax=1)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('checkpoint', nargs='?')
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument('--images', help='directory of images (e.g. 50 ImageNet validation images)')
    src.add_argument('--synthetic', type=int, help='N random-noise images instead of real ones')
    parser.add_argument('--size', type=int, default=1024)
    parser.add_argument('--stage', type=int, default=3, help='backbone stage (0-3) whose centre output is used')
    parser.add_argument('--compare', nargs='+', metavar=('CONFIG2', 'CHECKPOINT2'))
    parser.add_argument('--thresholds', type=float, nargs='+', default=list(DEFAULT_THRESHOLDS))
    parser.add_argument('--out', default='erf.png')
    args = parser.parse_args()
    try:
        check_thresholds(args.thresholds)
    except ValueError as e:
        raise SystemExit(f'error: {e}')
    runs = [(args.config, args.checkpoint)]
    if args.compare:
        runs.append((args.compare[0], args.compare[1] if len(args.compare) > 1 else None))
    maps, titles = [], []
    for spec, ckpt in runs:
        feats = load_features(spec, ckpt, args.stage)
        m = erf_map(feats, image_batches(args.images, args.synthetic or 0, args.size))
        ratios = area_ratios(m, args.thresholds)
        name = osp.splitext(osp.basename(spec))[0] if not spec.startswith('timm:') else spec
        npy = osp.splitext(args.out)[0] + (f'_{len(maps)}' if len(runs) > 1 else '') + '.npy'
        np.save(npy, m)
        print(f'{name} (stage {args.stage}): ' + ', '.join(f'r({t}) = {r:.4f}' for t, r in ratios.items())
              + f'; matrix {npy}')
        maps.append(m)
        titles.append(f'{name}\n' + ' '.join(f'r{t}={r:.3f}' for t, r in ratios.items()))
    save_figure(maps, titles, args.out)
    print(f'heat map: {args.out}')


if __name__ == '__main__':
    main()
