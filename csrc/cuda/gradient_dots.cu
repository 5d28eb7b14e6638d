// Pass 1 on CUDA: S g, Y g, g.g per chunk, read-only (csrc/ops.cpp). One thread
// block per chunk; g is formed once into shared memory, then each ring row is read
// once (coalesced, 128-bit where aligned) against it.
// Bytes per element: reads E (grad) [+ E theta with weight decay] + 2 m H; writes
// (2m + 1) * 8 bytes per chunk.
#include "common.cuh"

namespace mlbfgs_fused {
namespace cuda {
namespace {

template <typename T, typename H>
__global__ void __launch_bounds__(THREADS) gradient_dots_kernel(
    const int64_t* pointers, int64_t n_params, const H* hs, const H* hy, const int64_t* chunks,
    double* partials, const float* grad_scale, double weight_decay, bool maximize, int64_t m) {
  using C = opmath_t<T>;
  __shared__ C g[CHUNK];
  __shared__ double scratch[WARPS];
  const Chunk c(chunks + blockIdx.x * CHUNK_COLUMNS);
  const int64_t width = 2 * m + 1, n = c.count();
  double* out = partials + blockIdx.x * width;
  const T* grad = reinterpret_cast<const T*>(pointers[n_params + c.param]);
  if (grad == nullptr || n == 0) {  // no gradient: zero in every dot
    for (int64_t j = threadIdx.x; j < width; j += THREADS) out[j] = 0.0;
    return;
  }
  grad += c.local;
  const T* theta = reinterpret_cast<const T*>(pointers[c.param]) + c.local;
  const C inv_scale = grad_scale == nullptr ? C(1) : static_cast<C>(1.0 / *grad_scale);
  const C signed_scale = maximize ? -inv_scale : inv_scale;
  const C wd = static_cast<C>(weight_decay);
  const bool vec = aligned(grad) && aligned(theta);
  double gg = 0.0;
  for (int it = 0; it < ITERS; ++it) {
    const int64_t x = pack_start(it);
    if (x >= n) break;
    C gr[VEC], th[VEC] = {};
    load(grad + x, vec, n - x, gr);
    if (weight_decay != 0.0) load(theta + x, vec, n - x, th);
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      const C v = x + l < n ? effective_gradient<C>(gr[l], th[l], signed_scale, wd) : C(0);
      g[x + l] = v;
      gg += static_cast<double>(v) * v;
    }
  }
  const double total = block_sum(gg, scratch);  // syncs: g is complete
  if (threadIdx.x == 0) out[2 * m] = total;
  for (int64_t i = 0; i < m; ++i) {
    const H* s_row = hs + c.ring(i);
    const H* y_row = hy + c.ring(i);
    const bool vec_row = aligned(s_row) && aligned(y_row);
    C sg = 0, yg = 0;
    for (int it = 0; it < ITERS; ++it) {
      const int64_t x = pack_start(it);
      if (x >= n) break;
      C s[VEC], y[VEC];
      load(s_row + x, vec_row, n - x, s);
      load(y_row + x, vec_row, n - x, y);
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        if (x + l < n) {
          sg += s[l] * g[x + l];
          yg += y[l] * g[x + l];
        }
      }
    }
    const double sg_total = block_sum(sg, scratch);
    const double yg_total = block_sum(yg, scratch);
    if (threadIdx.x == 0) {
      out[i] = sg_total;
      out[m + i] = yg_total;
    }
  }
}

void gradient_dots(at::TensorList params, at::ArrayRef<std::optional<at::Tensor>> grads,
                   const at::Tensor& history_s, const at::Tensor& history_y, const at::Tensor&,
                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor& chunks,
                   const at::Tensor&, const at::Tensor&, const at::Tensor& partials, const at::Tensor&,
                   const std::optional<at::Tensor>& grad_scale, double weight_decay, bool maximize,
                   double, double, double, int64_t, int64_t m, bool pair_sums) {
  // The candidate's sums come with the update pass here (UPDATE_PAPER).
  TORCH_CHECK(!pair_sums, "mlbfgs_fused::gradient_dots: pair_sums is not implemented on CUDA");
  const c10::cuda::CUDAGuard guard(history_s.device());
  const int64_t P = chunks.size(0);
  if (P == 0) return;
  const at::Tensor pointers = pointer_table(params, grads);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_types(params[0].scalar_type(), history_s.scalar_type(), "mlbfgs_fused::gradient_dots",
                 [&](auto t_tag, auto h_tag) {
                   using T = typename decltype(t_tag)::type;
                   using H = typename decltype(h_tag)::type;
                   gradient_dots_kernel<T, H><<<P, THREADS, 0, stream>>>(
                       pointers.const_data_ptr<int64_t>(), static_cast<int64_t>(params.size()),
                       history_s.const_data_ptr<H>(), history_y.const_data_ptr<H>(),
                       chunks.const_data_ptr<int64_t>(), partials.data_ptr<double>(),
                       grad_scale_ptr(grad_scale), weight_decay, maximize, m);
                   C10_CUDA_KERNEL_LAUNCH_CHECK();
                 });
}

}  // namespace

TORCH_LIBRARY_IMPL(mlbfgs_fused_native, CUDA, m) {
  m.impl("gradient_dots", &gradient_dots);
}

}  // namespace cuda
}  // namespace mlbfgs_fused
