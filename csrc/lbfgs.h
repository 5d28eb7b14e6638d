// The C++ contract of LBFGS's passes (mlbfgs_fused/backends/_lbfgs.py is the Python
// twin, kernels/lbfgs_common.py the Triton one; docs/design.md, "LBFGS").
//
// An arena is one block ([m, N] rings, row i at i * N) cut into the chunks of
// csrc/ops.h. The passes, per arena:
//   lbfgs_gradient_dots  after a closure evaluation: per chunk, the dots of g with the
//                        ring rows (R_G), and with a pair candidate s = alpha d, y = g - prev
//                        (rounded as the ring stores them) those of s (R_S) and y (R_Y),
//                        then the scalars of Scalar; read-only.
//   lbfgs_two_loop       the chunk rows summed per arena (fixed order), the read vector,
//                        and lbfgs_model: acceptance, candidate Gram matrices, coefficients.
//   lbfgs_direction      the pair pushed into its slot (where accepted), d from the
//                        coefficients, prev = g, the parameters saved and moved.
//   lbfgs_move           a line-search trial point, x = saved + alpha d.
#pragma once

#include <cmath>
#include <cstdint>

#include "ops.h"

namespace mlbfgs_fused {
namespace lbfgs {

// Where a pass reads the gradient: the user's .grad (negated under maximize) or a flat
// buffer of the arena holding the effective gradient (a kept one, prev_grad).
enum Source : int64_t { SOURCE_GRAD, SOURCE_KEPT, SOURCE_PREV };
// The read vector; READ_FIXED + a: max |d| of arena a's last direction.
enum Read : int64_t { READ_LOSS, READ_GTD, READ_GTD_NEXT, READ_GMAX, READ_GL1, READ_GG, READ_FIXED };
// Per chunk: [R_G (2m), R_S (2m), R_Y (2m)] then these (float64 products for the dots
// of g, s, y among themselves; GMAX and DMAX are maxima, the rest sums).
enum Scalar : int64_t { P_GG, P_GD, P_SS, P_SY, P_YY, P_SG, P_YG, P_GL1, P_GMAX, P_DMAX, NUM_SCALARS };
// The model scratch: candidate Gram matrices [3, m, m], then these, then 3m doubles.
enum Model : int64_t { MODEL_ACCEPT, MODEL_SLOT, MODEL_COUNT, MODEL_FIXED };

// torch.optim.LBFGS stores a pair only when s.y > 1e-10.
constexpr double CURVATURE_MIN = 1e-10;

MLBFGS_HOST_DEVICE int64_t partial_width(int64_t m) { return 6 * m + NUM_SCALARS; }
MLBFGS_HOST_DEVICE int64_t model_size(int64_t m) { return 3 * m * m + MODEL_FIXED + 3 * m; }

MLBFGS_HOST_DEVICE bool finite(double x) { return x == x && x - x == 0.0; }

// The model of an evaluated point, on one thread. `sums` is [A + 1, W]: row a the sums
// of arena a, row A their total. Writes the candidate Gram matrices (the state's `gram`
// with the pair's row and column where it is accepted), the acceptance, slot and new
// pair count into `model`, the coefficients of d = -H g over [g, s_0..s_{m-1},
// y_0..y_{m-1}] (slot order) into `coef`, and g . d of that d (sum over arenas of
// scales[a] times their dots: the step direction is scales[a] d there) into
// read[READ_GTD_NEXT]. The two-loop is two_loop_block of csrc/ops.h.
MLBFGS_HOST_DEVICE void lbfgs_model(const double* sums, int64_t A, const double* scales,
                                    const double* gram, int64_t pair_count, int64_t m, bool pair,
                                    double* model, double* coef, double* read) {
  const int64_t W = partial_width(m);
  const double* total = sums + A * W;
  const double* sc = total + 6 * m;
  double* cand = model;
  double* fixed = model + 3 * m * m;
  double* alpha = fixed + MODEL_FIXED;
  double* Sg = alpha + m;
  double* Yg = Sg + m;
  for (int64_t i = 0; i < 3 * m * m; ++i) cand[i] = gram[i];
  const int64_t slot = pair_count % m;
  const bool accept = pair && finite(sc[P_SY]) && sc[P_SY] > CURVATURE_MIN && finite(sc[P_YY]) &&
                      finite(sc[P_SS]);
  if (accept) {
    double* SS = cand;
    double* SY = cand + m * m;  // [i, j] = s_i . y_j
    double* YY = cand + 2 * m * m;
    const double* Rs = total + 2 * m;  // s . s_j, then s . y_j
    const double* Ry = total + 4 * m;  // y . s_j, then y . y_j
    for (int64_t j = 0; j < m; ++j) {
      const bool own = j == slot;
      const double ss = own ? sc[P_SS] : Rs[j];
      const double yy = own ? sc[P_YY] : Ry[m + j];
      SS[slot * m + j] = ss;
      SS[j * m + slot] = ss;
      SY[slot * m + j] = own ? sc[P_SY] : Rs[m + j];
      SY[j * m + slot] = own ? sc[P_SY] : Ry[j];
      YY[slot * m + j] = yy;
      YY[j * m + slot] = yy;
    }
  }
  const int64_t count = pair_count + (accept ? 1 : 0);
  for (int64_t j = 0; j < m; ++j) {
    const bool own = accept && j == slot;
    Sg[j] = own ? sc[P_SG] : total[j];
    Yg[j] = own ? sc[P_YG] : total[m + j];
  }
  two_loop_block(cand, Sg, Yg, sc[P_GG], count, m, coef, alpha);
  for (int64_t i = 0; i < 2 * m + 1; ++i) coef[i] = -coef[i];
  double gtd = 0.0;
  for (int64_t a = 0; a < A; ++a) {
    const double* row = sums + a * W;
    const double* rs = row + 6 * m;
    double dot = coef[0] * rs[P_GG];
    for (int64_t j = 0; j < m; ++j) {
      const bool own = accept && j == slot;
      dot += coef[1 + j] * (own ? rs[P_SG] : row[j]) + coef[1 + m + j] * (own ? rs[P_YG] : row[m + j]);
    }
    gtd += scales[a] * dot;
  }
  read[READ_GTD_NEXT] = gtd;
  fixed[MODEL_ACCEPT] = accept ? 1.0 : 0.0;
  fixed[MODEL_SLOT] = static_cast<double>(slot);
  fixed[MODEL_COUNT] = static_cast<double>(count);
}

// The read vector's other entries from the per-arena sums (rows 0 .. A - 1 of `sums`).
MLBFGS_HOST_DEVICE void lbfgs_read(const double* sums, int64_t A, const double* scales, int64_t m,
                                   double* read) {
  const int64_t W = partial_width(m);
  const double* total = sums + A * W + 6 * m;
  double gtd = 0.0;
  for (int64_t a = 0; a < A; ++a) {
    gtd += scales[a] * sums[a * W + 6 * m + P_GD];
    read[READ_FIXED + a] = sums[a * W + 6 * m + P_DMAX];
  }
  read[READ_GTD] = gtd;
  read[READ_GMAX] = total[P_GMAX];
  read[READ_GL1] = total[P_GL1];
  read[READ_GG] = total[P_GG];
}

// Whether column j of the partial rows is a maximum (else a sum).
MLBFGS_HOST_DEVICE bool max_column(int64_t j, int64_t m) {
  return j == 6 * m + P_GMAX || j == 6 * m + P_DMAX;
}

}  // namespace lbfgs
}  // namespace mlbfgs_fused
