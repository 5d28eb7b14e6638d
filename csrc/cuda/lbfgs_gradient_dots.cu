// LBFGS after each closure evaluation, on CUDA (csrc/lbfgs.h lbfgs_gradient_dots): one
// thread block per chunk; each thread keeps its elements of g, s = alpha d and
// y = g - prev (as the ring stores them) in registers, then reads each held ring row once
// against them. A row's K dots are reduced per warp by shuffles and written to shared
// memory, and the warps' values added in order once per batch of rows, so a row costs
// no __syncthreads of its own.
// g.d and |g|_1 are always computed here (the flags gd, l1 only save the CPU's time).
// Bytes per element: reads E (g) + E (d) + 2 m H [+ E prev with a pair candidate];
// writes 6m + 10 doubles per chunk.
#include "lbfgs_common.cuh"

namespace mlbfgs_fused {
namespace lbfgs {
namespace gpu {
namespace {

constexpr int ROW_BATCH = 16;

template <typename T, typename H, int K>
__global__ void __launch_bounds__(THREADS) lbfgs_gradient_dots_kernel(
    const int64_t* addresses, const T* source, const H* hs, const H* hy, const T* direction, const T* prev,
    const int64_t* chunks, const int64_t* pair_count, double* partials, double alpha, bool maximize, bool pair,
    bool ring, int64_t m) {
  using C = opmath_t<T>;
  __shared__ double scratch[9 * WARPS];
  __shared__ double rows_part[ROW_BATCH * K * WARPS];
  const Chunk c(chunks + blockIdx.x * CHUNK_COLUMNS);
  const int64_t n = c.count(), W = partial_width(m);
  double* out = partials + blockIdx.x * W;
  C g[PER_THREAD], s[PER_THREAD], y[PER_THREAD];
  load_gradient<T, C>(addresses, source, c, maximize, g);
  const T* dp = direction + c.start;
  const T* pp = prev + c.start;
  const bool vec = aligned(dp) && aligned(pp);
  const C a = static_cast<C>(alpha);
  double v[9] = {};  // gg, gd, gl1, ss, sy, yy, sg, yg, (max |g| apart)
  double gmax = 0.0;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t x = pack_start(it);
    C d[VEC] = {}, p[VEC] = {};
    if (x < n) {
      load(dp + x, vec, n - x, d);
      if (pair) load(pp + x, vec, n - x, p);
    }
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      const int e = it * VEC + l;
      const double gx = static_cast<double>(g[e]);
      v[0] += gx * gx;
      v[1] += gx * static_cast<double>(d[l]);
      v[2] += fabs(gx);
      gmax = fmax(gmax, fabs(gx));
      if (pair) {
        const bool in = x + l < n;
        s[e] = in ? static_cast<C>(static_cast<H>(a * d[l])) : C(0);
        y[e] = in ? static_cast<C>(static_cast<H>(g[e] - p[l])) : C(0);
        const double sx = s[e], yx = y[e];
        v[3] += sx * sx;
        v[4] += sx * yx;
        v[5] += yx * yx;
        v[6] += sx * gx;
        v[7] += yx * gx;
      }
    }
  }
  gmax = block_max(gmax, scratch);
  block_sums<9>(v, scratch);
  if (threadIdx.x == 0) {
    double* sc = out + 6 * m;
    sc[P_GG] = v[0];
    sc[P_GD] = v[1];
    sc[P_GL1] = v[2];
    sc[P_GMAX] = gmax;
    if (pair) {
      sc[P_SS] = v[3];
      sc[P_SY] = v[4];
      sc[P_YY] = v[5];
      sc[P_SG] = v[6];
      sc[P_YG] = v[7];
    }
  }
  if (!ring) return;
  const int64_t held = *pair_count < m ? *pair_count : m;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Rows r = s_0 .. s_{held-1}, y_0 .. y_{held-1}; unheld rows are 0.
  for (int64_t i = threadIdx.x; i < 6 * m; i += THREADS) out[i] = 0.0;
  for (int64_t first = 0; first < 2 * held; first += ROW_BATCH) {
    const int64_t count = 2 * held - first < ROW_BATCH ? 2 * held - first : ROW_BATCH;
    for (int64_t q = 0; q < count; ++q) {
      const int64_t r = first + q;
      const int64_t i = r < held ? r : m + r - held;
      const H* row = (i < m ? hs + c.ring(i) : hy + c.ring(i - m));
      const bool vec_row = aligned(row);
      double dots[K] = {};
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        const int64_t x = pack_start(it);
        if (x >= n) break;
        C rv[VEC];
        load(row + x, vec_row, n - x, rv);
        C part[K] = {};
#pragma unroll
        for (int l = 0; l < VEC; ++l) {
          part[0] += rv[l] * g[it * VEC + l];
          if constexpr (K == 3) {
            part[1] += rv[l] * s[it * VEC + l];
            part[2] += rv[l] * y[it * VEC + l];
          }
        }
#pragma unroll
        for (int k = 0; k < K; ++k) dots[k] += static_cast<double>(part[k]);
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
#pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) dots[k] += __shfl_down_sync(0xffffffffu, dots[k], offset);
        if (lane == 0) rows_part[(q * K + k) * WARPS + warp] = dots[k];
      }
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < count * K; e += THREADS) {
      const int64_t q = e / K, k = e % K;
      double total = 0.0;
      for (int w = 0; w < WARPS; ++w) total += rows_part[(q * K + k) * WARPS + w];
      const int64_t r = first + q;
      const int64_t i = r < held ? r : m + r - held;
      out[k * 2 * m + i] = total;
    }
    __syncthreads();
  }
}

void lbfgs_gradient_dots(const at::Tensor& addresses, const std::optional<at::Tensor>& source,
                         const at::Tensor& history_s, const at::Tensor& history_y, const at::Tensor& direction,
                         const at::Tensor& prev, const at::Tensor& chunks, const at::Tensor& pair_count,
                         const at::Tensor& partials, double alpha, bool maximize, bool pair, bool ring, bool gd,
                         bool l1, int64_t m) {
  check_tables(addresses, chunks);
  const c10::cuda::CUDAGuard guard(direction.device());
  const int64_t P = chunks.size(0);
  if (P == 0) return;
  TORCH_CHECK(partials.is_cuda() && partials.dtype() == at::kDouble && partials.size(0) == P &&
                  partials.size(1) == partial_width(m),
              "mlbfgs_fused::lbfgs_gradient_dots: partials must be float64 [chunks, 6m + 10]");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(direction.scalar_type(), history_s.scalar_type(), "mlbfgs_fused::lbfgs_gradient_dots",
                 [&](auto t_tag, auto h_tag) {
                   using T = typename decltype(t_tag)::type;
                   using H = typename decltype(h_tag)::type;
                   const T* src = source.has_value() && source->defined() ? source->const_data_ptr<T>() : nullptr;
                   auto launch = [&](auto kernel) {
                     kernel<<<P, THREADS, 0, stream>>>(
                         addresses.const_data_ptr<int64_t>(), src, history_s.const_data_ptr<H>(),
                         history_y.const_data_ptr<H>(), direction.const_data_ptr<T>(), prev.const_data_ptr<T>(),
                         chunks.const_data_ptr<int64_t>(), pair_count.const_data_ptr<int64_t>(),
                         partials.data_ptr<double>(), alpha, maximize, pair, ring, m);
                   };
                   if (pair) {
                     launch(lbfgs_gradient_dots_kernel<T, H, 3>);
                   } else {
                     launch(lbfgs_gradient_dots_kernel<T, H, 1>);
                   }
                   C10_CUDA_KERNEL_LAUNCH_CHECK();
                 });
}

}  // namespace

TORCH_LIBRARY_IMPL(mlbfgs_fused_native, CUDA, m) {
  m.impl("lbfgs_gradient_dots", &lbfgs_gradient_dots);
}

}  // namespace gpu
}  // namespace lbfgs
}  // namespace mlbfgs_fused
