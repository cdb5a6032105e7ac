"""Switches for the CPU inference fusions, which run oneDNN ops with fused post-ops instead of separate passes.

``'mlp'``       the block MLP: bias + GELU fused into fc1, bias + residual add into fc2 (:mod:`.fused_mlp`).
``'conv_add'``  the summed depthwise bands: each band after the first adds the running sum as a post-op of its own
                convolution, instead of a separate add over the activations (:func:`.dwconv.dwconv2d_sum`).
``'dwconv_kernel'``  not a oneDNN fusion: slak_mm's own C++ kernel for the whole summed depthwise unit
                (:mod:`.cpu_kernel`), which replaces the oneDNN convolutions (and so ``'conv_add'``) where it runs.

All are on by default where they apply; :func:`cpu_fusions_disabled` turns them off for A/B benchmarks and tests.
"""
import contextlib
import functools
from typing import Iterator, Optional, Set

import torch

FUSIONS = ('mlp', 'conv_add', 'dwconv_kernel')
_disabled: Set[str] = set()  # changed in place only: dwconv2d_sum's fast path holds a reference to it


@contextlib.contextmanager
def cpu_fusions_disabled(*names: str) -> Iterator[None]:
    """Run the plain ops for the named fusions (all of :data:`FUSIONS` if none are named) inside this block.
    Process-wide, not thread-local."""
    unknown = set(names) - set(FUSIONS)
    if unknown:
        raise ValueError(f'unknown CPU fusion(s) {sorted(unknown)}; choose from {FUSIONS}')
    previous = set(_disabled)
    _disabled.update(names or FUSIONS)
    try:
        yield
    finally:
        _disabled.clear()
        _disabled.update(previous)


@functools.lru_cache(maxsize=None)
def _has_mkldnn_op(name: str) -> bool:  # op lookup once, not per call
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, name)


def cpu_fusion_enabled(name: str, op: Optional[str] = None) -> bool:
    """Whether fusion ``name`` may run: no :func:`cpu_fusions_disabled` block turned it off and, for a oneDNN
    fusion, its ``op`` exists in this build and mkldnn is enabled."""
    if name in _disabled:
        return False
    return op is None or (torch.backends.mkldnn.enabled and _has_mkldnn_op(op))
