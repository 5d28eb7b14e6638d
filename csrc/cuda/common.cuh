// Shared by the CUDA passes: the chunk geometry of csrc/ops.h on the GPU (one
// thread block per chunk, 256 threads, 4 consecutive elements per thread and
// iteration, 128-bit loads where the chunk is aligned), fixed-order block sums,
// the pointer table of the user's tensors, and launch helpers. A twin of
// kernels/common.py.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "../dispatch.h"
#include "../ops.h"

namespace mlbfgs_fused {
namespace cuda {

constexpr int THREADS = 256;
constexpr int VEC = 4;  // elements per thread and iteration
constexpr int ITERS = CHUNK / (THREADS * VEC);
constexpr int WARPS = THREADS / 32;
static_assert(CHUNK % (THREADS * VEC) == 0, "a chunk is a whole number of iterations");

template <typename T>
using opmath_t = at::opmath_type<T>;

// VEC elements of T in one load: 128 bits for float32, 64 for 16-bit types.
template <typename T>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T>
__device__ __forceinline__ bool aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(Pack<T>) == 0;
}

// out[l] = p[l] for l < left (0 beyond); one vector load when `vec` and the pack is whole.
template <typename T, typename C>
__device__ __forceinline__ void load(const T* p, bool vec, int64_t left, C (&out)[VEC]) {
  if (vec && left >= VEC) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(p);
#pragma unroll
    for (int l = 0; l < VEC; ++l) out[l] = static_cast<C>(pack.v[l]);
  } else {
#pragma unroll
    for (int l = 0; l < VEC; ++l) out[l] = l < left ? static_cast<C>(p[l]) : C(0);
  }
}

template <typename T, typename C>
__device__ __forceinline__ void store(T* p, bool vec, int64_t left, const C (&in)[VEC]) {
  if (vec && left >= VEC) {
    Pack<T> pack;
#pragma unroll
    for (int l = 0; l < VEC; ++l) pack.v[l] = static_cast<T>(in[l]);
    *reinterpret_cast<Pack<T>*>(p) = pack;
  } else {
#pragma unroll
    for (int l = 0; l < VEC; ++l) {
      if (l < left) p[l] = static_cast<T>(in[l]);
    }
  }
}

// The sum of `value` over the thread block, in a fixed order (warp tree, then the
// warps in sequence); valid in thread 0. `scratch` is WARPS doubles of shared memory.
__device__ __forceinline__ double block_sum(double value, double* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch is free
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < WARPS; ++w) total += scratch[w];
  }
  return total;
}

// The first element of this thread's pack at iteration `it`.
__device__ __forceinline__ int64_t pack_start(int it) {
  return (static_cast<int64_t>(it) * THREADS + threadIdx.x) * VEC;
}

// The parameters' and gradients' addresses as a device int64 table [2, n] (0: no
// gradient), through a pinned host buffer and an asynchronous copy on the current
// stream: a few bytes per parameter, no synchronisation.
inline at::Tensor pointer_table(at::TensorList params, at::ArrayRef<std::optional<at::Tensor>> grads) {
  const int64_t n = static_cast<int64_t>(params.size());
  at::Tensor host = at::empty({2 * n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(params[i].is_cuda() && params[i].is_contiguous(), "mlbfgs_fused: parameters must be contiguous CUDA tensors");
    h[i] = reinterpret_cast<int64_t>(params[i].data_ptr());
    const bool has = grads[i].has_value() && grads[i]->defined();
    if (has) {
      TORCH_CHECK(grads[i]->is_contiguous() && grads[i]->dtype() == params[i].dtype(),
                  "mlbfgs_fused: a gradient must be contiguous and match its parameter");
    }
    h[n + i] = has ? reinterpret_cast<int64_t>(grads[i]->data_ptr()) : 0;
  }
  return host.to(at::TensorOptions().device(params[0].device()), /*non_blocking=*/true);
}

inline const float* grad_scale_ptr(const std::optional<at::Tensor>& grad_scale) {
  if (!grad_scale.has_value() || !grad_scale->defined()) return nullptr;
  TORCH_CHECK(grad_scale->is_cuda() && grad_scale->scalar_type() == at::kFloat,
              "mlbfgs_fused: grad_scale must be a float32 CUDA tensor");
  return grad_scale->const_data_ptr<float>();
}

}  // namespace cuda
}  // namespace mlbfgs_fused
