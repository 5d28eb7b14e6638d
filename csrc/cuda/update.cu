// Pass 2 on CUDA: d, EMAs, momentum and parameters; on a pair-forming step the
// candidate's s.s, s.y, y.y per chunk (csrc/ops.cpp). One thread block per chunk;
// every thread block returns at once when the step is not finite (`ok` on the
// device: no host round trip).
// Bytes per element: reads 5 E + 2 m H, writes 4 E; a pair-forming step reads
// 2 E + 2 H more (snapshots, newest pair).
#include "common.cuh"

namespace mlbfgs_fused {
namespace cuda {
namespace {

template <typename T, typename H>
__global__ void __launch_bounds__(THREADS) update_kernel(
    const int64_t* pointers, int64_t n_params, const H* hs, const H* hy, T* param_ema,
    T* grad_ema, T* momentum_buffer, const T* param_snapshot, const T* grad_snapshot,
    const int64_t* chunks, const double* coef, const int64_t* step, const int64_t* pair_count,
    const double* stats, int64_t n_stats, const bool* ok, const float* grad_scale,
    double* pair_partials, const double* lr, double momentum, double weight_decay, double beta_p,
    double beta_g, double pair_momentum, int64_t period, int64_t m, bool maximize, int64_t normalize) {
  using C = opmath_t<T>;
  if (!*ok) return;  // a non-finite step changes nothing (the push counts it)
  __shared__ double scratch[WARPS];
  __shared__ double shared_scale;
  if (threadIdx.x == 0) {
    // docs/design.md, "The step", 4: the group's scale of d.
    shared_scale = direction_scale(stats, n_stats, normalize);
  }
  __syncthreads();
  const Chunk c(chunks + blockIdx.x * CHUNK_COLUMNS);
  const int64_t n = c.count(), b = c.block, width = 2 * m + 1;
  const bool first = step[b] == 0;
  const bool pair = forms_pair(step[b], period);
  const C w_param = first ? C(1) : static_cast<C>(1 - beta_p);
  const C w_grad = first ? C(1) : static_cast<C>(1 - beta_g);
  const C scale = static_cast<C>(shared_scale), mu = static_cast<C>(momentum);
  const C neg_lr = -static_cast<C>(*lr), wd = static_cast<C>(weight_decay);
  const C inv_scale = grad_scale == nullptr ? C(1) : static_cast<C>(1.0 / *grad_scale);
  const C signed_scale = maximize ? -inv_scale : inv_scale;
  const double* cf = coef + b * width;
  const T* grad = reinterpret_cast<const T*>(pointers[n_params + c.param]);
  T* theta_ptr = reinterpret_cast<T*>(pointers[c.param]) + c.local;
  T* P_ptr = param_ema + c.start;
  T* G_ptr = grad_ema + c.start;
  T* buf_ptr = momentum_buffer + c.start;
  const bool vec = aligned(theta_ptr) && aligned(P_ptr) && (grad == nullptr || aligned(grad + c.local));
  const int64_t pc = pair_count[b];
  const C r = pc > 0 ? static_cast<C>(pair_momentum) : C(0);
  const int64_t newest = c.ring((pc - 1 + m) % m);
  const bool vec_newest = aligned(hs + newest) && aligned(hy + newest);
  double ss = 0.0, sy = 0.0, yy = 0.0;
  for (int it = 0; it < ITERS; ++it) {
    const int64_t x = pack_start(it);
    if (x >= n) break;
    const int64_t left = n - x;
    C P[VEC], G[VEC];
    load(P_ptr + x, vec, left, P);
    load(G_ptr + x, vec, left, G);
    if (grad != nullptr) {
      C th[VEC], gr[VEC], g[VEC], d[VEC], buf[VEC];
      load(theta_ptr + x, vec, left, th);
      load(grad + c.local + x, vec, left, gr);
      load(buf_ptr + x, vec, left, buf);
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        g[l] = effective_gradient<C>(gr[l], th[l], signed_scale, wd);
        d[l] = static_cast<C>(cf[0]) * g[l];
      }
      for (int64_t i = 0; i < m; ++i) {
        C s[VEC], y[VEC];
        const H* s_row = hs + c.ring(i) + x;
        const H* y_row = hy + c.ring(i) + x;
        const bool vec_row = aligned(s_row) && aligned(y_row);
        load(s_row, vec_row, left, s);
        load(y_row, vec_row, left, y);
        const C cs = static_cast<C>(cf[1 + i]), cy = static_cast<C>(cf[1 + m + i]);
#pragma unroll
        for (int l = 0; l < VEC; ++l) d[l] += cs * s[l] + cy * y[l];
      }
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        // EMAs with the parameters before the update, rounded as stored: the pair's
        // sums below must see what the push reads back (16-bit parameters).
        P[l] = static_cast<C>(static_cast<T>(lerp<C>(P[l], th[l], w_param)));
        G[l] = static_cast<C>(static_cast<T>(lerp<C>(G[l], g[l], w_grad)));
        buf[l] = buf[l] * mu + d[l] * scale;
        th[l] = th[l] + buf[l] * neg_lr;
      }
      store(P_ptr + x, vec, left, P);
      store(G_ptr + x, vec, left, G);
      store(buf_ptr + x, vec, left, buf);
      store(theta_ptr + x, vec, left, th);
    }
    if (pair) {
      // The candidate over the whole block, gradient or not: the push needs these
      // block-wide sums for the damping before it writes the pair.
      C P0[VEC], G0[VEC], s_last[VEC], y_last[VEC];
      load(param_snapshot + c.start + x, vec, left, P0);
      load(grad_snapshot + c.start + x, vec, left, G0);
      load(hs + newest + x, vec_newest, left, s_last);
      load(hy + newest + x, vec_newest, left, y_last);
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        if (l < left) {
          const C s = lerp<C>(P[l] - P0[l], s_last[l], r);
          const C y = lerp<C>(G[l] - G0[l], y_last[l], r);
          ss += static_cast<double>(s) * s;
          sy += static_cast<double>(s) * y;
          yy += static_cast<double>(y) * y;
        }
      }
    }
  }
  if (pair) {
    const double ss_total = block_sum(ss, scratch);
    const double sy_total = block_sum(sy, scratch);
    const double yy_total = block_sum(yy, scratch);
    if (threadIdx.x == 0) {
      double* out = pair_partials + blockIdx.x * PAIR_COLUMNS;
      out[P_SS] = ss_total;
      out[P_SY] = sy_total;
      out[P_YY] = yy_total;
    }
  }
}

void update(at::TensorList params, at::ArrayRef<std::optional<at::Tensor>> grads,
            const at::Tensor& history_s, const at::Tensor& history_y, const at::Tensor& param_ema,
            const at::Tensor& grad_ema, const at::Tensor& momentum_buffer,
            const at::Tensor& param_snapshot, const at::Tensor& grad_snapshot,
            const at::Tensor& chunks, const at::Tensor&, const at::Tensor& coef,
            const at::Tensor& step, const at::Tensor& pair_count, const at::Tensor& stats,
            const at::Tensor& ok, const std::optional<at::Tensor>& grad_scale,
            const at::Tensor& pair_partials, const at::Tensor&, const at::Tensor& lr,
            double momentum, double weight_decay, double beta_p, double beta_g,
            double pair_momentum, double, double, double, double, int64_t period, int64_t m,
            bool maximize, int64_t normalize, int64_t mode) {
  // The pair is pushed by its own pass here (push.cu): UPDATE_PAPER only.
  TORCH_CHECK(mode == UPDATE_PAPER,
              "mlbfgs_fused::update: only the paper's update with a separate push is implemented on CUDA");
  const c10::cuda::CUDAGuard guard(history_s.device());
  const int64_t P = chunks.size(0);
  if (P == 0) return;
  TORCH_CHECK(lr.is_cuda() && lr.scalar_type() == at::kDouble,
              "mlbfgs_fused: lr must be a float64 tensor on the parameters' device");
  TORCH_CHECK(ok.scalar_type() == at::kBool, "mlbfgs_fused: ok must be a bool tensor");
  const at::Tensor pointers = pointer_table(params, grads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(params[0].scalar_type(), history_s.scalar_type(), "mlbfgs_fused::update",
                 [&](auto t_tag, auto h_tag) {
                   using T = typename decltype(t_tag)::type;
                   using H = typename decltype(h_tag)::type;
                   update_kernel<T, H><<<P, THREADS, 0, stream>>>(
                       pointers.const_data_ptr<int64_t>(), static_cast<int64_t>(params.size()),
                       history_s.const_data_ptr<H>(), history_y.const_data_ptr<H>(),
                       param_ema.data_ptr<T>(), grad_ema.data_ptr<T>(), momentum_buffer.data_ptr<T>(),
                       param_snapshot.const_data_ptr<T>(), grad_snapshot.const_data_ptr<T>(),
                       chunks.const_data_ptr<int64_t>(), coef.const_data_ptr<double>(),
                       step.const_data_ptr<int64_t>(), pair_count.const_data_ptr<int64_t>(),
                       stats.const_data_ptr<double>(), stats.size(0), ok.const_data_ptr<bool>(),
                       grad_scale_ptr(grad_scale), pair_partials.data_ptr<double>(),
                       lr.const_data_ptr<double>(), momentum, weight_decay, beta_p, beta_g,
                       pair_momentum, period, m, maximize, normalize);
                   C10_CUDA_KERNEL_LAUNCH_CHECK();
                 });
}

}  // namespace

TORCH_LIBRARY_IMPL(mlbfgs_fused_native, CUDA, m) {
  m.impl("update", &update);
}

}  // namespace cuda
}  // namespace mlbfgs_fused
