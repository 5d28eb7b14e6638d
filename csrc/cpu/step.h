// The whole mL-BFGS step of one arena on the CPU as one call (csrc/cpu/passes.cpp),
// for the Python binding of csrc/python.cpp: what MLBFGS.step runs when a group is the
// optimizer's only arena (docs/design.md, "The C++ and CUDA backends").
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace mlbfgs_fused {
namespace cpu {

// The arena's state and the plan's scratch, as NativeArena holds them.
struct StepState {
  at::Tensor history_s, history_y, param_ema, grad_ema, momentum_buffer, param_snapshot,
      grad_snapshot, gram, step, pair_count, skipped_pairs, skipped_steps, chunks, blocks,
      partials, pair_partials, gram_partials, coef, stats;
  int64_t m = 0;
};

// A step's hyperparameters, read from the group at every step.
struct StepHyper {
  double lr = 0, momentum = 0, weight_decay = 0, beta_p = 0, beta_g = 0, pair_momentum = 0,
         damping = 0, sigma_low = 0, sigma_high = 0, eps = 0;
  int64_t period = 1, normalize = 0;
  bool maximize = false;
};

// The paper's step (docs/design.md, "The step"): pass 1 (S g, Y g, g.g and, on a
// pair-forming step, the candidate's sums), the two-loop and the pair decision, the
// verdict (finite g.g and found_inf == 0), pass 2 (averages, direction, momentum,
// parameters and, where a pair is due, the pair, its Gram row partials and the
// snapshots) and the counters. `params` and `grads` in arena order, dense, in the
// arena's element order; an undefined gradient is an absent one. `grad_scale` is 1
// without AMP. Every input must have been checked (csrc/python.cpp).
void whole_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const StepState& state, const StepHyper& hyper, double grad_scale,
                bool found_inf);

}  // namespace cpu
}  // namespace mlbfgs_fused
