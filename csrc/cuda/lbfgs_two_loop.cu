// LBFGS's model of an evaluated point on CUDA (csrc/lbfgs.h): one thread block. Its
// threads sum the chunks' partial rows column by column, arena by arena and in chunk
// order (maxima for max |g| and max |d|), then thread 0 runs lbfgs_read and lbfgs_model,
// the same code as the CPU op. Bytes: none per element.
#include "lbfgs_common.cuh"

namespace mlbfgs_fused {
namespace lbfgs {
namespace gpu {
namespace {

constexpr int MODEL_THREADS = 128;

template <typename L>
__global__ void lbfgs_two_loop_kernel(const double* partials, const int64_t* arena_rows, const double* scales,
                                      int64_t A, const L* loss, const double* gram, const int64_t* pair_count,
                                      double* sums, double* model, double* coef, double* read, bool pair,
                                      bool direction, int64_t m) {
  const int64_t W = partial_width(m);
  for (int64_t j = threadIdx.x; j < W; j += blockDim.x) {
    const bool is_max = max_column(j, m);
    double total = 0.0;
    for (int64_t a = 0; a < A; ++a) {
      double acc = 0.0;
      for (int64_t k = arena_rows[a]; k < arena_rows[a + 1]; ++k) {
        const double v = partials[k * W + j];
        acc = is_max ? fmax(acc, v) : acc + v;
      }
      sums[a * W + j] = acc;
      total = is_max ? fmax(total, acc) : total + acc;
    }
    sums[A * W + j] = total;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  if (loss != nullptr) read[READ_LOSS] = static_cast<double>(*loss);
  lbfgs_read(sums, A, scales, m, read);
  if (direction) lbfgs_model(sums, A, scales, gram, *pair_count, m, pair, model, coef, read);
}

void lbfgs_two_loop(const at::Tensor& partials, const at::Tensor& arena_rows, const at::Tensor& scales,
                    const std::optional<at::Tensor>& loss, const at::Tensor& gram, const at::Tensor& pair_count,
                    const at::Tensor& sums, const at::Tensor& model, const at::Tensor& coef, const at::Tensor& read,
                    bool pair, bool direction, int64_t m) {
  const c10::cuda::CUDAGuard guard(gram.device());
  const int64_t A = scales.numel();
  TORCH_CHECK(arena_rows.is_cuda() && arena_rows.numel() == A + 1 && scales.dtype() == at::kDouble &&
                  sums.numel() >= (A + 1) * partial_width(m) && model.numel() >= model_size(m) &&
                  read.numel() >= READ_FIXED + A,
              "mlbfgs_fused::lbfgs_two_loop: malformed scratch");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool has_loss = loss.has_value() && loss->defined();
  auto launch = [&](auto tag) {
    using L = typename decltype(tag)::type;
    lbfgs_two_loop_kernel<L><<<1, MODEL_THREADS, 0, stream>>>(
        partials.const_data_ptr<double>(), arena_rows.const_data_ptr<int64_t>(), scales.const_data_ptr<double>(),
        A, has_loss ? loss->const_data_ptr<L>() : nullptr, gram.const_data_ptr<double>(),
        pair_count.const_data_ptr<int64_t>(), sums.data_ptr<double>(), model.data_ptr<double>(),
        coef.data_ptr<double>(), read.data_ptr<double>(), pair, direction, m);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const auto kind = has_loss ? loss->scalar_type() : at::kDouble;
  TORCH_CHECK(!has_loss || loss->is_cuda(), "mlbfgs_fused::lbfgs_two_loop: the loss must be on the device");
  if (kind == at::kFloat) {
    launch(Type<float>{});
  } else if (kind == at::kDouble) {
    launch(Type<double>{});
  } else if (kind == at::kHalf) {
    launch(Type<c10::Half>{});
  } else if (kind == at::kBFloat16) {
    launch(Type<c10::BFloat16>{});
  } else {
    TORCH_CHECK(false, "mlbfgs_fused::lbfgs_two_loop: a loss of dtype ", kind);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mlbfgs_fused_native, CUDA, m) {
  m.impl("lbfgs_two_loop", &lbfgs_two_loop);
}

}  // namespace gpu
}  // namespace lbfgs
}  // namespace mlbfgs_fused
