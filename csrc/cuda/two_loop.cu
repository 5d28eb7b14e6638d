// The two-loop recursion on CUDA: one thread block for the arena. Per block of the
// arena the threads add the chunks' partial sums column by column in chunk order,
// then one thread runs block_two_loop (csrc/ops.h) on the float64 scalars. Bytes:
// none per element.
#include "common.cuh"

namespace mlbfgs_fused {
namespace cuda {
namespace {

__global__ void two_loop_kernel(const double* partials, const int64_t* blocks, int64_t B,
                                const double* gram, const int64_t* pair_count, double* coef,
                                double* stats, double* probe, int64_t m) {
  extern __shared__ double shared[];
  const int64_t width = 2 * m + 1;
  double* sums = shared;
  double* alpha = shared + width;
  double total = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t first = blocks[b * BLOCK_COLUMNS + B_FIRST], end = blocks[b * BLOCK_COLUMNS + B_END];
    for (int64_t j = threadIdx.x; j < width; j += blockDim.x) {
      double s = 0.0;
      for (int64_t k = first; k < end; ++k) s += partials[k * width + j];
      sums[j] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      total += block_two_loop(gram + b * 3 * m * m, sums, pair_count[b], m, coef + b * width, alpha,
                              stats + b * STATS_COLUMNS);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *probe = total;
}

void two_loop(const at::Tensor& partials, const at::Tensor& blocks, const at::Tensor& gram,
              const at::Tensor& pair_count, const at::Tensor& coef, const at::Tensor& stats,
              const at::Tensor& probe, int64_t block_offset, int64_t m) {
  const c10::cuda::CUDAGuard guard(gram.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t shared = static_cast<size_t>(3 * m + 1) * sizeof(double);
  two_loop_kernel<<<1, 64, shared, stream>>>(
      partials.const_data_ptr<double>(), blocks.const_data_ptr<int64_t>(), blocks.size(0),
      gram.const_data_ptr<double>(), pair_count.const_data_ptr<int64_t>(), coef.data_ptr<double>(),
      stats.data_ptr<double>() + block_offset * STATS_COLUMNS, probe.data_ptr<double>(), m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// block_sums (csrc/ops.cpp): one thread block per block of the arena, the threads over
// the columns, each column's rows added in chunk order as two_loop_kernel adds them.
__global__ void block_sums_kernel(const double* partials, const int64_t* blocks, int64_t width,
                                  double* sums) {
  const int64_t b = blockIdx.x;
  const int64_t first = blocks[b * BLOCK_COLUMNS + B_FIRST], end = blocks[b * BLOCK_COLUMNS + B_END];
  for (int64_t j = threadIdx.x; j < width; j += blockDim.x) {
    double s = 0.0;
    for (int64_t k = first; k < end; ++k) s += partials[k * width + j];
    sums[b * width + j] = s;
  }
}

void block_sums(const at::Tensor& partials, const at::Tensor& blocks, const at::Tensor& sums) {
  const int64_t B = blocks.size(0);
  const int64_t width = sums.size(1);
  TORCH_CHECK(sums.size(0) == B && (partials.size(0) == 0 || partials.size(1) == width),
              "mlbfgs_fused::block_sums: shapes do not match");
  if (B == 0) return;
  const c10::cuda::CUDAGuard guard(sums.device());
  block_sums_kernel<<<B, 64, 0, c10::cuda::getCurrentCUDAStream()>>>(
      partials.const_data_ptr<double>(), blocks.const_data_ptr<int64_t>(), width,
      sums.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(mlbfgs_fused_native, CUDA, m) {
  m.impl("two_loop", &two_loop);
  m.impl("block_sums", &block_sums);
}

}  // namespace cuda
}  // namespace mlbfgs_fused
