// CPU inference kernel for slak_mm.ops.dwconv2d_sum: out = bias + sum_k conv2d(x, w_k), depthwise, stride 1,
// "same" padding, float32, channels_last (NHWC) input and output. Built on first use by slak_mm/ops/cpu_kernel.py.
//
// Why: oneDNN's channels_last depthwise kernel reaches only 20-40% of this machine's GEMM rate on SLaK's long bands,
// mostly because SLaK's channel counts (124, 249, 499, 998) make every 16-float vector load straddle cache lines,
// and because it re-loads inputs down a kernel column (docs/benchmarks.md). Here each job takes one block of L
// channels (one vector: 16 on AVX-512, 8 on AVX2, 4 otherwise) of one image and
//   1. packs it into an aligned buffer P[H][cols][L], zero-padded left and right (one read of x; no boundary tests
//      later; the padding is zeroed once per thread and map geometry, later jobs only overwrite the map);
//   2. computes the output one row at a time into an aligned scratch A[W][L] (starting from the bias), every
//      kernel adding into it as register tiles of T outputs along the row (T in [4, 8], chosen per call from the
//      map and kernel widths, see tile_width); each tile runs only the kernel rows that reach the map, and either
//      the taps that reach the map for at least one of its outputs or the map columns that at least one of its
//      outputs reaches, whichever is fewer (Span): on a map narrower than the kernel the second is exactly the
//      in-map work;
//   3. writes the row once.
// The job re-lays its block's kernels out as K[k][i][j][L], unless its thread's previous job had the same block.
// The vectors are GCC/Clang vector extensions, so the same source compiles to AVX-512, AVX2 or SSE (the loader
// passes the ISA flags). Products are the same as F.conv2d's; only the order of the additions differs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
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
typedef float vf __attribute__((vector_size(L * 4), aligned(L * 4)));
typedef int vi __attribute__((vector_size(L * 4), aligned(L * 4)));
typedef float vfu __attribute__((vector_size(L * 4), aligned(4)));  // unaligned access to x and out
// Pixels ahead to prefetch when packing x and writing the output: each job touches only 64 of every C·4 bytes
// of a pixel, a stride the hardware prefetchers do not hide (measured: 4-15% faster at SLaK-T's shapes).
constexpr int kPrefetch = 64;
// Maps of fewer pixels run their jobs block-major (see run).
constexpr int kBlockMajorPixels = 1024;

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

// A tile of T outputs along a row, two loop orders over the same products; P points at the input column of the
// tile's first output's first tap, K at its kernel row's first tap, rows of K are kwp floats apart and have T - 1
// zero taps on each side.
// Tap order: acc[r] += sum_i sum_{j in [j0, j1)} P[i][j + r] * K[i][j]: one weight and T inputs per column j.
template <int T>
inline void tile_taps(const float* P, size_t cols, const float* K, int kwp, int kh, int j0, int j1, vf* acc) {
  vf a[T];
  for (int r = 0; r < T; ++r) a[r] = acc[r];
  for (int i = 0; i < kh; ++i) {
    const float* k = K + static_cast<size_t>(i) * kwp * L;
    const float* p = P + static_cast<size_t>(i) * cols * L;
    for (int j = j0; j < j1; ++j) {
      const vf w = *reinterpret_cast<const vf*>(k + j * L);
#pragma GCC unroll 16
      for (int r = 0; r < T; ++r) a[r] += *reinterpret_cast<const vf*>(p + (j + r) * L) * w;
    }
  }
  for (int r = 0; r < T; ++r) acc[r] = a[r];
}

// Input order: acc[r] += sum_i sum_{u in [u0, u1)} P[i][u] * K[i][u - r]: one input and T weights per column u
// (K[i][u - r] is one of the zero taps where output r does not reach input u).
template <int T>
inline void tile_inputs(const float* P, size_t cols, const float* K, int kwp, int kh, int u0, int u1, vf* acc) {
  vf a[T];
  for (int r = 0; r < T; ++r) a[r] = acc[r];
  for (int i = 0; i < kh; ++i) {
    const float* k = K + static_cast<size_t>(i) * kwp * L;
    const float* p = P + static_cast<size_t>(i) * cols * L;
    for (int u = u0; u < u1; ++u) {
      const vf v = *reinterpret_cast<const vf*>(p + u * L);
#pragma GCC unroll 16
      for (int r = 0; r < T; ++r) a[r] += v * *reinterpret_cast<const vf*>(k + (u - r) * L);
    }
  }
  for (int r = 0; r < T; ++r) acc[r] = a[r];
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

struct Geometry {
  int nk, H, W, C, PL, T;
  size_t cols;  // packed row length (pixels), PL zero pixels each side of the map and of the tiles' overhang
  const int *khs, *kws;
  const size_t* koff;  // offset (vectors of L floats) of kernel k in a block's re-laid-out kernels
  int kwp(int k) const { return kws[k] + 2 * (T - 1); }
};

// Outputs per tile for this call: the T in [4, kMaxTile] with the fewest load slots, T + 1 per column (one weight
// and T inputs, or one input and T weights) plus kTileRowCost per kernel row (loop and pointer set-up), summed over
// every tile of every kernel row that runs; ties go to the larger T. Narrow maps get short or exactly fitting tiles
// (a 14-wide map runs two tiles of 7), wide ones the widest. Against every width forced, at SLaK-T's 9 stage map
// shapes: the pick was the fastest or within 7% of it on AVX-512 and, with the set-up term (without it: 4-output
// tiles on a 32-wide map, 1.4x slower), within 4% at 8 of 9 shapes on AVX2.
constexpr long kTileRowCost = 8;
int tile_width(int nk, const int* khs, const int* kws, int H, int W) {
  long best = -1;
  int best_t = kMaxTile;
  for (int t = kMaxTile; t >= 4; --t) {
    long cost = 0;
    for (int k = 0; k < nk; ++k) {
      long rows = 0;
      for (int a = 0; a < H; ++a) rows += std::min(khs[k], khs[k] / 2 - a + H) - std::max(0, khs[k] / 2 - a);
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

// Steps 2 and 3 of one job: every output row of the block, from the packed map P and the block's kernels K.
template <int T>
void block_rows(const Geometry& g, const float* P, const float* K, vf bias, vf* A, float* ob, int nc) {
  const int H = g.H, W = g.W, C = g.C;
  for (int a = 0; a < H; ++a) {
    for (int c = 0; c < round_up(W, T); ++c) A[c] = bias;
    for (int k = 0; k < g.nk; ++k) {
      const int kh = g.khs[k], kw = g.kws[k], kwp = g.kwp(k);
      const int i0 = std::max(0, kh / 2 - a), i1 = std::min(kh, kh / 2 - a + H);
      // output (a, c) and tap (i, j) read x[a + i - kh/2][c + j - kw/2]: start at map row a + i0 - kh/2, kernel
      // row i0, tap 0 (T - 1 zero taps precede it)
      const float* Pa = P + (static_cast<size_t>(a + i0 - kh / 2) * g.cols + (g.PL - kw / 2)) * L;
      const float* Ka = K + (g.koff[k] + static_cast<size_t>(i0) * kwp + T - 1) * L;
      for (int c0 = 0; c0 < W; c0 += T) {
        const Span sp = span(c0, std::min(T, W - c0), kw, W);
        const float* Pt = Pa + static_cast<size_t>(c0) * L;
        if (sp.inputs())
          tile_inputs<T>(Pt, g.cols, Ka, kwp, i1 - i0, sp.u0, sp.u1, A + c0);
        else
          tile_taps<T>(Pt, g.cols, Ka, kwp, i1 - i0, sp.j0, sp.j1, A + c0);
      }
    }
    // 3. write the valid channels
    float* o = ob + static_cast<size_t>(a) * W * C;
    if (nc == L) {
      for (int c = 0; c < W; ++c) {
        __builtin_prefetch(o + static_cast<size_t>(c + kPrefetch) * C, 1);
        __builtin_prefetch(o + static_cast<size_t>(c + kPrefetch) * C + L - 1, 1);
        *reinterpret_cast<vfu*>(o + static_cast<size_t>(c) * C) = A[c];
      }
    } else {
      for (int c = 0; c < W; ++c)
        for (int l = 0; l < nc; ++l) o[static_cast<size_t>(c) * C + l] = A[c][l];
    }
  }
}

void run(const float* x, float* out, const std::vector<const float*>& ws, const std::vector<int>& khs,
         const std::vector<int>& kws, const float* bias, int B, int C, int H, int W) {
  Geometry g;
  g.nk = static_cast<int>(ws.size());
  g.H = H;
  g.W = W;
  g.C = C;
  g.khs = khs.data();
  g.kws = kws.data();
  g.T = tile_width(g.nk, g.khs, g.kws, H, W);
  // left / right padding of the packed map, enough for every kernel and tile overhang; no padding rows, because no
  // tap that reads above or below the map is run
  g.PL = 0;
  for (int k = 0; k < g.nk; ++k) g.PL = std::max(g.PL, kws[k] / 2);
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
  // Job order: on small maps block-major, so that a thread re-lays a block's kernels out once for all images
  // (1.2-1.4x faster at 7-14 px, batch 8); on larger maps image-major, so that consecutive jobs read the adjacent
  // channels of one image and share the cache lines that straddle their blocks (1.05-1.08x at 40-56 px, batch 4-8).
  const bool block_major = H * W < kBlockMajorPixels;
  static std::atomic<long> calls{0};
  const long call = ++calls;

  at::parallel_for(0, static_cast<int64_t>(B) * nb, 1, [&](int64_t begin, int64_t end) {
    thread_local Buffer pbuf, abuf, kbuf;
    thread_local long k_call = 0;  // the call and block whose kernels kbuf holds
    thread_local int k_cb = -1;
    for (int64_t job = begin; job < end; ++job) {
      const int cb = block_major ? static_cast<int>(job / B) : static_cast<int>(job % nb);
      const int b = block_major ? static_cast<int>(job % B) : static_cast<int>(job / nb), nc = std::min(L, C - cb * L);
      const float* xb = x + static_cast<size_t>(b) * H * W * C + cb * L;
      float* ob = out + static_cast<size_t>(b) * H * W * C + cb * L;
      vi lanes;
      for (int l = 0; l < L; ++l) lanes[l] = l < nc ? -1 : 0;

      float* K = kbuf.get(kblock * L);
      if (k_call != call || k_cb != cb) {  // every vector of K written once: taps, zero taps, zero lanes
        for (int k = 0; k < g.nk; ++k) {
          const int kh = khs[k], kw = kws[k], kwp = g.kwp(k), taps = kh * kw;
          const float* w0 = ws[k] + static_cast<size_t>(cb) * L * taps;
          vf* Kk = reinterpret_cast<vf*>(K) + koff[k];
          for (int i = 0; i < kh; ++i)
            for (int j = -(g.T - 1); j < kw + g.T - 1; ++j) {
              vf v = vf{};
              if (j >= 0 && j < kw)
                for (int l = 0; l < nc; ++l) v[l] = w0[static_cast<size_t>(l) * taps + i * kw + j];
              Kk[static_cast<size_t>(i) * kwp + g.T - 1 + j] = v;
            }
        }
        k_call = call;
        k_cb = cb;
      }

      // 1. pack (zero padding left and right of the map; lanes past the last channel zero)
      float* P = pbuf.get(L * H * g.cols);
      // the padding is zeroed once per buffer and layout (map size, left padding, row length, which also depends
      // on the tile width): later jobs only overwrite the map
      thread_local const float* zeroed = nullptr;
      thread_local size_t zgeom[4] = {0, 0, 0, 0};
      const size_t geom[4] = {static_cast<size_t>(H), static_cast<size_t>(W), static_cast<size_t>(g.PL), g.cols};
      if (zeroed != P || !std::equal(geom, geom + 4, zgeom)) {
        std::memset(P, 0, sizeof(float) * L * H * g.cols);
        zeroed = P;
        std::copy(geom, geom + 4, zgeom);
      }
      for (int a = 0; a < H; ++a) {
        const float* src = xb + static_cast<size_t>(a) * W * C;
        float* d = P + (static_cast<size_t>(a) * g.cols + g.PL) * L;
        const bool last_row = b + 1 == B && a + 1 == H;
        for (int c = 0; c < W; ++c, d += L, src += C) {
          __builtin_prefetch(src + kPrefetch * C);  // never faults, even past the end of x
          __builtin_prefetch(src + kPrefetch * C + L - 1);
          if (nc == L) {
            *reinterpret_cast<vf*>(d) = *reinterpret_cast<const vfu*>(src);
          } else if (!last_row || c + 1 < W) {  // a full-vector read stays inside x
            *reinterpret_cast<vf*>(d) = (vf)((vi)(*reinterpret_cast<const vfu*>(src)) & lanes);
          } else {
            for (int l = 0; l < L; ++l) d[l] = l < nc ? src[l] : 0.f;
          }
        }
      }
      vf bv = vf{};
      if (bias != nullptr)
        for (int l = 0; l < nc; ++l) bv[l] = bias[cb * L + l];

      // 2 and 3: output rows, accumulated in A[Wr] from the bias, then written
      vf* A = reinterpret_cast<vf*>(abuf.get(static_cast<size_t>(L) * Wr));
      switch (g.T) {
        case 4: block_rows<4>(g, P, K, bv, A, ob, nc); break;
        case 5: block_rows<5>(g, P, K, bv, A, ob, nc); break;
        case 6: block_rows<6>(g, P, K, bv, A, ob, nc); break;
        case 7: block_rows<7>(g, P, K, bv, A, ob, nc); break;
        default:
          if constexpr (kMaxTile == 8) block_rows<8>(g, P, K, bv, A, ob, nc);
          break;
      }
    }
  });
}

}  // namespace

// x: (B, C, H, W) float32 channels_last; weights: (C, 1, kh, kw) float32, odd sides; bias: (C,) or None.
// Returns (B, C, H, W) channels_last.
torch::Tensor dwconv_sum(const torch::Tensor& x, const std::vector<torch::Tensor>& weights,
                         const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "dwconv_cpu: x must be a 4-D float32 CPU tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), "dwconv_cpu: x must be channels_last");
  TORCH_CHECK(!weights.empty(), "dwconv_cpu: at least one kernel");
  const int B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  std::vector<torch::Tensor> keep;
  std::vector<const float*> ptrs;
  std::vector<int> khs, kws;
  for (const auto& w : weights) {
    TORCH_CHECK(w.dim() == 4 && w.size(0) == C && w.size(1) == 1 && w.size(2) % 2 == 1 && w.size(3) % 2 == 1 &&
                    w.scalar_type() == torch::kFloat32 && w.device().is_cpu(),
                "dwconv_cpu: each weight must be a float32 CPU (C, 1, kh, kw) tensor with odd kh and kw");
    keep.push_back(w.contiguous());
    ptrs.push_back(keep.back().data_ptr<float>());
    khs.push_back(w.size(2));
    kws.push_back(w.size(3));
  }
  torch::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C && bias->scalar_type() == torch::kFloat32,
                "dwconv_cpu: bias must be a float32 (C,) tensor");
    b = bias->contiguous();
  }
  auto out = torch::empty({B, C, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() > 0)
    run(x.data_ptr<float>(), out.data_ptr<float>(), ptrs, khs, kws, b.defined() ? b.data_ptr<float>() : nullptr, B,
        C, H, W);
  return out;
}

// The tile width dwconv_sum uses for these kernels on an H×W map (exposed for the tests' coverage check).
int64_t tile_width_for(const std::vector<int64_t>& khs, const std::vector<int64_t>& kws, int64_t H, int64_t W) {
  TORCH_CHECK(khs.size() == kws.size() && !khs.empty() && H > 0 && W > 0, "tile_width: bad arguments");
  const std::vector<int> kh(khs.begin(), khs.end()), kw(kws.begin(), kws.end());
  return tile_width(static_cast<int>(kh.size()), kh.data(), kw.data(), static_cast<int>(H), static_cast<int>(W));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dwconv_sum", &dwconv_sum, "sum_k depthwise conv2d(x, w_k) + bias (CPU, float32, channels_last)");
  m.def("tile_width", &tile_width_for, "outputs per register tile dwconv_sum uses for kernels (khs, kws) on H×W");
  m.attr("lanes") = L;  // channels per job (floats per vector) in this build
  m.attr("max_tile_width") = kMaxTile;
}
