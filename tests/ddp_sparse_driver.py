"""torchrun driver: 2-rank CPU training with SparseTrainingHook; writes each rank's mask checksum.

    torchrun --nproc_per_node=2 tests/ddp_sparse_driver.py DATA_ROOT WORK_DIR [--diverge]
"""
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402

from helpers import ROOT, find_hook, sparse_cfg_options  # noqa: E402
from slak_mm.apis import build_runner, load_config  # noqa: E402
from slak_mm.env import finish_distributed  # noqa: E402
from slak_mm.sparse import mask_checksum  # noqa: E402


def main():
    data_root, work_dir = sys.argv[1], sys.argv[2]
    diverge = '--diverge' in sys.argv
    rank = int(os.environ['RANK'])
    hook = dict(type='slak_mm.SparseTrainingHook', init='ERK', grow='random', update_interval=1, prune_rate=0.3,
                seed=rank if diverge else 0)
    cfg = load_config(os.path.join(ROOT, 'configs/demo/upernet_slak_demo.py'),
                      sparse_cfg_options(data_root, 3, [hook]), work_dir=work_dir, launcher='pytorch')
    runner = build_runner(cfg, launcher='pytorch')
    broadcasts = []
    real = dist.broadcast

    class CountBroadcasts(Hook):
        priority = 'HIGHEST'  # before SparseTrainingHook.before_train (mmengine's own weight sync is earlier)

        def before_train(self, runner):
            dist.broadcast = lambda t, *a, **k: (broadcasts.append((t.dtype, tuple(t.shape))), real(t, *a, **k))[1]

    runner.register_hook(CountBroadcasts())
    runner.train()
    sparse = find_hook(runner, 'SparseTrainingHook')
    mask_shapes = {tuple(m.shape) for m in sparse.masks.masks.values()}
    sent_masks = [b for b in broadcasts if b[0] == torch.bool or b[1] in mask_shapes]
    with open(os.path.join(work_dir, f'rank{rank}.txt'), 'w') as f:
        f.write(f'{int(mask_checksum(sparse.masks.masks))} {sparse.updates} {len(sent_masks)}\n')
    finish_distributed()


if __name__ == '__main__':
    main()
