"""Layer-wise / stage-wise learning-rate decay for SLaK inside any mmseg segmentor or mmdet detector.

mmseg's and mmdet's ``LearningRateDecayOptimizerConstructor`` only accept backbones whose class name contains
"ConvNeXt". This one asks the backbone for ``get_layer_depth`` instead and reproduces the reference's layer ids and
scales (slak_reference.md §7.3-7.4): scale = decay_rate ** (num_layers + 2 - layer_id - 1); no weight decay on 1-D
parameters (norms, layer scales) and biases.
"""
from typing import Dict, List

import torch.nn as nn
from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor

from ..registry import OPTIM_WRAPPER_CONSTRUCTORS

DECAY_TYPES = ('layer_wise', 'stage_wise')


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class LayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """``paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=6)``.

    Works on a model with a ``backbone`` attribute (segmentor / detector) or on a bare backbone. Every parameter gets
    ``lr * scale`` and ``weight_decay`` (0 for 1-D parameters and biases).
    """

    def add_params(self, params: List[Dict], module: nn.Module, **kwargs) -> None:
        cfg = dict(self.paramwise_cfg)
        decay_rate = cfg.pop('decay_rate', 1.0)
        decay_type = cfg.pop('decay_type', 'layer_wise')
        num_layers = cfg.pop('num_layers', None)
        if cfg:
            raise ValueError(f'LayerDecayOptimizerConstructor: unknown paramwise_cfg keys {sorted(cfg)}; '
                             f'supported: decay_rate, decay_type, num_layers')
        if decay_type not in DECAY_TYPES:
            raise ValueError(f'LayerDecayOptimizerConstructor: decay_type must be one of {DECAY_TYPES}, '
                             f'got {decay_type!r}')
        if not 0 < decay_rate <= 1:
            raise ValueError(f'LayerDecayOptimizerConstructor: decay_rate must be in (0, 1], got {decay_rate}')
        backbone, prefix = (module.backbone, 'backbone.') if hasattr(module, 'backbone') else (module, '')
        if not hasattr(backbone, 'get_layer_depth'):
            raise TypeError(f'LayerDecayOptimizerConstructor needs a backbone with get_layer_depth() '
                            f'(e.g. slak_mm.SLaK); got {type(backbone).__name__}')

        groups: Dict[str, Dict] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = param.ndim == 1 or name.endswith('.bias')
            layer_id, total = backbone.get_layer_depth(name, prefix=prefix, decay_type=decay_type,
                                                       num_layers=num_layers)
            key = f'layer_{layer_id}_{"no_decay" if no_decay else "decay"}'
            if key not in groups:
                scale = decay_rate ** (total - layer_id - 1)
                groups[key] = dict(params=[], param_names=[], lr_scale=scale, lr=self.base_lr * scale,
                                   weight_decay=0. if no_decay else self.base_wd, layer_id=layer_id)
            groups[key]['params'].append(param)
            groups[key]['param_names'].append(name)
        for key in sorted(groups, key=lambda k: (groups[k]['layer_id'], k)):
            g = groups[key]
            print_log(f'layer decay ({decay_type}, rate {decay_rate}): {key}: {len(g["params"])} params, '
                      f'lr scale {g["lr_scale"]:.4f}, weight decay {g["weight_decay"]}', logger='current')
        params.extend(groups.values())
