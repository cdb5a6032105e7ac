"""Export a config's deployed SLaK backbone (and, where mmseg's ops allow, the whole segmentor) to ONNX.

    python tools/export_onnx.py CONFIG CHECKPOINT OUT.onnx [--shape H W] [--model backbone|segmentor]
                                [--verify]

The backbone is re-parameterised first (``switch_to_deploy``) and exported with dynamic height/width. The UperNet
segmentor's pyramid pooling (adaptive pooling) fixes the input size, so it is exported at --shape (dynamo exporter).
CHECKPOINT may be a training-form or deployed checkpoint of the config's model, or 'none' (random weights, for
testing the export path). --verify runs the file in onnxruntime and compares with PyTorch.
"""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402
from mmengine.runner import load_checkpoint  # noqa: E402

from slak_mm.apis import load_config  # noqa: E402
from slak_mm.env import trust_local_mmengine_checkpoints  # noqa: E402


class SegmentorLogits(torch.nn.Module):
    """Normalised image -> decode-head logits (1/4 resolution), the segmentor's tensor-mode forward."""

    def __init__(self, segmentor: torch.nn.Module):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentor._forward(x)


def build_deployed(config: str, checkpoint: str) -> torch.nn.Module:
    cfg = load_config(config, check_data=False)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    cfg.model.backbone.init_cfg = None
    deployed_ckpt = False
    if checkpoint != 'none':
        trust_local_mmengine_checkpoints()
        meta = torch.load(checkpoint, map_location='cpu', weights_only=False).get('meta', {})
        deployed_ckpt = bool(meta.get('deployed'))
        cfg.model.backbone.deploy = deployed_ckpt
    model = MODELS.build(cfg.model)
    if checkpoint != 'none':
        load_checkpoint(model, checkpoint, map_location='cpu', strict=True)
    model.eval()
    model.backbone.switch_to_deploy()
    return model


def export(model: torch.nn.Module, which: str, out: str, shape) -> torch.nn.Module:
    x = torch.randn(1, 3, *shape)
    if which == 'backbone':
        net = model.backbone
        n = len(net.out_indices)
        names = [f'stage{i}' for i in net.out_indices]
        dynamic = {'input': {0: 'batch', 2: 'height', 3: 'width'}}
        dynamic.update({k: {0: 'batch', 2: f'h{i}', 3: f'w{i}'} for i, k in enumerate(names)})
    else:
        if not hasattr(model, 'decode_head'):
            raise SystemExit('error: --model segmentor needs an mmseg (UperNet) config')
        net, names, dynamic = SegmentorLogits(model), ['logits'], {'input': {0: 'batch'}, 'logits': {0: 'batch'}}
        n = 1
    with torch.no_grad():
        net(x)  # settles deploy-time caches before tracing
        if which == 'backbone':  # TorchScript exporter: dynamic H/W
            torch.onnx.export(net, (x,), out, input_names=['input'], output_names=names, dynamic_axes=dynamic,
                              opset_version=17, dynamo=False)
        else:  # PPM's adaptive pooling at non-divisible sizes exports only through the dynamo exporter
            torch.onnx.export(net, (x,), out, input_names=['input'], output_names=names, dynamo=True)
    print(f'wrote {out} ({which}, {n} output{"s" if n > 1 else ""}, '
          f'{"dynamic H/W" if which == "backbone" else f"input {shape[0]}x{shape[1]}"})')
    return net


def verify(net: torch.nn.Module, out: str, shapes, batch: int) -> float:
    import onnxruntime as ort
    sess = ort.InferenceSession(out, providers=['CPUExecutionProvider'])
    worst = 0.0
    for shape in shapes:
        x = torch.randn(batch, 3, *shape)
        with torch.no_grad():
            ref = net(x)
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        got = sess.run(None, {'input': x.numpy()})
        for a, b in zip(got, ref):
            worst = max(worst, float(np.abs(a - b.numpy()).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config')
    parser.add_argument('checkpoint', help="checkpoint path, or 'none'")
    parser.add_argument('out')
    parser.add_argument('--shape', type=int, nargs=2, default=[512, 512], metavar=('H', 'W'))
    parser.add_argument('--model', choices=['backbone', 'segmentor'], default='backbone')
    parser.add_argument('--verify', action='store_true', help='compare onnxruntime with PyTorch')
    args = parser.parse_args()
    if args.checkpoint != 'none' and not osp.isfile(args.checkpoint):
        raise SystemExit(f'error: checkpoint {args.checkpoint} does not exist')
    model = build_deployed(args.config, args.checkpoint)
    net = export(model, args.model, args.out, args.shape)
    if args.verify:
        h, w = args.shape
        dynamic = args.model == 'backbone'
        shapes = [(h, w), (h + 32, w - 32)] if dynamic else [(h, w)]
        diff = verify(net, args.out, shapes, batch=2 if dynamic else 1)
        print(f'onnxruntime vs PyTorch, inputs {shapes}: max abs difference {diff:.2e}')


if __name__ == '__main__':
    main()
