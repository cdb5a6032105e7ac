"""`make demo`: train SLaK + UperNet and SLaK + Faster R-CNN on built-in synthetic data, on CPU, in a few minutes.

Generates the data (once, cached), evaluates each freshly initialised model (untrained baseline), trains, evaluates
again with the real IoUMetric / CocoMetric, draws predictions on a validation image, and prints a summary table.
Outputs under work_dirs/demo/: checkpoints, logs, seg_prediction.png, det_prediction.png, summary.json.
"""
import argparse
import json
import os
import os.path as osp
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.hooks import Hook  # noqa: E402

from slak_mm.apis import build_runner, load_config, predict_and_draw  # noqa: E402
from slak_mm.datasets import SEG_CLASSES, make_ade20k, make_coco  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


class RecordValidation(Hook):
    """Validates the initialised model before the first iteration and records every validation's metrics."""
    priority = 'LOWEST'

    def __init__(self) -> None:
        self.history = []

    def before_train(self, runner) -> None:
        runner.val_loop.run()

    def after_val_epoch(self, runner, metrics=None) -> None:
        self.history.append(dict(iter=runner.iter, **(metrics or {})))


def upscaled_copy(image: str, out_dir: str, factor: int = 4) -> str:
    """The synthetic images are tiny; predictions are drawn on an enlarged copy (the test pipeline resizes anyway)."""
    from PIL import Image
    img = Image.open(image)
    path = osp.join(out_dir, 'x{}_'.format(factor) + osp.basename(image))
    img.resize((img.width * factor, img.height * factor), Image.BICUBIC).save(path)
    return path


def run(config: str, work_dir: str, metric: str, out_png: str, cfg_options: dict = None) -> dict:
    cfg = load_config(osp.join(ROOT, config), cfg_options, work_dir=work_dir)
    runner = build_runner(cfg)
    recorder = RecordValidation()
    runner.register_hook(recorder)
    t0 = time.time()
    runner.train()
    wall = time.time() - t0
    untrained, trained = float(recorder.history[0][metric]), float(recorder.history[-1][metric])
    ckpt = osp.join(work_dir, f'iter_{cfg.train_cfg.max_iters}.pth')
    val = cfg.val_dataloader.dataset
    img_dir = osp.join(val.data_root, val.data_prefix.get('img_path', val.data_prefix.get('img', '')))
    image = upscaled_copy(osp.join(img_dir, sorted(os.listdir(img_dir))[0]), work_dir)
    names = SEG_CLASSES if cfg.default_scope == 'mmseg' else None  # ADE ids 1-5 hold the synthetic classes
    predict_and_draw(cfg, ckpt, image, out_png, class_names=names)
    return dict(config=config, metric=metric, untrained=untrained, trained=trained, iters=cfg.train_cfg.max_iters,
                train_and_val_seconds=round(wall, 1), checkpoint=ckpt, prediction_png=out_png)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'demo'))
    args = parser.parse_args()
    os.chdir(ROOT)
    t0 = time.time()
    make_ade20k('data/demo/ade/ADEChallengeData2016')
    make_coco('data/demo/coco')
    results = []
    for config, sub, metric, png in (
            ('configs/demo/upernet_slak_demo.py', 'seg', 'mIoU', 'seg_prediction.png'),
            ('configs/demo/faster_rcnn_slak_demo.py', 'det', 'coco/bbox_mAP', 'det_prediction.png')):
        results.append(run(config, osp.join(args.work_dir, sub), metric, osp.join(args.work_dir, png)))
    total = time.time() - t0
    print('\n================ slak_mm demo (CPU, built-in synthetic data) ================')
    print(f'{"task":<40} {"metric":<14} {"untrained":>10} {"trained":>10} {"iters":>6} {"seconds":>8}')
    for r in results:
        print(f'{r["config"]:<40} {r["metric"]:<14} {r["untrained"]:>10.4g} {r["trained"]:>10.4g} '
              f'{r["iters"]:>6} {r["train_and_val_seconds"]:>8}')
    for r in results:
        print(f'predictions drawn: {r["prediction_png"]}')
    print(f'total wall time: {total:.0f} s')
    json.dump(dict(results=results, total_seconds=round(total, 1)),
              open(osp.join(args.work_dir, 'summary.json'), 'w'), indent=2)


if __name__ == '__main__':
    main()
