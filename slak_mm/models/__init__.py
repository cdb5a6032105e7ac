"""SLaK models. Registered in ``slak_mm``'s registry scope when mmengine is installed."""
from timm.layers import LayerNorm2d

from .layers import LargeKernelConv, fuse_bn
from .slak import SLaK

try:
    from ..registry import MODELS
except ImportError:  # torch + timm only
    MODELS = None
if MODELS is not None:
    MODELS.register_module(module=SLaK)

__all__ = ['SLaK', 'LargeKernelConv', 'LayerNorm2d', 'fuse_bn']
