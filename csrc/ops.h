// The C++ contract of the fused mL-BFGS step: the table layouts every pass reads
// and the names of the passes (twins of kernels/common.py and kernels/*.py).
//
// An arena of N elements is cut into chunks that each lie in one block and one
// parameter (a fixed number of elements, CHUNK, so which chunk an element falls in
// does not depend on the thread count). The host builds two int64 tables once per
// arena (mlbfgs_fused/backends/native.py, chunk_tables):
//   chunk table [P, CHUNK_COLUMNS]: start, end (arena elements), block, param (arena
//     order), param_start (arena offset of the parameter's first element),
//     ring_origin, ring_stride: row i of the block's ring holds element x at
//     ring_origin + i * ring_stride + x (block b is an [m, n_b] matrix at m * lo);
//   block table [B, BLOCK_COLUMNS]: lo, hi and the chunks first, end covering it.
// Reductions are two-stage: each chunk writes float64 partial sums to its own row
// of a scratch matrix and a serial loop adds a block's rows in chunk order, so the
// results are bit-identical whatever the number of threads.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MLBFGS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MLBFGS_HOST_DEVICE inline
#endif

namespace mlbfgs_fused {

constexpr int64_t CHUNK = 4096;

enum ChunkColumn : int64_t {
  C_START, C_END, C_BLOCK, C_PARAM, C_PARAM_START, C_RING_ORIGIN, C_RING_STRIDE, CHUNK_COLUMNS
};
enum BlockColumn : int64_t { B_LO, B_HI, B_FIRST, B_END, BLOCK_COLUMNS };
// Group-wide status rows, one per block of the group: g.g, ||d||^2, any pair held.
enum StatsColumn : int64_t { S_GG, S_DD, S_HELD, STATS_COLUMNS };
// What an update pass does (docs/design.md, "The step" and "variant='released'"):
//   UPDATE_PAPER                EMAs (1 - beta weights) and the direction's writes;
//   UPDATE_RELEASED             EMAs without the (1 - beta) factor (E1) and the direction;
//   UPDATE_RELEASED_AVERAGES    a released due step before its push: E1 EMAs and the
//                               candidate's sums, no direction;
//   UPDATE_RELEASED_AFTER_PUSH  a released due step after its push: G = g (E2) and the
//                               direction with the pair just pushed (E4);
//   UPDATE_PAPER_PAIR           the paper's order with the pair pushed in this pass where
//                               due (its candidate's sums came with pass 1; the CPU).
enum UpdateMode : int64_t {
  UPDATE_PAPER, UPDATE_RELEASED, UPDATE_RELEASED_AVERAGES, UPDATE_RELEASED_AFTER_PUSH,
  UPDATE_PAPER_PAIR
};
// Per-chunk partial sums of a pair-forming step's candidate: s.s, s.y, y.y.
enum PairColumn : int64_t { P_SS, P_SY, P_YY, PAIR_COLUMNS };


// One row of the chunk table, unpacked (CPU and CUDA passes alike).
struct Chunk {
  int64_t start, end, block, param, local, ring_origin, ring_stride;
  MLBFGS_HOST_DEVICE explicit Chunk(const int64_t* row)
      : start(row[C_START]), end(row[C_END]), block(row[C_BLOCK]), param(row[C_PARAM]),
        local(row[C_START] - row[C_PARAM_START]), ring_origin(row[C_RING_ORIGIN]),
        ring_stride(row[C_RING_STRIDE]) {}
  MLBFGS_HOST_DEVICE int64_t count() const { return end - start; }
  // Where row i of the block's ring holds the chunk's first element.
  MLBFGS_HOST_DEVICE int64_t ring(int64_t i) const { return ring_origin + i * ring_stride + start; }
};

// g = grad / grad_scale (negated under maximize) + weight_decay * theta, with
// signed_scale = (maximize ? -1 : 1) / grad_scale: torch's order, so weight decay pulls
// toward zero when maximising too (docs/design.md, "The step", 1).
template <typename C>
MLBFGS_HOST_DEVICE C effective_gradient(C grad, C theta, C signed_scale, C weight_decay) {
  return grad * signed_scale + weight_decay * theta;
}

// When the direction is divided by its norm over the group (mlbfgs_fused/_math.py,
// Note [direction scale]): never, once some block holds a pair, or always.
enum NormalizeMode : int64_t { NORMALIZE_NEVER, NORMALIZE_AFTER_PAIR, NORMALIZE_ALWAYS };

// 1 / ||d|| over the group, or 1, from the group's status rows (S_DD summed, S_HELD any)
// by the rule of `normalize`; 1 as well when ||d|| = 0. A twin of _math.direction_scale.
MLBFGS_HOST_DEVICE double direction_scale(const double* stats, int64_t rows, int64_t normalize) {
  if (normalize == NORMALIZE_NEVER) return 1.0;
  double dd = 0.0;
  bool held = false;
  for (int64_t r = 0; r < rows; ++r) {
    dd += stats[r * STATS_COLUMNS + S_DD];
    held = held || stats[r * STATS_COLUMNS + S_HELD] > 0;
  }
  const double norm = sqrt(dd);
  const bool due = norm > 0 && (normalize == NORMALIZE_ALWAYS || held);
  return due ? 1.0 / norm : 1.0;
}

// The damping factor phi of docs/design.md ("The step", 7); a twin of
// mlbfgs_fused/_math.py damping_factor.
MLBFGS_HOST_DEVICE double damping_factor(double s_dot_y, double s_dot_s, double sigma_low,
                                         double sigma_high, double damping, double eps) {
  const double mu = s_dot_y / (s_dot_s + eps);
  double phi = 1.0;
  if (mu < sigma_low) {
    phi = (1.0 - sigma_low) / (1.0 - mu);
  } else if (mu > sigma_high) {
    phi = (sigma_high - 1.0) / (mu - 1.0);
  }
  return phi < 1.0 - damping ? phi : 1.0 - damping;
}

// torch.lerp's formula, so results agree with the foreach backend.
template <typename C>
MLBFGS_HOST_DEVICE C lerp(C a, C b, C w) {
  return w < C(0.5) ? a + w * (b - a) : b - (b - a) * (C(1) - w);
}

// Whether a pair can be due at the step that takes the counter from `step` to
// `step + 1`, and whether it forms one (snapshots exist from the first due step on).
MLBFGS_HOST_DEVICE bool pair_due(int64_t step, int64_t period) { return (step + 1) % period == 0; }
MLBFGS_HOST_DEVICE bool forms_pair(int64_t step, int64_t period) {
  return pair_due(step, period) && step + 1 > period;
}

// The vector-free two-loop recursion on one block, in float64 scalars: writes
// coef = (c_g, c_s[m], c_y[m]) in slot order and returns ||d||^2. A port of
// mlbfgs_fused/_math.py two_loop_coefficients. gram is [3, m, m] (S S^T, S Y^T
// with [i, j] = s_i . y_j, Y Y^T); Sg, Yg in slot order; alpha is scratch [m].
// The k-th newest pair sits in slot (pair_count - 1 - k) mod m, for k < min(pair_count, m).
MLBFGS_HOST_DEVICE double two_loop_block(const double* gram, const double* Sg, const double* Yg,
                                         double gg, int64_t pair_count, int64_t m, double* coef,
                                         double* alpha) {
  const double* SS = gram;
  const double* SY = gram + m * m;
  const double* YY = gram + 2 * m * m;
  double* c_s = coef + 1;
  double* c_y = coef + 1 + m;
  double c_g = 1.0;
  for (int64_t j = 0; j < 2 * m; ++j) coef[1 + j] = 0.0;
  const int64_t held = pair_count < m ? pair_count : m;
  // First loop, newest to oldest: alpha_k = rho_k s_k.q ; q -= alpha_k y_k.
  for (int64_t k = 0; k < held; ++k) {
    const int64_t slot = (pair_count - 1 - k) % m;
    double s_dot_q = c_g * Sg[slot];
    for (int64_t j = 0; j < m; ++j) s_dot_q += SS[slot * m + j] * c_s[j] + SY[slot * m + j] * c_y[j];
    const double a = s_dot_q / SY[slot * m + slot];
    alpha[slot] = a;
    c_y[slot] -= a;
  }
  // H0 = gamma I from the newest pair; 1 while the history is empty.
  if (held > 0) {
    const int64_t newest = (pair_count - 1) % m;
    const double gamma = SY[newest * m + newest] / YY[newest * m + newest];
    c_g *= gamma;
    for (int64_t j = 0; j < 2 * m; ++j) coef[1 + j] *= gamma;
  }
  // Second loop, oldest to newest: beta = rho_k y_k.r ; r += (alpha_k - beta) s_k.
  for (int64_t k = held - 1; k >= 0; --k) {
    const int64_t slot = (pair_count - 1 - k) % m;
    double y_dot_r = c_g * Yg[slot];
    for (int64_t j = 0; j < m; ++j) y_dot_r += SY[j * m + slot] * c_s[j] + YY[slot * m + j] * c_y[j];
    const double beta = y_dot_r / SY[slot * m + slot];
    c_s[slot] += alpha[slot] - beta;
  }
  coef[0] = c_g;
  // ||d||^2 as the quadratic form of the Gram matrix of {g, s_i, y_i}.
  double cross = 0.0, quad = 0.0;
  for (int64_t i = 0; i < m; ++i) {
    cross += c_s[i] * Sg[i] + c_y[i] * Yg[i];
    for (int64_t j = 0; j < m; ++j) {
      quad += c_s[i] * SS[i * m + j] * c_s[j] + 2.0 * c_s[i] * SY[i * m + j] * c_y[j] +
              c_y[i] * YY[i * m + j] * c_y[j];
    }
  }
  return c_g * c_g * gg + 2.0 * c_g * cross + quad;
}

// One block's two-loop from its dots summed in chunk order (sums: S g [m], Y g [m], g.g):
// the coefficients of d and the block's status row (g.g, ||d||^2, whether it holds a
// pair). Returns g.g. The CPU's pass 1 and the CUDA two_loop kernel.
MLBFGS_HOST_DEVICE double block_two_loop(const double* gram, const double* sums, int64_t pair_count,
                                         int64_t m, double* coef, double* alpha, double* stats) {
  const double gg = sums[2 * m];
  stats[S_DD] = two_loop_block(gram, sums, sums + m, gg, pair_count, m, coef, alpha);
  stats[S_GG] = gg;
  stats[S_HELD] = pair_count > 0 ? 1.0 : 0.0;
  return gg;
}

}  // namespace mlbfgs_fused
