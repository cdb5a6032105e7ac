// CPU inference kernel for slak_mm.ops.dwconv2d_sum: out = bias + sum_k conv2d(x, w_k), depthwise, stride 1,
// "same" padding, float32, channels_last (NHWC) input and output. Built on first use by slak_mm/ops/cpu_kernel.py.
//
// Why: oneDNN's channels_last depthwise kernel reaches only 20-40% of this machine's GEMM rate on SLaK's long bands,
// mostly because SLaK's channel counts (124, 249, 499, 998) make every 16-float vector load straddle cache lines,
// and because it re-loads inputs down a kernel column (docs/benchmarks.md). Here each job takes one block of 16
// channels of one image and
//   1. packs it into an aligned buffer P[H][cols][16], zero-padded left and right (one read of x; no boundary tests
//      later; the padding is zeroed once per thread and map geometry, later jobs only overwrite the map);
//   2. computes the output one row at a time into an aligned scratch A[W][16] (starting from the bias), every
//      kernel adding into it as register tiles of R outputs along the row (R / 2 on narrow maps); each tile runs
//      only the taps that reach the map for at least one of its outputs (taps entirely in the padding are skipped);
//   3. writes the row once.
// Kernels are re-laid out once per call as K[block][i][j][16].
// The vectors are GCC/Clang vector extensions, so the same source compiles to AVX-512, AVX2 or SSE (the loader
// passes the ISA flags). Products are the same as F.conv2d's; only the order of the additions differs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(64)));
typedef int v16i __attribute__((vector_size(64), aligned(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // unaligned access to x and out
constexpr int L = 16;  // channels per job (one vector)
constexpr int R = 8;   // outputs per register tile (along a row); 4 on maps of <= kNarrow columns
// On narrow maps most tiles are edge tiles, which run the union of their outputs' in-map taps: 4-output tiles waste
// fewer taps there (1.1-1.4x at SLaK-T's 7-28 px maps), 8-output ones are 1.03-1.1x faster on wide maps.
constexpr int kNarrow = 32;
// Pixels ahead to prefetch when packing x and writing the output: each job touches only 64 of every C·4 bytes
// of a pixel, a stride the hardware prefetchers do not hide (measured: 4-15% faster at SLaK-T's shapes).
constexpr int kPrefetch = 64;

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

// T outputs along a row: acc[r] += sum_ij P[i][j + r] * K[i][j] over taps i in [0, kh), j in [j0, j1) (the caller
// leaves out the taps that only reach the zero padding for every output of the tile)
template <int T>
inline void tile_row(const float* P, size_t cols, const float* K, int kw, int kh, int j0, int j1, v16* acc) {
  v16 a[T];
  for (int r = 0; r < T; ++r) a[r] = acc[r];
  for (int i = 0; i < kh; ++i) {
    const float* k = K + static_cast<size_t>(i) * kw * L;
    const float* p = P + static_cast<size_t>(i) * cols * L;
    for (int j = j0; j < j1; ++j) {
      const v16 w = *reinterpret_cast<const v16*>(k + j * L);
#pragma GCC unroll 16
      for (int r = 0; r < T; ++r) a[r] += *reinterpret_cast<const v16*>(p + (j + r) * L) * w;
    }
  }
  for (int r = 0; r < T; ++r) acc[r] = a[r];
}

inline int round_up(int n, int m) { return (n + m - 1) / m * m; }

void run(const float* x, float* out, const std::vector<const float*>& ws, const std::vector<int>& khs,
         const std::vector<int>& kws, const float* bias, int B, int C, int H, int W) {
  const int nb = (C + L - 1) / L, nk = static_cast<int>(ws.size());
  // left / right padding of the packed map, enough for every kernel; no padding rows, because no tap that reads
  // above or below the map is run
  int PL = 0;
  for (int k = 0; k < nk; ++k) PL = std::max(PL, kws[k] / 2);
  const int Wr = round_up(W, R), T = W <= kNarrow ? R / 2 : R;  // T: outputs per tile in this call
  const size_t cols = Wr + 2 * PL;

  // kernels as K[block][k][i][j][16] (lanes past the last channel zero), once per call
  std::vector<size_t> koff(nk);
  size_t kblock = 0;
  for (int k = 0; k < nk; ++k) {
    koff[k] = kblock;
    kblock += static_cast<size_t>(khs[k]) * kws[k];
  }
  Buffer kall;
  float* Kall = kall.get(nb * kblock * L);
  std::memset(Kall, 0, sizeof(float) * nb * kblock * L);
  at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t cb = begin; cb < end; ++cb)
      for (int k = 0; k < nk; ++k) {
        const int taps = khs[k] * kws[k];
        float* K = Kall + (cb * kblock + koff[k]) * L;
        for (int l = 0; l < L && cb * L + l < C; ++l) {
          const float* wl = ws[k] + static_cast<size_t>(cb * L + l) * taps;
          for (int t = 0; t < taps; ++t) K[static_cast<size_t>(t) * L + l] = wl[t];
        }
      }
  });

  at::parallel_for(0, static_cast<int64_t>(B) * nb, 1, [&](int64_t begin, int64_t end) {
    thread_local Buffer pbuf, abuf;
    for (int64_t job = begin; job < end; ++job) {
      const int b = static_cast<int>(job / nb), cb = static_cast<int>(job % nb), nc = std::min(L, C - cb * L);
      const float* xb = x + static_cast<size_t>(b) * H * W * C + cb * L;
      float* ob = out + static_cast<size_t>(b) * H * W * C + cb * L;
      v16i lanes;
      for (int l = 0; l < L; ++l) lanes[l] = l < nc ? -1 : 0;

      // 1. pack (zero padding left and right of the map; lanes past the last channel zero)
      float* P = pbuf.get(L * H * cols);
      // the padding is zeroed once per buffer and geometry: later jobs only overwrite the map
      thread_local const float* zeroed = nullptr;
      thread_local int zgeom[3] = {0, 0, 0};
      const int geom[3] = {H, W, PL};
      if (zeroed != P || !std::equal(geom, geom + 3, zgeom)) {
        std::memset(P, 0, sizeof(float) * L * H * cols);
        zeroed = P;
        std::copy(geom, geom + 3, zgeom);
      }
      for (int a = 0; a < H; ++a) {
        const float* src = xb + static_cast<size_t>(a) * W * C;
        float* d = P + (static_cast<size_t>(a) * cols + PL) * L;
        const bool last_row = b + 1 == B && a + 1 == H;
        for (int c = 0; c < W; ++c, d += L, src += C) {
          __builtin_prefetch(src + kPrefetch * C);  // never faults, even past the end of x
          __builtin_prefetch(src + kPrefetch * C + L - 1);
          if (nc == L) {
            *reinterpret_cast<v16*>(d) = *reinterpret_cast<const v16u*>(src);
          } else if (!last_row || c + 1 < W) {  // a full-vector read stays inside x
            *reinterpret_cast<v16*>(d) = (v16)((v16i)(*reinterpret_cast<const v16u*>(src)) & lanes);
          } else {
            for (int l = 0; l < L; ++l) d[l] = l < nc ? src[l] : 0.f;
          }
        }
      }
      v16 bv = v16{};
      if (bias != nullptr)
        for (int l = 0; l < nc; ++l) bv[l] = bias[cb * L + l];

      // 2. one output row at a time, accumulated in A[Wr]; output (a, c) and tap (i, j) read
      // x[a + i - kh/2][c + j - kw/2], so a tile of outputs c0 .. c0 + nv - 1 needs only the taps i in [i0, i1),
      // j in [j0, j1) below
      v16* A = reinterpret_cast<v16*>(abuf.get(static_cast<size_t>(L) * Wr));
      for (int a = 0; a < H; ++a) {
        for (int c = 0; c < Wr; ++c) A[c] = bv;
        for (int k = 0; k < nk; ++k) {
          const int kh = khs[k], kw = kws[k], i0 = std::max(0, kh / 2 - a), i1 = std::min(kh, kh / 2 - a + H);
          // map row a + i0 - kh/2 and kernel row i0 first
          const float* Pa = P + (static_cast<size_t>(a + i0 - kh / 2) * cols + (PL - kw / 2)) * L;
          const float* Ka = Kall + (cb * kblock + koff[k] + static_cast<size_t>(i0) * kw) * L;
          for (int c0 = 0; c0 < W; c0 += T) {
            const int nv = std::min(T, W - c0), j0 = std::max(0, kw / 2 - c0 - nv + 1);
            const int j1 = std::min(kw, kw / 2 - c0 + W);
            if (T == R)
              tile_row<R>(Pa + static_cast<size_t>(c0) * L, cols, Ka, kw, i1 - i0, j0, j1, A + c0);
            else
              tile_row<R / 2>(Pa + static_cast<size_t>(c0) * L, cols, Ka, kw, i1 - i0, j0, j1, A + c0);
          }
        }
        // 3. write the valid channels
        float* o = ob + static_cast<size_t>(a) * W * C;
        if (nc == L) {
          for (int c = 0; c < W; ++c) {
            __builtin_prefetch(o + static_cast<size_t>(c + kPrefetch) * C, 1);
            __builtin_prefetch(o + static_cast<size_t>(c + kPrefetch) * C + L - 1, 1);
            *reinterpret_cast<v16u*>(o + static_cast<size_t>(c) * C) = A[c];
          }
        } else {
          for (int c = 0; c < W; ++c)
            for (int l = 0; l < nc; ++l) o[static_cast<size_t>(c) * C + l] = A[c][l];
        }
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dwconv_sum", &dwconv_sum, "sum_k depthwise conv2d(x, w_k) + bias (CPU, float32, channels_last)");
}
