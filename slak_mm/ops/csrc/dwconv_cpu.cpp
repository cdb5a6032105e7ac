// CPU inference kernel for slak_mm.ops.dwconv2d_sum: out = bias + sum_k conv2d(x, w_k), depthwise, stride 1,
// "same" padding, float32 arithmetic, channels_last (NHWC) input and output: float32, or under CPU bfloat16 autocast
// (dwconv_sum_bf16) a bfloat16 output from a float32 or bfloat16 input, with x, the kernels and the bias rounded to
// bfloat16 as they are read. Built on first use by slak_mm/ops/cpu_kernel.py. CPU training runs each branch's forward
// and input gradient (the flipped kernel over the output's gradient) on the same kernel, and its weight gradient on
// dwconv_weight_grad (further down).
//
// Why: oneDNN's channels_last depthwise kernel reaches only 20-40% of this machine's GEMM rate on SLaK's long bands,
// mostly because SLaK's channel counts (124, 249, 499, 998) make every 16-float vector load straddle cache lines,
// and because it re-loads inputs down a kernel column (docs/cpu_performance_log.md). Here each job takes one block of L
// channels (one vector: 16 on AVX-512, 8 on AVX2, 4 otherwise) of one image and
//   1. packs it into an aligned buffer P[H][cols][L], zero-padded left and right (one read of x; no boundary tests
//      later; the padding is zeroed once per thread and map geometry, later jobs only overwrite the map), row by
//      row just before the output rows first need them (RowPacker), so that the reads of x overlap the arithmetic;
//   2. computes the output kRows rows at a time (2 on AVX-512, else 1) into an aligned scratch A[kRows][W][L]
//      (starting from the bias), every kernel adding into it as register tiles of T outputs along each row (on
//      AVX-512 two rows, which share their input loads; T in [4, 8], chosen per call from the
//      map and kernel widths, see tile_width); each tile runs only the kernel rows that reach the map, and either
//      the taps that reach the map for at least one of its outputs or the map columns that at least one of its
//      outputs reaches, whichever is fewer (Span): on a map narrower than the kernel the second is exactly the
//      in-map work;
//   3. writes the rows once.
// While computing, it prefetches its output rows and (small maps) the next job's input. The job re-lays its
// block's kernels out as K[k][i][j][L], unless its thread's previous job had the same block (or, for a batch of small
// maps, its thread already did in this call); kernel rows at the same offset from the centre are added into the
// widest one's, which runs them all (host_kernel: the cross-shaped unit's centre runs once).
// The vectors are GCC/Clang vector extensions, so the same source compiles to AVX-512, AVX2 or SSE (the loader
// passes the ISA flags). Products are F.conv2d's, except that taps folded into another kernel's row are summed with
// its tap before the product; the order of the additions differs (float32 rounding).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

namespace {

// Channels per job: one native vector of floats. (Built for AVX2, 16-float vectors, which GCC splits into pairs of
// 8-float operations, measured 5-7x slower than 8-float ones at SLaK-T's stage shapes.)
#if defined(__AVX512F__)
constexpr int L = 16;
#elif defined(__AVX__)
constexpr int L = 8;
#else
constexpr int L = 4;  // SSE2 / NEON
#endif
// Widest register tile: with AVX2's 16 vector registers, 8-output tiles ran 1.6-2.4x slower than 7-output ones at
// every SLaK-T stage shape (AVX2 build, measured on an AVX-512 machine); AVX-512 has 32. SSE and NEON builds
// (untimed) also stop at 7.
constexpr int kMaxTile = L == 16 ? 8 : 7;
// Output rows per tile: two on AVX-512, whose 32 vector registers hold both rows' accumulators (2 x 8 tiles, the
// weights and an input); the two rows read the same input rows, so each input load feeds two products (1.05-1.14x
// faster on SLaK-T's maps of 28-128 px, on par at 7-16 px, Xeon, AVX-512). One row elsewhere (16 registers).
constexpr int kRows = L == 16 ? 2 : 1;
typedef float vf __attribute__((vector_size(L * 4), aligned(L * 4)));
typedef int vi __attribute__((vector_size(L * 4), aligned(L * 4)));
typedef float vfu __attribute__((vector_size(L * 4), aligned(4)));  // unaligned access to x and out
typedef unsigned vu __attribute__((vector_size(L * 4), aligned(L * 4)));
typedef unsigned short vh __attribute__((vector_size(L * 2), aligned(2)));  // L bfloat16 values of x or out

// bfloat16 (CPU autocast inference, dwconv_sum_bf16): values are the upper 16 bits of a float32; float32 is rounded
// to them to the nearest, ties to even, NaN kept a (quiet) NaN, as torch rounds. The arithmetic stays float32.
inline vu bf16_bits(vf v) {  // the rounded value's bits in the upper half, zeros below
  const vu b = (vu)v;
  const vu r = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
  const vu nan = (vu)(v != v);
  return (r & ~nan) | (0x7FC00000u & nan);
}
inline vf round_bf16(vf v) { return (vf)bf16_bits(v); }
inline vh to_bf16(vf v) { return __builtin_convertvector(bf16_bits(v) >> 16, vh); }
inline vf from_bf16(vh h) { return (vf)(__builtin_convertvector(h, vu) << 16); }
// How a call reads x and writes out.
enum class In { kF32, kF32RoundedToBf16, kBf16 };
// Calls of run() so far (names each call for the per-thread kernel re-layout cache; read by the tests).
std::atomic<long> g_calls{0};
// Weight-gradient jobs so far (read by the tests).
std::atomic<long> g_wgrad_calls{0};
// Batches of fewer pixels (images x pixels per map) run their jobs block-major (see run).
constexpr int64_t kBlockMajorPixels = 2048;
// On maps of fewer pixels a job prefetches the next job's input.
constexpr int kSmallMapPixels = 1024;
// Image-major batches of maps of fewer pixels keep every block's re-laid-out kernels per thread (see run).
constexpr int kKeptKernelsPixels = 512;

struct Buffer {  // scratch, grown on demand, 64-byte aligned
  float* p = nullptr;
  size_t n = 0;
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr; o.n = 0; }
  float* get(size_t floats) {
    if (floats > n) {
      std::free(p);
      p = static_cast<float*>(std::aligned_alloc(64, ((floats * sizeof(float) + 63) / 64) * 64));
      TORCH_CHECK(p != nullptr, "dwconv_cpu: out of memory for a ", floats * sizeof(float), "-byte buffer");
      n = floats;
    }
    return p;
  }
  ~Buffer() { std::free(p); }
};

// A thread's buffer whose zero parts (padding, zero taps) are written once per layout: later jobs of the same layout
// only overwrite the rest. zero(p, n, layout) zeroes p[0, n) unless the thread's previous call had this buffer and
// layout.
struct ZeroedOnce {
  const float* p = nullptr;
  std::vector<int64_t> layout;
  void zero(float* q, size_t n, const std::vector<int64_t>& l) {
    if (q == p && l == layout) return;
    std::memset(q, 0, sizeof(float) * n);
    p = q;
    layout = l;
  }
};

// One input row's products for a tile of T outputs, in the two loop orders below (tile_taps, tile_inputs; also the
// rows that only one output of a two-row tile runs). Tap order: x[r] += sum_{j in [j0, j1)} p[j + r] * k[j].
template <int T>
__attribute__((always_inline)) inline void row_taps(const float* p, const float* k, int j0, int j1, vf* x) {
  for (int j = j0; j < j1; ++j) {
    const vf w = *reinterpret_cast<const vf*>(k + j * L);
#pragma GCC unroll 16
    for (int r = 0; r < T; ++r) x[r] += *reinterpret_cast<const vf*>(p + (j + r) * L) * w;
  }
}
// Input order: x[r] += sum_{u in [u0, u1)} p[u] * k[u - r].
template <int T>
__attribute__((always_inline)) inline void row_inputs(const float* p, const float* k, int u0, int u1, vf* x) {
  for (int u = u0; u < u1; ++u) {
    const vf v = *reinterpret_cast<const vf*>(p + u * L);
#pragma GCC unroll 16
    for (int r = 0; r < T; ++r) x[r] += v * *reinterpret_cast<const vf*>(k + (u - r) * L);
  }
}

// A tile of T outputs along a row, two loop orders over the same products; P points at the input column of the
// tile's first output's first tap, K at its kernel row's first tap, rows of K are kwp floats apart and have T - 1
// zero taps on each side. Kernel rows [s0, s1) of the kh are skipped (folded into another kernel; s0 = kh: none).
// Tap order: acc[r] += sum_i sum_{j in [j0, j1)} P[i][j + r] * K[i][j]: one weight and T inputs per column j.
template <int T>
inline void tile_taps(const float* P, size_t cols, const float* K, int kwp, int kh, int s0, int s1, int j0, int j1,
                      vf* acc) {
  vf a[T];
  for (int r = 0; r < T; ++r) a[r] = acc[r];
  for (int i = 0; i < kh; ++i) {
    if (i == s0 && (i = s1) >= kh) break;  // rows [s0, s1) are folded into another kernel
    row_taps<T>(P + static_cast<size_t>(i) * cols * L, K + static_cast<size_t>(i) * kwp * L, j0, j1, a);
  }
  for (int r = 0; r < T; ++r) acc[r] = a[r];
}

// Input order: acc[r] += sum_i sum_{u in [u0, u1)} P[i][u] * K[i][u - r]: one input and T weights per column u
// (K[i][u - r] is one of the zero taps where output r does not reach input u).
template <int T>
inline void tile_inputs(const float* P, size_t cols, const float* K, int kwp, int kh, int s0, int s1, int u0, int u1,
                        vf* acc) {
  vf a[T];
  for (int r = 0; r < T; ++r) a[r] = acc[r];
  for (int i = 0; i < kh; ++i) {
    if (i == s0 && (i = s1) >= kh) break;
    row_inputs<T>(P + static_cast<size_t>(i) * cols * L, K + static_cast<size_t>(i) * kwp * L, u0, u1, a);
  }
  for (int r = 0; r < T; ++r) acc[r] = a[r];
}

// The vector of L floats p[0], p[stride], ..., p[(L - 1) * stride] (lanes from nc on: zero, not read), built in
// registers (filling a buffer one float at a time and loading it as a vector stalls on store forwarding).
using Lanes = std::make_index_sequence<L>;
template <size_t... I>
inline vf lanes_of(const float* p, int64_t stride, std::index_sequence<I...>) {
  return vf{p[static_cast<int64_t>(I) * stride]...};
}
template <size_t... I>
inline vf lanes_of(const float* p, int64_t stride, int nc, std::index_sequence<I...>) {
  return vf{(static_cast<int>(I) < nc ? p[static_cast<int64_t>(I) * stride] : 0.f)...};
}

inline int round_up(int n, int m) { return (n + m - 1) / m * m; }

// Column ranges of a tile of outputs c0 .. c0 + nv - 1 (of T) for a kernel kw wide on a W-wide map: taps j in
// [j0, j1) that reach the map for at least one output, or input columns u (relative to the first output's first
// tap) in [u0, u1) that are in the map and reached by at least one output. Each order runs T products per column.
struct Span {
  int j0, j1, u0, u1;
  bool inputs() const { return u1 - u0 < j1 - j0; }
  int columns() const { return inputs() ? u1 - u0 : j1 - j0; }
};
inline Span span(int c0, int nv, int kw, int W) {
  return {std::max(0, kw / 2 - c0 - nv + 1), std::min(kw, kw / 2 - c0 + W), std::max(0, kw / 2 - c0),
          std::min(kw + nv - 1, kw / 2 - c0 + W)};
}

// One kernel as the caller holds it, any strides (e.g. a view clipped to the map): element (channel c, row i,
// column j) is at p[c * sc + i * sh + j * sw].
struct KernelView {
  const float* p;
  int kh, kw;
  int64_t sc, sh, sw;
};

// Row folding (the cross-shaped kernel with its centre run once): a kernel row at offset d from its kernel's centre is
// added, in the re-laid-out kernels, into the row at offset d of the widest kernel that has one (ties: the first),
// which then runs it with its own taps at no extra cost: a narrower centred row's taps lie inside the wider row's,
// and both reach the map for the same output rows. Each row offset runs once, as wide as its widest kernel. For
// SLaK's bands (M×N and N×M) the N central rows of the M×N band fold into the N×M band, so the unit's N×N centre is
// no longer computed twice (30% fewer in-map products at 7×7, 22% at 16×16, 5% at 128×128).
int host_kernel(int nk, const int* khs, const int* kws, int d) {
  int best = -1;
  for (int m = 0; m < nk; ++m)
    if (khs[m] / 2 >= std::abs(d) && (best < 0 || kws[m] > kws[best])) best = m;
  return best;
}

// Rows [s0[k], s1[k]) of kernel k are folded into other kernels: a central range, because a kernel that is the widest
// with a row at offset d is also the widest at every larger |d| it has (fewer kernels reach that far). None: kh, kh.
void folded_rows(int nk, const int* khs, const int* kws, int* s0, int* s1) {
  for (int k = 0; k < nk; ++k) {
    s0[k] = s1[k] = khs[k];
    for (int i = 0; i < khs[k]; ++i)
      if (host_kernel(nk, khs, kws, i - khs[k] / 2) != k) {
        if (s0[k] == khs[k]) s0[k] = i;
        s1[k] = i + 1;
      }
  }
}

// The kernels of one call (clipped to the map), their sizes and their folded rows.
struct Unit {
  std::vector<KernelView> views;
  std::vector<int> khs, kws, s0, s1;
  explicit Unit(std::vector<KernelView> v) : views(std::move(v)) {
    for (const KernelView& kv : views) {
      khs.push_back(kv.kh);
      kws.push_back(kv.kw);
    }
    s0.resize(views.size());
    s1.resize(views.size());
    folded_rows(static_cast<int>(views.size()), khs.data(), kws.data(), s0.data(), s1.data());
  }
};

// Rows of a kernel kh high that run for output row a of an H-high map: [i0, i1) reach the map, less the folded
// [f0, f1) (as offsets from i0: [q0, q1), or q0 = q1 = i1 - i0 when none are folded).
struct RowRange {
  int i0, i1, q0, q1;
  RowRange(int kh, int s0, int s1, int a, int H)
      : i0(std::max(0, kh / 2 - a)), i1(std::min(kh, kh / 2 - a + H)) {
    const int f0 = std::max(s0, i0), f1 = std::min(s1, i1);
    q0 = f0 < f1 ? f0 - i0 : i1 - i0;
    q1 = f0 < f1 ? f1 - i0 : i1 - i0;
  }
  int runs() const { return i1 - i0 - (q1 - q0); }
};

struct Geometry {
  int nk, H, W, C, PL, T;
  size_t cols;  // packed row length (pixels), PL zero pixels each side of the map and of the tiles' overhang
  const int *khs, *kws;
  const int *s0, *s1;  // folded rows of each kernel
  const size_t* koff;  // offset (vectors of L floats) of kernel k in a block's re-laid-out kernels
  int kwp(int k) const { return kws[k] + 2 * (T - 1); }
  int reach = 0;  // input rows below an output row that its kernels read (the largest kh / 2)
};

// Outputs per tile for this call: the T in [4, kMaxTile] with the fewest load slots, T + 1 per column (one weight and T
// inputs, or one input and T weights) plus kTileRowCost per kernel row (loop and pointer set-up), summed over every
// tile of every kernel row that runs (folded rows, [s0, s1), do not); ties go to the larger T. Narrow maps get short or
// exactly fitting tiles (a 14-wide map runs two tiles of 7), wide ones the widest. Against every width forced, at
// SLaK-T's 9 stage map shapes: the pick was the fastest or within 7% of it on AVX-512 and, with the set-up term
// (without it: 4-output tiles on a 32-wide map, 1.4x slower), within 4% at 8 of 9 shapes on AVX2.
constexpr long kTileRowCost = 8;
int tile_width(int nk, const int* khs, const int* kws, const int* s0, const int* s1, int H, int W) {
  long best = -1;
  int best_t = kMaxTile;
  for (int t = kMaxTile; t >= 4; --t) {
    long cost = 0;
    for (int k = 0; k < nk; ++k) {
      long rows = 0;
      for (int a = 0; a < H; ++a) rows += RowRange(khs[k], s0[k], s1[k], a, H).runs();
      long columns = 0, tiles = 0;
      for (int c0 = 0; c0 < W; c0 += t, ++tiles) columns += span(c0, std::min(t, W - c0), kws[k], W).columns();
      cost += rows * (columns * (t + 1) + kTileRowCost * tiles);
    }
    if (best < 0 || cost < best) {
      best = cost;
      best_t = t;
    }
  }
  return best_t;
}

// The rows [0, n) of a two-row tile that both outputs run, in tap order: input row t at p + t·ps is row a's kernel row
// at k0 + t·ks and row a + 1's kernel row before it; each column loads two weights and T inputs for 2·T products. The
// rows step by pointer increments, and a band's short side (3, 5 or 7 taps: SLaK's N) runs fully unrolled: 1.04-1.10x
// faster per call at most of SLaK-T's stage 0-2 shapes (1.01-1.05x at 32 x 32 and 50 x 84) than one loop over the rows
// with the row's tests (docs/cpu_performance_log.md, "Session 17").
template <int T>
__attribute__((always_inline)) inline void column2(const float* p, const float* k0, const float* k1, int j, vf* x0,
                                                   vf* x1) {
  const vf w0 = *reinterpret_cast<const vf*>(k0 + j * L), w1 = *reinterpret_cast<const vf*>(k1 + j * L);
#pragma GCC unroll 16
  for (int r = 0; r < T; ++r) {
    const vf v = *reinterpret_cast<const vf*>(p + (j + r) * L);
    x0[r] += v * w0;
    x1[r] += v * w1;
  }
}
template <int T, int NJ>
__attribute__((always_inline)) inline void rows_both_fixed(const float* p, const float* k0, size_t ps, size_t ks, int n,
                                                           vf* x0, vf* x1) {
  for (int t = 0; t < n; ++t, p += ps, k0 += ks) {
#pragma GCC unroll 8
    for (int j = 0; j < NJ; ++j) column2<T>(p, k0, k0 - ks, j, x0, x1);
  }
}
template <int T>
__attribute__((always_inline)) inline void rows_both(const float* p, const float* k0, size_t ps, size_t ks, int n,
                                                     int j0, int j1, vf* x0, vf* x1) {
  p += j0 * L;
  k0 += j0 * L;
  switch (j1 - j0) {
    case 3: return rows_both_fixed<T, 3>(p, k0, ps, ks, n, x0, x1);
    case 5: return rows_both_fixed<T, 5>(p, k0, ps, ks, n, x0, x1);
    case 7: return rows_both_fixed<T, 7>(p, k0, ps, ks, n, x0, x1);
  }
  for (int t = 0; t < n; ++t, p += ps, k0 += ks)
    for (int j = 0; j < j1 - j0; ++j) column2<T>(p, k0, k0 - ks, j, x0, x1);
}

// The same products for a tile of T outputs on each of two output rows, a and a + 1, whose taps share input rows
// (kRows = 2). P points at map row 0, at the input column of the tile's first output's first tap; K at kernel row 0,
// tap 0. ra and rb: the kernel rows that reach the map for rows a and a + 1; rows [s0, s1) are folded.
// Tap order, over input rows: input row a + i - kh/2 is row a's kernel row i and row a + 1's kernel row i - 1, so each
// column loads two weights and T inputs for 2·T products; a row that only one of the two outputs runs (the map's
// edge, folded rows) runs for that one alone.
template <int T>
inline void tile_taps2(const float* P, size_t cols, const float* K, int kwp, int a, int kh, int s0, int s1,
                       const RowRange& ra, const RowRange& rb, int j0, int j1, vf* acc0, vf* acc1) {
  vf x0[T], x1[T];
  for (int r = 0; r < T; ++r) { x0[r] = acc0[r]; x1[r] = acc1[r]; }
  const int lo = std::min(ra.i0, rb.i0 + 1), hi = std::max(ra.i1, rb.i1 + 1);
  // rows that both outputs run: [b0, b1) less [f0, f1) (folded for one of them), in runs
  const int b0 = std::max(ra.i0, rb.i0 + 1), b1 = std::min(ra.i1, rb.i1 + 1);
  const int f0 = s0, f1 = s0 < s1 ? s1 + 1 : s0;
  const size_t ps = cols * L, ks = static_cast<size_t>(kwp) * L;
  for (int i = lo; i < hi;) {
    if (i >= b0 && i < b1 && !(i >= f0 && i < f1)) {
      const int end = i < f0 ? std::min(b1, f0) : b1;
      rows_both<T>(P + static_cast<size_t>(a + i - kh / 2) * ps, K + static_cast<size_t>(i) * ks, ps, ks, end - i, j0,
                   j1, x0, x1);
      i = end;
      continue;
    }
    // a row that one output runs (the map's edge, folded rows) runs for that one alone; none: both folded
    const bool u0 = i >= ra.i0 && i < ra.i1 && !(i >= s0 && i < s1);
    const bool u1 = i - 1 >= rb.i0 && i - 1 < rb.i1 && !(i - 1 >= s0 && i - 1 < s1);
    const float* p = P + static_cast<size_t>(a + i - kh / 2) * ps;  // in the map if some output runs it
    if (u0)
      row_taps<T>(p, K + static_cast<size_t>(i) * ks, j0, j1, x0);  // kernel row i, for row a
    else if (u1)
      row_taps<T>(p, K + static_cast<size_t>(i - 1) * ks, j0, j1, x1);  // kernel row i - 1, for row a + 1
    ++i;
  }
  for (int r = 0; r < T; ++r) { acc0[r] = x0[r]; acc1[r] = x1[r]; }
}

// Input order, over kernel rows: kernel row i reads input row a + i - kh/2 for row a and the next one for row a + 1,
// so each column loads T weights and two inputs for 2·T products.
template <int T>
inline void tile_inputs2(const float* P, size_t cols, const float* K, int kwp, int a, int kh, int s0, int s1,
                         const RowRange& ra, const RowRange& rb, int u0, int u1, vf* acc0, vf* acc1) {
  vf x0[T], x1[T];
  for (int r = 0; r < T; ++r) { x0[r] = acc0[r]; x1[r] = acc1[r]; }
  const int lo = std::min(ra.i0, rb.i0), hi = std::max(ra.i1, rb.i1);
  for (int i = lo; i < hi; ++i) {
    if (i >= s0 && i < s1) continue;
    const bool b0 = i >= ra.i0 && i < ra.i1, b1 = i >= rb.i0 && i < rb.i1;
    const float* p0 = b0 ? P + static_cast<size_t>(a + i - kh / 2) * cols * L : nullptr;  // rows in the map only
    const float* p1 = b1 ? P + static_cast<size_t>(a + 1 + i - kh / 2) * cols * L : nullptr;
    const float* k = K + static_cast<size_t>(i) * kwp * L;
    if (b0 && b1) {
      for (int u = u0; u < u1; ++u) {
        const vf v0 = *reinterpret_cast<const vf*>(p0 + u * L), v1 = *reinterpret_cast<const vf*>(p1 + u * L);
#pragma GCC unroll 16
        for (int r = 0; r < T; ++r) {
          const vf w = *reinterpret_cast<const vf*>(k + (u - r) * L);
          x0[r] += v0 * w;
          x1[r] += v1 * w;
        }
      }
    } else if (b0) {
      row_inputs<T>(p0, k, u0, u1, x0);
    } else if (b1) {
      row_inputs<T>(p1, k, u0, u1, x1);
    }
  }
  for (int r = 0; r < T; ++r) { acc0[r] = x0[r]; acc1[r] = x1[r]; }
}

// Step 1 for one job, row by row: upto(r) packs input rows [done, r) into P (map columns only; the padding is zeroed
// once). block_rows asks for each row just before the first output row that reads it, so the reads of x (often from
// L3) overlap the arithmetic of the rows before. (Was: the whole map packed first, with software prefetch 64 pixels
// ahead; packing row by row, without it, is 1.04-1.14x faster per call at SLaK-T's 512 px stage shapes, 1.00-1.05x
// at 224 and 800x1344, Xeon, AVX-512; docs/cpu_performance_log.md.)
struct RowPacker {
  const void* xb;  // float (In::kF32, kF32RoundedToBf16) or bfloat16 (kBf16)
  In in;
  float* P;
  size_t cols;
  int PL, H, W, C, nc;
  bool last_image;  // the job's image is x's last (a full-vector read of its last pixel could leave x)
  vi lanes;         // lanes below nc
  int done = 0;     // rows packed so far
  void upto(int r) {
    for (r = std::min(r, H); done < r; ++done) {
      float* d = P + (static_cast<size_t>(done) * cols + PL) * L;
      const bool last_row = last_image && done + 1 == H;
      const size_t row = static_cast<size_t>(done) * W * C;
      switch (in) {
        case In::kF32: pack_row<In::kF32>(static_cast<const float*>(xb) + row, d, last_row); break;
        case In::kF32RoundedToBf16:
          pack_row<In::kF32RoundedToBf16>(static_cast<const float*>(xb) + row, d, last_row);
          break;
        case In::kBf16: pack_row<In::kBf16>(static_cast<const unsigned short*>(xb) + row, d, last_row); break;
      }
    }
  }
  template <In I, typename E>
  void pack_row(const E* src, float* d, bool last_row) {
    for (int c = 0; c < W; ++c, d += L, src += C) {
      vf v;
      if (nc == L || !last_row || c + 1 < W) {  // a full-vector read stays inside x
        if constexpr (I == In::kBf16)
          v = from_bf16(*reinterpret_cast<const vh*>(src));
        else
          v = *reinterpret_cast<const vfu*>(src);
        if (nc != L) v = (vf)((vi)v & lanes);
      } else {
        for (int l = 0; l < L; ++l) {
          if constexpr (I == In::kBf16)
            v[l] = l < nc ? from_bf16(vh{src[l]})[0] : 0.f;
          else
            v[l] = l < nc ? src[l] : 0.f;
        }
      }
      if constexpr (I == In::kF32RoundedToBf16) v = round_bf16(v);
      *reinterpret_cast<vf*>(d) = v;
    }
  }
};

// Steps 1-3 of one job: every output row of the block, kRows at a time (the last one alone if H is odd), from the
// packed map P (packed by pk as the rows need it) and the block's kernels K; A holds kRows rows of Wr accumulators.
template <int T>
void block_rows(const Geometry& g, const float* P, const float* K, vf bias, vf* A, void* ob, bool out_bf16, int nc,
                const char* next_x, size_t x_esize, RowPacker& pk) {
  const int H = g.H, W = g.W, C = g.C, Wr = round_up(W, T);
  const size_t o_esize = out_bf16 ? 2 : 4;
  for (int a = 0; a < H; a += kRows) {
    const int nr = std::min(kRows, H - a);
    // prefetch these output rows (written after they are computed) and the next job's input rows (if given):
    // their memory traffic overlaps the rows' arithmetic (1.03-1.13x faster per call on maps of 7-32 px)
    for (int q = a; q < a + nr; ++q) {
      const size_t row = static_cast<size_t>(q) * W * C;
      for (int c = 0; c < W; ++c) {
        const size_t e = row + static_cast<size_t>(c) * C;  // first element of the pixel's block
        if (next_x) {
          __builtin_prefetch(next_x + e * x_esize);
          __builtin_prefetch(next_x + (e + L - 1) * x_esize);
        }
        __builtin_prefetch(static_cast<char*>(ob) + e * o_esize, 1);
        __builtin_prefetch(static_cast<char*>(ob) + (e + L - 1) * o_esize, 1);
      }
    }
    pk.upto(a + nr + g.reach);  // 1. the input rows these output rows read
    for (int c = 0; c < nr * Wr; ++c) A[c] = bias;
    for (int k = 0; k < g.nk; ++k) {
      const int kh = g.khs[k], kw = g.kws[k], kwp = g.kwp(k);
      const RowRange ra(kh, g.s0[k], g.s1[k], a, H);
      if constexpr (kRows == 2) {
        if (nr == 2) {
          const RowRange rb(kh, g.s0[k], g.s1[k], a + 1, H);
          if (ra.runs() == 0 && rb.runs() == 0) continue;
          // map column 0 of each row, shifted to the first tap's input column; kernel k's tap 0 of row 0
          const float* Pk = P + static_cast<size_t>(g.PL - kw / 2) * L;
          const float* Kk = K + (g.koff[k] + T - 1) * L;
          for (int c0 = 0; c0 < W; c0 += T) {
            const Span sp = span(c0, std::min(T, W - c0), kw, W);
            if (sp.inputs())
              tile_inputs2<T>(Pk + c0 * L, g.cols, Kk, kwp, a, kh, g.s0[k], g.s1[k], ra, rb, sp.u0, sp.u1, A + c0,
                              A + Wr + c0);
            else
              tile_taps2<T>(Pk + c0 * L, g.cols, Kk, kwp, a, kh, g.s0[k], g.s1[k], ra, rb, sp.j0, sp.j1, A + c0,
                            A + Wr + c0);
          }
          continue;
        }
      }
      if (ra.runs() == 0) continue;  // every row that reaches the map is folded into another kernel
      const int i0 = ra.i0, n = ra.i1 - ra.i0;
      // output (a, c) and tap (i, j) read x[a + i - kh/2][c + j - kw/2]: start at map row a + i0 - kh/2, kernel
      // row i0, tap 0 (T - 1 zero taps precede it)
      const float* Pa = P + (static_cast<size_t>(a + i0 - kh / 2) * g.cols + (g.PL - kw / 2)) * L;
      const float* Ka = K + (g.koff[k] + static_cast<size_t>(i0) * kwp + T - 1) * L;
      for (int c0 = 0; c0 < W; c0 += T) {
        const Span sp = span(c0, std::min(T, W - c0), kw, W);
        const float* Pt = Pa + static_cast<size_t>(c0) * L;
        if (sp.inputs())
          tile_inputs<T>(Pt, g.cols, Ka, kwp, n, ra.q0, ra.q1, sp.u0, sp.u1, A + c0);
        else
          tile_taps<T>(Pt, g.cols, Ka, kwp, n, ra.q0, ra.q1, sp.j0, sp.j1, A + c0);
      }
    }
    // 3. write the valid channels (their lines were prefetched at the start of the rows)
    for (int q = 0; q < nr; ++q) {
      const vf* Aq = A + static_cast<size_t>(q) * Wr;
      const size_t row = static_cast<size_t>(a + q) * W * C;
      if (out_bf16) {
        unsigned short* o = static_cast<unsigned short*>(ob) + row;
        for (int c = 0; c < W; ++c) {
          const vh h = to_bf16(Aq[c]);
          if (nc == L)
            *reinterpret_cast<vh*>(o + static_cast<size_t>(c) * C) = h;
          else
            for (int l = 0; l < nc; ++l) o[static_cast<size_t>(c) * C + l] = h[l];
        }
      } else {
        float* o = static_cast<float*>(ob) + row;
        if (nc == L) {
          for (int c = 0; c < W; ++c) {
            *reinterpret_cast<vfu*>(o + static_cast<size_t>(c) * C) = Aq[c];
          }
        } else {
          for (int c = 0; c < W; ++c)
            for (int l = 0; l < nc; ++l) o[static_cast<size_t>(c) * C + l] = Aq[c][l];
        }
      }
    }
  }
}

// x: float or bfloat16 per `in`; out: float, or with bf16 bfloat16, and then the kernels' taps and the bias are
// rounded to bfloat16 first (CPU autocast inference, where autocast rounds a convolution's weights).
void run(const void* x, In in, void* out, bool bf16, const Unit& u, const float* bias, int64_t bias_stride, int B,
         int C, int H, int W) {
  const size_t x_esize = in == In::kBf16 ? 2 : 4, o_esize = bf16 ? 2 : 4;
  const std::vector<KernelView>& ws = u.views;
  const std::vector<int>& khs = u.khs;
  const std::vector<int>& kws = u.kws;
  Geometry g;
  g.nk = static_cast<int>(ws.size());
  g.H = H;
  g.W = W;
  g.C = C;
  g.khs = khs.data();
  g.kws = kws.data();
  g.s0 = u.s0.data();
  g.s1 = u.s1.data();
  g.T = tile_width(g.nk, g.khs, g.kws, g.s0, g.s1, H, W);
  // left / right padding of the packed map, enough for every kernel and tile overhang; no padding rows, because no
  // tap that reads above or below the map is run
  g.PL = 0;
  for (int k = 0; k < g.nk; ++k) g.PL = std::max(g.PL, kws[k] / 2);
  for (int k = 0; k < g.nk; ++k) g.reach = std::max(g.reach, khs[k] / 2);
  const int nb = (C + L - 1) / L, Wr = round_up(W, g.T);
  g.cols = Wr + 2 * g.PL;
  // a block's kernels as K[k][i][T - 1 + j][L] with T - 1 zero taps each side of every row and zero lanes past the
  // last channel, re-laid out by a job whose thread does not hold them already (from its previous job)
  std::vector<size_t> koff(g.nk);
  size_t kblock = 0;
  for (int k = 0; k < g.nk; ++k) {
    koff[k] = kblock;
    kblock += static_cast<size_t>(khs[k]) * g.kwp(k);
  }
  g.koff = koff.data();
  // where each kernel row goes in K (vectors of L floats, at its tap 0): its own row, or the row it is folded into
  std::vector<size_t> row_base(g.nk), row_dst;
  for (int k = 0; k < g.nk; ++k) {
    row_base[k] = row_dst.size();
    for (int i = 0; i < khs[k]; ++i) {
      const int m = host_kernel(g.nk, g.khs, g.kws, i - khs[k] / 2);
      row_dst.push_back(koff[m] + static_cast<size_t>(i - khs[k] / 2 + khs[m] / 2) * g.kwp(m) + g.T - 1 +
                        (kws[m] - kws[k]) / 2);
    }
  }
  // the layouts of the packed map (size, left padding, row length, which also depends on the tile width) and of the
  // kernels (tile width, kernel sizes), whose zero parts each thread writes once (ZeroedOnce)
  const std::vector<int64_t> map_layout{H, W, g.PL, static_cast<int64_t>(g.cols)};
  std::vector<int64_t> kernel_layout{g.T};
  kernel_layout.insert(kernel_layout.end(), khs.begin(), khs.end());
  kernel_layout.insert(kernel_layout.end(), kws.begin(), kws.end());
  // Job order: image-major, so that consecutive jobs read the adjacent channels of one image and share the cache
  // lines that straddle their blocks (SLaK's channel counts are not multiples of 16), except for small batches of
  // small maps, which run block-major, so that a thread re-lays a block's kernels out once for all images: there the
  // re-layout weighs more, and the whole batch's lines of a block (B·H·W pixels, 1-2 lines each for x and out) are
  // still cached when the adjacent block's jobs come. Measured on the Xeon VM (AVX-512; docs/cpu_performance_log.md,
  // "Session 17"): block-major 1.15x faster at 8 x 14 x 14 (1568 batch pixels) and 1.37x at 8 x 7 x 7; the two on par
  // at 3136; image-major 1.05-1.08x at 56 x 56 and 1.09x at 8 x 28 x 28 (6272), 1.40x at 128 x 7 x 7.
  const bool block_major = static_cast<int64_t>(B) * H * W < kBlockMajorPixels;
  const long call = ++g_calls;
  // Kernels: a thread re-lays a block's kernels out when its previous job had another block, into one slot; but on
  // small maps run image-major, where that is every job and the re-layout outweighs a job's arithmetic, it keeps
  // every block's kernels, one slot each (1.08-1.42x faster at 14 x 14 and 7 x 7, batch 16-128; no faster at 28 x 28,
  // where reading the kept kernels back costs as much as laying them out again).
  const int kslots = !block_major && B > 1 && H * W < kKeptKernelsPixels ? nb : 1;
  std::vector<int64_t> slots_layout(kernel_layout);
  slots_layout.push_back(kslots);
  auto block_of = [&](int64_t job) { return static_cast<int>(block_major ? job / B : job % nb); };
  auto image_of = [&](int64_t job) { return static_cast<int>(block_major ? job % B : job / nb); };
  auto offset_of = [&](int64_t job) { return static_cast<size_t>(image_of(job)) * H * W * C + block_of(job) * L; };

  at::parallel_for(0, static_cast<int64_t>(B) * nb, 1, [&](int64_t begin, int64_t end) {
    thread_local Buffer pbuf, abuf, kbuf;
    thread_local std::vector<long> slot_call;  // per slot of kbuf: the call and block whose kernels it holds
    thread_local std::vector<int> slot_cb;
    if (static_cast<int>(slot_call.size()) < kslots) {
      slot_call.resize(kslots, 0);
      slot_cb.resize(kslots, -1);
    }
    for (int64_t job = begin; job < end; ++job) {
      const int cb = block_of(job), b = image_of(job), nc = std::min(L, C - cb * L);
      const void* xb = static_cast<const char*>(x) + offset_of(job) * x_esize;
      void* ob = static_cast<char*>(out) + offset_of(job) * o_esize;
      vi lanes;
      for (int l = 0; l < L; ++l) lanes[l] = l < nc ? -1 : 0;

      const int slot = kslots > 1 ? cb : 0;
      float* const Ks = kbuf.get(kslots * kblock * L);
      float* K = Ks + slot * kblock * L;
      // Tap by tap, one vector of the block's L channels (zero lanes past the last channel) assigned to its row's
      // tap, then the folded rows' vectors added into their host rows. The zero taps (T - 1 each side of every row)
      // are written once per buffer and layout. (Was: the whole buffer zeroed for every block, then each channel's
      // taps added into its lane, a pass over the buffer per channel: 1.2-1.4x slower per call at SLaK-T's 16 px
      // stage, where the re-layout is a fifth of the call.)
      if (slot_call[slot] != call || slot_cb[slot] != cb) {
        thread_local ZeroedOnce kzero;
        kzero.zero(Ks, kslots * kblock * L, slots_layout);
        for (int folded = 0; folded < 2; ++folded)
          for (int k = 0; k < g.nk; ++k) {
            const KernelView& kv = ws[k];
            const size_t* dst = row_dst.data() + row_base[k];
            const float* w = kv.p + static_cast<int64_t>(cb) * L * kv.sc;
            for (int i = 0; i < kv.kh; ++i) {
              if ((i >= u.s0[k] && i < u.s1[k]) != (folded == 1)) continue;
              vf* Ki = reinterpret_cast<vf*>(K + dst[i] * L);
              for (int j = 0; j < kv.kw; ++j) {
                const float* wij = w + i * kv.sh + j * kv.sw;
                vf v = nc == L ? lanes_of(wij, kv.sc, Lanes{}) : lanes_of(wij, kv.sc, nc, Lanes{});
                if (bf16) v = round_bf16(v);
                Ki[j] = folded ? Ki[j] + v : v;
              }
            }
          }
        slot_call[slot] = call;
        slot_cb[slot] = cb;
      }

      // 1. the packed map (zero padding left and right of the map; lanes past the last channel zero), packed by
      // block_rows row by row
      float* P = pbuf.get(L * H * g.cols);
      thread_local ZeroedOnce pzero;  // the padding; later jobs only overwrite the map
      pzero.zero(P, L * H * g.cols, map_layout);
      RowPacker pk{xb, in, P, g.cols, g.PL, H, W, C, nc, b + 1 == B, lanes};
      vf bv = vf{};
      if (bias != nullptr)
        for (int l = 0; l < nc; ++l) bv[l] = bias[(cb * L + l) * bias_stride];
      if (bf16) bv = round_bf16(bv);

      // 2 and 3: output rows, accumulated in A[Wr] from the bias, then written
      vf* A = reinterpret_cast<vf*>(abuf.get(static_cast<size_t>(kRows) * L * Wr));
      // prefetched during this job on small maps (on large ones the next job's input would not stay in cache)
      const char* next_x = H * W < kSmallMapPixels && job + 1 < end
                               ? static_cast<const char*>(x) + offset_of(job + 1) * x_esize
                               : nullptr;
      switch (g.T) {
        case 4: block_rows<4>(g, P, K, bv, A, ob, bf16, nc, next_x, x_esize, pk); break;
        case 5: block_rows<5>(g, P, K, bv, A, ob, bf16, nc, next_x, x_esize, pk); break;
        case 6: block_rows<6>(g, P, K, bv, A, ob, bf16, nc, next_x, x_esize, pk); break;
        case 7: block_rows<7>(g, P, K, bv, A, ob, bf16, nc, next_x, x_esize, pk); break;
        default:
          if constexpr (kMaxTile == 8) block_rows<8>(g, P, K, bv, A, ob, bf16, nc, next_x, x_esize, pk);
          break;
      }
    }
  });
}

// ---- Weight gradient (CPU training) ----
// dw[c][i][j] = sum_{n,h,w} g[n][h][w][c] * x[n][h + i - kh/2][w + j - kw/2][c] (x zero outside the map): the
// gradient of a depthwise "same" convolution's kernel, from its input x and the gradient g of its output, both
// channels_last. Each job takes one block of L channels of every image (so no two threads add into the same taps) and,
// per image, packs x (zero-padded all round) and g (zero columns past the map) into aligned buffers, then runs the
// taps as register tiles of R kernel rows x T kernel columns: for U output columns at a time, U loads of g, R (U + T -
// 1) loads of x and R T U products, the R T sums held in registers over a band of output rows and then added into the
// block's float32 sums. Each tile runs only the output rows and columns that reach the map for at least one of its
// taps; the taps past the kernel's width in its last tile column read zeros and are dropped.
// Register tiles: kWgradAcc accumulators at most (32 vector registers on AVX-512, 16 elsewhere). On AVX-512, 16
// (tiles of 3 x 5 and 2 x 8) was 1.08-1.09x faster over SLaK-T's stage-0-2 kernels than 20 (4 x 5, which spilled
// accumulators to the stack); 12 (2 x 5, 1 x 8) on par with 16 in one run, slower in another; U = 2 slower (0.94x).
constexpr int kWgradAcc = L == 16 ? 16 : 8;
constexpr int kWgradU = L == 16 ? 4 : 2;
// Tile width for a kernel kw wide: kw itself up to kWgradMaxT, else the wider of kWgradMaxT - 1 and kWgradMaxT that
// wastes fewer taps (e.g. 49: 7; 51: 8).
constexpr int kWgradMaxT = L == 16 ? 8 : 4;
inline int wgrad_tile_width(int kw) {
  if (kw <= kWgradMaxT) return kw;
  const int a = kWgradMaxT - 1, b = kWgradMaxT;
  return round_up(kw, a) < round_up(kw, b) ? a : b;
}
constexpr int wgrad_rows(int T) { return kWgradAcc / T > 8 ? 8 : (kWgradAcc / T < 1 ? 1 : kWgradAcc / T); }

// One tile: R kernel rows from X (packed x at the tile's first kernel row and column, for output row h0 and
// column w0; rows xs floats apart) against G (packed g at output row h0, column w0; rows gs floats apart), over nh
// output rows and nw output columns (a multiple of U); the R x T sums are added into D (rows ds vectors apart).
template <int R, int T>
__attribute__((noinline)) void wgrad_tile(const float* X, size_t xs, const float* G, size_t gs, int nh, int nw,
                                          vf* D, size_t ds) {
  constexpr int U = kWgradU;
  vf acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = vf{};
  for (int h = 0; h < nh; ++h) {
    const float* g = G + h * gs;
    const float* x = X + h * xs;
    for (int w = 0; w < nw; w += U) {
      vf gv[U];
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) gv[u] = *reinterpret_cast<const vf*>(g + (w + u) * L);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * xs + w * L;
#pragma GCC unroll 16
        for (int m = 0; m < U + T - 1; ++m) {
          const vf xv = *reinterpret_cast<const vf*>(xr + m * L);
#pragma GCC unroll 8
          for (int u = 0; u < U; ++u)
            if (m - u >= 0 && m - u < T) acc[r][m - u] += gv[u] * xv;
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) D[r * ds + t] += acc[r][t];
}

template <int T>
void wgrad_rows_of(int R, const float* X, size_t xs, const float* G, size_t gs, int nh, int nw, vf* D, size_t ds) {
  constexpr int RM = wgrad_rows(T);
  if (R == RM)
    wgrad_tile<RM, T>(X, xs, G, gs, nh, nw, D, ds);
  else
    for (int r = 0; r < R; ++r) wgrad_tile<1, T>(X + r * xs, xs, G, gs, nh, nw, D + r * ds, ds);
}

// Output rows per band: a tile's sums stay in registers over a band, and a band's packed rows of x and g (its rows,
// plus kh - 1 of x) stay in L2 across the band's tiles on large maps.
constexpr int kWgradBandRows = 32;

void run_wgrad(const void* x, const void* g, In in, float* dw, int B, int C, int H, int W, int kh, int kw) {
  const int ph = kh / 2, pw = kw / 2, T = wgrad_tile_width(kw), RM = wgrad_rows(T);
  const int U = kWgradU, kwp = round_up(kw, T), nb = (C + L - 1) / L;
  // packed x: PT zero rows above and below the map (a tile's rows past the map), PL zero columns left of it (the
  // first tile column's overhang), enough right of it for the last tile and the columns rounded up to U
  const int PT = RM - 1, PL = T - 1;
  const size_t xcols = static_cast<size_t>(PL) + W + pw + U + 2 * T, xrows = static_cast<size_t>(H) + 2 * PT;
  const size_t gcols = static_cast<size_t>(W) + U;
  const size_t esize = in == In::kBf16 ? 2 : 4;
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    thread_local Buffer xbuf, gbuf, dbuf;
    ++g_wgrad_calls;
    for (int64_t cb = begin; cb < end; ++cb) {
      const int nc = std::min(L, C - static_cast<int>(cb) * L);
      vi lanes;
      for (int l = 0; l < L; ++l) lanes[l] = l < nc ? -1 : 0;
      float* Px = xbuf.get(xrows * xcols * L);
      float* Pg = gbuf.get(static_cast<size_t>(H) * gcols * L);
      vf* D = reinterpret_cast<vf*>(dbuf.get(static_cast<size_t>(kh) * kwp * L));
      // the padding, zeroed once per thread and geometry: each image overwrites only the map
      thread_local ZeroedOnce xzero, gzero;
      xzero.zero(Px, xrows * xcols * L, {H, W, PT, PL, static_cast<int64_t>(xcols)});
      gzero.zero(Pg, static_cast<size_t>(H) * gcols * L, {H, W, static_cast<int64_t>(gcols)});
      for (size_t k = 0; k < static_cast<size_t>(kh) * kwp; ++k) D[k] = vf{};
      for (int b = 0; b < B; ++b) {
        const size_t off = (static_cast<size_t>(b) * H * W * C + cb * L) * esize;
        RowPacker px{static_cast<const char*>(x) + off, in, Px + PT * xcols * L, xcols, PL, H, W, C, nc, b + 1 == B,
                     lanes};
        RowPacker pg{static_cast<const char*>(g) + off, in, Pg, gcols, 0, H, W, C, nc, b + 1 == B, lanes};
        px.upto(H);
        pg.upto(H);
        for (int h0 = 0; h0 < H; h0 += kWgradBandRows) {
          const int h1 = std::min(H, h0 + kWgradBandRows);
          for (int i0 = 0; i0 < kh; i0 += RM) {
            const int R = std::min(RM, kh - i0);
            // output rows that reach the map for at least one of kernel rows [i0, i0 + R), within the band
            const int ha = std::max(h0, ph - i0 - R + 1), hb = std::min(h1, H + ph - i0);
            if (ha >= hb) continue;
            for (int j0 = 0; j0 < kw; j0 += T) {
              const int wa = std::max(0, pw - j0 - T + 1), wb = std::min(W, W + pw - j0);
              if (wa >= wb) continue;
              const int nw = round_up(wb - wa, U);
              // x at row ha + i0 - ph, column wa + j0 - pw (packed coordinates: + PT rows, + PL columns)
              const float* X = Px + ((static_cast<size_t>(ha + i0 - ph + PT)) * xcols + (wa + j0 - pw + PL)) * L;
              const float* G = Pg + (static_cast<size_t>(ha) * gcols + wa) * L;
              vf* Dt = D + static_cast<size_t>(i0) * kwp + j0;
              switch (T) {
#define SLAK_WGRAD_CASE(TT) \
  case TT: wgrad_rows_of<TT>(R, X, xcols * L, G, gcols * L, hb - ha, nw, Dt, kwp); break;
                SLAK_WGRAD_CASE(1)
                SLAK_WGRAD_CASE(2)
                SLAK_WGRAD_CASE(3)
                SLAK_WGRAD_CASE(4)
                SLAK_WGRAD_CASE(5)
                SLAK_WGRAD_CASE(6)
                SLAK_WGRAD_CASE(7)
                SLAK_WGRAD_CASE(8)
#undef SLAK_WGRAD_CASE
                default: TORCH_CHECK(false, "dwconv_cpu: weight-gradient tile width ", T);
              }
            }
          }
        }
      }
      for (int l = 0; l < nc; ++l) {
        float* o = dw + (static_cast<size_t>(cb) * L + l) * kh * kw;
        for (int i = 0; i < kh; ++i)
          for (int j = 0; j < kw; ++j) o[i * kw + j] = D[static_cast<size_t>(i) * kwp + j][l];
      }
    }
  });
}

// A plain strided CPU tensor of this dtype (default float32): no subclass (FakeTensor, functorch wrappers), no sparse /
// quantized / conj / neg views. Its dispatch keys are a subset of an ordinary CPU tensor's (inference tensors have
// fewer).
bool plain_cpu(const at::Tensor& t, at::ScalarType dtype = at::kFloat) {
  static const c10::DispatchKeySet ordinary({c10::DispatchKey::CPU, c10::DispatchKey::ADInplaceOrView,
                                             c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutocastCPU});
  return t.defined() && t.scalar_type() == dtype && t.layout() == at::kStrided && t.device().is_cpu() &&
         (t.key_set() | ordinary) == ordinary;
}

// A (C, 1, kh, kw) kernel with odd kh and kw: what a depthwise "same" convolution of C channels takes.
bool unit_kernel_shape(const at::Tensor& w, int64_t C) {
  return w.dim() == 4 && w.size(0) == C && w.size(1) == 1 && w.size(2) % 2 == 1 && w.size(3) % 2 == 1;
}

// No dispatch mode (FakeTensorMode, make_fx, FlopCounterMode, ...), vmap or functionalization active: the thread's
// included dispatch keys are a subset of plain eager mode's.
bool eager_dispatch() {
  static const c10::DispatchKeySet eager({c10::DispatchKey::BackendSelect, c10::DispatchKey::ADInplaceOrView});
  return (c10::impl::tls_local_dispatch_key_set().included_ | eager) == eager;
}

// The kernel's part of a weight: the central min(kh, 2H - 1) x min(kw, 2W - 1) taps, the only ones that reach an
// H x W map under "same" padding (no copy: a strided view).
KernelView clipped_view(const at::Tensor& w, int H, int W) {
  const int kh = w.size(2), kw = w.size(3), kh2 = std::min(kh, 2 * H - 1), kw2 = std::min(kw, 2 * W - 1);
  const int64_t sc = w.stride(0), sh = w.stride(2), sw = w.stride(3);
  return {w.data_ptr<float>() + (kh - kh2) / 2 * sh + (kw - kw2) / 2 * sw, kh2, kw2, sc, sh, sw};
}

// Kernel shapes (after clipping) and folded rows of the latest call, for the tests (calls may run without the GIL:
// locked).
std::vector<std::pair<int, int>> g_last_kernels, g_last_folded;
std::mutex g_last_kernels_lock;

// bf16: x float32 (rounded to bfloat16 as it is read) or bfloat16, kernels and bias rounded, bfloat16 output.
torch::Tensor run_unit(const at::Tensor& x, const std::vector<at::Tensor>& weights, const at::Tensor* bias,
                       bool bf16 = false) {
  RECORD_FUNCTION("slak_mm::dwconv_cpu", std::vector<c10::IValue>());  // shows in torch.profiler; ~free when off
  const int B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  std::vector<KernelView> views;
  for (const auto& w : weights) views.push_back(clipped_view(w, H, W));
  const Unit u(std::move(views));
  {
    std::lock_guard<std::mutex> lock(g_last_kernels_lock);
    g_last_kernels.clear();
    g_last_folded.clear();
    for (size_t k = 0; k < u.views.size(); ++k) {
      g_last_kernels.emplace_back(u.khs[k], u.kws[k]);
      g_last_folded.emplace_back(u.s0[k], u.s1[k]);
    }
  }
  auto out = torch::empty({B, C, H, W}, x.options()
                                           .dtype(bf16 ? at::kBFloat16 : at::kFloat)
                                           .memory_format(at::MemoryFormat::ChannelsLast));
  const In in = !bf16 ? In::kF32 : x.scalar_type() == at::kBFloat16 ? In::kBf16 : In::kF32RoundedToBf16;
  if (out.numel() > 0)
    run(x.data_ptr(), in, out.data_ptr(), bf16, u, bias ? bias->data_ptr<float>() : nullptr,
        bias ? bias->stride(0) : 0, B, C, H, W);
  return out;
}

}  // namespace

// The checks both entries share (x's dtype aside).
static void check_unit_args(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                            const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "dwconv_cpu: x must be channels_last");
  TORCH_CHECK(!weights.empty(), "dwconv_cpu: at least one kernel");
  for (const auto& w : weights)
    TORCH_CHECK(unit_kernel_shape(w, x.size(1)) && w.scalar_type() == torch::kFloat32 && w.device().is_cpu() &&
                    w.layout() == at::kStrided,
                "dwconv_cpu: each weight must be a float32 CPU (C, 1, kh, kw) tensor with odd kh and kw");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(1) && bias->scalar_type() == torch::kFloat32 &&
                    bias->device().is_cpu(),
                "dwconv_cpu: bias must be a float32 CPU (C,) tensor");
}

// x: (B, C, H, W) float32 channels_last; weights: (C, 1, kh, kw) float32, odd sides, any strides (taps that only
// reach the zero padding are dropped here); bias: (C,) or None. Returns (B, C, H, W) channels_last.
torch::Tensor dwconv_sum(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                         const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "dwconv_cpu: x must be a 4-D float32 CPU tensor");
  check_unit_args(x, weights, bias);
  return run_unit(x, weights, bias.has_value() ? &*bias : nullptr);
}

// CPU bfloat16 autocast inference: as dwconv_sum, with x float32 or bfloat16 and x, the kernels and the bias rounded
// to bfloat16 (as autocast rounds a convolution's operands), the products summed in float32 and the sum rounded to
// bfloat16 once. Returns a bfloat16 channels_last tensor.
torch::Tensor dwconv_sum_bf16(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                              const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 4 && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16) &&
                  x.device().is_cpu(),
              "dwconv_cpu: x must be a 4-D float32 or bfloat16 CPU tensor");
  check_unit_args(x, weights, bias);
  return run_unit(x, weights, bias.has_value() ? &*bias : nullptr, true);
}

// dwconv2d_sum's fast path, one call from Python: the unit computed here when it is plain float32 CPU inference
// (x 4-D and not empty, weights (C, 1, odd, odd), bias (C,) or None, all plain CPU float32 tensors; no gradient
// needed, no JIT trace, plain eager dispatch; up to 8 kernels) or the same under CPU bfloat16 autocast (x float32
// or bfloat16; as dwconv_sum_bf16), else None, and the caller's Python path decides (and raises the clear errors for
// bad input). Runs without the GIL. Each Python-level test this replaces
// costs ~10x its warm time right after the MLP's GEMMs: ~0.3 ms per unit, measured.
py::object dwconv_sum_auto(py::handle x_obj, py::handle weights_obj, py::handle bias_obj) {
  // exact tensors (torch.Tensor, nn.Parameter): a subclass may override __torch_function__, which only the Python
  // path honours
  if (!THPVariable_CheckExact(x_obj.ptr()) || !(PyList_Check(weights_obj.ptr()) || PyTuple_Check(weights_obj.ptr())))
    return py::none();
  const at::Tensor& x = THPVariable_Unpack(x_obj.ptr());
  const bool bf16 = at::autocast::is_autocast_enabled(at::kCPU);
  if (bf16 && at::autocast::get_autocast_dtype(at::kCPU) != at::kBFloat16) return py::none();
  if (!(plain_cpu(x) || (bf16 && plain_cpu(x, at::kBFloat16))) || x.dim() != 4 || x.numel() == 0 ||
      torch::jit::tracer::isTracing() || !eager_dispatch())
    return py::none();
  const bool grad = at::GradMode::is_enabled();
  if (grad && x.requires_grad()) return py::none();
  const auto seq = py::reinterpret_borrow<py::sequence>(weights_obj);
  const size_t n = seq.size();
  if (n == 0 || n > 8) return py::none();
  std::vector<at::Tensor> weights;
  weights.reserve(n);
  for (size_t k = 0; k < n; ++k) {
    PyObject* o = PySequence_Fast_GET_ITEM(weights_obj.ptr(), k);  // list or tuple
    if (!THPVariable_CheckExact(o)) return py::none();
    const at::Tensor& w = THPVariable_Unpack(o);
    if (!plain_cpu(w) || !unit_kernel_shape(w, x.size(1)) || (grad && w.requires_grad()))
      return py::none();
    weights.push_back(w);
  }
  at::Tensor bias;
  if (!bias_obj.is_none()) {
    if (!THPVariable_CheckExact(bias_obj.ptr())) return py::none();
    bias = THPVariable_Unpack(bias_obj.ptr());
    if (!plain_cpu(bias) || bias.dim() != 1 || bias.size(0) != x.size(1) || (grad && bias.requires_grad()))
      return py::none();
  }
  at::Tensor out;
  {
    py::gil_scoped_release no_gil;
    const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);  // a no-op inside SLaK (channels_last)
    out = run_unit(xc, weights, bias.defined() ? &bias : nullptr, bf16);
  }
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(out)));
}

// The weight gradient of a depthwise "same" convolution with a (C, 1, kh, kw) kernel (odd sides): x its input and
// g the gradient of its output, (B, C, H, W) channels_last, both float32 or both bfloat16 (CPU autocast training;
// summed in float32). Returns (C, 1, kh, kw) float32.
torch::Tensor dwconv_weight_grad(const torch::Tensor& x, const torch::Tensor& g, int64_t kh, int64_t kw) {
  TORCH_CHECK(x.dim() == 4 && g.sizes() == x.sizes() && x.device().is_cpu() && g.device().is_cpu() &&
                  (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16) &&
                  g.scalar_type() == x.scalar_type(),
              "dwconv_cpu: x and grad_out must be 4-D CPU tensors of one shape, both float32 or both bfloat16");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast) && g.is_contiguous(at::MemoryFormat::ChannelsLast),
              "dwconv_cpu: x and grad_out must be channels_last");
  TORCH_CHECK(kh > 0 && kw > 0 && kh % 2 == 1 && kw % 2 == 1, "dwconv_cpu: kernel sides must be odd");
  RECORD_FUNCTION("slak_mm::dwconv_weight_grad_cpu", std::vector<c10::IValue>());
  const int B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto dw = torch::zeros({C, 1, kh, kw}, x.options().dtype(at::kFloat));
  if (x.numel() > 0)
    run_wgrad(x.data_ptr(), g.data_ptr(), x.scalar_type() == torch::kBFloat16 ? In::kBf16 : In::kF32,
              dw.data_ptr<float>(), B, C, H, W, static_cast<int>(kh), static_cast<int>(kw));
  return dw;
}

// The tile width dwconv_sum uses for these kernels on an H×W map (exposed for the tests' coverage check).
int64_t tile_width_for(const std::vector<int64_t>& khs, const std::vector<int64_t>& kws, int64_t H, int64_t W) {
  TORCH_CHECK(khs.size() == kws.size() && !khs.empty() && H > 0 && W > 0, "tile_width: bad arguments");
  const int nk = static_cast<int>(khs.size());
  const std::vector<int> kh(khs.begin(), khs.end()), kw(kws.begin(), kws.end());
  std::vector<int> s0(nk), s1(nk);
  folded_rows(nk, kh.data(), kw.data(), s0.data(), s1.data());
  return tile_width(nk, kh.data(), kw.data(), s0.data(), s1.data(), static_cast<int>(H), static_cast<int>(W));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dwconv_sum", &dwconv_sum, "sum_k depthwise conv2d(x, w_k) + bias (CPU, float32, channels_last)",
        py::call_guard<py::gil_scoped_release>());
  m.def("dwconv_sum_bf16", &dwconv_sum_bf16,
        "dwconv_sum with bfloat16 rounding of x, kernels and bias and a bfloat16 result (CPU autocast inference)",
        py::call_guard<py::gil_scoped_release>());
  m.def("dwconv_sum_auto", &dwconv_sum_auto,
        "dwconv_sum (dwconv_sum_bf16 under CPU bfloat16 autocast) for plain CPU inference (any layout), None for "
        "anything else");
  m.def("dwconv_weight_grad", &dwconv_weight_grad,
        "d(loss)/d(kernel) of a depthwise same conv from x and grad_out (CPU, channels_last, float32 or bfloat16)",
        py::call_guard<py::gil_scoped_release>());
  m.def("wgrad_calls", [] { return g_wgrad_calls.load(); }, "weight-gradient jobs so far in this process");
  m.def("tile_width", &tile_width_for, "outputs per register tile dwconv_sum uses for kernels (khs, kws) on H×W");
  m.def("calls", [] { return g_calls.load(); }, "kernel runs so far in this process");
  m.def(
      "last_kernels",
      [] {
        std::lock_guard<std::mutex> lock(g_last_kernels_lock);
        return g_last_kernels;
      },
      "(kh, kw) of each kernel the latest run used, after clipping");
  m.def(
      "last_folded_rows",
      [] {
        std::lock_guard<std::mutex> lock(g_last_kernels_lock);
        return g_last_folded;
      },
      "rows [s0, s1) of each kernel of the latest run folded into a wider kernel's rows (none: kh, kh)");
  m.attr("lanes") = L;  // channels per job (floats per vector) in this build
  m.attr("max_tile_width") = kMaxTile;
}
