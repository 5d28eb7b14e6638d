// LBFGS's direction pass and trial points on CUDA (csrc/lbfgs.h lbfgs_direction,
// lbfgs_move): one thread block per chunk, a thread's elements in registers. The pair's
// rows go into their slot where the model accepted it (and are used from registers for
// that slot), d = c_g g + sum_i c_s[i] s_i + c_y[i] y_i over the held slots, prev = g,
// the parameters saved and moved; max |d| per chunk. The first arena's launch commits the
// model (block 0). Bytes per element: reads 3 E + 2 m H, writes 2 E [+ 2 H a pair]
// [+ E saved, E read and written with the move].
#include "lbfgs_common.cuh"

namespace mlbfgs_fused {
namespace lbfgs {
namespace gpu {
namespace {

template <typename T, typename H>
__global__ void __launch_bounds__(THREADS) lbfgs_direction_kernel(
    const int64_t* addresses, const T* source, H* hs, H* hy, T* direction, T* prev, T* saved,
    const int64_t* chunks, const double* coef, const double* model, double* partials, double* gram,
    int64_t* pair_count, double alpha, double move, bool push, bool combine, bool do_move, bool maximize,
    int64_t m) {
  using C = opmath_t<T>;
  __shared__ double scratch[WARPS];
  const Chunk c(chunks + blockIdx.x * CHUNK_COLUMNS);
  const int64_t n = c.count();
  const double* fixed = model + 3 * m * m;
  const bool accept = push && fixed[MODEL_ACCEPT] > 0.5;
  const int64_t slot = static_cast<int64_t>(fixed[MODEL_SLOT]);
  const int64_t count = static_cast<int64_t>(fixed[MODEL_COUNT]);
  const int64_t held = count < m ? count : m;
  C g[PER_THREAD];
  load_gradient<T, C>(addresses, source, c, maximize, g);
  T* dp = direction + c.start;
  T* pp = prev + c.start;
  T* theta = param_of<T>(addresses, c.param) + c.local;
  const bool vec = aligned(dp) && aligned(pp) && aligned(theta) && (saved == nullptr || aligned(saved + c.start));
  const C a = static_cast<C>(alpha), c_move = static_cast<C>(move), c_g = static_cast<C>(coef[0]);
  C s_new[PER_THREAD], y_new[PER_THREAD], d[PER_THREAD];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t x = pack_start(it);
    C dv[VEC] = {}, pv[VEC] = {};
    if (x < n) {
      load(dp + x, vec, n - x, dv);
      load(pp + x, vec, n - x, pv);
    }
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      const int e = it * VEC + l;
      s_new[e] = static_cast<C>(static_cast<H>(a * dv[l]));
      y_new[e] = static_cast<C>(static_cast<H>(g[e] - pv[l]));
      d[e] = c_g * g[e];
    }
    if (accept && x < n) {
      H* s_row = hs + c.ring(slot) + x;
      H* y_row = hy + c.ring(slot) + x;
      const bool vec_row = aligned(s_row) && aligned(y_row);
      C sv[VEC], yv[VEC];
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        sv[l] = s_new[it * VEC + l];
        yv[l] = y_new[it * VEC + l];
      }
      store(s_row, vec_row, n - x, sv);
      store(y_row, vec_row, n - x, yv);
    }
  }
  if (combine) {
    for (int64_t i = 0; i < held; ++i) {
      const C cs = static_cast<C>(coef[1 + i]), cy = static_cast<C>(coef[1 + m + i]);
      const bool mine = accept && i == slot;  // the pair just pushed: from registers
      const H* s_row = hs + c.ring(i);
      const H* y_row = hy + c.ring(i);
      const bool vec_row = aligned(s_row) && aligned(y_row);
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        const int64_t x = pack_start(it);
        if (x >= n) break;
        C sv[VEC], yv[VEC];
        if (mine) {
#pragma unroll
          for (int l = 0; l < VEC; ++l) {
            sv[l] = s_new[it * VEC + l];
            yv[l] = y_new[it * VEC + l];
          }
        } else {
          load(s_row + x, vec_row, n - x, sv);
          load(y_row + x, vec_row, n - x, yv);
        }
#pragma unroll
        for (int l = 0; l < VEC; ++l) d[it * VEC + l] += cs * sv[l] + cy * yv[l];
      }
    }
    double dmax = 0.0;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t x = pack_start(it);
      if (x >= n) break;
      C dv[VEC], gv[VEC], th[VEC];
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        const T stored = static_cast<T>(d[it * VEC + l]);
        dv[l] = static_cast<C>(stored);
        gv[l] = g[it * VEC + l];
        if (x + l < n) dmax = fmax(dmax, fabs(static_cast<double>(dv[l])));
      }
      store(dp + x, vec, n - x, dv);
      store(pp + x, vec, n - x, gv);
      if (saved != nullptr || do_move) {
        load(theta + x, vec, n - x, th);
        if (saved != nullptr) store(saved + c.start + x, vec, n - x, th);
        if (do_move) {
#pragma unroll
          for (int l = 0; l < VEC; ++l) th[l] = static_cast<C>(static_cast<T>(th[l] + c_move * dv[l]));
          store(theta + x, vec, n - x, th);
        }
      }
    }
    dmax = block_max(dmax, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x * partial_width(m) + 6 * m + P_DMAX] = dmax;
  }
  if (gram != nullptr && blockIdx.x == 0) {  // the model becomes the state
    for (int64_t i = threadIdx.x; i < 3 * m * m; i += THREADS) gram[i] = model[i];
    if (threadIdx.x == 0) *pair_count = count;
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS) lbfgs_move_kernel(const int64_t* addresses, const T* saved,
                                                             const T* direction, const int64_t* chunks,
                                                             double alpha) {
  using C = opmath_t<T>;
  const Chunk c(chunks + blockIdx.x * CHUNK_COLUMNS);
  const int64_t n = c.count();
  T* theta = param_of<T>(addresses, c.param) + c.local;
  const T* base = saved != nullptr ? saved + c.start : theta;
  const T* dp = direction + c.start;
  const bool vec = aligned(theta) && aligned(base) && aligned(dp);
  const C a = static_cast<C>(alpha);
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t x = pack_start(it);
    if (x >= n) break;
    C b[VEC], d[VEC];
    load(base + x, vec, n - x, b);
    load(dp + x, vec, n - x, d);
#pragma unroll
    for (int l = 0; l < VEC; ++l) b[l] = b[l] + a * d[l];
    store(theta + x, vec, n - x, b);
  }
}

void lbfgs_direction(const at::Tensor& addresses, const std::optional<at::Tensor>& source,
                     const at::Tensor& history_s, const at::Tensor& history_y, const at::Tensor& direction,
                     const at::Tensor& prev, const std::optional<at::Tensor>& saved, const at::Tensor& chunks,
                     const at::Tensor& coef, const at::Tensor& model, const at::Tensor& partials,
                     const std::optional<at::Tensor>& gram, const std::optional<at::Tensor>& pair_count,
                     double alpha, double move, bool push, bool combine, bool do_move, bool save, bool maximize,
                     int64_t m) {
  check_tables(addresses, chunks);
  const c10::cuda::CUDAGuard guard(direction.device());
  const int64_t P = chunks.size(0);
  const bool commit = push && gram.has_value() && gram->defined();
  TORCH_CHECK(!save || (saved.has_value() && saved->defined()), "mlbfgs_fused::lbfgs_direction: no saved buffer");
  if (P == 0 && !commit) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(direction.scalar_type(), history_s.scalar_type(), "mlbfgs_fused::lbfgs_direction",
                 [&](auto t_tag, auto h_tag) {
                   using T = typename decltype(t_tag)::type;
                   using H = typename decltype(h_tag)::type;
                   const T* src = source.has_value() && source->defined() ? source->const_data_ptr<T>() : nullptr;
                   lbfgs_direction_kernel<T, H><<<P > 0 ? P : 1, THREADS, 0, stream>>>(
                       addresses.const_data_ptr<int64_t>(), src, history_s.data_ptr<H>(), history_y.data_ptr<H>(),
                       direction.data_ptr<T>(), prev.data_ptr<T>(), save ? saved->data_ptr<T>() : nullptr,
                       chunks.const_data_ptr<int64_t>(), coef.const_data_ptr<double>(),
                       model.const_data_ptr<double>(), partials.data_ptr<double>(),
                       commit ? gram->data_ptr<double>() : nullptr, commit ? pair_count->data_ptr<int64_t>() : nullptr,
                       alpha, move, push, combine && P > 0, do_move, maximize, m);
                   C10_CUDA_KERNEL_LAUNCH_CHECK();
                 });
}

void lbfgs_move(const at::Tensor& addresses, const std::optional<at::Tensor>& saved, const at::Tensor& direction,
                const at::Tensor& chunks, double alpha) {
  check_tables(addresses, chunks);
  const c10::cuda::CUDAGuard guard(direction.device());
  const int64_t P = chunks.size(0);
  if (P == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(direction.scalar_type(), "mlbfgs_fused::lbfgs_move", [&] {
    lbfgs_move_kernel<scalar_t><<<P, THREADS, 0, stream>>>(
        addresses.const_data_ptr<int64_t>(),
        saved.has_value() && saved->defined() ? saved->const_data_ptr<scalar_t>() : nullptr,
        direction.const_data_ptr<scalar_t>(), chunks.const_data_ptr<int64_t>(), alpha);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mlbfgs_fused_native, CUDA, m) {
  m.impl("lbfgs_direction", &lbfgs_direction);
  m.impl("lbfgs_move", &lbfgs_move);
}

}  // namespace gpu
}  // namespace lbfgs
}  // namespace mlbfgs_fused
