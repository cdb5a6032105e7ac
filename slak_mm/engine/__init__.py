"""Training-time components: layer-wise lr decay constructor and the sparse-training hook."""
from .optimizers import LayerDecayOptimizerConstructor
from .sparse_hook import SparseTrainingHook

__all__ = ['LayerDecayOptimizerConstructor', 'SparseTrainingHook']
