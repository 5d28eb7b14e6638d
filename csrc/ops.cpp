// The schemas of the fused mL-BFGS passes; the kernels register per device
// (csrc/cpu/passes.cpp, csrc/cuda/*.cu). Every op writes into its arguments and
// returns nothing; mlbfgs_fused/backends/native.py registers their fake kernels.
//
// The passes of one step, per arena (docs/design.md, "The step"):
//   gradient_dots  S g, Y g, g.g per chunk (partials), read-only over the arena; with
//                  pair_sums (the CPU, paper variant) also a pair-forming step's
//                  candidate s.s, s.y, y.y from the averages this step will write;
//   two_loop       per block: the coefficients of d from the Gram matrices, and the
//                  group status row (g.g, ||d||^2, pair held); the arena's probe;
//   update         d, EMAs, momentum, parameters; nothing unless `ok`; `update_mode`
//                  (csrc/ops.h UpdateMode) picks the variant's order: the candidate's
//                  sums here (UPDATE_PAPER, UPDATE_RELEASED_AVERAGES), or the pair
//                  itself where due, decided from pass 1's sums (UPDATE_PAPER_PAIR: the
//                  ring slot, the Gram row partials from the ring rows as stored, the
//                  snapshots);
//   push           the counters every step; on a due step the Gram row, and unless
//                  pair_written (the update pass pushed it) the pair's own pass
//                  (push_pairs then commit: the same in two ops, a distributed rank's).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(mlbfgs_fused_native, m) {
  m.def(
      "gradient_dots(Tensor[] params, Tensor?[] grads, Tensor history_s, Tensor history_y, "
      "Tensor param_ema, Tensor grad_ema, Tensor param_snapshot, Tensor grad_snapshot, "
      "Tensor chunks, Tensor step, Tensor pair_count, Tensor(a!) partials, "
      "Tensor(b!) pair_partials, Tensor? grad_scale, float weight_decay, bool maximize, "
      "float beta_p, float beta_g, float pair_momentum, int period, int m, bool pair_sums) -> ()");
  m.def(
      "two_loop(Tensor partials, Tensor blocks, Tensor gram, Tensor pair_count, "
      "Tensor(a!) coef, Tensor(b!) stats, Tensor(c!) probe, int block_offset, int m) -> ()");
  m.def(
      "update(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!) history_s, Tensor(c!) history_y, "
      "Tensor(d!) param_ema, Tensor(e!) grad_ema, Tensor(f!) momentum_buffer, "
      "Tensor(g!) param_snapshot, Tensor(h!) grad_snapshot, Tensor chunks, Tensor blocks, "
      "Tensor coef, Tensor step, Tensor pair_count, Tensor stats, Tensor ok, Tensor? grad_scale, "
      "Tensor(i!) pair_partials, Tensor(j!) gram_partials, Tensor lr, float momentum, "
      "float weight_decay, float beta_p, float beta_g, float pair_momentum, float damping, "
      "float sigma_low, float sigma_high, float eps, int period, int m, bool maximize, "
      "int normalize, int update_mode) -> ()");
  m.def(
      "push(Tensor param_ema, Tensor grad_ema, Tensor(a!) param_snapshot, "
      "Tensor(b!) grad_snapshot, Tensor(c!) history_s, Tensor(d!) history_y, Tensor(e!) gram, "
      "Tensor chunks, Tensor blocks, Tensor pair_partials, Tensor(f!) gram_partials, "
      "Tensor ok, Tensor(g!) step, Tensor(h!) pair_count, Tensor(i!) skipped_pairs, "
      "Tensor(j!) skipped_steps, float pair_momentum, float damping, float sigma_low, "
      "float sigma_high, float eps, int period, int m, bool pair_written) -> ()");
  // A rank that holds part of each block (distributed "sharded") completes the per-block
  // sums across ranks between the passes (docs/design.md, "Distributed"): block_sums
  // adds a block's partial rows in chunk order, and two_loop, push_pairs and commit then
  // read the completed sums through a block table with one row per block. push_pairs
  // and commit are push's two halves, with the Gram rows' sums completed in between.
  m.def("block_sums(Tensor partials, Tensor blocks, Tensor(a!) sums) -> ()");
  m.def(
      "push_pairs(Tensor param_ema, Tensor grad_ema, Tensor(a!) param_snapshot, "
      "Tensor(b!) grad_snapshot, Tensor(c!) history_s, Tensor(d!) history_y, Tensor chunks, "
      "Tensor blocks, Tensor pair_partials, Tensor(e!) gram_partials, Tensor ok, Tensor step, "
      "Tensor pair_count, float pair_momentum, float damping, float sigma_low, "
      "float sigma_high, float eps, int period, int m) -> ()");
  m.def(
      "commit(Tensor(a!) gram, Tensor blocks, Tensor pair_partials, Tensor gram_partials, "
      "Tensor ok, Tensor(b!) step, Tensor(c!) pair_count, Tensor(d!) skipped_pairs, "
      "Tensor(e!) skipped_steps, float damping, float sigma_low, float sigma_high, float eps, "
      "int period, int m) -> ()");
  // LBFGS's passes (csrc/lbfgs.h; csrc/cpu/lbfgs.cpp, csrc/cuda/lbfgs_*.cu).
  m.def(
      "lbfgs_gradient_dots(Tensor addresses, Tensor? source, Tensor history_s, Tensor history_y, "
      "Tensor direction, Tensor prev, Tensor chunks, Tensor pair_count, Tensor(a!) partials, "
      "float alpha, bool maximize, bool pair, bool ring, bool gd, bool l1, int m) -> ()");
  m.def(
      "lbfgs_two_loop(Tensor partials, Tensor arena_rows, Tensor scales, Tensor? loss, Tensor gram, "
      "Tensor pair_count, Tensor(a!) sums, Tensor(b!) model, Tensor(c!) coef, Tensor(d!) read, "
      "bool pair, bool direction, int m) -> ()");
  m.def(
      "lbfgs_direction(Tensor addresses, Tensor? source, Tensor(a!) history_s, Tensor(b!) history_y, "
      "Tensor(c!) direction, Tensor(d!) prev, Tensor(e!)? saved, Tensor chunks, Tensor coef, "
      "Tensor model, Tensor(f!) partials, Tensor(g!)? gram, Tensor(h!)? pair_count, float alpha, "
      "float move, bool push, bool combine, bool do_move, bool save, bool maximize, int m) -> ()");
  m.def("lbfgs_move(Tensor addresses, Tensor? saved, Tensor direction, Tensor chunks, float alpha) -> ()");
}
