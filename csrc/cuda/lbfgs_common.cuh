// What LBFGS's CUDA passes share (csrc/lbfgs.h is the contract): the address table of
// the user's tensors kept on the device by the plan (int64 [count, 2]: parameter, then
// gradient, 0 for none; no upload per call, unlike the mL-BFGS ops' pointer tables), the
// gradient of a chunk's elements held in registers, and fixed-order reductions of a few
// values per row. One thread block per chunk (common.cuh): a thread holds the VEC
// elements of each of the ITERS packs it covers.
#pragma once

#include <ATen/Dispatch.h>

#include "../lbfgs.h"
#include "common.cuh"

namespace mlbfgs_fused {
namespace lbfgs {
namespace gpu {

// The CUDA helpers of common.cuh; names of csrc/lbfgs.h (this namespace's parent) hide
// the mL-BFGS ones of csrc/ops.h.
using namespace ::mlbfgs_fused::cuda;

constexpr int PER_THREAD = ITERS * VEC;  // elements a thread holds

template <typename T>
__device__ __forceinline__ const T* grad_of(const int64_t* addresses, int64_t param) {
  return reinterpret_cast<const T*>(addresses[2 * param + 1]);
}

template <typename T>
__device__ __forceinline__ T* param_of(const int64_t* addresses, int64_t param) {
  return reinterpret_cast<T*>(addresses[2 * param]);
}

// The thread's elements of the chunk's gradient: a flat buffer of the arena (effective
// already) or the user's .grad (negated under maximize; 0 where there is none).
template <typename T, typename C>
__device__ __forceinline__ void load_gradient(const int64_t* addresses, const T* source, const Chunk& c,
                                              bool maximize, C (&g)[PER_THREAD]) {
  const int64_t n = c.count();
  const T* src = source != nullptr ? source + c.start : grad_of<T>(addresses, c.param);
  if (source == nullptr && src != nullptr) src += c.local;
  const bool vec = src != nullptr && aligned(src);
  const C sign = (source == nullptr && maximize) ? C(-1) : C(1);
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t x = pack_start(it);
    C v[VEC] = {};
    if (src != nullptr && x < n) load(src + x, vec, n - x, v);
#pragma unroll
    for (int l = 0; l < VEC; ++l) g[it * VEC + l] = sign * v[l];
  }
}

// Sum over the thread block, fixed order (warp tree, then the warps in sequence), of K
// values per thread at once; valid in thread 0. `scratch` holds K * WARPS doubles.
template <int K>
__device__ __forceinline__ void block_sums(double (&v)[K], double* scratch) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) scratch[k * WARPS + warp] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      double total = 0.0;
      for (int w = 0; w < WARPS; ++w) total += scratch[k * WARPS + w];
      v[k] = total;
    }
  }
}

__device__ __forceinline__ double block_max(double v, double* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmax(v, __shfl_down_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 0; w < WARPS; ++w) v = fmax(v, scratch[w]);
  }
  return v;
}

inline void check_tables(const at::Tensor& addresses, const at::Tensor& chunks) {
  TORCH_CHECK(addresses.is_cuda() && addresses.dtype() == at::kLong && addresses.is_contiguous() &&
                  addresses.dim() == 2 && addresses.size(1) == 2,
              "mlbfgs_fused: malformed address table");
  TORCH_CHECK(chunks.is_cuda() && chunks.dtype() == at::kLong && chunks.is_contiguous() &&
                  chunks.size(1) == CHUNK_COLUMNS,
              "mlbfgs_fused: malformed chunk table");
}

}  // namespace gpu
}  // namespace lbfgs
}  // namespace mlbfgs_fused
