// The fused mL-BFGS passes on the CPU (schemas and order in csrc/ops.cpp).
//
// Each pass runs at::parallel_for over the chunks of csrc/ops.h: a chunk works in
// stack buffers of CHUNK elements in the arithmetic type C (float for float32 and
// 16-bit parameters, double for float64), so every array is read from memory once
// per pass and the inner loops are at::vec::Vectorized over L1-resident data with a
// scalar tail. Reductions go to a per-chunk float64 row and are added per block in
// chunk order: the same bits for any thread count. Nothing is allocated per step
// but O(blocks) host vectors on pair steps.
//
// Bytes per element (E parameter bytes, H history bytes, m slots; float32, m = 10):
//   gradient_dots  reads E (grad) [+ E theta with weight decay] + 2 m H
//   update         reads 5 E + 2 m H, writes 4 E; a pair-forming step reads 2 E + 2 H more
//   push           a due step reads 4 E + 2 m H, writes 2 H + 2 E; nothing otherwise
// so (16 m + 44) N a step, (8 m + 44) N with a 16-bit history.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <c10/util/irange.h>

#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "../dispatch.h"
#include "../ops.h"
#include "chunk.h"

namespace mlbfgs_fused {
namespace {

using at::Tensor;
using cpu::as_compute;
using cpu::lane_sum;

// -- chunk-local helpers --------------------------------------------------------------
template <typename T, typename C>
inline void store(T* dst, const C* src, int64_t n) {
  if constexpr (std::is_same_v<C, T>) {
    if (dst != src) std::copy(src, src + n, dst);
  } else {
    for (int64_t x = 0; x < n; ++x) dst[x] = static_cast<T>(src[x]);
  }
}

// (a.u, a.v) over the chunk with one read of a: Vectorized partial sums in C (two
// accumulators per dot so consecutive FMAs do not wait on each other), then float64.
template <typename C>
inline std::pair<double, double> dot2(const C* a, const C* u, const C* v, int64_t n) {
  using Vec = at::vec::Vectorized<C>;
  constexpr int64_t W = Vec::size();
  Vec u0(C(0)), u1(C(0)), v0(C(0)), v1(C(0));
  int64_t x = 0;
  for (; x + 2 * W <= n; x += 2 * W) {
    const Vec a0 = Vec::loadu(a + x), a1 = Vec::loadu(a + x + W);
    u0 = at::vec::fmadd(a0, Vec::loadu(u + x), u0);
    u1 = at::vec::fmadd(a1, Vec::loadu(u + x + W), u1);
    v0 = at::vec::fmadd(a0, Vec::loadu(v + x), v0);
    v1 = at::vec::fmadd(a1, Vec::loadu(v + x + W), v1);
  }
  double su = lane_sum<C>(u0 + u1), sv = lane_sum<C>(v0 + v1);
  for (; x < n; ++x) {
    su += static_cast<double>(a[x] * u[x]);
    sv += static_cast<double>(a[x] * v[x]);
  }
  return {su, sv};
}

// y[x] += alpha u[x] + beta v[x]
template <typename C>
inline void axpy2(C* y, C alpha, const C* u, C beta, const C* v, int64_t n) {
  using Vec = at::vec::Vectorized<C>;
  constexpr int64_t W = Vec::size();
  const Vec va(alpha), vb(beta);
  int64_t x = 0;
  for (; x + W <= n; x += W) {
    const Vec acc = at::vec::fmadd(va, Vec::loadu(u + x), Vec::loadu(y + x));
    at::vec::fmadd(vb, Vec::loadu(v + x), acc).store(y + x);
  }
  for (; x < n; ++x) y[x] += alpha * u[x] + beta * v[x];
}

// average = lerp(average, sample, w) (torch.lerp's formula), the branch on w hoisted.
template <typename T, typename C>
inline void ema_lerp(T* average, const C* sample, C w, int64_t n) {
  if (w < C(0.5)) {
    for (int64_t x = 0; x < n; ++x) {
      const C a = static_cast<C>(average[x]);
      average[x] = static_cast<T>(a + w * (sample[x] - a));
    }
  } else {
    const C v = C(1) - w;
    for (int64_t x = 0; x < n; ++x) {
      const C a = static_cast<C>(average[x]);
      average[x] = static_cast<T>(sample[x] - (sample[x] - a) * v);
    }
  }
}

// average = decay * average + w * sample
template <typename T, typename C>
inline void ema_decay(T* average, const C* sample, C decay, C w, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    average[x] = static_cast<T>(static_cast<C>(average[x]) * decay + sample[x] * w);
  }
}

// The chunk's effective gradient (csrc/ops.h effective_gradient, AMP's unscaling folded
// in) into g; theta is read only with weight decay. Returns g.g in float64: finite
// exactly when every entry of g is.
template <typename C, typename T>
inline double chunk_gradient(const T* grad, const T* theta, int64_t n, C inv_scale,
                             C weight_decay, bool maximize, C* g, C* theta_buf) {
  const C* gr = as_compute(grad, n, g);
  const C signed_scale = maximize ? -inv_scale : inv_scale;
  if (weight_decay != C(0)) {
    const C* th = as_compute(theta, n, theta_buf);
    for (int64_t x = 0; x < n; ++x) g[x] = effective_gradient<C>(gr[x], th[x], signed_scale, weight_decay);
  } else {
    for (int64_t x = 0; x < n; ++x) g[x] = gr[x] * signed_scale;
  }
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t x = 0;
  for (; x + 4 <= n; x += 4) {
    for (int l = 0; l < 4; ++l) acc[l] += static_cast<double>(g[x + l]) * g[x + l];
  }
  for (; x < n; ++x) acc[0] += static_cast<double>(g[x]) * g[x];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// NOTE [interleaved ring streams]: the passes read the 2m ring rows of a chunk a
// sub-block (SB elements) of every row in turn, not one row after another. A thread's
// consecutive chunks continue each row where the last one stopped, so the memory system
// sees 2m long sequential streams, which its prefetchers follow; one row at a time would
// restart every stream at every chunk. Past MAX_INTERLEAVED slots, one row at a time.
constexpr int64_t SB = 256;
constexpr int64_t MAX_INTERLEAVED = 32;

// out[i] = g . s_i and out[m + i] = g . y_i over the chunk (see note above).
template <typename C, typename H>
inline void ring_dots(const C* g, const H* hs, const H* hy, const Chunk& c, int64_t m,
                      int64_t n, double* out, C* row, C* row2) {
  using Vec = at::vec::Vectorized<C>;
  constexpr int64_t W = Vec::size();
  static_assert(SB % W == 0, "a sub-block is whole vectors");
  if (m > MAX_INTERLEAVED) {
    for (int64_t i = 0; i < m; ++i) {
      std::tie(out[i], out[m + i]) = dot2<C>(g, as_compute<C, H>(hs + c.ring(i), n, row),
                                             as_compute<C, H>(hy + c.ring(i), n, row2), n);
    }
    return;
  }
  Vec acc[2 * MAX_INTERLEAVED];
  for (int64_t i = 0; i < 2 * m; ++i) acc[i] = Vec(C(0));
  int64_t x0 = 0;
  for (; x0 + SB <= n; x0 += SB) {
    for (int64_t i = 0; i < 2 * m; ++i) {
      const H* src = (i < m ? hs + c.ring(i) : hy + c.ring(i - m)) + x0;
      const C* r = as_compute<C, H>(src, SB, row);
      Vec a = acc[i];
      for (int64_t x = 0; x < SB; x += W) a = at::vec::fmadd(Vec::loadu(g + x0 + x), Vec::loadu(r + x), a);
      acc[i] = a;
    }
  }
  for (int64_t i = 0; i < 2 * m; ++i) {
    const H* src = i < m ? hs + c.ring(i) : hy + c.ring(i - m);
    double total = lane_sum<C>(acc[i]);
    for (int64_t x = x0; x < n; ++x) total += static_cast<double>(g[x] * static_cast<C>(src[x]));
    out[i] = total;
  }
}

// d += sum_i c_s[i] s_i + c_y[i] y_i over the chunk (see note above); cf = (c_g, c_s, c_y).
template <typename C, typename H>
inline void ring_combine(C* d, const double* cf, const H* hs, const H* hy, const Chunk& c,
                         int64_t m, int64_t n, C* row, C* row2) {
  using Vec = at::vec::Vectorized<C>;
  constexpr int64_t W = Vec::size();
  if (m > MAX_INTERLEAVED) {
    for (int64_t i = 0; i < m; ++i) {
      if (cf[1 + i] == 0.0 && cf[1 + m + i] == 0.0) continue;  // an unheld slot
      axpy2<C>(d, static_cast<C>(cf[1 + i]), as_compute<C, H>(hs + c.ring(i), n, row),
               static_cast<C>(cf[1 + m + i]), as_compute<C, H>(hy + c.ring(i), n, row2), n);
    }
    return;
  }
  int64_t held[MAX_INTERLEAVED];
  int64_t count = 0;
  for (int64_t i = 0; i < m; ++i) {
    if (cf[1 + i] != 0.0 || cf[1 + m + i] != 0.0) held[count++] = i;  // skip unheld slots
  }
  int64_t x0 = 0;
  for (; x0 + SB <= n; x0 += SB) {
    Vec acc[SB / W];
    for (int64_t v = 0; v < SB / W; ++v) acc[v] = Vec::loadu(d + x0 + v * W);
    for (int64_t k = 0; k < count; ++k) {
      const int64_t i = held[k];
      const Vec cs(static_cast<C>(cf[1 + i])), cy(static_cast<C>(cf[1 + m + i]));
      const C* s_i = as_compute<C, H>(hs + c.ring(i) + x0, SB, row);
      const C* y_i = as_compute<C, H>(hy + c.ring(i) + x0, SB, row2);
      for (int64_t v = 0; v < SB / W; ++v) {
        acc[v] = at::vec::fmadd(cy, Vec::loadu(y_i + v * W), at::vec::fmadd(cs, Vec::loadu(s_i + v * W), acc[v]));
      }
    }
    for (int64_t v = 0; v < SB / W; ++v) acc[v].store(d + x0 + v * W);
  }
  for (int64_t k = 0; k < count; ++k) {
    const int64_t i = held[k];
    const C cs = static_cast<C>(cf[1 + i]), cy = static_cast<C>(cf[1 + m + i]);
    const H* s_i = hs + c.ring(i);
    const H* y_i = hy + c.ring(i);
    for (int64_t x = x0; x < n; ++x) d[x] += cs * static_cast<C>(s_i[x]) + cy * static_cast<C>(y_i[x]);
  }
}

void check_chunks(const Tensor& chunks) {
  TORCH_CHECK(chunks.dtype() == at::kLong && chunks.is_contiguous() && chunks.dim() == 2 &&
                  chunks.size(1) == CHUNK_COLUMNS,
              "mlbfgs_fused: malformed chunk table");
}

void check_params(at::TensorList params, at::ArrayRef<std::optional<Tensor>> grads) {
  TORCH_CHECK(params.size() == grads.size(), "mlbfgs_fused: ", params.size(), " parameters but ",
              grads.size(), " gradients");
  for (const auto i : c10::irange(params.size())) {
    TORCH_CHECK(params[i].is_contiguous(), "mlbfgs_fused: parameters must be contiguous");
    if (grads[i].has_value() && grads[i]->defined()) {
      TORCH_CHECK(grads[i]->is_contiguous() && grads[i]->dtype() == params[i].dtype() &&
                      grads[i]->numel() == params[i].numel(),
                  "mlbfgs_fused: a gradient must be contiguous and match its parameter");
    }
  }
}

template <typename T>
std::vector<T*> data_ptrs(at::TensorList tensors) {
  std::vector<T*> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.data_ptr<T>());
  return out;
}

template <typename T>
std::vector<const T*> grad_ptrs(at::ArrayRef<std::optional<Tensor>> grads) {
  std::vector<const T*> out;
  out.reserve(grads.size());
  for (const auto& g : grads) {
    out.push_back(g.has_value() && g->defined() ? g->const_data_ptr<T>() : nullptr);
  }
  return out;
}

template <typename C>
C inverse_scale(const std::optional<Tensor>& grad_scale) {
  if (!grad_scale.has_value() || !grad_scale->defined()) return C(1);
  return static_cast<C>(1.0 / grad_scale->item<double>());
}

// -- gradient_dots ------------------------------------------------------------------------
void gradient_dots(at::TensorList params, at::ArrayRef<std::optional<Tensor>> grads,
                   const Tensor& history_s, const Tensor& history_y, const Tensor& chunks,
                   const Tensor& partials, const std::optional<Tensor>& grad_scale,
                   double weight_decay, bool maximize, int64_t m) {
  check_chunks(chunks);
  check_params(params, grads);
  const int64_t width = 2 * m + 1;
  const int64_t P = chunks.size(0);
  TORCH_CHECK(partials.dtype() == at::kDouble && partials.numel() >= P * width);
  dispatch_types(params[0].scalar_type(), history_s.scalar_type(), "mlbfgs_fused::gradient_dots", [&](auto t_tag, auto h_tag) {
    using T = typename decltype(t_tag)::type;
    using H = typename decltype(h_tag)::type;
    using C = at::opmath_type<T>;
    const auto param_ptr = data_ptrs<T>(params);
    const auto grad_ptr = grad_ptrs<T>(grads);
    const C inv_scale = inverse_scale<C>(grad_scale);
    const H* hs = history_s.const_data_ptr<H>();
    const H* hy = history_y.const_data_ptr<H>();
    const int64_t* table = chunks.const_data_ptr<int64_t>();
    double* out_all = partials.data_ptr<double>();
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      alignas(64) C g[CHUNK], theta[CHUNK], row[CHUNK], row2[CHUNK];
      for (int64_t k = begin; k < end; ++k) {
        const Chunk c(table + k * CHUNK_COLUMNS);
        double* out = out_all + k * width;
        const T* grad = grad_ptr[c.param];
        const int64_t n = c.count();
        if (grad == nullptr || n == 0) {  // no gradient: zero in every dot
          std::fill(out, out + width, 0.0);
          continue;
        }
        out[2 * m] = chunk_gradient<C, T>(grad + c.local, param_ptr[c.param] + c.local, n,
                                              inv_scale, static_cast<C>(weight_decay), maximize,
                                              g, theta);
        ring_dots<C, H>(g, hs, hy, c, m, n, out, row, row2);
      }
    });
  });
}

// -- two_loop -----------------------------------------------------------------------------
void two_loop(const Tensor& partials, const Tensor& blocks, const Tensor& gram,
              const Tensor& pair_count, const Tensor& coef, const Tensor& stats,
              const Tensor& probe, int64_t block_offset, int64_t m) {
  const int64_t width = 2 * m + 1;
  const int64_t B = blocks.size(0);
  const double* part = partials.const_data_ptr<double>();
  const int64_t* btab = blocks.const_data_ptr<int64_t>();
  const double* gram_ptr = gram.const_data_ptr<double>();
  const int64_t* count = pair_count.const_data_ptr<int64_t>();
  double* coef_ptr = coef.data_ptr<double>();
  double* stats_ptr = stats.data_ptr<double>() + block_offset * STATS_COLUMNS;
  std::vector<double> sums(width), alpha(m);
  double total_gg = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    std::fill(sums.begin(), sums.end(), 0.0);
    for (int64_t k = btab[b * BLOCK_COLUMNS + B_FIRST]; k < btab[b * BLOCK_COLUMNS + B_END]; ++k) {
      for (int64_t j = 0; j < width; ++j) sums[j] += part[k * width + j];
    }
    const double gg = sums[2 * m];
    const double dd = two_loop_block(gram_ptr + b * 3 * m * m, sums.data(), sums.data() + m, gg,
                                     count[b], m, coef_ptr + b * width, alpha.data());
    stats_ptr[b * STATS_COLUMNS + S_GG] = gg;
    stats_ptr[b * STATS_COLUMNS + S_DD] = dd;
    stats_ptr[b * STATS_COLUMNS + S_HELD] = count[b] > 0 ? 1.0 : 0.0;
    total_gg += gg;
  }
  *probe.data_ptr<double>() = total_gg;
}

// -- update -------------------------------------------------------------------------------
void update(at::TensorList params, at::ArrayRef<std::optional<Tensor>> grads,
            const Tensor& history_s, const Tensor& history_y, const Tensor& param_ema,
            const Tensor& grad_ema, const Tensor& momentum_buffer, const Tensor& param_snapshot,
            const Tensor& grad_snapshot, const Tensor& chunks, const Tensor& coef,
            const Tensor& step, const Tensor& pair_count, const Tensor& stats, const Tensor& ok,
            const std::optional<Tensor>& grad_scale, const Tensor& pair_partials,
            const Tensor& lr, double momentum, double weight_decay, double beta_p, double beta_g,
            double pair_momentum, int64_t period, int64_t m, bool maximize, int64_t normalize,
            int64_t mode) {
  check_chunks(chunks);
  check_params(params, grads);
  TORCH_CHECK(mode >= UPDATE_PAPER && mode <= UPDATE_RELEASED_AFTER_PUSH, "mlbfgs_fused::update: bad mode");
  if (!ok.item<bool>()) return;  // a non-finite step changes nothing (push counts it)
  // docs/design.md, "The step", 4: the group's scale of d.
  const double scale = direction_scale(stats.const_data_ptr<double>(), stats.size(0), normalize);
  const double lr_value = lr.item<double>();
  const bool released = mode != UPDATE_PAPER;
  const bool direction = mode != UPDATE_RELEASED_AVERAGES;
  const int64_t width = 2 * m + 1;
  const int64_t P = chunks.size(0);
  dispatch_types(params[0].scalar_type(), history_s.scalar_type(), "mlbfgs_fused::update", [&](auto t_tag, auto h_tag) {
    using T = typename decltype(t_tag)::type;
    using H = typename decltype(h_tag)::type;
    using C = at::opmath_type<T>;
    const auto param_ptr = data_ptrs<T>(params);
    const auto grad_ptr = grad_ptrs<T>(grads);
    const C inv_scale = inverse_scale<C>(grad_scale);
    const H* hs = history_s.const_data_ptr<H>();
    const H* hy = history_y.const_data_ptr<H>();
    T* P_all = param_ema.data_ptr<T>();
    T* G_all = grad_ema.data_ptr<T>();
    T* buf_all = momentum_buffer.data_ptr<T>();
    const T* P0_all = param_snapshot.const_data_ptr<T>();
    const T* G0_all = grad_snapshot.const_data_ptr<T>();
    const int64_t* table = chunks.const_data_ptr<int64_t>();
    const double* coef_all = coef.const_data_ptr<double>();
    const int64_t* step_ptr = step.const_data_ptr<int64_t>();
    const int64_t* count = pair_count.const_data_ptr<int64_t>();
    double* pair_out = pair_partials.data_ptr<double>();
    const C c_scale = static_cast<C>(scale), c_momentum = static_cast<C>(momentum);
    const C neg_lr = -static_cast<C>(lr_value), c_wd = static_cast<C>(weight_decay);
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      alignas(64) C g[CHUNK], theta[CHUNK], d[CHUNK], row[CHUNK], row2[CHUNK];
      for (int64_t k = begin; k < end; ++k) {
        const Chunk c(table + k * CHUNK_COLUMNS);
        const int64_t n = c.count();
        const int64_t b = c.block;
        const bool first = step_ptr[b] == 0;
        // The candidate's sums where the push follows this pass (after the push the
        // counter already names the next step).
        const bool pair = forms_pair(step_ptr[b], period) &&
                          (mode == UPDATE_PAPER || mode == UPDATE_RELEASED_AVERAGES);
        // paper: P = lerp(P, theta, 1 - beta); released (E1): P = beta P + theta. Both
        // start at their first sample.
        const C w_param = first ? C(1) : static_cast<C>(released ? 1.0 : 1 - beta_p);
        const C w_grad = first ? C(1) : static_cast<C>(released ? 1.0 : 1 - beta_g);
        const C decay_param = first ? C(0) : static_cast<C>(beta_p);
        const C decay_grad = first ? C(0) : static_cast<C>(beta_g);
        T* Pp = P_all + c.start;
        T* Gp = G_all + c.start;
        const T* grad = grad_ptr[c.param];
        if (grad != nullptr && n > 0) {
          T* th_ptr = param_ptr[c.param] + c.local;
          const C* th = as_compute<C, T>(th_ptr, n, theta);  // theta before the update
          chunk_gradient<C, T>(grad + c.local, th_ptr, n, inv_scale, c_wd, maximize, g, d);
          // d = c_g g + sum_i c_s[i] s_i + c_y[i] y_i
          const double* cf = coef_all + b * width;
          const C c_g = static_cast<C>(cf[0]);
          for (int64_t x = 0; x < n; ++x) d[x] = c_g * g[x];
          if (direction) ring_combine<C, H>(d, cf, hs, hy, c, m, n, row, row2);
          // EMAs with the parameters before the update, then momentum and parameters:
          // loops without branches inside, so the compiler vectorizes them.
          if (mode == UPDATE_PAPER) {
            ema_lerp<T, C>(Pp, th, w_param, n);
            ema_lerp<T, C>(Gp, g, w_grad, n);
          } else if (mode == UPDATE_RELEASED_AFTER_PUSH) {
            store<T, C>(Gp, g, n);  // E2: the gradient average restarts at g
          } else {
            ema_decay<T, C>(Pp, th, decay_param, w_param, n);
            ema_decay<T, C>(Gp, g, decay_grad, w_grad, n);
          }
          if (direction) {
            T* bp = buf_all + c.start;
            for (int64_t x = 0; x < n; ++x) {
              const C buf = static_cast<C>(bp[x]) * c_momentum + d[x] * c_scale;
              bp[x] = static_cast<T>(buf);
              th_ptr[x] = static_cast<T>(th[x] + buf * neg_lr);  // th may be th_ptr: same x
            }
          }
        }
        if (pair) {
          // The candidate's s.s, s.y, y.y over the whole block, gradient or not; the
          // push needs these block-wide sums for the damping before it writes the pair.
          const int64_t pc = count[b];
          const C r = pc > 0 ? static_cast<C>(pair_momentum) : C(0);
          const int64_t newest = c.ring((pc - 1 + m) % m);
          const T* P0 = P0_all + c.start;
          const T* G0 = G0_all + c.start;
          double ss = 0.0, sy = 0.0, yy = 0.0;
          for (int64_t x = 0; x < n; ++x) {
            const C s = lerp<C>(static_cast<C>(Pp[x]) - static_cast<C>(P0[x]), static_cast<C>(hs[newest + x]), r);
            const C y = lerp<C>(static_cast<C>(Gp[x]) - static_cast<C>(G0[x]), static_cast<C>(hy[newest + x]), r);
            ss += static_cast<double>(s) * s;
            sy += static_cast<double>(s) * y;
            yy += static_cast<double>(y) * y;
          }
          double* out = pair_out + k * PAIR_COLUMNS;
          out[P_SS] = ss;
          out[P_SY] = sy;
          out[P_YY] = yy;
        }
      }
    });
  });
}

// -- push ---------------------------------------------------------------------------------
// One op on a single process; a rank that holds part of each block (distributed
// "sharded") runs its two halves as push_pairs and commit, so that the pair's sums and
// the Gram rows are completed across ranks in between (docs/design.md, "Distributed").
struct PairDecision {
  bool due = false, forms = false, accepted = false;
  double phi = 0.0;
  int64_t slot = 0;
};

// The per-block decisions, from the update pass's partial sums in chunk order (rows
// [B_FIRST, B_END) of pair_partials).
std::vector<PairDecision> pair_decisions(const Tensor& blocks, const Tensor& pair_partials,
                                         const int64_t* step_ptr, const int64_t* count,
                                         double damping, double sigma_low, double sigma_high,
                                         double eps, int64_t period, int64_t m, bool& any_due) {
  const int64_t B = blocks.size(0);
  const int64_t* btab = blocks.const_data_ptr<int64_t>();
  const double* pp = pair_partials.const_data_ptr<double>();
  std::vector<PairDecision> decision(B);
  any_due = false;
  for (int64_t b = 0; b < B; ++b) {
    PairDecision& dec = decision[b];
    dec.due = pair_due(step_ptr[b], period);
    dec.forms = forms_pair(step_ptr[b], period);
    dec.slot = count[b] % m;
    any_due = any_due || dec.due;
    if (!dec.forms) continue;
    double ss = 0.0, sy = 0.0;
    for (int64_t k = btab[b * BLOCK_COLUMNS + B_FIRST]; k < btab[b * BLOCK_COLUMNS + B_END]; ++k) {
      ss += pp[k * PAIR_COLUMNS + P_SS];
      sy += pp[k * PAIR_COLUMNS + P_SY];
    }
    dec.phi = damping_factor(sy, ss, sigma_low, sigma_high, damping, eps);
    const double curvature = dec.phi * sy + (1.0 - dec.phi) * ss;  // s.yhat
    dec.accepted = std::isfinite(curvature) && curvature > eps;
  }
  return decision;
}

// Per chunk of a block with a pair due: the accepted pair into its ring slot with its
// Gram partials, then the snapshots.
void push_chunks(const std::vector<PairDecision>& decision, const Tensor& param_ema,
                 const Tensor& grad_ema, const Tensor& param_snapshot, const Tensor& grad_snapshot,
                 const Tensor& history_s, const Tensor& history_y, const Tensor& chunks,
                 const Tensor& gram_partials, const int64_t* count, double pair_momentum,
                 int64_t m) {
  const int64_t P = chunks.size(0);
  const int64_t gw = 4 * m;
  dispatch_types(param_ema.scalar_type(), history_s.scalar_type(), "mlbfgs_fused::push", [&](auto t_tag, auto h_tag) {
    using T = typename decltype(t_tag)::type;
    using H = typename decltype(h_tag)::type;
    using C = at::opmath_type<T>;
    H* hs = history_s.data_ptr<H>();
    H* hy = history_y.data_ptr<H>();
    const T* P_all = param_ema.const_data_ptr<T>();
    const T* G_all = grad_ema.const_data_ptr<T>();
    T* P0_all = param_snapshot.data_ptr<T>();
    T* G0_all = grad_snapshot.data_ptr<T>();
    const int64_t* table = chunks.const_data_ptr<int64_t>();
    double* gram_out = gram_partials.data_ptr<double>();
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      alignas(64) C s[CHUNK], yhat[CHUNK], row[CHUNK], row2[CHUNK];
      for (int64_t k = begin; k < end; ++k) {
        const Chunk c(table + k * CHUNK_COLUMNS);
        const PairDecision& dec = decision[c.block];
        if (!dec.due) continue;
        const int64_t n = c.count();
        const T* Pp = P_all + c.start;
        const T* Gp = G_all + c.start;
        T* P0 = P0_all + c.start;
        T* G0 = G0_all + c.start;
        if (dec.accepted) {
          const int64_t pc = count[c.block];
          const C r = pc > 0 ? static_cast<C>(pair_momentum) : C(0);
          const C phi = static_cast<C>(dec.phi);
          const int64_t newest = c.ring((pc - 1 + m) % m);
          H* s_row = hs + c.ring(dec.slot);
          H* y_row = hy + c.ring(dec.slot);
          for (int64_t x = 0; x < n; ++x) {
            const C sx = lerp<C>(static_cast<C>(Pp[x]) - static_cast<C>(P0[x]), static_cast<C>(hs[newest + x]), r);
            const C yx = lerp<C>(static_cast<C>(Gp[x]) - static_cast<C>(G0[x]), static_cast<C>(hy[newest + x]), r);
            // The rows as stored: the Gram matrices stay those of the ring.
            s_row[x] = static_cast<H>(sx);
            y_row[x] = static_cast<H>(lerp<C>(sx, yx, phi));
            s[x] = static_cast<C>(s_row[x]);
            yhat[x] = static_cast<C>(y_row[x]);
          }
          double* out = gram_out + k * gw;
          for (int64_t j = 0; j < m; ++j) {
            const bool new_row = j == dec.slot;
            const C* s_j = new_row ? s : as_compute<C, H>(hs + c.ring(j), n, row);
            const C* y_j = new_row ? yhat : as_compute<C, H>(hy + c.ring(j), n, row2);
            const auto [ss, sy_col] = dot2<C>(s_j, s, yhat, n);  // S S^T [slot, j], S Y^T [j, slot]
            const auto [sy_row, yy] = dot2<C>(y_j, s, yhat, n);  // S Y^T [slot, j], Y Y^T [slot, j]
            out[j] = ss;
            out[m + j] = sy_col;
            out[2 * m + j] = sy_row;
            out[3 * m + j] = yy;
          }
        }
        std::copy(Pp, Pp + n, P0);
        std::copy(Gp, Gp + n, G0);
      }
    });
  });
}

// Counters, and the accepted pairs' Gram rows from the chunk sums in chunk order (rows
// [B_FIRST, B_END) of gram_partials).
void commit_blocks(const std::vector<PairDecision>& decision, const Tensor& blocks,
                   const Tensor& gram_partials, const Tensor& gram, int64_t* step_ptr,
                   int64_t* count, int64_t* skipped_p, int64_t m) {
  const int64_t B = blocks.size(0);
  const int64_t* btab = blocks.const_data_ptr<int64_t>();
  const double* gp = gram_partials.const_data_ptr<double>();
  double* gram_ptr = gram.data_ptr<double>();
  std::vector<double> rows(4 * m);
  for (int64_t b = 0; b < B; ++b) {
    const PairDecision& dec = decision[b];
    step_ptr[b] += 1;
    if (!dec.forms) continue;
    if (!dec.accepted) {
      skipped_p[b] += 1;
      continue;
    }
    std::fill(rows.begin(), rows.end(), 0.0);
    for (int64_t k = btab[b * BLOCK_COLUMNS + B_FIRST]; k < btab[b * BLOCK_COLUMNS + B_END]; ++k) {
      for (int64_t j = 0; j < 4 * m; ++j) rows[j] += gp[k * 4 * m + j];
    }
    double* SS = gram_ptr + b * 3 * m * m;
    double* SY = SS + m * m;
    double* YY = SY + m * m;
    const int64_t slot = dec.slot;
    for (int64_t j = 0; j < m; ++j) {
      SS[slot * m + j] = SS[j * m + slot] = rows[j];
      SY[j * m + slot] = rows[m + j];
      SY[slot * m + j] = rows[2 * m + j];
      YY[slot * m + j] = YY[j * m + slot] = rows[3 * m + j];
    }
    count[b] += 1;
  }
}

void push(const Tensor& param_ema, const Tensor& grad_ema, const Tensor& param_snapshot,
          const Tensor& grad_snapshot, const Tensor& history_s, const Tensor& history_y,
          const Tensor& gram, const Tensor& chunks, const Tensor& blocks,
          const Tensor& pair_partials, const Tensor& gram_partials, const Tensor& ok,
          const Tensor& step, const Tensor& pair_count, const Tensor& skipped_pairs,
          const Tensor& skipped_steps, double pair_momentum, double damping, double sigma_low,
          double sigma_high, double eps, int64_t period, int64_t m) {
  check_chunks(chunks);
  const int64_t B = blocks.size(0);
  int64_t* step_ptr = step.data_ptr<int64_t>();
  int64_t* count = pair_count.data_ptr<int64_t>();
  int64_t* skipped_s = skipped_steps.data_ptr<int64_t>();
  if (!ok.item<bool>()) {
    for (int64_t b = 0; b < B; ++b) skipped_s[b] += 1;
    return;
  }
  bool any_due = false;
  const auto decision = pair_decisions(blocks, pair_partials, step_ptr, count, damping, sigma_low,
                                       sigma_high, eps, period, m, any_due);
  if (any_due) {
    push_chunks(decision, param_ema, grad_ema, param_snapshot, grad_snapshot, history_s, history_y,
                chunks, gram_partials, count, pair_momentum, m);
  }
  commit_blocks(decision, blocks, gram_partials, gram, step_ptr, count,
                skipped_pairs.data_ptr<int64_t>(), m);
}

// push's first half: the pairs and snapshots, counters untouched.
void push_pairs(const Tensor& param_ema, const Tensor& grad_ema, const Tensor& param_snapshot,
                const Tensor& grad_snapshot, const Tensor& history_s, const Tensor& history_y,
                const Tensor& chunks, const Tensor& blocks, const Tensor& pair_partials,
                const Tensor& gram_partials, const Tensor& ok, const Tensor& step,
                const Tensor& pair_count, double pair_momentum, double damping, double sigma_low,
                double sigma_high, double eps, int64_t period, int64_t m) {
  check_chunks(chunks);
  if (!ok.item<bool>()) return;
  const int64_t* count = pair_count.const_data_ptr<int64_t>();
  bool any_due = false;
  const auto decision = pair_decisions(blocks, pair_partials, step.const_data_ptr<int64_t>(), count,
                                       damping, sigma_low, sigma_high, eps, period, m, any_due);
  if (any_due) {
    push_chunks(decision, param_ema, grad_ema, param_snapshot, grad_snapshot, history_s, history_y,
                chunks, gram_partials, count, pair_momentum, m);
  }
}

// push's second half: the counters and the accepted pairs' Gram rows.
void commit(const Tensor& gram, const Tensor& blocks, const Tensor& pair_partials,
            const Tensor& gram_partials, const Tensor& ok, const Tensor& step,
            const Tensor& pair_count, const Tensor& skipped_pairs, const Tensor& skipped_steps,
            double damping, double sigma_low, double sigma_high, double eps, int64_t period,
            int64_t m) {
  const int64_t B = blocks.size(0);
  int64_t* step_ptr = step.data_ptr<int64_t>();
  int64_t* count = pair_count.data_ptr<int64_t>();
  if (!ok.item<bool>()) {
    int64_t* skipped_s = skipped_steps.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) skipped_s[b] += 1;
    return;
  }
  bool any_due = false;
  const auto decision = pair_decisions(blocks, pair_partials, step_ptr, count, damping, sigma_low,
                                       sigma_high, eps, period, m, any_due);
  commit_blocks(decision, blocks, gram_partials, gram, step_ptr, count,
                skipped_pairs.data_ptr<int64_t>(), m);
}

// Per block, the sum of its rows [B_FIRST, B_END) of a partial-sum matrix, in chunk
// order (as two_loop and push add them): what a rank holding part of each block
// completes across ranks before two_loop, push_pairs and commit read it back through
// a block table with one row per block.
void block_sums(const Tensor& partials, const Tensor& blocks, const Tensor& sums) {
  const int64_t B = blocks.size(0);
  const int64_t width = sums.size(1);
  TORCH_CHECK(sums.size(0) == B && (partials.size(0) == 0 || partials.size(1) == width),
              "mlbfgs_fused::block_sums: shapes do not match");
  const int64_t* btab = blocks.const_data_ptr<int64_t>();
  const double* part = partials.const_data_ptr<double>();
  double* out = sums.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    double* row = out + b * width;
    std::fill(row, row + width, 0.0);
    for (int64_t k = btab[b * BLOCK_COLUMNS + B_FIRST]; k < btab[b * BLOCK_COLUMNS + B_END]; ++k) {
      for (int64_t j = 0; j < width; ++j) row[j] += part[k * width + j];
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mlbfgs_fused_native, CPU, m) {
  m.impl("gradient_dots", &gradient_dots);
  m.impl("two_loop", &two_loop);
  m.impl("update", &update);
  m.impl("push", &push);
  m.impl("push_pairs", &push_pairs);
  m.impl("commit", &commit);
  m.impl("block_sums", &block_sums);
}

}  // namespace mlbfgs_fused
