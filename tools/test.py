"""Evaluate a checkpoint on a config's test set (segmentation mIoU or detection mAP).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--show-dir DIR] [--cfg-options k=v ...]
                                           [--launcher {none,pytorch,slurm,mpi}]
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import DictAction  # noqa: E402

from slak_mm.apis import build_runner, load_config  # noqa: E402
from slak_mm.env import finish_distributed  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test a SLaK segmentor or detector')
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', help='checkpoint file (slak_mm / mmengine format)')
    parser.add_argument('--work-dir', help='directory for logs and metrics')
    parser.add_argument('--show-dir', help='save images with predictions drawn to this directory')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, help='override config settings, key=value')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main() -> None:
    args = parse_args()
    if not osp.isfile(args.checkpoint):
        raise SystemExit(f'checkpoint {args.checkpoint} does not exist')
    cfg = load_config(args.config, args.cfg_options, work_dir=args.work_dir, launcher=args.launcher,
                      splits=('test_dataloader',))
    cfg.load_from = args.checkpoint
    if args.show_dir:
        vis = cfg.default_hooks.get('visualization')
        if vis is None:
            raise SystemExit('--show-dir: the config has no default_hooks.visualization to draw with')
        vis.draw = True
        vis.interval = 1
        if 'show_dir' in vis or cfg.default_scope == 'mmseg':
            cfg.visualizer.setdefault('save_dir', args.show_dir)
        vis.setdefault('test_out_dir', osp.abspath(args.show_dir))
    runner = build_runner(cfg, launcher=args.launcher)
    runner.test()
    finish_distributed()


if __name__ == '__main__':
    main()
