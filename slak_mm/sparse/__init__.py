"""Dynamic sparse training (SLaK's 'Sparse'): mask initialisation, prune-and-regrow, the mmengine hook."""
from .core import (GROW_METHODS, INIT_METHODS, SparseMasks, cosine_prune_rate, erk_densities, mask_checksum,
                   select_parameters)

__all__ = ['SparseMasks', 'select_parameters', 'erk_densities', 'cosine_prune_rate', 'mask_checksum',
           'INIT_METHODS', 'GROW_METHODS']
