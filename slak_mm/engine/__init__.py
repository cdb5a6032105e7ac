"""Training-time components: layer-wise lr decay constructor (and hooks)."""
from .optimizers import LayerDecayOptimizerConstructor

__all__ = ['LayerDecayOptimizerConstructor']
