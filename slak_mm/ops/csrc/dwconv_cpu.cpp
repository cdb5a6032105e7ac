// CPU inference kernel for slak_mm.ops.dwconv2d_sum: out = bias + sum_k conv2d(x, w_k), depthwise, stride 1,
// "same" padding, float32, channels_last (NHWC) input and output. Built on first use by slak_mm/ops/cpu_kernel.py.
//
// Why: oneDNN's channels_last depthwise kernel reaches only 20-40% of this machine's GEMM rate on SLaK's long bands,
// mostly because SLaK's channel counts (124, 249, 499, 998) make every 16-float vector load straddle cache lines,
// and because it re-loads inputs down a kernel column (docs/benchmarks.md). Here each job takes one block of 16
// channels of one image and
//   1. packs it into an aligned, zero-padded buffer P[rows][cols][16] (one read of x; no boundary tests later);
//   2. computes the output R rows at a time into an aligned scratch A[R][W][16] (starting from the bias), every
//      kernel adding into it: a wide kernel (kw >= kh) as tiles of R outputs along a row, a tall one as tiles of R
//      outputs down a column whose R input rows stay in registers (one load per tap);
//   3. writes A to the output once.
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
constexpr int R = 8;   // outputs per register tile
// Pixels ahead to prefetch when packing x and writing the output: each job touches only 64 of every C·4 bytes
// of a pixel, a stride the hardware prefetchers do not hide (measured: 4-15% faster at SLaK-T's shapes).
constexpr int kPrefetch = 64;

struct Buffer {  // per-thread scratch, grown on demand, 64-byte aligned
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

// R outputs along a row: acc[r] += sum_ij P[i][j + r] * K[i][j]
inline void tile_row(const float* P, size_t cols, const float* K, int kh, int kw, v16* acc) {
  v16 a[R];
  for (int r = 0; r < R; ++r) a[r] = acc[r];
  for (int i = 0; i < kh; ++i) {
    const float* k = K + static_cast<size_t>(i) * kw * L;
    const float* p = P + static_cast<size_t>(i) * cols * L;
    for (int j = 0; j < kw; ++j) {
      const v16 w = *reinterpret_cast<const v16*>(k + j * L);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) a[r] += *reinterpret_cast<const v16*>(p + (j + r) * L) * w;
    }
  }
  for (int r = 0; r < R; ++r) acc[r] = a[r];
}

// R outputs down a column: acc[r] += sum_ij P[i + r][j] * K[i][j], kh a multiple of R (kernel rows zero-padded).
// The R input rows in use are kept in registers and replaced one per tap (circular window), so each tap costs
// one input load and one weight load for R multiply-adds.
inline void tile_col(const float* P, size_t cols, const float* K, int kh, int kw, v16* acc) {
  v16 a[R];
  for (int r = 0; r < R; ++r) a[r] = acc[r];
  const size_t stride = cols * L;
  for (int j = 0; j < kw; ++j) {
    const float* p = P + static_cast<size_t>(j) * L;
    v16 win[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) win[r] = *reinterpret_cast<const v16*>(p + r * stride);
    for (int i = 0; i < kh; i += R) {
#pragma GCC unroll 16
      for (int u = 0; u < R; ++u) {
        const v16 w = *reinterpret_cast<const v16*>(K + (static_cast<size_t>(i + u) * kw + j) * L);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) a[r] += win[(u + r) % R] * w;
        win[u] = *reinterpret_cast<const v16*>(p + (i + u + R) * stride);
      }
    }
  }
  for (int r = 0; r < R; ++r) acc[r] = a[r];
}

inline int round_up(int n, int m) { return (n + m - 1) / m * m; }

void run(const float* x, float* out, const std::vector<const float*>& ws, const std::vector<int>& khs,
         const std::vector<int>& kws, const float* bias, int B, int C, int H, int W) {
  const int nb = (C + L - 1) / L, nk = static_cast<int>(ws.size());
  int PT = 0, PL = 0;  // padding of the packed map: enough for every kernel
  for (int k = 0; k < nk; ++k) {
    PT = std::max(PT, khs[k] / 2);
    PL = std::max(PL, kws[k] / 2);
  }
  const int Wr = round_up(W, R);
  // rows: column tiles of the last row block read up to R rows past the map plus the zero-padded kernel rows
  const size_t rows = round_up(H, R) + 2 * PT + 2 * R, cols = Wr + 2 * PL;
  std::vector<int> kh_tiles(nk);
  for (int k = 0; k < nk; ++k) kh_tiles[k] = kws[k] >= khs[k] ? khs[k] : round_up(khs[k], R);

  at::parallel_for(0, static_cast<int64_t>(B) * nb, 1, [&](int64_t begin, int64_t end) {
    thread_local Buffer pbuf, abuf;
    thread_local std::vector<Buffer> kbuf;
    if (kbuf.size() < static_cast<size_t>(nk)) kbuf.resize(nk);
    for (int64_t job = begin; job < end; ++job) {
      const int b = static_cast<int>(job / nb), cb = static_cast<int>(job % nb), nc = std::min(L, C - cb * L);
      const float* xb = x + static_cast<size_t>(b) * H * W * C + cb * L;
      float* ob = out + static_cast<size_t>(b) * H * W * C + cb * L;
      v16i lanes;
      for (int l = 0; l < L; ++l) lanes[l] = l < nc ? -1 : 0;

      // 1. pack (zero padding around the map; lanes past the last channel zero)
      float* P = pbuf.get(L * rows * cols);
      for (size_t a = 0; a < rows; ++a) {
        float* prow = P + a * cols * L;
        if (a < static_cast<size_t>(PT) || a >= static_cast<size_t>(PT + H)) {
          std::memset(prow, 0, sizeof(float) * L * cols);
          continue;
        }
        std::memset(prow, 0, sizeof(float) * L * PL);
        std::memset(prow + static_cast<size_t>(PL + W) * L, 0, sizeof(float) * L * (cols - PL - W));
        const float* src = xb + (a - PT) * static_cast<size_t>(W) * C;
        float* d = prow + static_cast<size_t>(PL) * L;
        const bool last_row = b + 1 == B && a - PT + 1 == static_cast<size_t>(H);
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
      // kernels as K[i][j][16], rows zero-padded to kh_tiles
      std::vector<const float*> Ks(nk);
      for (int k = 0; k < nk; ++k) {
        const int kh = khs[k], kw = kws[k];
        float* K = kbuf[k].get(static_cast<size_t>(L) * kh_tiles[k] * kw);
        std::memset(K, 0, sizeof(float) * L * kh_tiles[k] * kw);
        for (int l = 0; l < nc; ++l) {
          const float* wl = ws[k] + static_cast<size_t>(cb * L + l) * kh * kw;
          for (int t = 0; t < kh * kw; ++t) K[static_cast<size_t>(t) * L + l] = wl[t];
        }
        Ks[k] = K;
      }
      v16 bv = v16{};
      if (bias != nullptr)
        for (int l = 0; l < nc; ++l) bv[l] = bias[cb * L + l];

      // 2. R output rows at a time, accumulated in A[R][Wr]
      v16* A = reinterpret_cast<v16*>(abuf.get(static_cast<size_t>(L) * R * Wr));
      for (int a0 = 0; a0 < H; a0 += R) {
        const int nr = std::min(R, H - a0);
        for (size_t q = 0; q < static_cast<size_t>(R) * Wr; ++q) A[q] = bv;
        for (int k = 0; k < nk; ++k) {
          const int kh = khs[k], kw = kws[k];
          const float* P0 = P + (static_cast<size_t>(PT - kh / 2) * cols + (PL - kw / 2)) * L;
          if (kw >= kh) {
            for (int r = 0; r < nr; ++r)
              for (int c0 = 0; c0 < W; c0 += R)
                tile_row(P0 + (static_cast<size_t>(a0 + r) * cols + c0) * L, cols, Ks[k], kh, kw,
                         A + static_cast<size_t>(r) * Wr + c0);
          } else {
            for (int c = 0; c < W; ++c) {
              v16 t[R];
              for (int r = 0; r < R; ++r) t[r] = A[static_cast<size_t>(r) * Wr + c];
              tile_col(P0 + (static_cast<size_t>(a0) * cols + c) * L, cols, Ks[k], kh_tiles[k], kw, t);
              for (int r = 0; r < R; ++r) A[static_cast<size_t>(r) * Wr + c] = t[r];
            }
          }
        }
        // 3. write the valid rows / channels
        for (int r = 0; r < nr; ++r) {
          float* o = ob + static_cast<size_t>(a0 + r) * W * C;
          const v16* src = A + static_cast<size_t>(r) * Wr;
          if (nc == L) {
            for (int c = 0; c < W; ++c) {
              __builtin_prefetch(o + static_cast<size_t>(c + kPrefetch) * C, 1);
              __builtin_prefetch(o + static_cast<size_t>(c + kPrefetch) * C + L - 1, 1);
              *reinterpret_cast<v16u*>(o + static_cast<size_t>(c) * C) = src[c];
            }
          } else {
            for (int c = 0; c < W; ++c)
              for (int l = 0; l < nc; ++l) o[static_cast<size_t>(c) * C + l] = src[c][l];
          }
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
