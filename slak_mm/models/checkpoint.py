"""Loading SLaK weights: official ImageNet checkpoints of every naming era, and slak_mm's own files.

One pure function, :func:`convert_slak_state_dict`, owns the key mapping (timm's ``checkpoint_filter_fn`` pattern);
:func:`load_pretrained` (used by ``init_cfg=dict(type='Pretrained')``) and ``tools/convert_slak_checkpoint.py`` both
use it. Files are read with ``torch.load(weights_only=True)``; the only non-tensor type allowed is
``argparse.Namespace`` (the official files keep the training arguments under ``args``).
"""
import argparse
import logging
import os
import pickle
import re
import zipfile
from typing import Dict, List, Tuple

import torch

from .layers import pad_kernel

log = logging.getLogger('slak_mm')

# Reference branch names (three eras) -> slak_mm names. LoRA/Decom are names only (no low-rank adaptation).
BRANCH_NAMES = {'LoRA1': 'tall', 'Decom1': 'tall', 'LoRA2': 'wide', 'Decom2': 'wide', 'small_conv': 'small',
                'lkb_origin': 'dense', 'lkb_reparam': 'merged'}
_BRANCH_RE = re.compile(r'(\.large_kernel\.)(' + '|'.join(BRANCH_NAMES) + r')\.')
SAFE_GLOBALS = [argparse.Namespace]
IGNORED_PREFIXES = ('head.', 'norm.')  # ImageNet classifier and final norm: expected leftovers, never warned about


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model as configured; the message names the fix."""


def load_checkpoint_file(path: str) -> Dict:
    """``torch.load`` a downloaded file safely (weights_only, minimal allow-list), with clear errors."""
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist')
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        detail = [ln.strip() for ln in str(e).splitlines() if re.search(r'global', ln, re.I)]
        if detail:
            raise CheckpointError(f'{path}: refusing to unpickle objects outside the allow-list ({detail[0][:200]}). '
                                  f'Only tensors and argparse.Namespace are loaded from downloaded files; if this '
                                  f'is your own trusted training checkpoint, use it as load_from/resume (or pass '
                                  f'--trust-checkpoint where a tool offers it).'
                                  ) from None
        raise CheckpointError(f'{path} is not a PyTorch checkpoint or is truncated (unpickling failed)') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f'{path} is not a PyTorch checkpoint or is truncated '
                              f'({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""})') from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict')
    return ckpt


def extract_state_dict(ckpt: Dict, use_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The weights of a checkpoint: ``model_ema`` if asked, else ``state_dict``, ``model``, or the dict itself."""
    if use_ema:
        if not isinstance(ckpt.get('model_ema'), dict):
            raise CheckpointError(f'use_ema=True but the checkpoint has no model_ema entry (keys: {sorted(ckpt)[:8]})')
        sd = ckpt['model_ema']
    else:
        sd = next((ckpt[k] for k in ('state_dict', 'model') if isinstance(ckpt.get(k), dict)), ckpt)
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f'no tensors found in the checkpoint (top-level keys: {sorted(ckpt)[:8]})')
    return tensors


def convert_slak_state_dict(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Map any reference key era to slak_mm's backbone keys. Returns (mapped, ignored ImageNet head/norm keys).

    Strips ``module.`` / ``backbone.`` prefixes and renames branches (LoRA1/Decom1 -> tall, LoRA2/Decom2 -> wide,
    small_conv -> small, lkb_origin -> dense, lkb_reparam -> merged). The tall/wide assignment is checked by shape
    (tall is (C, 1, M, N) with M > N), since no name is trusted alone.
    """
    mapped, ignored = {}, []
    for key, value in state_dict.items():
        k = key
        while k.startswith(('module.', 'backbone.')):
            k = k.split('.', 1)[1]
        if k.startswith(IGNORED_PREFIXES):
            ignored.append(k)
            continue
        k = _BRANCH_RE.sub(lambda m: m.group(1) + BRANCH_NAMES[m.group(2)] + '.', k)
        if k.endswith(('.tall.conv.weight', '.wide.conv.weight')) and value.dim() == 4:
            kh, kw = value.shape[2:]
            if kh != kw:
                k = k.replace('.wide.', '.tall.') if kh > kw else k.replace('.tall.', '.wide.')
        mapped[k] = value
    return mapped, ignored


def describe_state_dict(sd: Dict[str, torch.Tensor]) -> Dict:
    """Architecture facts read off the tensors: depths, widths, per-stage kernels, layout, deploy form."""
    depths = [0, 0, 0, 0]
    for k in sd:
        m = re.match(r'stages\.(\d)\.(\d+)\.', k)
        if m:
            depths[int(m.group(1))] = max(depths[int(m.group(1))], int(m.group(2)) + 1)
    dims = [sd[f'stages.{i}.0.norm.weight'].shape[0] if f'stages.{i}.0.norm.weight' in sd else None
            for i in range(4)]
    kernels, short, layout = [], None, None
    for i in range(4):
        p = f'stages.{i}.0.large_kernel.'
        if p + 'tall.conv.weight' in sd:
            layout = 'decomposed'
            m_, n_ = sd[p + 'tall.conv.weight'].shape[2:]
            kernels.append(m_)
            short = n_
        elif p + 'dense.conv.weight' in sd:
            layout = 'dense'
            kernels.append(sd[p + 'dense.conv.weight'].shape[2])
            if p + 'small.conv.weight' in sd:
                short = sd[p + 'small.conv.weight'].shape[2]
        elif p + 'merged.weight' in sd:
            layout = 'deployed'
            kernels.append(sd[p + 'merged.weight'].shape[2])
        else:
            kernels.append(None)
    return dict(depths=depths, dims=dims, kernels=kernels, short_edge=short, layout=layout,
                has_bn=any('.large_kernel.' in k and '.bn.' in k for k in sd))


def match_state_dict(model: torch.nn.Module, sd: Dict[str, torch.Tensor], pad_kernels: bool = False,
                     source: str = 'checkpoint') -> Dict[str, torch.Tensor]:
    """Check a mapped state dict against ``model`` and raise :class:`CheckpointError` naming the config fix.

    With ``pad_kernels=True``, smaller odd kernels are zero-padded (centred) into the model's larger ones, which
    keeps the function computed by each branch unchanged.
    """
    own = model.state_dict()
    common = set(own) & set(sd)
    if not common or not any(k.startswith('stages.') for k in common):
        raise CheckpointError(f'{source} is not a SLaK checkpoint: none of its {len(sd)} tensors matches a SLaK '
                              f'parameter (first keys: {sorted(sd)[:3]})')
    ck, me = describe_state_dict(sd), describe_state_dict(own)
    if ck['layout'] != me['layout']:
        fixes = {'deployed': 'deploy=True (or load the training-form checkpoint)',
                 'dense': "kernel_layout='dense'", 'decomposed': "kernel_layout='decomposed' and deploy=False"}
        raise CheckpointError(f"{source} holds a {ck['layout']} large-kernel layout but the model is "
                              f"{me['layout']}; set {fixes.get(ck['layout'], '?')}")
    if not ck['has_bn'] and ck['layout'] != 'deployed':
        raise CheckpointError(f'{source} was trained with bn=False (no BN after the large-kernel branches); '
                              f'slak_mm always uses branch BN (the paper: crucial) and cannot load it')
    if ck['depths'] != me['depths']:
        raise CheckpointError(f"{source} has depths {ck['depths']} but the model {me['depths']}; "
                              f"set arch='tiny' for [3, 3, 9, 3] or 'small'/'base' for [3, 3, 27, 3]")
    if ck['dims'] != me['dims']:
        raise CheckpointError(f"{source} has widths {ck['dims']} but the model {me['dims']}; set arch/width_factor "
                              f"to match (SLaK-T/S: 96..768 x 1.3 = [124, 249, 499, 998]; SLaK-B: [166, 332, 665, "
                              f"1331])")
    kernel_msg = (f"{source} has stage kernels {'/'.join(map(str, ck['kernels']))} (short edge {ck['short_edge']}) "
                  f"but the model {'/'.join(map(str, me['kernels']))} (short edge {me['short_edge']}); "
                  f"set kernel_size={ck['kernels'] + [ck['short_edge']]}")
    out = dict(sd)
    for k in sorted(common):
        if sd[k].shape == own[k].shape:
            continue
        smaller = (sd[k].dim() == 4 and own[k].dim() == 4 and sd[k].shape[:2] == own[k].shape[:2]
                   and all(a <= b and (b - a) % 2 == 0 for a, b in zip(sd[k].shape[2:], own[k].shape[2:])))
        if '.large_kernel.' in k and smaller and pad_kernels:
            out[k] = pad_kernel(sd[k], *own[k].shape[2:])
        elif '.large_kernel.' in k:
            hint = ' (or pad_kernels=True to zero-pad the smaller kernels into the larger ones)' if smaller else ''
            raise CheckpointError(f'{kernel_msg}{hint}. First mismatch: {k} {tuple(sd[k].shape)} vs '
                                  f'{tuple(own[k].shape)}')
        else:
            raise CheckpointError(f'{source}: shape mismatch at {k}: {tuple(sd[k].shape)} vs model '
                                  f'{tuple(own[k].shape)}')
    return out


def load_pretrained(model: torch.nn.Module, path: str, use_ema: bool = False, pad_kernels: bool = False) -> Dict:
    """Load SLaK weights into ``model`` (a :class:`SLaK`); every backbone tensor must load. Returns the report."""
    from .slak import _log
    sd, ignored = convert_slak_state_dict(extract_state_dict(load_checkpoint_file(path), use_ema=use_ema))
    sd = match_state_dict(model, sd, pad_kernels=pad_kernels, source=path)
    result = model.load_state_dict(sd, strict=False)
    optional = re.compile(r'norm\d\.(weight|bias)$')  # the dense-prediction output norms are new layers
    missing = [k for k in result.missing_keys if not optional.match(k)]
    if missing:
        raise CheckpointError(f'{path} lacks {len(missing)} backbone tensors, e.g. {missing[:3]}')
    report = dict(matched=len(sd) - len(result.unexpected_keys), missing=len(result.missing_keys),
                  unexpected=len(result.unexpected_keys), ignored=len(ignored))
    _log(f'SLaK: loaded {path}{" (EMA)" if use_ema else ""}: {report["matched"]} tensors matched, '
         f'{report["missing"]} missing (new output norms), {report["unexpected"]} unexpected'
         + (f', {len(ignored)} ImageNet head/norm tensors skipped' if ignored else ''))
    if result.unexpected_keys:
        _log(f'SLaK: unexpected keys in {path}: {result.unexpected_keys[:5]}', 'WARNING')
    return report
