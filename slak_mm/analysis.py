"""Parameter and MAC counts, dense and non-zero (the SLaK paper counts only non-zero weights).

MACs are counted with forward hooks on every ``nn.Conv2d`` (full kernel, as the paper's arithmetic: taps that land in
zero padding are included) and ``nn.Linear``; norms and activations are not counted (as fvcore/mmengine).
Non-zero MACs scale each layer by its weight density: a conv output uses every tap, so MACs = outputs × nnz.
"""
from typing import Callable, Dict

import torch
import torch.nn as nn


def count_params(module: nn.Module) -> Dict[str, int]:
    params = list(module.parameters())
    return dict(params=sum(p.numel() for p in params), nonzero_params=sum(int(p.count_nonzero()) for p in params))


@torch.no_grad()
def count_macs(model: nn.Module, run: Callable[[], object], parts: Dict[str, nn.Module] = None) -> Dict[str, Dict]:
    """Run ``run()`` once and count MACs. ``parts`` names sub-modules to report separately (e.g. the backbone)."""
    parts = dict(parts or {})
    owner = {}
    for part, mod in parts.items():
        for m in mod.modules():
            owner[id(m)] = part
    totals = {name: dict(macs=0, nonzero_macs=0) for name in ['model'] + list(parts)}

    def hook(m: nn.Module, inputs, output) -> None:
        w = m.weight
        if isinstance(m, nn.Conv2d):
            positions = output.shape[0] * output.shape[2] * output.shape[3]
            dense = positions * w.numel()
        else:  # Linear: one MAC per weight per token
            positions = output.numel() // output.shape[-1]
            dense = positions * w.numel()
        nonzero = positions * int(w.count_nonzero())
        for name in ('model', owner.get(id(m))):
            if name is not None:
                totals[name]['macs'] += dense
                totals[name]['nonzero_macs'] += nonzero

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    for name, mod in [('model', model)] + list(parts.items()):
        totals[name].update(count_params(mod))
    return totals
