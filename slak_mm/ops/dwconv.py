"""``dwconv2d``: stride-1 "same" depthwise convolution with rectangular odd kernels.

Semantics are exactly ``F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=C)`` for a weight of shape
(C, 1, kh, kw). Implementations (``impl``):

``'torch'``  PyTorch's convolutions, in the fastest layout for the device: on CPU, oneDNN's channels_last depthwise
             kernels run SLaK's long bands an order of magnitude faster than the NCHW path (docs/benchmarks.md), so
             NCHW inputs are converted; results do not depend on the layout (in inference, long tall bands run as
             wide bands over the transposed map, see :func:`transposed_kernels`, and each band after the first
             accumulates into the sum inside its own convolution, see :func:`fused_sum_applies`). CPU training
             (float32, or under bfloat16 autocast) runs slak_mm's C++ kernels for the forward, the input gradient
             and the weight gradient (:class:`_CPUDepthwise`, :func:`cpu_train_kernel_applies`). Without them the
             weight gradient of a large kernel is computed by FFT cross-correlation when the cost model below
             predicts it is cheaper (oneDNN's depthwise weight-gradient runs at a few % of the GEMM rate); the
             forward and input gradient stay direct (under CPU autocast in the autocast dtype, as ``F.conv2d``
             runs them there, with the weight gradient in float32). In CPU float32 inference, and in CPU autocast
             inference, :func:`dwconv2d_sum` (and so :func:`dwconv2d`) runs slak_mm's own C++ kernel instead of
             oneDNN (:mod:`.cpu_kernel`, built on first use; ``SLAK_MM_CPU_KERNEL=0`` or
             ``cpu_fusions_disabled('dwconv_kernel')`` turn it off); also for bfloat16 and float16 models (one
             rounding of the float32 sum) and inside ``torch.compile`` graphs, as the op
             ``torch.ops.slak_mm.dwconv_sum_cpu`` (not while tracing or exporting: standard ops only there).
``'triton'`` the Triton kernels of :mod:`slak_mm.ops.triton_dwconv` (CUDA tensors; CPU tensors only under Triton's
             interpreter, ``TRITON_INTERPRET=1``, which the tests use).
``'auto'``   Triton for CUDA tensors when Triton is installed, the torch path otherwise (and while tracing/exporting).

Kernel taps that can only see zero padding (maps smaller than the kernel) are skipped by both paths.
:func:`dwconv2d_branches` runs SLaK's M×N, N×M and N×N branches of one input in one pass (Triton) and
:func:`dwconv2d_sum` the sum of several kernels plus bias (the deployed cross-shaped kernel as two bands; the CPU
C++ kernel runs their shared centre once).
"""
import os
from functools import lru_cache
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch._C._functorch import is_functorch_wrapped_tensor as _functorch_wrapped
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .cpu_fusion import _disabled as _disabled_fusions
from .cpu_fusion import cpu_fusion_enabled
from . import cpu_kernel as _ck  # its entries looked up at call time (the tests replace them)
from .cpu_kernel import cpu_kernel_built, loaded_cpu_kernel

IMPLS = ('auto', 'torch', 'triton')
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dwconv_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      impl: str = 'auto') -> None:
    """Raise a clear error for anything ``dwconv2d`` does not support."""
    if impl not in IMPLS:
        raise ValueError(f"dwconv2d: impl={impl!r} is not one of {IMPLS}")
    if x.dim() != 4:
        raise ValueError(f'dwconv2d: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}')
    if weight.dim() != 4 or weight.shape[1] != 1:
        raise ValueError(f'dwconv2d: weight must have shape (C, 1, kh, kw), got {tuple(weight.shape)}')
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f'dwconv2d: weight has {weight.shape[0]} channels but the input has {x.shape[1]}')
    kh, kw = weight.shape[2:]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f'dwconv2d: kernel ({kh}, {kw}) must have odd sides ("same" padding needs a centre tap)')
    if x.dtype not in _FLOAT_DTYPES or weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f'dwconv2d: floating-point tensors required, got input {x.dtype} and weight {weight.dtype}')
    tensors = [x, weight] + ([bias] if bias is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f'dwconv2d: tensors on different devices: {[str(t.device) for t in tensors]}')
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f'dwconv2d: bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}')


@lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# torch.export, which torch.compiler.is_exporting (torch >= 2.7) tells apart from torch.compile; both are "compiling"
_torch_exporting = getattr(torch.compiler, 'is_exporting', None)


def _exporting() -> bool:
    """Tracing (``torch.jit.trace``), exporting to ONNX, or ``torch.export``: the graph must hold standard ops only.
    ``torch.compile`` is not exporting: its graphs may call slak_mm's own ops (:func:`_inference_call`)."""
    return (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            or (_torch_exporting is not None and _torch_exporting()))


def _plain_eager(*tensors: Optional[torch.Tensor]) -> bool:
    """Plain eager tensors and mode, where slak_mm's C++ kernels may read the data: no dispatch mode active
    (FakeTensorMode, FlopCounterMode, ... would not see the kernels, and fake tensors have no data), no tensor
    subclass, no functorch wrapper (vmap, grad). ``torch.compile`` reaches the kernel through its op instead."""
    if _get_current_dispatch_mode() is not None:
        return False
    for t in tensors:
        if t is not None and (type(t) not in (torch.Tensor, torch.nn.Parameter) or _functorch_wrapped(t)):
            return False
    return True


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """'torch' or 'triton' for this input; raises a clear error if ``impl='triton'`` cannot run it."""
    if impl == 'torch':
        return 'torch'
    if impl == 'auto':
        use = x.is_cuda and x.dtype in _TRITON_DTYPES and triton_available() and not _exporting()
        return 'triton' if use else 'torch'
    if not triton_available():
        raise ImportError("dwconv2d: impl='triton' needs the triton package, which is not installed. It ships with "
                          "PyTorch's CUDA wheels on Linux (`pip install triton` otherwise); or use impl='auto'/'torch'")
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"dwconv2d: impl='triton' supports {[str(d) for d in _TRITON_DTYPES]}, got {x.dtype}; "
                        "use impl='torch' for other dtypes")
    if _exporting():
        raise RuntimeError("dwconv2d: impl='triton' cannot be traced or exported; export with conv_impl='torch'")
    if not x.is_cuda:
        if os.environ.get('TRITON_INTERPRET') != '1':
            raise ValueError(f"dwconv2d: impl='triton' runs on CUDA tensors, got {x.device} tensors. Move the model "
                             "and input to a GPU, use impl='auto' or 'torch' on CPU, or set TRITON_INTERPRET=1 to "
                             "run Triton's (slow) interpreter for testing")
        from . import triton_dwconv
        if not triton_dwconv.INTERPRET:
            raise RuntimeError('dwconv2d: TRITON_INTERPRET=1 was set after slak_mm.ops.triton_dwconv was imported; '
                               'set it before importing slak_mm')
    return 'triton'


def clip_to_input(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Drop kernel rows/columns that can only ever multiply zero padding (exact).

    Under 'same' padding an output pixel reaches at most ``H - 1`` rows away, so only the central
    ``min(kh, 2H - 1)`` × ``min(kw, 2W - 1)`` taps ever touch real pixels (feature maps smaller than the kernel).
    """
    kh, kw = weight.shape[2:]
    kh2, kw2 = min(kh, 2 * height - 1), min(kw, 2 * width - 1)
    if (kh2, kw2) == (kh, kw):
        return weight
    dh, dw = (kh - kh2) // 2, (kw - kw2) // 2
    return weight[:, :, dh:dh + kh2, dw:dw + kw2]


def _fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (fast sizes for pocketfft/cuFFT)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def fft_weight_grad_wins(kh: int, kw: int) -> bool:
    """Whether the CPU weight gradient should go through FFT: for every kernel larger than 7×7 in area.

    Measured on oneDNN (docs/benchmarks.md, 2-core Xeon): its channels_last depthwise weight-gradient slows down far
    more than linearly with the kernel area (SLaK-T stage 3 at 224: 13×5 takes 8.5× the 5×5's time), so FFT wins for
    every SLaK band measured (7×7 to 128×128 maps, 1.3-17× faster) and loses only for the 5×5 kernels (up to 2.7×
    slower). The map size hardly matters in that range; the FFT's memory is ~4× the input's.
    """
    return kh * kw >= 49


def fft_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """d(loss)/d(weight) of a 'same' depthwise conv as an FFT cross-correlation of the padded input with grad_out.

    dw[c, i, j] = sum_{n,h,w} grad_out[n, c, h, w] * x_pad[n, c, h + i, w + j], i.e. the first kh × kw lags of the
    circular cross-correlation over an (H + kh - 1) × (W + kw - 1) (or larger) grid, where no wrap-around reaches them.
    """
    n, c, h, w = x.shape
    hp, wp = _fft_size(h + kh - 1), _fft_size(w + kw - 1)
    xp = F.pad(x.contiguous(), (kw // 2, kw // 2, kh // 2, kh // 2))
    fx = torch.fft.rfft2(xp, s=(hp, wp))
    fg = torch.fft.rfft2(grad_out.contiguous(), s=(hp, wp))
    corr = torch.fft.irfft2((fx * fg.conj()).sum(0), s=(hp, wp))
    return corr[:, :kh, :kw].unsqueeze(1).to(x.dtype)


class _CPUDepthwise(torch.autograd.Function):
    """One kernel on CPU whose weight needs its gradient. ``mode``:

    - ``'kernel'``: slak_mm's C++ kernels (:mod:`.cpu_kernel`, :func:`cpu_train_kernel_applies`) for all three: the
      forward (the inference kernel with this one kernel), the input gradient (the same kernel run on the output's
      gradient with the kernel flipped) and the weight gradient (``dwconv_weight_grad``: register tiles of kernel
      rows × columns over the map, float32 sums). Its weight gradients are 5-60x faster than the two below at
      SLaK-T's shapes, and the unit's forward + backward 3.1-5.7x (docs/benchmarks.md, "Depthwise unit at 224: the
      training path"); before, the depthwise backward was ~30% of SLaK-T's CPU training step.
    - ``'fft'``: forward and input gradient as ``F.conv2d`` runs them (oneDNN), the weight gradient by FFT (oneDNN's
      depthwise weight gradient runs large kernels at a few % of the GEMM rate).
    - ``'onednn'``: as ``F.conv2d`` throughout, with the weight gradient computed in the weight's dtype.

    Forward and input gradient run in ``x``'s dtype: under CPU autocast the caller passes ``x`` in the autocast dtype
    and the weight and bias are rounded to it, as autocast rounds a convolution's operands (the C++ kernel rounds
    them as it reads them and sums in float32). The weight gradient is then computed in float32 from those
    low-precision operands and returned as float32 (the gradient of the same forward, not rounded to bfloat16):
    oneDNN's bfloat16 channels_last depthwise weight gradient takes 2-11x the float32 paths' time at SLaK-T's stage
    0-2 kernels (docs/benchmarks.md, "CPU autocast"). Gradients keep ``x``'s layout.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mode):
        kh, kw = weight.shape[2:]
        ctx.mode, ctx.weight_dtype = mode, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        if mode == 'kernel':
            ctx.save_for_backward(x, weight)
            return _kernel_conv(x, weight, bias)
        w = weight.to(x.dtype)
        ctx.save_for_backward(x, w)
        with torch.autocast('cpu', enabled=False):
            return F.conv2d(x, w, None if bias is None else bias.to(x.dtype), padding=(kh // 2, kw // 2),
                            groups=x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        kh, kw = w.shape[2:]
        channels_last = ctx.mode == 'kernel' or (x.is_contiguous(memory_format=torch.channels_last)
                                                 and not x.is_contiguous())
        grad_out = grad_out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        dtype = ctx.weight_dtype
        dx = dw = db = None
        if ctx.mode == 'kernel':
            grad_out = grad_out.to(x.dtype)
            if ctx.needs_input_grad[0]:  # the transposed convolution: the flipped kernel over grad_out
                dx = _kernel_conv(grad_out, w.flip((2, 3)), None)
            if ctx.needs_input_grad[1]:
                dw = _ck.cpu_dwconv_weight_grad(x, grad_out, kh, kw).to(dtype)
        else:
            if ctx.needs_input_grad[0]:
                dx = torch.ops.aten.convolution_backward(grad_out, x, w, None, [1, 1], [kh // 2, kw // 2], [1, 1],
                                                         False, [0, 0], x.shape[1], [True, False, False])[0]
            if ctx.needs_input_grad[1]:
                if ctx.mode == 'fft':  # converted straight into the NCHW layout the FFT reads
                    dw = fft_weight_grad(x.to(dtype, memory_format=torch.contiguous_format),
                                         grad_out.to(dtype, memory_format=torch.contiguous_format), kh, kw)
                else:
                    dw = torch.ops.aten.convolution_backward(grad_out.to(dtype), x.to(dtype), w.to(dtype), None,
                                                             [1, 1], [kh // 2, kw // 2], [1, 1], False, [0, 0],
                                                             x.shape[1], [False, True, False])[1]
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            db = grad_out.to(ctx.bias_dtype).sum((0, 2, 3))
        return dx, dw, db, None


def _kernel_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One depthwise convolution on slak_mm's C++ kernel, for :class:`_CPUDepthwise`: ``x`` channels_last float32,
    or bfloat16 (CPU autocast), then with the float32 weight and bias rounded to bfloat16 as they are read and a
    bfloat16 result."""
    weight = weight.float()
    bias = None if bias is None else bias.float()
    if x.dtype is torch.bfloat16:
        return _ck.cpu_dwconv_sum_bf16(x, [weight], bias)
    return _ck.cpu_dwconv_sum(x, [weight], bias)


def cpu_train_kernel_applies(x: torch.Tensor, *others: Optional[torch.Tensor], any_layout: bool = False) -> bool:
    """Whether a CPU depthwise convolution whose weight needs its gradient runs on slak_mm's C++ kernels
    (:class:`_CPUDepthwise`, mode ``'kernel'``): ``x`` float32, or under CPU bfloat16 autocast float32 or bfloat16
    (the kernels read it in bfloat16), channels_last as inside SLaK (or any layout with ``any_layout``: the layout
    choice, :func:`nchw_wins`, asks before converting) and not empty; ``x`` and the ``others`` (weight, bias) plain
    eager tensors (:func:`_plain_eager`); not compiling or exporting (the kernels are opaque to dynamo); the
    ``'dwconv_kernel'`` switch on and the kernel built (on the first call that gets this far)."""
    if x.device.type != 'cpu' or x.numel() == 0:
        return False
    if not (any_layout or x.is_contiguous(memory_format=torch.channels_last)):
        return False
    if torch.is_autocast_enabled('cpu'):
        if x.dtype not in (torch.float32, torch.bfloat16) or torch.get_autocast_dtype('cpu') is not torch.bfloat16:
            return False
    elif x.dtype is not torch.float32:
        return False
    if torch.compiler.is_compiling() or _exporting() or not cpu_fusion_enabled('dwconv_kernel'):
        return False
    return _plain_eager(x, *others) and cpu_kernel_built()


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    # oneDNN (CPU) and cuDNN (GPU) depthwise paths; NCHW long bands hit slow generic kernels. A no-op when the caller
    # already runs channels_last (SLaK converts its input once).
    return x.contiguous(memory_format=torch.channels_last)


#: On CPU, a unit whose kernels all have (clipped) edges <= NCHW_MAX_EDGE on a map of <= NCHW_MAX_PIXELS pixels trains
#: faster in NCHW (see :func:`nchw_wins`).
NCHW_MAX_EDGE = 13
NCHW_MAX_PIXELS = 64


def nchw_wins(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """Whether the CPU torch path should run this unit NCHW instead of channels_last (same results).

    Only when gradients are needed, every kernel edge is <= 13 after clipping and the map has <= 64 pixels: SLaK's
    last stage at 224 input (7×7 maps, 13×5 bands). Measured on the 2-core Xeon VM (docs/benchmarks.md, "Layout
    choice"): forward + backward of the three-branch unit 1.1–1.7× faster there, conversions included; from 16×16
    maps on there is no difference, kernels of 21+ taps are 2–10× faster channels_last, and for inference the ~1 ms
    forward showed no difference above the timing noise (identical code: 0.8–1.3×). Never while tracing/exporting.
    """
    if x.device.type != 'cpu' or _exporting() or not torch.is_grad_enabled():
        return False
    if not (x.requires_grad or any(k.requires_grad for k in weights)):
        return False
    h, w = x.shape[2:]
    if h * w > NCHW_MAX_PIXELS or max(max(clip_to_input(k, h, w).shape[2:]) for k in weights) > NCHW_MAX_EDGE:
        return False
    # measured against oneDNN; slak_mm's C++ training kernels (channels_last) are faster still
    return not cpu_train_kernel_applies(x, *weights, any_layout=True)


#: On CPU, inference of a sum of kernels on a map of >= TRANSPOSE_MIN_PIXELS pixels runs each tall band whose clipped
#: height is >= TRANSPOSE_MIN_EDGE as a wide band over the spatially transposed input (see :func:`transposed_kernels`).
TRANSPOSE_MIN_EDGE = 17
TRANSPOSE_MIN_PIXELS = 32 * 32


def transposed_kernels(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> List[bool]:
    """Which kernels of a CPU inference sum (:func:`dwconv2d_sum`) to run on the spatially transposed input.

    oneDNN's channels_last depthwise kernel reuses inputs along a kernel row but not down a column: on the 2-core Xeon
    VM a 51×5 band on a 128×128 map runs at a flat ~30–36 GF/s while its 5×51 transpose reaches ~63 GF/s
    (docs/cpu_performance_log.md, "Tall bands as wide ones"). So a tall band (kh > kw, clipped kh >= 17) is computed as
    the wide band ``conv(x^T, w^T)^T``: one copy of the input with H and W swapped, shared by the unit, and the result
    added back as a transposed view into an output that is already in the result's layout -- hence only when at least
    one kernel stays untransposed. Measured on SLaK-T's folded units: 1.1–1.2× faster on 56–128 px maps, 1.0–1.06× at
    32×32, 0.94–1.01× at 28×28 and 0.85× at 14×14 (the copies dominate), hence maps of >= 32×32 pixels. Only when no
    gradient is needed (the measured case) and never while tracing/exporting. Same results up to float rounding (the
    same products, summed in oneDNN's order for the other orientation).
    """
    off = [False] * len(weights)
    if x.device.type != 'cpu' or _exporting():
        return off
    if torch.is_grad_enabled() and (x.requires_grad or any(k.requires_grad for k in weights)):
        return off
    h, w = x.shape[2:]
    if h * w < TRANSPOSE_MIN_PIXELS:
        return off
    flags = []
    for k in weights:
        kh, kw = clip_to_input(k, h, w).shape[2:]
        flags.append(kh > kw and kh >= TRANSPOSE_MIN_EDGE)
    return off if all(flags) else flags


def _cpu_f32_inference(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor]) -> bool:
    """CPU float32 with no gradient needed, no autocast, not tracing / exporting: where the CPU inference fast paths
    (which have no backward and are opaque to exporters) may run."""
    # Written as plain loops, cheapest test first: it runs before every CPU unit the C++ fast path does not take (the
    # kernel off or not built: the oneDNN path), right after the MLP's GEMMs have evicted the interpreter's working
    # set, where each Python step costs ~10x its warm time (measured).
    if x.is_cuda or x.dtype is not torch.float32 or (bias is not None and bias.dtype is not torch.float32):
        return False
    for w in weights:
        if w.dtype is not torch.float32:
            return False
    if x.device.type != 'cpu' or x.numel() == 0 or torch.is_autocast_enabled('cpu'):
        return False
    return _inference_call(x, weights, bias)


def _inference_call(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor]) -> bool:
    """No gradient needed, not tracing / exporting: where an op without a backward, opaque to exporters, may run.
    Under ``torch.compile`` too (as ``torch.ops.slak_mm.dwconv_sum_cpu``), except on torch < 2.7, which cannot tell
    ``torch.compile`` from ``torch.export`` (nor can the versions whose ``is_exporting()`` is also true under
    ``torch.compile``, pytorch#176347, fixed in March 2026: there compiled models keep oneDNN's convolutions)."""
    if torch.is_grad_enabled():
        if x.requires_grad or (bias is not None and bias.requires_grad):
            return False
        for w in weights:
            if w.requires_grad:
                return False
    if _torch_exporting is None and torch.compiler.is_compiling():
        return False
    return not _exporting()


def cpu_kernel_applies(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor]) -> bool:
    """Whether :func:`dwconv2d_sum` runs slak_mm's C++ CPU kernel (:mod:`slak_mm.ops.cpu_kernel`): CPU float32
    inference (:func:`_cpu_f32_inference`), the ``'dwconv_kernel'`` switch on and the kernel built (on the first
    call that gets this far)."""
    if not (_cpu_f32_inference(x, weights, bias) and cpu_fusion_enabled('dwconv_kernel')):
        return False
    if not (torch.compiler.is_compiling() or _plain_eager(x, *weights, bias)):
        return False
    return cpu_kernel_built()


def cpu_kernel_low_precision_dtype(x: torch.Tensor, weights: Sequence[torch.Tensor],
                                   bias: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """bfloat16 or float16 where :func:`dwconv2d_sum` runs CPU inference in that dtype on slak_mm's C++ kernel, else
    None. Two cases, each with no gradient needed and not tracing / exporting (the ``'dwconv_kernel'`` switch on and
    the kernel built):

    - under CPU autocast (bfloat16 or float16): a float32 or autocast-dtype input, float32 kernels and bias; the
      operands are rounded to the autocast dtype, as autocast's ``F.conv2d`` rounds them;
    - a bfloat16 or float16 model (no autocast): the input, the kernels and the bias all of that dtype.

    The products of the (rounded) operands are exact in float32; the C++ kernel sums them in float32 and the sum is
    rounded once to the dtype. oneDNN's convolutions in these dtypes also accumulate in float32, but round each band's
    output, and then the bands' sum.
    """
    if x.device.type != 'cpu' or x.numel() == 0:
        return None
    if torch.is_autocast_enabled('cpu'):
        dtype, operand_dtype = torch.get_autocast_dtype('cpu'), torch.float32
        if x.dtype not in (torch.float32, dtype):
            return None
    else:
        dtype = operand_dtype = x.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    if any(t.dtype is not operand_dtype for t in (*weights, *(() if bias is None else (bias,)))):
        return None
    if not (_inference_call(x, weights, bias) and cpu_fusion_enabled('dwconv_kernel')):
        return None
    if not (torch.compiler.is_compiling() or _plain_eager(x, *weights, bias)):
        return None
    return dtype if cpu_kernel_built() else None


def cpu_kernel_dtype(x: torch.Tensor, weights: Sequence[torch.Tensor],
                     bias: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """The result's dtype where :func:`dwconv2d_sum` runs slak_mm's C++ CPU kernel: float32
    (:func:`cpu_kernel_applies`) or bfloat16 / float16 (:func:`cpu_kernel_low_precision_dtype`); None elsewhere."""
    if cpu_kernel_applies(x, weights, bias):
        return torch.float32
    return cpu_kernel_low_precision_dtype(x, weights, bias)


def _cpu_kernel_sum(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor],
                    dtype: torch.dtype) -> torch.Tensor:
    """The C++ kernel's sum where :func:`cpu_kernel_dtype` gave ``dtype``: a channels_last ``dtype`` result. float32
    and bfloat16 inside the kernel (the kernel clips the kernels to the map; in bfloat16 it reads a float32 or
    bfloat16 input, rounds it, the kernels and the bias as it reads them and rounds the float32 sum once; kernels and
    bias in bfloat16 are widened to float32 first, exactly); float16 by rounding copies around the float32 kernel."""
    if dtype is torch.float32:
        return _ck.cpu_dwconv_sum(_channels_last(x), list(weights), bias)
    if dtype is torch.bfloat16:
        return _ck.cpu_dwconv_sum_bf16(_channels_last(x), [w.float() for w in weights],
                                   None if bias is None else bias.float())

    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).float()

    with torch.autocast('cpu', enabled=False):
        out = _ck.cpu_dwconv_sum(_channels_last(rounded(x)), [rounded(w) for w in weights],
                             None if bias is None else rounded(bias))
    return out.to(dtype)


@torch.library.custom_op('slak_mm::dwconv_sum_cpu', mutates_args=())
def _dwconv_sum_cpu_op(x: torch.Tensor, weights: List[torch.Tensor], bias: Optional[torch.Tensor],
                       dtype: torch.dtype) -> torch.Tensor:
    """:func:`_cpu_kernel_sum` as an op ``torch.compile`` keeps in its graphs (``torch.ops.slak_mm.dwconv_sum_cpu``):
    a compiled model's CPU inference runs the C++ kernel as the eager model does, not oneDNN's convolutions. No
    backward (called only where no gradient is needed); not used while exporting (:func:`_exporting`)."""
    return _cpu_kernel_sum(x, weights, bias, dtype)


@_dwconv_sum_cpu_op.register_fake
def _(x, weights, bias, dtype):
    return torch.empty(x.shape, dtype=dtype, device=x.device, memory_format=torch.channels_last)


def fused_sum_applies(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor]) -> bool:
    """Whether :func:`dwconv2d_sum` may accumulate its kernels through oneDNN's convolution + add post-op.

    CPU float32 inference of two or more kernels only: no gradient needed (the op has no backward), no autocast, not
    tracing / exporting / compiling, oneDNN enabled and the ``'conv_add'`` fusion not switched off
    (:func:`slak_mm.ops.cpu_fusion.cpu_fusions_disabled`). Same products as the separate convolutions and add; only
    the order of the final additions may differ (float32 rounding).
    """
    return (len(weights) >= 2 and _cpu_f32_inference(x, weights, bias) and not torch.compiler.is_compiling()
            and cpu_fusion_enabled('conv_add', '_convolution_pointwise'))


def _fused_dwconv_sum(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``sum_k dwconv2d(x, weights[k]) + bias``, each convolution after the first accumulating into the running sum
    (``torch.ops.mkldnn._convolution_pointwise_.binary``): oneDNN's sum post-op, so no separate pass over the
    activations per extra kernel. A tall band run over the transposed map (:func:`transposed_kernels`) accumulates
    into the transposed view of the sum instead, which oneDNN cannot take: PyTorch then adds its output in place.
    The first convolution runs on ``x`` itself (there always is one), so the sum is channels_last in ``x``'s
    orientation. Measured against separate convolutions and adds in docs/cpu_performance_log.md ("Band sum as a
    convolution post-op")."""
    x = _channels_last(x)
    groups, (h, w) = x.shape[1], x.shape[2:]
    flags = transposed_kernels(x, weights)
    xt = _channels_last(x.transpose(2, 3)) if any(flags) else None
    out = None
    for k in sorted(range(len(weights)), key=lambda k: flags[k]):
        inp, kernel = _oriented(x, xt, clip_to_input(weights[k], h, w), flags[k])
        padding = [kernel.shape[2] // 2, kernel.shape[3] // 2]
        if out is None:
            out = F.conv2d(inp, kernel, bias, padding=padding, groups=groups)
        else:
            torch.ops.mkldnn._convolution_pointwise_.binary(out.transpose(2, 3) if flags[k] else out, inp, kernel,
                                                            None, padding, [1, 1], [1, 1], groups, 'add', None,
                                                            None, [], None)
    return out


def _torch_dwconvs(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor],
                   allow_transpose: bool = False) -> List[torch.Tensor]:
    """PyTorch path: each kernel's output (``bias`` added to the first), in the layout that is fastest here. With
    ``allow_transpose`` (summed outputs), tall bands may come back as transposed views (:func:`transposed_kernels`)."""
    if nchw_wins(x, weights):
        x = x.contiguous()
        # clone: SLaK keeps (C, 1, kh, kw) weights channels_last, which would pull the conv back to channels_last
        return [_torch_dwconv(x, w.clone(memory_format=torch.contiguous_format), bias if k == 0 else None, fft=False)
                for k, w in enumerate(weights)]
    x = _channels_last(x)
    flags = transposed_kernels(x, weights) if allow_transpose else [False] * len(weights)
    xt = _channels_last(x.transpose(2, 3)) if any(flags) else None
    outs = []
    for k, (w, flag) in enumerate(zip(weights, flags)):
        y = _torch_dwconv(*_oriented(x, xt, w, flag), bias if k == 0 else None)
        outs.append(y.transpose(2, 3) if flag else y)
    return outs


def _oriented(x: torch.Tensor, xt: Optional[torch.Tensor], kernel: torch.Tensor, transposed: bool) -> tuple:
    """(input, kernel) for one band: ``x`` and the kernel as given, or for a tall band run as a wide one
    (:func:`transposed_kernels`) the transposed map ``xt`` and the transposed kernel, channels_last like SLaK's."""
    if not transposed:
        return x, kernel
    return xt, kernel.transpose(2, 3).contiguous(memory_format=torch.channels_last)


def _torch_dwconv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  fft: bool = True) -> torch.Tensor:
    """PyTorch path for one kernel, in ``x``'s layout."""
    if not _exporting():  # exported graphs keep dynamic sizes
        weight = clip_to_input(weight, x.shape[2], x.shape[3])
    kh, kw = weight.shape[2:]
    if x.device.type != 'cpu' or not torch.is_grad_enabled() or _exporting() or not (
            weight.requires_grad or x.requires_grad or (bias is not None and bias.requires_grad)):
        return F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=x.shape[1])
    if not (torch.compiler.is_compiling() or _plain_eager(x, weight, bias)):  # fake tensors, dispatch modes
        return F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=x.shape[1])
    # a gradient is needed: slak_mm's C++ kernels where they apply, else the weight gradient by FFT or oneDNN
    fft = fft and weight.requires_grad and fft_weight_grad_wins(kh, kw)
    if torch.is_autocast_enabled('cpu'):
        dtype = torch.get_autocast_dtype('cpu')
        if weight.dtype == torch.float32 and x.dtype in (torch.float32, dtype) and dtype != torch.float32 and (
                bias is None or bias.dtype == torch.float32):
            x = x.to(dtype)
            mode = 'kernel' if cpu_train_kernel_applies(x) else 'fft' if fft else 'onednn'
            if mode != 'onednn' or weight.requires_grad:
                return _CPUDepthwise.apply(x, weight, bias, mode)
    elif x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype and (
            bias is None or bias.dtype == x.dtype):
        if cpu_train_kernel_applies(x):  # (weight and bias: plain, checked above)
            return _CPUDepthwise.apply(x, weight, bias, 'kernel')
        if fft:
            return _CPUDepthwise.apply(x, weight, bias, 'fft')
    return F.conv2d(x, weight, bias, padding=(kh // 2, kw // 2), groups=x.shape[1])


def _autocast(x: torch.Tensor, tensors: Sequence[Optional[torch.Tensor]]) -> tuple:
    """Apply autocast's conv rule (inputs to the autocast dtype) for the Triton path, which bypasses F.conv2d."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return x.to(dtype), [t.to(dtype) if t is not None else None for t in tensors]
    dtypes = {x.dtype} | {t.dtype for t in tensors if t is not None}
    if len(dtypes) != 1:
        raise TypeError(f"dwconv2d: input and weight/bias dtypes differ ({sorted(map(str, dtypes))}); cast them to "
                        "one dtype or run under torch.autocast")
    return x, list(tensors)


def _functorch_call(*tensors: Optional[torch.Tensor]) -> bool:
    """Inside a torch.func transform (vmap, grad, ...): the operands are functorch wrappers. (Not asked while
    ``torch.compile`` traces: dynamo cannot trace the query, and handles the transforms itself.)"""
    if torch.compiler.is_compiling():
        return False
    return any(t is not None and _functorch_wrapped(t) for t in tensors)


def _plain_convs(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """Each kernel's ``F.conv2d`` (``bias`` added to the first), nothing else: under torch.func transforms, which
    batch and differentiate PyTorch's own ops but not slak_mm's kernels, autograd Functions or memory-format
    queries (``is_contiguous(memory_format=...)`` is not supported inside vmap)."""
    return [F.conv2d(x, w, bias if k == 0 else None, padding=(w.shape[2] // 2, w.shape[3] // 2), groups=x.shape[1])
            for k, w in enumerate(weights)]


def dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
             impl: str = 'auto') -> torch.Tensor:
    """Depthwise 'same' convolution. x: (N, C, H, W); weight: (C, 1, kh, kw), kh and kw odd; bias: (C,) or None.

    Returns (N, C, H, W). Differentiable w.r.t. x, weight and bias.
    """
    return dwconv2d_sum(x, [weight], bias, impl)


def dwconv2d_sum(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor] = None,
                 impl: str = 'auto') -> torch.Tensor:
    """``sum_k dwconv2d(x, weights[k]) + bias`` (kernels of any odd sizes). Triton: one launch per group of kernels
    of one orientation and width (SLaK's bands: two), summed in float32 and rounded once."""
    kernel = loaded_cpu_kernel()
    if (kernel is not None and (impl == 'auto' or impl == 'torch') and 'dwconv_kernel' not in _disabled_fusions
            and not torch.compiler.is_compiling()):
        # CPU float32 inference in one C++ call (checks, clipping, layout, kernel), or None for anything else; the
        # path below then decides, as it does for the first call (which builds / loads the kernel)
        out = kernel.dwconv_sum_auto(x, weights, bias)
        if out is not None:
            return out
    for k, w in enumerate(weights):
        check_dwconv_args(x, w, bias if k == 0 else None, impl)
    if _functorch_call(x, *weights, bias):
        return sum(_plain_convs(x, weights, bias))
    if resolve_impl(impl, x) == 'triton':
        from .triton_dwconv import dwconv_branches
        x, (b, *ws) = _autocast(x, [bias, *weights])
        return dwconv_branches(x, ws, b, sum_outputs=True)
    dtype = cpu_kernel_dtype(x, weights, bias)
    if dtype is not None:
        if torch.compiler.is_compiling():
            return torch.ops.slak_mm.dwconv_sum_cpu(x, list(weights), bias, dtype)
        return _cpu_kernel_sum(x, weights, bias, dtype)
    if fused_sum_applies(x, weights, bias):
        return _fused_dwconv_sum(x, weights, bias)
    outs = _torch_dwconvs(x, weights, bias, allow_transpose=True)
    # Start from an output in the result's layout (a transposed band comes back as a transposed view): the sum then
    # keeps that layout and the final conversion is a no-op. (Two comprehensions, not a sort with a key function,
    # which torch 2.5's torch.compile / torch.export cannot trace: 16 graph breaks in SLaK, no export.)
    cl = [y.is_contiguous(memory_format=torch.channels_last) for y in outs]
    outs = [y for y, c in zip(outs, cl) if c] + [y for y, c in zip(outs, cl) if not c]
    out = outs[0]
    for y in outs[1:]:
        out = out + y
    return _channels_last(out)


def dwconv2d_branches(x: torch.Tensor, weights: Sequence[torch.Tensor], impl: str = 'auto') -> List[torch.Tensor]:
    """``[dwconv2d(x, w) for w in weights]`` (SLaK's training-mode unit, where each branch's output feeds its own
    BatchNorm). Triton computes kernels of one orientation and width from the same loads (SLaK's M×N and N×N
    branches in one launch, the N×M branch in a second)."""
    for w in weights:
        check_dwconv_args(x, w, None, impl)
    if _functorch_call(x, *weights):
        return _plain_convs(x, weights, None)
    if resolve_impl(impl, x) == 'triton':
        from .triton_dwconv import dwconv_branches
        x, ws = _autocast(x, weights)
        return list(dwconv_branches(x, ws, None, sum_outputs=False))
    return [_channels_last(y) for y in _torch_dwconvs(x, weights, None)]
