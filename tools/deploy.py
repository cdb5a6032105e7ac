"""Re-parameterise a trained SLaK model for deployment: fold BN and merge each block's branches into one kernel.

    python tools/deploy.py CONFIG CHECKPOINT OUT

OUT is an mm checkpoint of the whole model (segmentor/detector or backbone) whose backbone is in deploy form.
Evaluate it with the same config plus the deploy flag:
    python tools/test.py CONFIG OUT --cfg-options model.backbone.deploy=True
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402
from mmengine.runner import load_checkpoint  # noqa: E402

from slak_mm.apis import load_config  # noqa: E402
from slak_mm.env import trust_local_mmengine_checkpoints  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('checkpoint', help='training-form checkpoint (your own training output)')
    parser.add_argument('out')
    args = parser.parse_args()
    if not osp.isfile(args.checkpoint):
        raise SystemExit(f'error: checkpoint {args.checkpoint} does not exist')
    cfg = load_config(args.config, check_data=False)
    if cfg.model.backbone.get('deploy'):
        raise SystemExit('error: the config already builds the deployed form (model.backbone.deploy=True); '
                         'pass the training-form config')
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    trust_local_mmengine_checkpoints()
    ckpt = load_checkpoint(model, args.checkpoint, map_location='cpu', strict=True)
    model.eval()
    model.backbone.switch_to_deploy()
    meta = dict(ckpt.get('meta', {}), deployed=True)
    torch.save(dict(state_dict=model.state_dict(), meta=meta), args.out)
    n = sum(p.numel() for p in model.backbone.parameters())
    print(f'wrote {args.out}: deployed backbone with {n / 1e6:.2f}M parameters; evaluate with '
          f'--cfg-options model.backbone.deploy=True')


if __name__ == '__main__':
    main()
