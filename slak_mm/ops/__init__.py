"""Depthwise large-kernel convolution ops (importable with torch alone)."""
from .dwconv import dwconv2d, check_dwconv_args

__all__ = ['dwconv2d', 'check_dwconv_args']
