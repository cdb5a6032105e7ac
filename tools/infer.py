"""Run a segmentor or detector on one image and save the prediction overlay (mmseg / mmdet visualizers).

    python tools/infer.py CONFIG CHECKPOINT IMAGE [--out out.png]

Works with the demo checkpoints from `make demo`, e.g.
    python tools/infer.py configs/demo/upernet_slak_demo.py work_dirs/demo/seg/iter_300.pth \
        data/demo/ade/ADEChallengeData2016/images/validation/ADE_val_00000000.jpg --out seg.png
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from slak_mm.apis import load_config, predict_and_draw  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('image')
    parser.add_argument('--out', default='out.png')
    args = parser.parse_args()
    if not osp.isfile(args.checkpoint):
        raise SystemExit(f'error: checkpoint {args.checkpoint} does not exist')
    try:
        predict_and_draw(load_config(args.config, check_data=False), args.checkpoint, args.image, args.out)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'error: {e}')
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
