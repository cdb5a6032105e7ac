"""Depthwise large-kernel convolution ops (importable with torch alone; Triton is imported only when used)."""
from .dwconv import (IMPLS, check_dwconv_args, dwconv2d, dwconv2d_branches, dwconv2d_sum, resolve_impl,
                     triton_available)

__all__ = ['IMPLS', 'check_dwconv_args', 'dwconv2d', 'dwconv2d_branches', 'dwconv2d_sum', 'resolve_impl',
           'triton_available']
