// The pair push and the counters on CUDA: two launches (csrc/ops.cpp); push_pairs and
// commit are the same two launches as ops of their own.
//
// push_kernel, one thread block per chunk: returns at once unless the step is finite
// and a pair is due for the chunk's block. On a pair-forming step thread 0 adds the
// update pass's partial sums of the block in chunk order (the same in every thread
// block) for phi and the acceptance; an accepted pair is written into ring slot
// pair_count % m in the history dtype, and the inner products of the rows as stored
// with every ring row go to the chunk's Gram partials. Every due step then rolls the
// snapshots. Bytes on a due step: reads 4 E + 2 m H, writes 2 H + 2 E.
//
// commit_kernel, one thread block: the only writer of the counters (every other
// kernel reads them): step or skipped_steps, and on a pair-forming step the Gram row
// and column of the slot from the chunks' sums in chunk order, pair_count or
// skipped_pairs.
#include "common.cuh"

namespace mlbfgs_fused {
namespace cuda {
namespace {

struct Decision {
  double phi;
  bool accepted;
};

__device__ Decision pair_decision(const double* pair_partials, int64_t first, int64_t end,
                                  double damping, double sigma_low, double sigma_high, double eps) {
  double ss = 0.0, sy = 0.0;
  for (int64_t k = first; k < end; ++k) {
    ss += pair_partials[k * PAIR_COLUMNS + P_SS];
    sy += pair_partials[k * PAIR_COLUMNS + P_SY];
  }
  const double phi = damping_factor(sy, ss, sigma_low, sigma_high, damping, eps);
  const double curvature = phi * sy + (1.0 - phi) * ss;  // s.yhat
  return {phi, isfinite(curvature) && curvature > eps};
}

template <typename T, typename H>
__global__ void __launch_bounds__(THREADS) push_kernel(
    const T* param_ema, const T* grad_ema, T* param_snapshot, T* grad_snapshot, H* hs, H* hy,
    const int64_t* chunks, const int64_t* blocks, const double* pair_partials,
    double* gram_partials, const bool* ok, const int64_t* step, const int64_t* pair_count,
    double pair_momentum, double damping, double sigma_low, double sigma_high, double eps,
    int64_t period, int64_t m) {
  using C = opmath_t<T>;
  const Chunk c(chunks + blockIdx.x * CHUNK_COLUMNS);
  const int64_t b = c.block, n = c.count();
  if (!*ok || !pair_due(step[b], period)) return;  // nothing per element
  __shared__ double scratch[WARPS];
  __shared__ Decision decision;
  if (threadIdx.x == 0) {
    decision = {0.0, false};
    if (forms_pair(step[b], period)) {
      decision = pair_decision(pair_partials, blocks[b * BLOCK_COLUMNS + B_FIRST],
                               blocks[b * BLOCK_COLUMNS + B_END], damping, sigma_low, sigma_high, eps);
    }
  }
  __syncthreads();
  const T* P_ptr = param_ema + c.start;
  const T* G_ptr = grad_ema + c.start;
  T* P0_ptr = param_snapshot + c.start;
  T* G0_ptr = grad_snapshot + c.start;
  const bool vec = aligned(P_ptr) && aligned(P0_ptr);
  if (decision.accepted) {
    const int64_t pc = pair_count[b], slot = pc % m;
    const C r = pc > 0 ? static_cast<C>(pair_momentum) : C(0);
    const C phi = static_cast<C>(decision.phi);
    const H* s_last = hs + c.ring((pc - 1 + m) % m);
    const H* y_last = hy + c.ring((pc - 1 + m) % m);
    H* s_slot = hs + c.ring(slot);
    H* y_slot = hy + c.ring(slot);
    const bool vec_last = aligned(s_last) && aligned(y_last);
    const bool vec_slot = aligned(s_slot) && aligned(y_slot);
    // This thread's elements of the new rows as stored, in registers.
    C s[ITERS][VEC], yhat[ITERS][VEC];
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t x = pack_start(it);
      const int64_t left = x < n ? n - x : 0;
      C P[VEC], P0[VEC], G[VEC], G0[VEC], sl[VEC], yl[VEC], s_new[VEC], y_new[VEC];
      load(P_ptr + x, vec, left, P);
      load(P0_ptr + x, vec, left, P0);
      load(G_ptr + x, vec, left, G);
      load(G0_ptr + x, vec, left, G0);
      load(s_last + x, vec_last, left, sl);
      load(y_last + x, vec_last, left, yl);
#pragma unroll
      for (int l = 0; l < VEC; ++l) {
        const C sx = lerp<C>(P[l] - P0[l], sl[l], r);
        const C yx = lerp<C>(G[l] - G0[l], yl[l], r);
        s_new[l] = sx;
        y_new[l] = lerp<C>(sx, yx, phi);
        // Rounded to the history dtype: the Gram matrices stay those of the ring.
        s[it][l] = l < left ? static_cast<C>(static_cast<H>(sx)) : C(0);
        yhat[it][l] = l < left ? static_cast<C>(static_cast<H>(y_new[l])) : C(0);
      }
      if (left > 0) {
        store(s_slot + x, vec_slot, left, s_new);
        store(y_slot + x, vec_slot, left, y_new);
      }
    }
    double* out = gram_partials + blockIdx.x * 4 * m;
    for (int64_t j = 0; j < m; ++j) {
      const H* s_j = hs + c.ring(j);
      const H* y_j = hy + c.ring(j);
      const bool vec_j = aligned(s_j) && aligned(y_j);
      double ss = 0.0, sy_col = 0.0, sy_row = 0.0, yy = 0.0;
#pragma unroll
      for (int it = 0; it < ITERS; ++it) {
        const int64_t x = pack_start(it);
        const int64_t left = x < n ? n - x : 0;
        C sj[VEC], yj[VEC];
        if (j == slot) {
#pragma unroll
          for (int l = 0; l < VEC; ++l) {
            sj[l] = s[it][l];
            yj[l] = yhat[it][l];
          }
        } else {
          load(s_j + x, vec_j, left, sj);
          load(y_j + x, vec_j, left, yj);
        }
#pragma unroll
        for (int l = 0; l < VEC; ++l) {
          ss += static_cast<double>(sj[l] * s[it][l]);
          sy_col += static_cast<double>(sj[l] * yhat[it][l]);
          sy_row += static_cast<double>(yj[l] * s[it][l]);
          yy += static_cast<double>(yj[l] * yhat[it][l]);
        }
      }
      const double t0 = block_sum(ss, scratch), t1 = block_sum(sy_col, scratch);
      const double t2 = block_sum(sy_row, scratch), t3 = block_sum(yy, scratch);
      if (threadIdx.x == 0) {
        out[j] = t0;          // S S^T [slot, j]
        out[m + j] = t1;      // S Y^T [j, slot]
        out[2 * m + j] = t2;  // S Y^T [slot, j]
        out[3 * m + j] = t3;  // Y Y^T [slot, j]
      }
    }
  }
  for (int it = 0; it < ITERS; ++it) {
    const int64_t x = pack_start(it);
    if (x >= n) break;
    C P[VEC], G[VEC];
    load(P_ptr + x, vec, n - x, P);
    load(G_ptr + x, vec, n - x, G);
    store(P0_ptr + x, vec, n - x, P);
    store(G0_ptr + x, vec, n - x, G);
  }
}

__global__ void commit_kernel(const int64_t* blocks, int64_t B, const double* pair_partials,
                              const double* gram_partials, double* gram, const bool* ok,
                              int64_t* step, int64_t* pair_count, int64_t* skipped_pairs,
                              int64_t* skipped_steps, double damping, double sigma_low,
                              double sigma_high, double eps, int64_t period, int64_t m) {
  __shared__ Decision decision;
  __shared__ bool forms;
  const bool finite = *ok;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t first = blocks[b * BLOCK_COLUMNS + B_FIRST], end = blocks[b * BLOCK_COLUMNS + B_END];
    if (threadIdx.x == 0) {
      forms = finite && forms_pair(step[b], period);
      decision = {0.0, false};
      if (forms) decision = pair_decision(pair_partials, first, end, damping, sigma_low, sigma_high, eps);
      if (finite) {
        step[b] += 1;
      } else {
        skipped_steps[b] += 1;
      }
    }
    __syncthreads();
    if (decision.accepted) {
      const int64_t slot = pair_count[b] % m;
      double* SS = gram + b * 3 * m * m;
      double* SY = SS + m * m;
      double* YY = SY + m * m;
      for (int64_t col = threadIdx.x; col < 4 * m; col += blockDim.x) {
        double total = 0.0;
        for (int64_t k = first; k < end; ++k) total += gram_partials[k * 4 * m + col];
        const int64_t j = col % m;
        switch (col / m) {
          case 0: SS[slot * m + j] = total; SS[j * m + slot] = total; break;
          case 1: SY[j * m + slot] = total; break;
          case 2: if (j != slot) SY[slot * m + j] = total; break;  // [slot, slot] is case 1's
          default: YY[slot * m + j] = total; YY[j * m + slot] = total; break;
        }
      }
    }
    __syncthreads();
    if (threadIdx.x == 0 && forms) {
      if (decision.accepted) {
        pair_count[b] += 1;
      } else {
        skipped_pairs[b] += 1;
      }
    }
    __syncthreads();
  }
}

void launch_push(const at::Tensor& param_ema, const at::Tensor& grad_ema,
                 const at::Tensor& param_snapshot, const at::Tensor& grad_snapshot,
                 const at::Tensor& history_s, const at::Tensor& history_y, const at::Tensor& chunks,
                 const at::Tensor& blocks, const at::Tensor& pair_partials,
                 const at::Tensor& gram_partials, const at::Tensor& ok, const at::Tensor& step,
                 const at::Tensor& pair_count, double pair_momentum, double damping,
                 double sigma_low, double sigma_high, double eps, int64_t period, int64_t m,
                 cudaStream_t stream) {
  TORCH_CHECK(ok.scalar_type() == at::kBool, "mlbfgs_fused: ok must be a bool tensor");
  const int64_t P = chunks.size(0);
  if (P == 0) return;
  dispatch_types(param_ema.scalar_type(), history_s.scalar_type(), "mlbfgs_fused::push",
                 [&](auto t_tag, auto h_tag) {
                   using T = typename decltype(t_tag)::type;
                   using H = typename decltype(h_tag)::type;
                   push_kernel<T, H><<<P, THREADS, 0, stream>>>(
                       param_ema.const_data_ptr<T>(), grad_ema.const_data_ptr<T>(),
                       param_snapshot.data_ptr<T>(), grad_snapshot.data_ptr<T>(),
                       history_s.data_ptr<H>(), history_y.data_ptr<H>(),
                       chunks.const_data_ptr<int64_t>(), blocks.const_data_ptr<int64_t>(),
                       pair_partials.const_data_ptr<double>(), gram_partials.data_ptr<double>(),
                       ok.const_data_ptr<bool>(), step.const_data_ptr<int64_t>(),
                       pair_count.const_data_ptr<int64_t>(), pair_momentum, damping, sigma_low,
                       sigma_high, eps, period, m);
                   C10_CUDA_KERNEL_LAUNCH_CHECK();
                 });
}

void launch_commit(const at::Tensor& gram, const at::Tensor& blocks, const at::Tensor& pair_partials,
                   const at::Tensor& gram_partials, const at::Tensor& ok, const at::Tensor& step,
                   const at::Tensor& pair_count, const at::Tensor& skipped_pairs,
                   const at::Tensor& skipped_steps, double damping, double sigma_low,
                   double sigma_high, double eps, int64_t period, int64_t m, cudaStream_t stream) {
  TORCH_CHECK(ok.scalar_type() == at::kBool, "mlbfgs_fused: ok must be a bool tensor");
  commit_kernel<<<1, 128, 0, stream>>>(
      blocks.const_data_ptr<int64_t>(), blocks.size(0), pair_partials.const_data_ptr<double>(),
      gram_partials.const_data_ptr<double>(), gram.data_ptr<double>(), ok.const_data_ptr<bool>(),
      step.data_ptr<int64_t>(), pair_count.data_ptr<int64_t>(), skipped_pairs.data_ptr<int64_t>(),
      skipped_steps.data_ptr<int64_t>(), damping, sigma_low, sigma_high, eps, period, m);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void push(const at::Tensor& param_ema, const at::Tensor& grad_ema, const at::Tensor& param_snapshot,
          const at::Tensor& grad_snapshot, const at::Tensor& history_s, const at::Tensor& history_y,
          const at::Tensor& gram, const at::Tensor& chunks, const at::Tensor& blocks,
          const at::Tensor& pair_partials, const at::Tensor& gram_partials, const at::Tensor& ok,
          const at::Tensor& step, const at::Tensor& pair_count, const at::Tensor& skipped_pairs,
          const at::Tensor& skipped_steps, double pair_momentum, double damping, double sigma_low,
          double sigma_high, double eps, int64_t period, int64_t m, bool pair_written) {
  TORCH_CHECK(!pair_written, "mlbfgs_fused::push: the pair is pushed by this pass on CUDA");
  const c10::cuda::CUDAGuard guard(history_s.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  launch_push(param_ema, grad_ema, param_snapshot, grad_snapshot, history_s, history_y, chunks,
              blocks, pair_partials, gram_partials, ok, step, pair_count, pair_momentum, damping,
              sigma_low, sigma_high, eps, period, m, stream);
  launch_commit(gram, blocks, pair_partials, gram_partials, ok, step, pair_count, skipped_pairs,
                skipped_steps, damping, sigma_low, sigma_high, eps, period, m, stream);
}

// push's two halves, for a rank that completes the Gram rows' sums in between
// (csrc/ops.cpp; docs/design.md, "Distributed").
void push_pairs(const at::Tensor& param_ema, const at::Tensor& grad_ema,
                const at::Tensor& param_snapshot, const at::Tensor& grad_snapshot,
                const at::Tensor& history_s, const at::Tensor& history_y, const at::Tensor& chunks,
                const at::Tensor& blocks, const at::Tensor& pair_partials,
                const at::Tensor& gram_partials, const at::Tensor& ok, const at::Tensor& step,
                const at::Tensor& pair_count, double pair_momentum, double damping,
                double sigma_low, double sigma_high, double eps, int64_t period, int64_t m) {
  const c10::cuda::CUDAGuard guard(history_s.device());
  launch_push(param_ema, grad_ema, param_snapshot, grad_snapshot, history_s, history_y, chunks,
              blocks, pair_partials, gram_partials, ok, step, pair_count, pair_momentum, damping,
              sigma_low, sigma_high, eps, period, m, c10::cuda::getCurrentCUDAStream());
}

void commit(const at::Tensor& gram, const at::Tensor& blocks, const at::Tensor& pair_partials,
            const at::Tensor& gram_partials, const at::Tensor& ok, const at::Tensor& step,
            const at::Tensor& pair_count, const at::Tensor& skipped_pairs,
            const at::Tensor& skipped_steps, double damping, double sigma_low, double sigma_high,
            double eps, int64_t period, int64_t m) {
  const c10::cuda::CUDAGuard guard(gram.device());
  launch_commit(gram, blocks, pair_partials, gram_partials, ok, step, pair_count, skipped_pairs,
                skipped_steps, damping, sigma_low, sigma_high, eps, period, m,
                c10::cuda::getCurrentCUDAStream());
}

}  // namespace

TORCH_LIBRARY_IMPL(mlbfgs_fused_native, CUDA, m) {
  m.impl("push", &push);
  m.impl("push_pairs", &push_pairs);
  m.impl("commit", &commit);
}

}  // namespace cuda
}  // namespace mlbfgs_fused
