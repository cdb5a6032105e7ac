"""slak_mm's C++ CPU kernel for :func:`slak_mm.ops.dwconv2d_sum` in float32 inference and CPU bfloat16 autocast
inference (``csrc/dwconv_cpu.cpp``), and for CPU training's depthwise convolutions (:func:`cpu_dwconv_weight_grad`
and the same kernel for the forward and the input gradient, :class:`slak_mm.ops.dwconv._CPUDepthwise`).

It packs each block of 16 channels into an aligned, zero-padded buffer and runs every kernel as register tiles of 4-8
outputs along a row (the width that fits the map; on AVX-512 along two rows, which share their input loads), each tile
skipping the taps that only reach zero padding (or, on maps narrower than the kernel, looping over the map columns its
outputs reach), so SLaK's long bands run without oneDNN's misaligned loads (SLaK's channel counts are not multiples of
16), the transposed copies of the tall band, or the work of taps in the padding (docs/cpu_performance_log.md, "C++ CPU
kernel"). Kernel rows at the same offset from their centres run once, in the widest of them, with the others' taps added
in (the cross-shaped unit's N×N centre is not computed twice). Results equal F.conv2d's sum to float32 rounding.

Built on first use with ``torch.utils.cpp_extension.load`` (a C++ compiler is needed; `make setup` builds it once),
cached under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), one build per instruction set
(named after ``torch.backends.cpu.get_cpu_capability()``), so machines of different CPUs sharing a home directory
do not share a binary. Where it cannot be built, :func:`load_cpu_kernel` warns once, naming the fix, and the oneDNN
path runs instead: same results to float32 rounding, only slower. ``SLAK_MM_CPU_KERNEL=0`` turns it off (no build,
no warning); :func:`slak_mm.ops.cpu_fusion.cpu_fusions_disabled` ``('dwconv_kernel')`` does so for a block of code.
Under ``torch.compile`` it runs as the op ``torch.ops.slak_mm.dwconv_sum_cpu`` (:mod:`.dwconv`), which the compiled
graph calls where the eager model would call the kernel.
"""
import os
import re
import warnings
from pathlib import Path
from types import ModuleType
from typing import List, Optional

import torch

SOURCE = Path(__file__).with_name('csrc') / 'dwconv_cpu.cpp'
# Instruction-set flags per torch CPU capability; anything else builds for the compiler's default target.
ISA_FLAGS = {'AVX512': ['-mavx512f', '-mavx512dq', '-mavx512bw', '-mavx512vl', '-mfma', '-mavx2'],
             'AVX2': ['-mavx2', '-mfma']}
ENV_SWITCH = 'SLAK_MM_CPU_KERNEL'


def cpu_kernel_wanted() -> bool:
    """False when the user turned the kernel off with ``SLAK_MM_CPU_KERNEL=0``."""
    return os.environ.get(ENV_SWITCH, '1').strip().lower() not in ('0', 'false', 'no', 'off')


def _name_part(text: str) -> str:
    """Lower case, every run of characters other than letters and digits as one '_'."""
    return re.sub(r'[^0-9a-z]+', '_', text.lower())


def build_name() -> str:
    """Extension name: one per instruction set and torch version, e.g. ``slak_mm_dwconv_cpu_avx512_torch2_14_1_cu130``.

    - The instruction set: a shared cache never hands one CPU another's binary.
    - The torch version: two environments with different torch versions sharing ``~/.cache/torch_extensions`` (the
      directory is named after the Python and CUDA versions only) do not rebuild each other's binary, and torch 2.13
      or older does not wait forever on the ``lock`` file that torch 2.14's build lock leaves behind (they take the
      file's existence for a build in progress; seen with torch 2.11 after 2.14).
    - Characters other than letters and digits become '_': some capabilities have spaces ('NO AVX', what torch 2.5
      reports for x86 without AVX2, and 'Z VECTOR'), which the module name and the build command cannot take.
    """
    capability = _name_part(torch.backends.cpu.get_cpu_capability())
    return f'slak_mm_dwconv_cpu_{capability}_torch{_name_part(torch.__version__)}'


def build_cpu_kernel(verbose: bool = False) -> ModuleType:
    """Compile (or load the cached build of) the kernel; raises whatever the build raises."""
    from torch.utils.cpp_extension import load
    flags = ['-O3', '-ffp-contract=fast', '-fopenmp', *ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]
    return load(build_name(), [str(SOURCE)], extra_cflags=flags, extra_ldflags=['-fopenmp'], verbose=verbose)


_NOT_LOADED = object()
_kernel = _NOT_LOADED  # the built module, None where it cannot be built or is switched off, or _NOT_LOADED


def load_cpu_kernel() -> Optional[ModuleType]:
    """The built kernel, or None (with one warning naming the fix) if it cannot be built here. Built or loaded on the
    first call; later calls return the same answer until :func:`forget_cpu_kernel`."""
    global _kernel
    if _kernel is _NOT_LOADED:
        _kernel = _load()
    return _kernel


@torch.compiler.assume_constant_result
def cpu_kernel_built() -> bool:
    """Whether :func:`load_cpu_kernel` gives a kernel (building it on the first call). A constant to
    ``torch.compile``, which calls it once while it traces instead of tracing into the build."""
    return load_cpu_kernel() is not None


def loaded_cpu_kernel() -> Optional[ModuleType]:
    """The kernel if a :func:`load_cpu_kernel` call already built / loaded it, else None (never builds)."""
    return None if _kernel is _NOT_LOADED else _kernel


def forget_cpu_kernel() -> None:
    """Make the next :func:`load_cpu_kernel` decide again (re-reads ``SLAK_MM_CPU_KERNEL``; the tests use it)."""
    global _kernel
    _kernel = _NOT_LOADED


def _load() -> Optional[ModuleType]:
    if not cpu_kernel_wanted():
        return None
    try:
        return build_cpu_kernel()
    except Exception as err:  # no compiler, no headers, ...: the oneDNN path still gives the same results
        warnings.warn(f'slak_mm: could not build the C++ CPU depthwise kernel ({type(err).__name__}: '
                      f'{str(err).strip()[-300:]}). CPU inference falls back to oneDNN: same results, slower. '
                      f'Install a C++ compiler (e.g. g++) to build it, or set {ENV_SWITCH}=0 to silence this.',
                      RuntimeWarning, stacklevel=4)
        return None


def cpu_dwconv_sum(x: torch.Tensor, weights: List[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``bias + sum_k conv2d(x, weights[k])`` ('same' padding, depthwise) with the C++ kernel. ``x`` float32
    channels_last on the CPU; kernels of any strides (the taps that only reach the zero padding are dropped without
    a copy); call only where :func:`load_cpu_kernel` is not None. Returns a channels_last tensor. Shows in
    ``torch.profiler`` as ``slak_mm::dwconv_cpu``. (:func:`slak_mm.ops.dwconv2d_sum` calls the kernel's
    ``dwconv_sum_auto`` entry instead once it is loaded: the same computation behind one C++ call.)"""
    return load_cpu_kernel().dwconv_sum(x, weights, bias)


def cpu_dwconv_sum_bf16(x: torch.Tensor, weights: List[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`cpu_dwconv_sum` for CPU bfloat16 autocast inference: ``x`` float32 or bfloat16 channels_last, kernels and
    bias float32; ``x``, the kernels and the bias are rounded to bfloat16 as the kernel reads them (what autocast
    does to a convolution's operands), the products summed in float32 and the sum rounded to bfloat16 once. Returns
    a bfloat16 channels_last tensor."""
    return load_cpu_kernel().dwconv_sum_bf16(x, weights, bias)


def cpu_dwconv_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """The kernel gradient of a depthwise 'same' convolution with a (C, 1, kh, kw) kernel (odd sides), from its input
    ``x`` and its output's gradient ``grad_out``: (B, C, H, W) channels_last CPU tensors, both float32 or both bfloat16
    (CPU autocast training), the products summed in float32. Returns (C, 1, kh, kw) float32. Shows in
    ``torch.profiler`` as ``slak_mm::dwconv_weight_grad_cpu``; call only where :func:`load_cpu_kernel` is not None."""
    return load_cpu_kernel().dwconv_weight_grad(x, grad_out, kh, kw)
