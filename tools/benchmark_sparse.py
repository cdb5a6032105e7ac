"""Cost of SparseTrainingHook in a training iteration of a reduced SLaK + UperNet (the demo model) on this device.

    python tools/benchmark_sparse.py [--iters 20] [--batch 4] [--json results.json]

Times real ``train_step`` calls (forward, backward, AdamW step) on the built-in ADE20K-format data, alternating
iterations with and without the hook's optimizer post-step (mask application: all a non-update iteration adds),
and times one prune-and-regrow update separately.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import sys
import time

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--iters', type=int, default=20, help='iterations per variant')
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--json', default='work_dirs/benchmarks/sparse_hook.json')
    args = parser.parse_args()
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.runner import Runner

    from slak_mm.apis import load_config
    from slak_mm.benchmark_utils import device_name
    from slak_mm.datasets import make_ade20k
    from slak_mm.engine import SparseTrainingHook
    from slak_mm.sparse import SparseMasks, select_parameters

    root = make_ade20k(osp.join(ROOT, 'data/demo/ade/ADEChallengeData2016'))
    cfg = load_config(osp.join(ROOT, 'configs/demo/upernet_slak_demo.py'),
                      {'train_dataloader.dataset.data_root': root, 'train_dataloader.num_workers': 0,
                       'train_dataloader.persistent_workers': False, 'train_dataloader.batch_size': args.batch,
                       'val_dataloader.dataset.data_root': root, 'test_dataloader.dataset.data_root': root},
                      check_data=False)
    init_default_scope('mmseg')
    model = MODELS.build(cfg.model)
    model.init_weights()
    wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    batches = [b for _, b in zip(range(4), loader)]

    hook = SparseTrainingHook(init='uniform', update_interval=10 ** 9)
    hook.masks = SparseMasks(select_parameters(model, 'backbone'))
    hook.masks.init('uniform', 0.4, dense_threshold=1.01)
    masked = sum(m.numel() for m in hook.masks.masks.values())

    times = {'plain': [], 'hook': []}
    for i in range(2 * args.iters + 2):
        variant = 'hook' if i % 2 else 'plain'
        handle = wrapper.optimizer.register_step_post_hook(hook._after_optimizer_step) if variant == 'hook' else None
        t0 = time.perf_counter()
        model.train_step(batches[i % len(batches)], wrapper)
        dt = time.perf_counter() - t0
        if handle is not None:
            handle.remove()
        if i >= 2:  # warm-up
            times[variant].append(dt)
    update = []
    for k in range(3):
        t0 = time.perf_counter()
        hook.masks.prune_and_regrow(0.3, 'random', update_index=k + 1)
        update.append(time.perf_counter() - t0)
    plain, with_hook = statistics.median(times['plain']), statistics.median(times['hook'])
    res = dict(device=device_name(torch.device('cpu')), iters=args.iters, batch=args.batch, masked_params=masked,
               plain_ms=plain * 1e3, hook_ms=with_hook * 1e3, overhead=with_hook / plain - 1,
               update_ms=statistics.median(update) * 1e3, command=' '.join(sys.argv))
    print(f'device: {res["device"]}; {masked / 1e6:.2f} M masked weights; batch {args.batch}')
    print(f'training iteration: {plain * 1e3:.1f} ms without the hook, {with_hook * 1e3:.1f} ms with it '
          f'(non-update iteration overhead {100 * res["overhead"]:+.2f}%, medians of {args.iters})')
    print(f'one prune-and-regrow update (random growth): {res["update_ms"]:.1f} ms')
    os.makedirs(osp.dirname(args.json) or '.', exist_ok=True)
    json.dump(res, open(args.json, 'w'), indent=1)


if __name__ == '__main__':
    main()
