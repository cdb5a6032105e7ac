"""Masks and the prune-and-regrow step, independent of mmengine (slak_reference.md §6).

Every decision is a deterministic function of the weights and ``(seed, update index, layer index)``: with identical
weights (DDP keeps them identical) every rank computes identical masks without communicating them.
"""
import math
import re
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

INIT_METHODS = ('snip', 'ERK', 'uniform', 'from_weights')
GROW_METHODS = ('random', 'gradient', 'momentum')
SELECTIONS = {
    # every conv and linear weight of the backbone (the reference's 2-D/4-D rule)
    'backbone': r'^(backbone\.)?(downsample_layers|stages)\..*weight$',
    # only the two long rectangles (the reference's --only-L)
    'large_kernel': r'^(backbone\.)?stages\..*\.large_kernel\.(tall|wide)\.conv\.weight$',
}


def select_parameters(model: nn.Module, selection: str = 'backbone') -> Dict[str, nn.Parameter]:
    """Parameters to mask: 'backbone', 'large_kernel', or a regex over parameter names (2-D/4-D weights only)."""
    pattern = re.compile(SELECTIONS.get(selection, selection))
    params = {n: p for n, p in model.named_parameters() if p.dim() in (2, 4) and pattern.search(n)}
    if not params:
        raise ValueError(f'SparseTrainingHook: params={selection!r} matches no 2-D/4-D parameter of the model; use '
                         f"'backbone', 'large_kernel' or a regex such as r'large_kernel\\.(tall|wide)'")
    return params


def erk_densities(shapes: Dict[str, torch.Size], density: float) -> Dict[str, float]:
    """Erdős–Rényi-Kernel densities (∝ sum(shape)/prod(shape)) within the global budget; a layer whose density
    would exceed 1 is made dense and the rest rescaled."""
    dense: set = set()
    while True:
        budget = sum(math.prod(s) * density for s in shapes.values()) - sum(math.prod(shapes[n]) for n in dense)
        raw = {n: sum(s) / math.prod(s) for n, s in shapes.items() if n not in dense}
        eps = budget / sum(raw[n] * math.prod(shapes[n]) for n in raw)
        over = [n for n in raw if eps * raw[n] > 1]
        if not over:
            return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
        dense.update(over)


def cosine_prune_rate(initial: float, step: int, total: int, minimum: float = 0.005) -> float:
    """The reference's CosineDecay: initial -> minimum over ``total`` optimizer steps."""
    t = min(max(step, 0), total) / max(total, 1)
    return minimum + (initial - minimum) * (1 + math.cos(math.pi * t)) / 2


def _generator(seed: int, *keys: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + sum(k * 7919 ** i for i, k in enumerate(keys, 1))) % (2 ** 63))
    return g


def _random_positions(count: int, candidates: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``count`` distinct flat indices drawn uniformly from the True entries of ``candidates`` (CPU generator)."""
    scores = torch.rand(candidates.numel(), generator=gen).to(candidates.device)
    scores[~candidates.flatten()] = -1.0
    return torch.topk(scores, count, sorted=False).indices


def mask_checksum(masks: Dict[str, torch.Tensor]) -> torch.Tensor:
    """A cheap order-sensitive fingerprint of all masks (int64 on CPU) for cross-rank comparison."""
    total = torch.zeros((), dtype=torch.int64)
    for i, name in enumerate(sorted(masks)):
        flat = masks[name].flatten().nonzero().flatten().cpu()
        total += (i + 1) * (int(flat.numel()) + int(((flat * 2654435761) % 1_000_000_007).sum()))
    return total


class SparseMasks:
    """Bool masks for a set of parameters, with initialisation and the prune-and-regrow update.

    ``self.masks[name]`` is True where the weight is active. Masked weights are kept exactly zero by :meth:`apply`.
    """

    def __init__(self, params: Dict[str, nn.Parameter], seed: int = 0):
        self.params = params
        self.seed = seed
        self.masks: Dict[str, torch.Tensor] = {}
        self._pruned: Dict[str, torch.Tensor] = {}  # ~mask, kept so that apply() allocates nothing

    # ------------------------------------------------------------------------------------------------ init
    def init(self, method: str, sparsity: float, scores: Optional[Dict[str, torch.Tensor]] = None,
             dense_threshold: float = 0.99, average: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        """Initialise masks. ``scores`` (SNIP saliencies) are needed for 'snip'; ``average`` reduces the per-layer
        densities across ranks so all ranks agree (identity on one process)."""
        density = 1.0 - sparsity
        names = list(self.params)
        if method == 'from_weights':
            masks = {n: self.params[n].detach() != 0 for n in names}
            self._set(masks)
            return
        if method == 'uniform':
            dens = {n: density for n in names}
        elif method == 'ERK':
            dens = erk_densities({n: self.params[n].shape for n in names}, density)
        elif method == 'snip':
            if scores is None:
                raise ValueError("init='snip' needs saliency scores")
            flat = torch.cat([scores[n].flatten().float().cpu() for n in names])
            keep = int(round(density * flat.numel()))
            threshold = torch.topk(flat, keep, sorted=True).values[-1]
            dens = {n: float((scores[n].float() >= threshold).sum()) / scores[n].numel() for n in names}
        else:
            raise ValueError(f'init must be one of {INIT_METHODS}, got {method!r}')
        vec = average(torch.tensor([dens[n] for n in names], dtype=torch.float64))
        masks = {}
        for i, n in enumerate(names):
            numel = self.params[n].numel()
            d = float(vec[i])
            if d >= dense_threshold:  # decided from the (rank-averaged) densities: the same on every rank
                continue
            k = int(round(d * numel))
            mask = torch.zeros(numel, dtype=torch.bool, device=self.params[n].device)
            mask[_random_positions(k, torch.ones(numel, dtype=torch.bool), _generator(self.seed, 0, i))
                 .to(mask.device)] = True
            masks[n] = mask.view_as(self.params[n])
        self._set(masks)

    def _set(self, masks: Dict[str, torch.Tensor]) -> None:
        self.masks = {n: m.to(self.params[n].device, torch.bool) for n, m in masks.items()}
        self._pruned = {n: ~m for n, m in self.masks.items()}
        self.apply()

    # ------------------------------------------------------------------------------------------------ apply
    @torch.no_grad()
    def apply(self, extra: Optional[List[Dict[str, torch.Tensor]]] = None) -> None:
        """Zero every masked weight in place (and the same positions in any ``extra`` name->tensor dicts)."""
        for n, pruned in self._pruned.items():
            self.params[n].masked_fill_(pruned, 0)
            for tensors in extra or ():
                if n in tensors:
                    tensors[n].masked_fill_(pruned, 0)

    # ------------------------------------------------------------------------------------------------ update
    @torch.no_grad()
    def prune_and_regrow(self, prune_rate: float, grow: str, update_index: int,
                         optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, int]:
        """Per layer: drop the ceil(rate × nnz) smallest-magnitude active weights, then activate exactly as many
        positions that were inactive before this update (chosen by ``grow``), starting at zero."""
        changed = {}
        for i, (n, mask) in enumerate(sorted(self.masks.items())):
            w = self.params[n]
            flat_mask = mask.flatten()
            nnz = int(flat_mask.sum())
            inactive = flat_mask.numel() - nnz
            k = min(math.ceil(prune_rate * nnz), inactive, nnz)
            if k <= 0:
                continue
            magnitude = w.detach().abs().flatten().float()
            magnitude[~flat_mask] = float('inf')
            drop = torch.topk(magnitude, k, largest=False, sorted=False).indices
            candidates = ~flat_mask
            if grow == 'random':
                add = _random_positions(k, candidates, _generator(self.seed, update_index + 1, i))
            else:
                score = self._growth_score(w, grow, optimizer).flatten().float().clone()
                score[flat_mask] = -float('inf')
                add = torch.topk(score, k, sorted=False).indices
            new = flat_mask.clone()
            new[drop] = False
            new[add] = True
            grown = torch.zeros_like(flat_mask)
            grown[add] = True
            w.masked_fill_(grown.view_as(mask), 0)  # regrown weights start at zero (any memory format)
            self.masks[n] = new.view_as(mask)
            self._pruned[n] = ~self.masks[n]
            changed[n] = k
        self.apply()
        return changed

    @staticmethod
    def _growth_score(w: nn.Parameter, grow: str, optimizer: Optional[torch.optim.Optimizer]) -> torch.Tensor:
        if grow == 'gradient':
            if w.grad is None:
                raise RuntimeError("grow='gradient' needs gradients at the update step (none found)")
            return w.grad.abs()
        if grow == 'momentum':
            state = optimizer.state.get(w, {}) if optimizer is not None else {}
            if 'exp_avg' in state:
                return (state['exp_avg'] / (state['exp_avg_sq'].sqrt() + 1e-8)).abs()
            if 'momentum_buffer' in state and state['momentum_buffer'] is not None:
                return state['momentum_buffer'].abs()
            raise RuntimeError("grow='momentum' needs an Adam(W) or SGD-with-momentum optimizer state")
        raise ValueError(f'grow must be one of {GROW_METHODS}, got {grow!r}')

    # ------------------------------------------------------------------------------------------------ stats
    def densities(self) -> Dict[str, float]:
        out = {n: 1.0 for n in self.params}
        out.update({n: float(m.sum()) / m.numel() for n, m in self.masks.items()})
        return out

    def global_density(self) -> float:
        total = sum(p.numel() for p in self.params.values())
        active = sum(int(self.masks[n].sum()) if n in self.masks else p.numel() for n, p in self.params.items())
        return active / total
