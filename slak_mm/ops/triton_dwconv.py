"""Triton kernels for stride-1 'same' depthwise convolution: forward, input-gradient, weight-gradient, fused branches.

No compile step: Triton JIT-compiles on first use for the GPU it runs on. Imported lazily by
:mod:`slak_mm.ops.dwconv` (only when ``impl='triton'`` is chosen), so ``slak_mm`` imports without Triton.

Kernels
  ``_dw_fwd_kernel``   up to three depthwise branches over one output tile. ``SUM=False`` writes one output per
                       branch (SLaK's training-mode M×N, N×M and N×N unit: each branch needs its own output for its
                       BatchNorm); ``SUM=True`` writes their sum plus bias (the deployed cross-shaped kernel as two
                       bands, and the input-gradient of the unit: the sum of the three transposed convolutions).
                       ``SHARE=True`` (branches read the same input and the third kernel lies inside the first's
                       columns, SLaK's N×N inside M×N) accumulates the third branch from the first branch's loads.
  ``_dw_wgrad_kernel`` weight-gradient partial sums over a chunk of rows, reduced deterministically afterwards.

Padding-only taps are skipped per tile: a program only loops over the kernel rows/columns whose shifted window
overlaps the feature map, so maps smaller than the kernel cost what their valid taps cost. Any memory layout works
(strides are arguments); the wrapper keeps NCHW or channels_last as given. Accumulation is fp32 for fp32, fp16 and
bf16 inputs.
"""
import os
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

#: Whether the kernels below were created for Triton's CPU interpreter (TRITON_INTERPRET=1 at import time).
INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _tap_range(k, n, start, stop):
    """Kernel taps [lo, hi) along one axis whose shifted window meets the map for outputs in [start, stop)."""
    pad = k // 2
    lo = tl.maximum(pad - (stop - 1), 0)
    hi = tl.minimum(n - start + pad, k)
    return lo, hi


@triton.jit
def _accumulate(acc, x_ptr, w_ptr, C, c, cmask, xoff_c, oh, ow, h0, h1, w0, w1, H, W, sxh, sxw, KH, KW):
    """acc[p, c] += sum over valid taps (i, j) of x[oh + i - KH//2, ow + j - KW//2, c] * w[i, j, c].

    Weights are tap-major (KH, KW, C) so each tap's channel vector is one contiguous load."""
    i_lo, i_hi = _tap_range(KH, H, h0, h1)
    j_lo, j_hi = _tap_range(KW, W, w0, w1)
    for i in range(i_lo, i_hi):
        ih = oh + (i - KH // 2)
        rmask = (ih >= 0) & (ih < H)
        roff = ih * sxh
        for j in range(j_lo, j_hi):
            iw = ow + (j - KW // 2)
            m = rmask & (iw >= 0) & (iw < W)
            xv = tl.load(x_ptr + (roff + iw * sxw)[:, None] + xoff_c[None, :], mask=m[:, None] & cmask[None, :],
                         other=0.)
            wv = tl.load(w_ptr + (i * KW + j) * C + c, mask=cmask, other=0.)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    return acc


@triton.jit
def _accumulate_shared(acc, acc2, x_ptr, w_ptr, w2_ptr, C, c, cmask, xoff_c, oh, ow, h0, h1, w0, w1, H, W, sxh, sxw,
                       KH, KW, KH2):
    """:func:`_accumulate` for the first kernel, plus a centred (KH2, KW) kernel from the same loads into acc2."""
    i_lo, i_hi = _tap_range(KH, H, h0, h1)
    j_lo, j_hi = _tap_range(KW, W, w0, w1)
    d = KH // 2 - KH2 // 2  # row offset of the second kernel inside the first
    for i in range(i_lo, i_hi):
        ih = oh + (i - KH // 2)
        rmask = (ih >= 0) & (ih < H)
        roff = ih * sxh
        in_second = (i >= d) & (i < d + KH2)
        for j in range(j_lo, j_hi):
            iw = ow + (j - KW // 2)
            m = rmask & (iw >= 0) & (iw < W)
            xv = tl.load(x_ptr + (roff + iw * sxw)[:, None] + xoff_c[None, :], mask=m[:, None] & cmask[None, :],
                         other=0.).to(tl.float32)
            wv = tl.load(w_ptr + (i * KW + j) * C + c, mask=cmask, other=0.)
            acc += xv * wv.to(tl.float32)[None, :]
            if in_second:
                w2v = tl.load(w2_ptr + ((i - d) * KW + j) * C + c, mask=cmask, other=0.)
                acc2 += xv * w2v.to(tl.float32)[None, :]
    return acc, acc2


@triton.jit
def _dw_fwd_kernel(x0_ptr, x1_ptr, x2_ptr, w0_ptr, w1_ptr, w2_ptr, bias_ptr, y0_ptr, y1_ptr, y2_ptr,
                   C, H, W, sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                   KH0, KW0, KH1, KW1, KH2, KW2,
                   NB: tl.constexpr, SUM: tl.constexpr, SHARE: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_s, pid_c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_tw = tl.cdiv(W, BLOCK_W)
    h0 = (pid_s // n_tw) * BLOCK_H
    w0 = (pid_s % n_tw) * BLOCK_W
    h1 = tl.minimum(h0 + BLOCK_H, H)
    w1 = tl.minimum(w0 + BLOCK_W, W)
    p = tl.arange(0, BLOCK_H * BLOCK_W)
    oh = h0 + p // BLOCK_W
    ow = w0 + p % BLOCK_W
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    xoff_c = c * sxc
    xb = n.to(tl.int64) * sxn
    acc0 = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_C], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_H * BLOCK_W, BLOCK_C], dtype=tl.float32)
    if SHARE:
        acc0, acc2 = _accumulate_shared(acc0, acc2, x0_ptr + xb, w0_ptr, w2_ptr, C, c, cmask, xoff_c, oh, ow,
                                        h0, h1, w0, w1, H, W, sxh, sxw, KH0, KW0, KH2)
    else:
        acc0 = _accumulate(acc0, x0_ptr + xb, w0_ptr, C, c, cmask, xoff_c, oh, ow, h0, h1, w0, w1, H, W, sxh, sxw,
                           KH0, KW0)
    if NB > 1:
        acc1 = _accumulate(acc1, x1_ptr + xb, w1_ptr, C, c, cmask, xoff_c, oh, ow, h0, h1, w0, w1, H, W, sxh, sxw,
                           KH1, KW1)
    if NB > 2:
        if not SHARE:
            acc2 = _accumulate(acc2, x2_ptr + xb, w2_ptr, C, c, cmask, xoff_c, oh, ow, h0, h1, w0, w1, H, W, sxh, sxw,
                               KH2, KW2)
    yoff = n.to(tl.int64) * syn + (oh * syh + ow * syw)[:, None] + (c * syc)[None, :]
    ymask = ((oh < H) & (ow < W))[:, None] & cmask[None, :]
    if SUM:
        acc0 = acc0 + acc1 + acc2
    if HAS_BIAS:
        acc0 += tl.load(bias_ptr + c, mask=cmask, other=0.).to(tl.float32)[None, :]
    tl.store(y0_ptr + yoff, acc0.to(y0_ptr.dtype.element_ty), mask=ymask)
    if not SUM:
        if NB > 1:
            tl.store(y1_ptr + yoff, acc1.to(y1_ptr.dtype.element_ty), mask=ymask)
        if NB > 2:
            tl.store(y2_ptr + yoff, acc2.to(y2_ptr.dtype.element_ty), mask=ymask)


@triton.jit
def _dw_wgrad_kernel(x_ptr, dy_ptr, part_ptr, C, H, W, NH, ROWS,
                     sxn, sxc, sxh, sxw, syn, syc, syh, syw, KH, KW,
                     BLOCK_P: tl.constexpr, BLOCK_KW: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[s, c, i, j0:j0+BLOCK_KW] = sum over rows r in chunk s (r = n*H + h) and all w of
    dy[n, c, h, w] * x[n, c, h + i - KH//2, w + j - KW//2]. Rows whose shifted row falls in the padding are skipped."""
    pid_t, pid_c, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_jb = tl.cdiv(KW, BLOCK_KW)
    i = pid_t // n_jb
    jj = (pid_t % n_jb) * BLOCK_KW + tl.arange(0, BLOCK_KW)
    jmask = jj < KW
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    acc = tl.zeros([BLOCK_KW, BLOCK_C], dtype=tl.float32)
    r_start = pid_s * ROWS
    r_stop = tl.minimum(r_start + ROWS, NH)
    for r in range(r_start, r_stop):
        n = r // H
        h = r % H
        ih = h + i - KH // 2
        if (ih >= 0) & (ih < H):
            ybase = n.to(tl.int64) * syn + h * syh
            xbase = n.to(tl.int64) * sxn + ih * sxh
            for w0 in range(0, W, BLOCK_P):
                w = w0 + tl.arange(0, BLOCK_P)
                wmask = w < W
                dy = tl.load(dy_ptr + ybase + (w * syw)[:, None] + (c * syc)[None, :],
                             mask=wmask[:, None] & cmask[None, :], other=0.).to(tl.float32)
                iw = w[:, None] + jj[None, :] - KW // 2
                m = wmask[:, None] & jmask[None, :] & (iw >= 0) & (iw < W)
                xv = tl.load(x_ptr + xbase + (iw * sxw)[:, :, None] + (c * sxc)[None, None, :],
                             mask=m[:, :, None] & cmask[None, None, :], other=0.).to(tl.float32)
                acc += tl.sum(xv * dy[:, None, :], axis=0)
    off = pid_s.to(tl.int64) * (C * KH * KW) + (c * (KH * KW))[None, :] + (i * KW + jj)[:, None]
    tl.store(part_ptr + off, acc, mask=jmask[:, None] & cmask[None, :])


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """NCHW unless the tensor is (only) channels_last-contiguous; other strides are made NCHW-contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _fwd_blocks(c: int, h: int, w: int, channels_last: bool):
    """Tile shape: channels innermost for channels_last (coalesced over C), width innermost for NCHW."""
    if channels_last:
        bc = min(32, _pow2(c))
        return 4, 8, bc
    bw = min(32, _pow2(w))
    return max(1, min(64 // bw, _pow2(h))), bw, min(4, _pow2(c))


def _num_chunks(device: torch.device, programs: int, rows: int) -> int:
    target = 4 * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == 'cuda' else 1)
    return max(1, min(rows, -(-target // max(1, programs))))


def _launch_fwd(xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor],
                sum_outputs: bool, share: bool) -> List[torch.Tensor]:
    """Run ``_dw_fwd_kernel`` over inputs ``xs`` (same shape and strides) with (C, 1, kh, kw) ``weights``."""
    x = xs[0]
    n, c, h, w = x.shape
    fmt = memory_format_of(x)
    nb = len(weights)
    outs = [torch.empty_like(x, memory_format=fmt) for _ in range(1 if sum_outputs else nb)]
    if x.numel() == 0:
        return outs
    ws = [k.permute(2, 3, 0, 1).contiguous() for k in weights]  # (kh, kw, C, 1): tap-major, channels contiguous
    ws += [ws[0]] * (3 - nb)
    xs = list(xs) + [xs[0]] * (3 - len(xs))
    ys = outs + [outs[0]] * (3 - len(outs))
    sizes = [(k.shape[0], k.shape[1]) for k in ws]
    bh, bw, bc = _fwd_blocks(c, h, w, fmt == torch.channels_last)
    grid = (triton.cdiv(h, bh) * triton.cdiv(w, bw), triton.cdiv(c, bc), n)
    _dw_fwd_kernel[grid](xs[0], xs[1], xs[2], ws[0], ws[1], ws[2], bias if bias is not None else ws[0],
                         ys[0], ys[1], ys[2], c, h, w, *x.stride(), *outs[0].stride(),
                         sizes[0][0], sizes[0][1], sizes[1][0], sizes[1][1], sizes[2][0], sizes[2][1],
                         NB=nb, SUM=sum_outputs, SHARE=share, HAS_BIAS=bias is not None,
                         BLOCK_H=bh, BLOCK_W=bw, BLOCK_C=bc)
    return outs


def _launch_wgrad(x: torch.Tensor, dy: torch.Tensor, kernel_size, dtype: torch.dtype) -> torch.Tensor:
    """d(loss)/d(weight) of shape (C, 1, kh, kw) for output gradient ``dy`` (same shape and strides as ``x``)."""
    n, c, h, w = x.shape
    kh, kw = kernel_size
    if x.numel() == 0:
        return torch.zeros(c, 1, kh, kw, device=x.device, dtype=dtype)
    channels_last = memory_format_of(x) == torch.channels_last
    bkw = min(16, _pow2(kw))
    bc = min(32 if channels_last else 8, _pow2(c))
    bp = min(16 if channels_last else 32, _pow2(w))
    programs = kh * triton.cdiv(kw, bkw) * triton.cdiv(c, bc)
    chunks = _num_chunks(x.device, programs, n * h)
    rows = -(-(n * h) // chunks)
    chunks = -(-(n * h) // rows)
    part = torch.empty(chunks, c, kh, kw, device=x.device, dtype=torch.float32)
    grid = (kh * triton.cdiv(kw, bkw), triton.cdiv(c, bc), chunks)
    _dw_wgrad_kernel[grid](x, dy, part, c, h, w, n * h, rows, *x.stride(), *dy.stride(), kh, kw,
                           BLOCK_P=bp, BLOCK_KW=bkw, BLOCK_C=bc)
    return part.sum(0).unsqueeze(1).to(dtype)


def _can_share(weights: Sequence[torch.Tensor]) -> bool:
    """Third kernel centred inside the first one's columns (SLaK: N×N inside M×N): reuse the first one's loads."""
    return (len(weights) == 3 and weights[2].shape[3] == weights[0].shape[3]
            and weights[2].shape[2] <= weights[0].shape[2])


class _DepthwiseBranches(torch.autograd.Function):
    """Outputs of several 'same' depthwise convs of one input (or their sum + bias), differentiable."""

    @staticmethod
    def forward(ctx, x, bias, sum_outputs, *weights):
        x = x.contiguous(memory_format=memory_format_of(x))
        outs = _launch_fwd([x] * len(weights), weights, bias, sum_outputs, not sum_outputs and _can_share(weights))
        ctx.save_for_backward(x, *weights)
        ctx.sum_outputs, ctx.has_bias = sum_outputs, bias is not None
        return outs[0] if sum_outputs else tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        fmt = memory_format_of(x)
        grads = [g.to(x.dtype).contiguous(memory_format=fmt) if g is not None else None for g in grads]
        if ctx.sum_outputs:
            grads = grads * len(weights)
        dx = db = None
        live = [(g, k) for g, k in zip(grads, weights) if g is not None]
        if ctx.needs_input_grad[0] and live:
            # The transposed 'same' conv of an odd kernel is the 'same' conv with the flipped kernel.
            dx = _launch_fwd([g for g, _ in live], [k.flip(2, 3) for _, k in live], None, True, False)[0]
        if ctx.has_bias and ctx.needs_input_grad[1]:
            db = grads[0].sum((0, 2, 3), dtype=torch.float32).to(x.dtype)
        dws = [_launch_wgrad(x, g, k.shape[2:], k.dtype) if need and g is not None else None
               for g, k, need in zip(grads, weights, ctx.needs_input_grad[3:])]
        return (dx, db, None, *dws)


def dwconv_branches(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor] = None,
                    sum_outputs: bool = False):
    """Triton entry point (arguments already validated by :mod:`slak_mm.ops.dwconv`)."""
    if len(weights) not in (1, 2, 3):
        raise ValueError(f'Triton depthwise kernel takes 1 to 3 kernels, got {len(weights)}')
    if bias is not None and not sum_outputs:
        raise ValueError('bias is only supported for a single kernel or summed outputs')
    return _DepthwiseBranches.apply(x, bias, sum_outputs, *weights)
