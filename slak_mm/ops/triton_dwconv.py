"""Triton kernels for stride-1 'same' depthwise convolution: forward, input-gradient, weight-gradient, fused branches.

No compile step: Triton JIT-compiles on first use for the GPU it runs on. Imported lazily by
:mod:`slak_mm.ops.dwconv` (only when ``impl='triton'`` is chosen), so ``slak_mm`` imports without Triton.

Kernels (register-blocked: each input tile loaded feeds several outputs' products)
  ``_dw_rows_kernel``  one or two kernels of the same width over a tile of four output rows × BLOCK_W columns ×
                       BLOCK_C channels. Walking down the input rows, each input tile is loaded once per (input row,
                       tap column) and feeds the four output rows' products (kernel rows i, i - 1, i - 2, i - 3), and
                       also the second kernel's when both read one input (SLaK's N×N branch inside the M×N one).
                       Kernels wider than tall run on the transposed map (H and W strides swapped, no copy), so the
                       four rows always lie along the kernel's long side: SLaK's unit is two launches, M×N + N×N and
                       N×M. ``SUM=False`` writes one output per kernel (training mode: each branch feeds its own
                       BatchNorm); ``SUM=True`` writes their sum plus bias (deployed bands; the unit's input
                       gradient, the sum of the transposed convolutions), the launches adding up in a float32
                       partial sum that the last one rounds once.
  ``_dw_wgrad_kernel`` weight-gradient partial sums for four kernel rows of one tap column over a chunk of output
                       rows: walking down the rows, the four taps' input rows slide by one, so each step loads one
                       input row and one output-gradient row for four products. Chunks are reduced deterministically
                       afterwards.

Inputs run channels_last (NCHW ones are copied), where either orientation reads whole channel vectors; outputs keep
the caller's layout. Padding-only taps are skipped per tile: a program only visits the tap columns and input rows
that reach the map, so maps smaller than the kernel cost what their valid taps cost. Accumulation is fp32 for fp32,
fp16 and bf16 inputs. Instruction mix on sm_90, compiled without a GPU: ``python tools/triton_sass_stats.py``.
"""
import os
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
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
def _rows4(a0, a1, a2, a3, xv, w_ptr, i, j, KW, CP, c):
    """a_r += xv * w[i - r, j, c] for the four output rows r = 0..3.

    Weights are tap-major float32 (3 + KH + 3, KW, CP), zero-padded: three zero rows each side (so rows i - r that
    miss the kernel add zeros) and channels up to CP, a multiple of the channel block (so no load needs a mask).
    One input tile, loaded once by the caller, feeds the four rows' products."""
    wp = w_ptr + ((i + 3) * KW + j) * CP + c
    a0 += xv * tl.load(wp)[None, :]
    a1 += xv * tl.load(wp - KW * CP)[None, :]
    a2 += xv * tl.load(wp - 2 * KW * CP)[None, :]
    a3 += xv * tl.load(wp - 3 * KW * CP)[None, :]
    return a0, a1, a2, a3


@triton.jit
def _store_row(y_ptr, part_ptr, acc, yb, oh, ow, c, cmask, H, W, syc, syh, syw, PARTIAL_IN: tl.constexpr):
    """Store one output row's tile (plus the float32 partial sum of earlier launches, if any)."""
    off = yb + oh * syh + (ow * syw)[:, None] + (c * syc)[None, :]
    # the row test as a vector (see _wgrad_row)
    m = ((ow < W) & (oh + 0 * ow < H))[:, None] & cmask[None, :]
    if PARTIAL_IN:
        acc += tl.load(part_ptr + off, mask=m, other=0.)
    tl.store(y_ptr + off, acc.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dw_rows_kernel(x0_ptr, x1_ptr, w0_ptr, w1_ptr, bias_ptr, y0_ptr, y1_ptr, part_ptr,
                    C, H, W, sxn, sxc, sxh, sxw, syn, syc, syh, syw, KH0, KH1, KW, CP,
                    NK: tl.constexpr, SAME_X: tl.constexpr, SUM: tl.constexpr, PARTIAL_IN: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """One or two depthwise kernels of the same width KW (kernel 1 no taller than kernel 0) over a tile of four
    output rows × BLOCK_W columns × BLOCK_C channels. Each input tile is loaded once per (input row, tap column) and
    feeds the four rows' products (and kernel 1's, when SAME_X): four products per input load, not one.
    SUM: kernel 1 adds into kernel 0's output (y0); else it writes y1. PARTIAL_IN adds a float32 partial sum
    (part_ptr, y's strides) before storing."""
    pid_s, pid_c, n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_tw = tl.cdiv(W, BLOCK_W)
    h0 = (pid_s // n_tw) * 4
    w0 = (pid_s % n_tw) * BLOCK_W
    w1 = tl.minimum(w0 + BLOCK_W, W)
    ow = w0 + tl.arange(0, BLOCK_W)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    xoff_c = c * sxc
    xb = n.to(tl.int64) * sxn
    a0 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    a1, a2, a3 = a0, a0, a0
    b0, b1, b2, b3 = a0, a0, a0, a0
    # input rows that reach output rows h0 .. h0 + 3 through kernel 0: [lo0, h0 + 4 + KH0 // 2), clipped to the map
    # (kernel 1's, [lo1, hi1), are a subset); each kernel's tap row for output row h0 is ih - lo
    lo0 = h0 - KH0 // 2
    lo1 = h0 - KH1 // 2
    hi1 = h0 + 4 + KH1 // 2
    j_lo, j_hi = _tap_range(KW, W, w0, w1)
    for j in range(j_lo, j_hi):
        iw = ow + (j - KW // 2)
        m = ((iw >= 0) & (iw < W))[:, None] & cmask[None, :]
        off = xb + (iw * sxw)[:, None] + xoff_c[None, :]
        for ih in range(tl.maximum(lo0, 0), tl.minimum(h0 + 4 + KH0 // 2, H)):
            xv = tl.load(x0_ptr + off + ih * sxh, mask=m, other=0.).to(tl.float32)
            a0, a1, a2, a3 = _rows4(a0, a1, a2, a3, xv, w0_ptr, ih - lo0, j, KW, CP, c)
            if NK == 2:
                if (ih >= lo1) & (ih < hi1):
                    if not SAME_X:
                        xv = tl.load(x1_ptr + off + ih * sxh, mask=m, other=0.).to(tl.float32)
                    if SUM:
                        a0, a1, a2, a3 = _rows4(a0, a1, a2, a3, xv, w1_ptr, ih - lo1, j, KW, CP, c)
                    else:
                        b0, b1, b2, b3 = _rows4(b0, b1, b2, b3, xv, w1_ptr, ih - lo1, j, KW, CP, c)
    if HAS_BIAS:
        bv = tl.load(bias_ptr + c, mask=cmask, other=0.).to(tl.float32)[None, :]
        a0, a1, a2, a3 = a0 + bv, a1 + bv, a2 + bv, a3 + bv
    yb = n.to(tl.int64) * syn
    _store_row(y0_ptr, part_ptr, a0, yb, h0, ow, c, cmask, H, W, syc, syh, syw, PARTIAL_IN)
    _store_row(y0_ptr, part_ptr, a1, yb, h0 + 1, ow, c, cmask, H, W, syc, syh, syw, PARTIAL_IN)
    _store_row(y0_ptr, part_ptr, a2, yb, h0 + 2, ow, c, cmask, H, W, syc, syh, syw, PARTIAL_IN)
    _store_row(y0_ptr, part_ptr, a3, yb, h0 + 3, ow, c, cmask, H, W, syc, syh, syw, PARTIAL_IN)
    if NK == 2:
        if not SUM:
            _store_row(y1_ptr, part_ptr, b0, yb, h0, ow, c, cmask, H, W, syc, syh, syw, False)
            _store_row(y1_ptr, part_ptr, b1, yb, h0 + 1, ow, c, cmask, H, W, syc, syh, syw, False)
            _store_row(y1_ptr, part_ptr, b2, yb, h0 + 2, ow, c, cmask, H, W, syc, syh, syw, False)
            _store_row(y1_ptr, part_ptr, b3, yb, h0 + 3, ow, c, cmask, H, W, syc, syh, syw, False)


@triton.jit
def _wgrad_row(x_ptr, xoff, xm, ih, sxh, H, ROW_MASK: tl.constexpr):
    """One row's tile as float32: zero outside rows [0, H) if ROW_MASK (else the caller knows the row is inside).

    Scalar tests enter masks as vectors (``ih + 0 * xoff``), here and in the other kernels: Triton 3.9's interpreter
    gives ``tensor & (scalar comparison)`` an int32 result that tl.load / tl.store reject as a mask. The compiled
    code is the same either way (docs/benchmarks.md, "Triton versions")."""
    if ROW_MASK:
        row = ih + 0 * xoff
        xm = xm & (row >= 0) & (row < H)
    return tl.load(x_ptr + xoff + ih * sxh, mask=xm, other=0.).to(tl.float32)


@triton.jit
def _wgrad_steps(a0, a1, a2, a3, s0, s1, s2, x_ptr, dy_ptr, xoff, yoff, xm, h, base, sxh, syh, H, h_hi,
                 ROW_MASK: tl.constexpr):
    """Four output rows h .. h + 3: each loads the next input row into the window (s0..s3, rotating) and its
    output-gradient row, and adds four products; the window comes back in the same order."""
    s3 = _wgrad_row(x_ptr, xoff, xm, base + 3, sxh, H, ROW_MASK)
    d = _wgrad_row(dy_ptr, yoff, xm, h, syh, h_hi, ROW_MASK)
    a0, a1, a2, a3 = a0 + d * s0, a1 + d * s1, a2 + d * s2, a3 + d * s3
    s0 = _wgrad_row(x_ptr, xoff, xm, base + 4, sxh, H, ROW_MASK)
    d = _wgrad_row(dy_ptr, yoff, xm, h + 1, syh, h_hi, ROW_MASK)
    a0, a1, a2, a3 = a0 + d * s1, a1 + d * s2, a2 + d * s3, a3 + d * s0
    s1 = _wgrad_row(x_ptr, xoff, xm, base + 5, sxh, H, ROW_MASK)
    d = _wgrad_row(dy_ptr, yoff, xm, h + 2, syh, h_hi, ROW_MASK)
    a0, a1, a2, a3 = a0 + d * s2, a1 + d * s3, a2 + d * s0, a3 + d * s1
    s2 = _wgrad_row(x_ptr, xoff, xm, base + 6, sxh, H, ROW_MASK)
    d = _wgrad_row(dy_ptr, yoff, xm, h + 3, syh, h_hi, ROW_MASK)
    a0, a1, a2, a3 = a0 + d * s3, a1 + d * s0, a2 + d * s1, a3 + d * s2
    return a0, a1, a2, a3, s0, s1, s2


@triton.jit
def _dw_wgrad_kernel(x_ptr, dy_ptr, part_ptr, C, H, W, KH, KW, HC, ROWS,
                     sxn, sxc, sxh, sxw, syn, syc, syh, syw,
                     BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[s, c, i0 + r, j] (r = 0..3) = sum over the output rows h of chunk s (image s // HC, rows
    [(s % HC) * ROWS, + ROWS)) and all columns w of dy[n, c, h, w] * x[n, c, h + i0 + r - KH//2, w + j - KW//2].

    Walking down the rows, the four taps' input rows slide by one: each step loads one new input row and one
    output-gradient row for four products (unrolled by four, so the window rotates without register moves). Only the
    rows and column tiles that reach the map for some tap are visited."""
    pid_t, pid_c, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i0 = (pid_t // KW) * 4
    j = pid_t % KW
    n = s // HC
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    # output rows of this chunk whose row h + i0 + r - KH//2 is in the map for some r
    h_end = tl.minimum((s % HC) * ROWS + ROWS, H)
    h_lo = tl.maximum((s % HC) * ROWS, KH // 2 - i0 - 3)
    h_hi = tl.minimum(h_end, H + KH // 2 - i0)
    # output columns whose input column w + j - KW//2 is in the map
    w_lo = tl.maximum(KW // 2 - j, 0)
    w_hi = tl.minimum(W + KW // 2 - j, W)
    a0 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
    a1, a2, a3 = a0, a0, a0
    xb = n.to(tl.int64) * sxn
    yb = n.to(tl.int64) * syn
    for wt in range(w_lo // BLOCK_W, tl.cdiv(w_hi, BLOCK_W)):
        w = wt * BLOCK_W + tl.arange(0, BLOCK_W)
        xcol = w + (j - KW // 2)
        xm = ((w >= w_lo) & (w < w_hi))[:, None] & cmask[None, :]
        xoff = xb + (xcol * sxw)[:, None] + (c * sxc)[None, :]
        yoff = yb + (w * syw)[:, None] + (c * syc)[None, :]
        base = h_lo + i0 - KH // 2  # input row of tap row i0 for output row h_lo
        s0 = _wgrad_row(x_ptr, xoff, xm, base, sxh, H, True)
        s1 = _wgrad_row(x_ptr, xoff, xm, base + 1, sxh, H, True)
        s2 = _wgrad_row(x_ptr, xoff, xm, base + 2, sxh, H, True)
        # groups of four output rows from h_lo: the first ones load only rows inside the map (h_lo keeps the new
        # input rows at or below row 0 out; up to `last`, they stay above row H and the output rows below h_hi) and
        # need no row masks; the rest are masked
        last = tl.minimum(h_hi - 4, H - 7 - i0 + KH // 2)
        mid = h_lo + tl.maximum(last - h_lo + 4, 0) // 4 * 4
        for h in range(h_lo, mid, 4):
            a0, a1, a2, a3, s0, s1, s2 = _wgrad_steps(a0, a1, a2, a3, s0, s1, s2, x_ptr, dy_ptr, xoff, yoff, xm, h,
                                                      h + i0 - KH // 2, sxh, syh, H, h_hi, False)
        for h in range(mid, h_hi, 4):  # rows past h_hi load a zero output gradient
            a0, a1, a2, a3, s0, s1, s2 = _wgrad_steps(a0, a1, a2, a3, s0, s1, s2, x_ptr, dy_ptr, xoff, yoff, xm, h,
                                                      h + i0 - KH // 2, sxh, syh, H, h_hi, True)
    off = s.to(tl.int64) * (C * KH * KW) + c * (KH * KW) + i0 * KW + j
    tl.store(part_ptr + off, tl.sum(a0, axis=0), mask=cmask & (i0 + 0 * c < KH))
    tl.store(part_ptr + off + KW, tl.sum(a1, axis=0), mask=cmask & (i0 + 1 + 0 * c < KH))
    tl.store(part_ptr + off + 2 * KW, tl.sum(a2, axis=0), mask=cmask & (i0 + 2 + 0 * c < KH))
    tl.store(part_ptr + off + 3 * KW, tl.sum(a3, axis=0), mask=cmask & (i0 + 3 + 0 * c < KH))


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """NCHW unless the tensor is (only) channels_last-contiguous; other strides are made NCHW-contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


#: Elements per program tile (BLOCK_W × BLOCK_C, then four output rows in the forward) and warps per program.
#: Chosen from the sm_90 machine code without a GPU (docs/benchmarks.md, GPU section): forward 1024 (8 per thread:
#: 36-44% FFMAs in the inner loop; 512: 27%, at 56 instead of 118 registers), weight gradient 512 (1024: ~170
#: registers). ``tools/sweep_triton_tiles.py`` times the alternatives on a GPU.
TILES = dict(forward=1024, wgrad=512, num_warps=4)


def _blocks(c: int, w: int, elems: int):
    """BLOCK_W columns (up to 32) × BLOCK_C channels (at least 32): ``elems`` elements unless the map or the channel
    count is smaller."""
    bw = min(32, _pow2(w), max(1, elems // 32))
    return bw, min(_pow2(c), max(32, elems // bw))


def _wide(k: torch.Tensor) -> bool:
    """Kernels wider than tall run on the transposed map (H and W strides swapped, no copy), so that the four output
    rows a program shares its input loads across lie along the kernel's long side."""
    return k.shape[3] > k.shape[2]


def _groups(weights: Sequence[torch.Tensor]) -> List[List[int]]:
    """Kernels per launch: pairs of the same orientation and width (the taller first, its rows cover the other's),
    e.g. SLaK's M×N and N×N branches; the rest alone."""
    def key(k):
        return _wide(k), min(k.shape[2:])
    left, groups = list(range(len(weights))), []
    while left:
        a = left.pop(0)
        b = next((b for b in left if key(weights[b]) == key(weights[a])), None)
        if b is None:
            groups.append([a])
            continue
        left.remove(b)
        groups.append(sorted([a, b], key=lambda k: -max(weights[k].shape[2:])))
    return groups


def _oriented(t: torch.Tensor, wide: bool) -> torch.Tensor:
    return t.transpose(2, 3) if wide else t


def _launch_fwd(xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor],
                sum_outputs: bool, fmt: Optional[torch.memory_format] = None) -> List[torch.Tensor]:
    """Depthwise 'same' convs of ``xs[k]`` (same shape) with (C, 1, kh, kw) ``weights[k]``: one output per kernel in
    layout ``fmt`` (default: the inputs'), or (``sum_outputs``) their sum plus ``bias``. Inputs run channels_last (a
    copy if they are not), so that either orientation reads whole channel vectors."""
    fmt = memory_format_of(xs[0]) if fmt is None else fmt
    cl = {}  # each distinct input once (the unit's branches share one)
    for x in xs:
        if id(x) not in cl:
            cl[id(x)] = x.contiguous(memory_format=torch.channels_last)
    xs = [cl[id(x)] for x in xs]
    n, c = xs[0].shape[:2]
    outs = [torch.empty_like(xs[0], memory_format=fmt) for _ in range(1 if sum_outputs else len(weights))]
    if xs[0].numel() == 0:
        return outs
    groups = _groups(weights)
    # summed launches add up in a float32 partial sum; the last one writes the output (one rounding)
    part = torch.empty_like(outs[0], dtype=torch.float32) if sum_outputs and len(groups) > 1 else None
    for g, ks in enumerate(groups):
        wide = _wide(weights[ks[0]])
        x0, x1 = (_oriented(xs[k], wide) for k in (ks[0], ks[-1]))
        _, _, hh, ww = x0.shape
        bw, bc = _blocks(c, ww, TILES['forward'])
        cp = triton.cdiv(c, bc) * bc
        # (3 + kh + 3, kw, cp): tap-major, channels contiguous, zero-padded (see _rows4)
        w0, w1 = (F.pad(_oriented(weights[k], wide)[:, 0].permute(1, 2, 0).float(), (0, cp - c, 0, 0, 3, 3))
                  for k in (ks[0], ks[-1]))
        last = g == len(groups) - 1
        if sum_outputs:
            y0 = y1 = _oriented(outs[0] if last else part, wide)
        else:
            y0, y1 = (_oriented(outs[k], wide) for k in (ks[0], ks[-1]))
        p = _oriented(part, wide) if part is not None else y0
        grid = (triton.cdiv(hh, 4) * triton.cdiv(ww, bw), triton.cdiv(c, bc), n)
        has_bias = bias is not None and sum_outputs and last
        _dw_rows_kernel[grid](x0, x1, w0, w1, bias if has_bias else w0, y0, y1, p,
                              c, hh, ww, *x0.stride(), *y0.stride(), w0.shape[0] - 6, w1.shape[0] - 6, w0.shape[1], cp,
                              NK=len(ks), SAME_X=xs[ks[0]] is xs[ks[-1]], SUM=sum_outputs,
                              PARTIAL_IN=part is not None and g > 0, HAS_BIAS=has_bias, BLOCK_W=bw, BLOCK_C=bc,
                              num_warps=TILES['num_warps'])
    return outs


def _launch_wgrad(x: torch.Tensor, dy: torch.Tensor, kernel_size, dtype: torch.dtype,
                  min_programs: Optional[int] = None) -> torch.Tensor:
    """d(loss)/d(weight) of shape (C, 1, kh, kw) for output gradient ``dy``: float32 partial sums per chunk of
    output rows, summed afterwards (deterministic). Wide kernels run on the transposed maps (as in the forward).
    Output rows are split into chunks (whole images, then runs of a multiple of four rows) until there are
    ``min_programs`` programs (default: 4 per SM) or every chunk has four rows."""
    n, c = x.shape[:2]
    kh, kw = kernel_size
    if x.numel() == 0:
        return torch.zeros(c, 1, kh, kw, device=x.device, dtype=dtype)
    wide = kw > kh
    x = _oriented(x.contiguous(memory_format=torch.channels_last), wide)
    dy = _oriented(dy.contiguous(memory_format=torch.channels_last), wide)
    (_, _, hh, ww), (th, tw) = x.shape, ((kw, kh) if wide else (kh, kw))
    bw, bc = _blocks(c, ww, TILES['wgrad'])
    programs = triton.cdiv(th, 4) * tw * triton.cdiv(c, bc)
    if min_programs is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.device.type == 'cuda' else 1
        min_programs = 4 * sms
    hc = max(1, min(triton.cdiv(hh, 4), triton.cdiv(min_programs, programs * n)))
    rows = triton.cdiv(triton.cdiv(hh, hc), 4) * 4
    hc = triton.cdiv(hh, rows)
    part = torch.empty(n * hc, c, th, tw, device=x.device, dtype=torch.float32)
    _dw_wgrad_kernel[(triton.cdiv(th, 4) * tw, triton.cdiv(c, bc), n * hc)](
        x, dy, part, c, hh, ww, th, tw, hc, rows, *x.stride(), *dy.stride(), BLOCK_W=bw, BLOCK_C=bc,
        num_warps=TILES['num_warps'])
    grad = part.sum(0)
    return (grad.transpose(1, 2) if wide else grad).unsqueeze(1).to(dtype)


class _DepthwiseBranches(torch.autograd.Function):
    """Outputs of several 'same' depthwise convs of one input (or their sum + bias), differentiable."""

    @staticmethod
    def forward(ctx, x, bias, sum_outputs, *weights):
        # the kernels' layout, converted once for the forward and the backward; outputs keep the caller's layout
        ctx.fmt = memory_format_of(x)
        x = x.contiguous(memory_format=torch.channels_last)
        outs = _launch_fwd([x] * len(weights), weights, bias, sum_outputs, ctx.fmt)
        ctx.save_for_backward(x, *weights)
        ctx.sum_outputs, ctx.has_bias = sum_outputs, bias is not None
        return outs[0] if sum_outputs else tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        grads = [g.to(x.dtype).contiguous(memory_format=torch.channels_last) if g is not None else None
                 for g in grads]
        if ctx.sum_outputs:
            grads = grads * len(weights)
        dx = db = None
        live = [(g, k) for g, k in zip(grads, weights) if g is not None]
        if ctx.needs_input_grad[0] and live:
            # The transposed 'same' conv of an odd kernel is the 'same' conv with the flipped kernel.
            dx = _launch_fwd([g for g, _ in live], [k.flip(2, 3) for _, k in live], None, True, ctx.fmt)[0]
        if ctx.has_bias and ctx.needs_input_grad[1]:
            db = grads[0].sum((0, 2, 3), dtype=torch.float32).to(x.dtype)
        dws = [_launch_wgrad(x, g, k.shape[2:], k.dtype) if need and g is not None else None
               for g, k, need in zip(grads, weights, ctx.needs_input_grad[3:])]
        return (dx, db, None, *dws)


def dwconv_branches(x: torch.Tensor, weights: Sequence[torch.Tensor], bias: Optional[torch.Tensor] = None,
                    sum_outputs: bool = False):
    """Triton entry point (arguments already validated by :mod:`slak_mm.ops.dwconv`)."""
    if not weights:
        raise ValueError('Triton depthwise kernel: at least one kernel')
    if bias is not None and not sum_outputs:
        raise ValueError('bias is only supported for a single kernel or summed outputs')
    return _DepthwiseBranches.apply(x, bias, sum_outputs, *weights)
