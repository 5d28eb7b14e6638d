// LBFGS's passes on the CPU (the contract: csrc/lbfgs.h; schemas: csrc/ops.cpp).
//
// As the mL-BFGS passes (csrc/cpu/passes.cpp): at::parallel_for over the fixed chunks
// of csrc/ops.h, each chunk in stack buffers of the arithmetic type C (float for
// float32 parameters, double for float64) with at::vec::Vectorized inner loops, and
// float64 partial sums per chunk added in chunk order, so every result is the same
// for any thread count. The ring rows are read a few at a time over a chunk (see
// ring_dots). Nothing is allocated.
//
// The user's parameters and gradients are reached through the plan's address table
// (int64 [count, 2]: the data_ptr of each parameter and of its gradient, 0 for none),
// dense and in the arena's element order. Bytes per element (E parameter bytes, H
// history bytes, m slots, float32 and m = 10 in brackets):
//   lbfgs_gradient_dots  reads E (grad) + 2 m H, and with a pair candidate 2 E more (d, prev)
//                        [(8m + 12) N = 92 N]
//   lbfgs_direction      reads E (grad) + 2 m H + 2 E (d, prev), writes 2 E (d, prev) and,
//                        with a pair accepted, 2 H (its slot); moving the parameters
//                        reads and writes E more [(8m + 36) N = 116 N with the move]
//   lbfgs_move           reads 2 E, writes E
// so an iteration without line search moves (16 m + 48) N bytes, (8 m + 48) N with a
// 16-bit history.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "../dispatch.h"
#include "../lbfgs.h"
#include "chunk.h"

namespace mlbfgs_fused {
namespace lbfgs {
namespace {

using at::Tensor;
using cpu::as_compute;
using cpu::lane_sum;

// out[q] = a_q . b_q over n elements with float64 products (no finite input overflows
// them), Q dots in one pass: float32 widened four lanes at a time where AVX2 is built in.
template <int Q, typename C>
inline void products64(const C* const (&a)[Q], const C* const (&b)[Q], int64_t n, double (&out)[Q]) {
  int64_t x = 0;
  for (int q = 0; q < Q; ++q) out[q] = 0.0;
  if constexpr (std::is_same_v<C, double>) {
    using Vec = at::vec::Vectorized<double>;
    constexpr int64_t W = Vec::size();
    Vec acc[Q];
    for (int q = 0; q < Q; ++q) acc[q] = Vec(0.0);
    for (; x + W <= n; x += W) {
      for (int q = 0; q < Q; ++q) acc[q] = at::vec::fmadd(Vec::loadu(a[q] + x), Vec::loadu(b[q] + x), acc[q]);
    }
    for (int q = 0; q < Q; ++q) out[q] = lane_sum<double>(acc[q]);
  } else {
#if defined(__AVX2__) && defined(__FMA__)
    if constexpr (std::is_same_v<C, float>) {
      __m256d acc[Q];
      for (int q = 0; q < Q; ++q) acc[q] = _mm256_setzero_pd();
      for (; x + 4 <= n; x += 4) {
        for (int q = 0; q < Q; ++q) {
          acc[q] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(a[q] + x)), _mm256_cvtps_pd(_mm_loadu_ps(b[q] + x)),
                                   acc[q]);
        }
      }
      for (int q = 0; q < Q; ++q) {
        double lanes[4];
        _mm256_storeu_pd(lanes, acc[q]);
        out[q] = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
      }
    }
#endif
  }
  for (; x < n; ++x) {
    for (int q = 0; q < Q; ++q) out[q] += static_cast<double>(a[q][x]) * static_cast<double>(b[q][x]);
  }
}

// max |x| over n elements (exact in any type).
template <typename C>
inline C abs_max(const C* v, int64_t n) {
  using Vec = at::vec::Vectorized<C>;
  constexpr int64_t W = Vec::size();
  Vec acc(C(0));
  int64_t x = 0;
  for (; x + W <= n; x += W) acc = at::vec::maximum(acc, Vec::loadu(v + x).abs());
  C lanes[W];
  acc.store(lanes);
  C top = C(0);
  for (int64_t l = 0; l < W; ++l) top = std::max(top, lanes[l]);
  for (; x < n; ++x) top = std::max(top, std::abs(v[x]));
  return top;
}

template <typename H>
inline const H* ring_row(const H* hs, const H* hy, const Chunk& c, int64_t i, int64_t m) {
  return i < m ? hs + c.ring(i) : hy + c.ring(i - m);
}

// Whether ring rows of H are widened in registers (16-bit rows under float32 arithmetic).
template <typename C, typename H>
constexpr bool narrow16() {
  return std::is_same_v<C, float> && (std::is_same_v<H, at::BFloat16> || std::is_same_v<H, at::Half>);
}

// Ring rows in groups of RB, each group streamed over the whole chunk at once: a few
// long streams per pass keep the memory system busy where one row at a time restarts
// its stream at every chunk and all 2m rows at once overwhelm the prefetchers (measured
// on one core: see bench/README.md, "LBFGS"). Partial sums stay per chunk, so the
// results do not depend on the thread count.
constexpr int RB = 4;

// out[k * 2m + i] = v_k . r_i over the chunk for the K vectors v_k and the ring rows
// r_i = s_0 .. s_{m-1}, y_0 .. y_{m-1}; rows of unheld slots are 0 and not read.
template <typename C, typename H, int K>
inline void ring_dots(const C* const* v, const H* hs, const H* hy, const Chunk& c, int64_t m,
                      int64_t held, int64_t n, double* out, C* rows_buffer) {
  using Vec = at::vec::Vectorized<C>;
  constexpr int64_t W = Vec::size();
  for (int k = 0; k < K; ++k) {
    for (int64_t i = 0; i < 2 * m; ++i) out[k * 2 * m + i] = 0.0;
  }
  // The held rows, s_0 .. s_{held-1} then y_0 .. y_{held-1} (held slots are the first ones).
  const int64_t count = 2 * held;
  auto rows = [&](int64_t q) { return q < held ? q : m + q - held; };
  if constexpr (narrow16<C, H>()) {
    // A 16-bit ring under float32 arithmetic: widened in registers, 2 W elements a step.
    using HVec = at::vec::Vectorized<H>;
    static_assert(HVec::size() == 2 * W, "a 16-bit vector widens to two float vectors");
    for (int64_t first = 0; first < count; first += RB) {
      const int64_t r_n = std::min<int64_t>(RB, count - first);
      const H* r[RB];
      for (int64_t q = 0; q < RB; ++q) r[q] = ring_row(hs, hy, c, rows(first + std::min(q, r_n - 1)), m);
      Vec acc[RB][K];
      for (int q = 0; q < RB; ++q) {
        for (int k = 0; k < K; ++k) acc[q][k] = Vec(C(0));
      }
      int64_t x = 0;
      for (; x + 2 * W <= n; x += 2 * W) {
        Vec lo[K], hi[K];
        for (int k = 0; k < K; ++k) {
          lo[k] = Vec::loadu(v[k] + x);
          hi[k] = Vec::loadu(v[k] + x + W);
        }
        for (int q = 0; q < RB; ++q) {
          const auto [r_lo, r_hi] = at::vec::convert_to_float<H>(HVec::loadu(r[q] + x));
          for (int k = 0; k < K; ++k) acc[q][k] = at::vec::fmadd(hi[k], r_hi, at::vec::fmadd(lo[k], r_lo, acc[q][k]));
        }
      }
      for (int64_t q = 0; q < r_n; ++q) {
        const int64_t i = rows(first + q);
        for (int k = 0; k < K; ++k) {
          double total = lane_sum<C>(acc[q][k]);
          for (int64_t t = x; t < n; ++t) total += static_cast<double>(v[k][t] * static_cast<C>(r[q][t]));
          out[k * 2 * m + i] = total;
        }
      }
    }
    return;
  }
  for (int64_t first = 0; first < count; first += RB) {
    const int64_t r_n = std::min<int64_t>(RB, count - first);
    const C* r[RB];
    for (int64_t q = 0; q < RB; ++q) {
      const int64_t i = rows(first + std::min(q, r_n - 1));  // a short group repeats its last row
      r[q] = as_compute<C, H>(ring_row(hs, hy, c, i, m), n, rows_buffer + q * CHUNK);
    }
    Vec acc[RB][K];
    for (int q = 0; q < RB; ++q) {
      for (int k = 0; k < K; ++k) acc[q][k] = Vec(C(0));
    }
    int64_t x = 0;
    for (; x + W <= n; x += W) {
      Vec vv[K];
      for (int k = 0; k < K; ++k) vv[k] = Vec::loadu(v[k] + x);
      for (int q = 0; q < RB; ++q) {
        const Vec rv = Vec::loadu(r[q] + x);
        for (int k = 0; k < K; ++k) acc[q][k] = at::vec::fmadd(vv[k], rv, acc[q][k]);
      }
    }
    for (int64_t q = 0; q < r_n; ++q) {
      const int64_t i = rows(first + q);
      for (int k = 0; k < K; ++k) {
        double total = lane_sum<C>(acc[q][k]);
        for (int64_t t = x; t < n; ++t) total += static_cast<double>(v[k][t] * r[q][t]);
        out[k * 2 * m + i] = total;
      }
    }
  }
}

// d += sum_i c_s[i] s_i + c_y[i] y_i over the chunk for the held slots (the first
// `held`; the others' coefficients are 0 and they are not read); cf = (c_g, c_s, c_y).
// RB rows a group, as ring_dots.
template <typename C, typename H>
inline void ring_combine(C* d, const double* cf, const H* hs, const H* hy, const Chunk& c, int64_t m,
                         int64_t held, int64_t n, C* rows_buffer) {
  using Vec = at::vec::Vectorized<C>;
  constexpr int64_t W = Vec::size();
  const int64_t count = 2 * held;
  auto rows = [&](int64_t q) { return q < held ? q : m + q - held; };
  if constexpr (narrow16<C, H>()) {
    using HVec = at::vec::Vectorized<H>;
    for (int64_t first = 0; first < count; first += RB) {
      const int64_t r_n = std::min<int64_t>(RB, count - first);
      const H* r[RB];
      C coef[RB];
      for (int64_t q = 0; q < RB; ++q) {
        const int64_t i = rows(first + std::min(q, r_n - 1));
        r[q] = ring_row(hs, hy, c, i, m);
        coef[q] = q < r_n ? static_cast<C>(cf[1 + i]) : C(0);
      }
      int64_t x = 0;
      for (; x + 2 * W <= n; x += 2 * W) {
        Vec lo = Vec::loadu(d + x), hi = Vec::loadu(d + x + W);
        for (int q = 0; q < RB; ++q) {
          const auto [r_lo, r_hi] = at::vec::convert_to_float<H>(HVec::loadu(r[q] + x));
          lo = at::vec::fmadd(Vec(coef[q]), r_lo, lo);
          hi = at::vec::fmadd(Vec(coef[q]), r_hi, hi);
        }
        lo.store(d + x);
        hi.store(d + x + W);
      }
      for (; x < n; ++x) {
        for (int q = 0; q < RB; ++q) d[x] += coef[q] * static_cast<C>(r[q][x]);
      }
    }
    return;
  }
  for (int64_t first = 0; first < count; first += RB) {
    const int64_t r_n = std::min<int64_t>(RB, count - first);
    const C* r[RB];
    C coef[RB];
    for (int64_t q = 0; q < RB; ++q) {
      const int64_t i = rows(first + std::min(q, r_n - 1));
      r[q] = as_compute<C, H>(ring_row(hs, hy, c, i, m), n, rows_buffer + q * CHUNK);
      coef[q] = q < r_n ? static_cast<C>(cf[1 + i]) : C(0);  // a repeated row adds 0
    }
    Vec vc[RB];
    for (int q = 0; q < RB; ++q) vc[q] = Vec(coef[q]);
    int64_t x = 0;
    for (; x + W <= n; x += W) {
      Vec acc = Vec::loadu(d + x);
      for (int q = 0; q < RB; ++q) acc = at::vec::fmadd(vc[q], Vec::loadu(r[q] + x), acc);
      acc.store(d + x);
    }
    for (; x < n; ++x) {
      for (int q = 0; q < RB; ++q) d[x] += coef[q] * r[q][x];
    }
  }
}

void check_tables(const Tensor& addresses, const Tensor& chunks) {
  TORCH_CHECK(addresses.dtype() == at::kLong && addresses.is_contiguous() && addresses.dim() == 2 &&
                  addresses.size(1) == 2 && addresses.device().is_cpu(),
              "mlbfgs_fused: malformed address table");
  TORCH_CHECK(chunks.dtype() == at::kLong && chunks.is_contiguous() && chunks.dim() == 2 &&
                  chunks.size(1) == CHUNK_COLUMNS,
              "mlbfgs_fused: malformed chunk table");
}

// The chunk's gradient as C values into g: from `source` (arena order, effective) or the
// user's gradient (negated under maximize; zeros where there is none).
template <typename C, typename T>
inline void chunk_gradient(const int64_t* table, const T* source, const Chunk& c, bool maximize, C* g) {
  const int64_t n = c.count();
  if (source != nullptr) {
    const C* src = as_compute<C, T>(source + c.start, n, g);
    if (src != g) std::copy(src, src + n, g);
    return;
  }
  const T* grad = reinterpret_cast<const T*>(table[c.param * 2 + 1]);
  if (grad == nullptr) {
    std::fill(g, g + n, C(0));
    return;
  }
  const C* src = as_compute<C, T>(grad + c.local, n, g);
  if (maximize) {
    for (int64_t x = 0; x < n; ++x) g[x] = -src[x];
  } else if (src != g) {
    std::copy(src, src + n, g);
  }
}

template <typename H, typename C>
inline C as_stored(C x) {
  return static_cast<C>(static_cast<H>(x));
}

// -- lbfgs_gradient_dots ------------------------------------------------------------------
void lbfgs_gradient_dots(const Tensor& addresses, const std::optional<Tensor>& source,
                         const Tensor& history_s, const Tensor& history_y, const Tensor& direction,
                         const Tensor& prev, const Tensor& chunks, const Tensor& pair_count,
                         const Tensor& partials, double alpha, bool maximize, bool pair, bool ring,
                         bool want_gd, bool want_l1, int64_t m) {
  check_tables(addresses, chunks);
  const int64_t W = partial_width(m);
  const int64_t P = chunks.size(0);
  TORCH_CHECK(partials.dtype() == at::kDouble && partials.is_contiguous() && partials.size(0) == P &&
                  partials.size(1) == W,
              "mlbfgs_fused::lbfgs_gradient_dots: partials must be float64 [chunks, ", W, "]");
  const int64_t held = ring ? std::min<int64_t>(*pair_count.const_data_ptr<int64_t>(), m) : 0;
  dispatch_types(direction.scalar_type(), history_s.scalar_type(), "mlbfgs_fused::lbfgs_gradient_dots",
                 [&](auto t_tag, auto h_tag) {
    using T = typename decltype(t_tag)::type;
    using H = typename decltype(h_tag)::type;
    using C = at::opmath_type<T>;
    const int64_t* table = addresses.const_data_ptr<int64_t>();
    const T* src = source.has_value() && source->defined() ? source->const_data_ptr<T>() : nullptr;
    const H* hs = history_s.const_data_ptr<H>();
    const H* hy = history_y.const_data_ptr<H>();
    const T* d_all = direction.const_data_ptr<T>();
    const T* prev_all = prev.const_data_ptr<T>();
    const int64_t* ctab = chunks.const_data_ptr<int64_t>();
    double* out_all = partials.data_ptr<double>();
    const C c_alpha = static_cast<C>(alpha);
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      alignas(64) C g[CHUNK], s[CHUNK], y[CHUNK];
      // Widened rows of a ring of another dtype (16-bit rows are widened in registers).
      alignas(64) C row[std::is_same_v<C, H> || narrow16<C, H>() ? 1 : RB * CHUNK];
      for (int64_t k = begin; k < end; ++k) {
        const Chunk c(ctab + k * CHUNK_COLUMNS);
        const int64_t n = c.count();
        double* out = out_all + k * W;
        double* sc = out + 6 * m;
        chunk_gradient<C, T>(table, src, c, maximize, g);
        const T* dp = d_all + c.start;
        const C* d = as_compute<C, T>(dp, n, s);  // s is free until the pair is formed
        {
          const C* a[2] = {g, g};
          const C* b[2] = {g, d};
          double dots[2];
          if (want_gd) {
            products64<2, C>(a, b, n, dots);
            sc[P_GD] = dots[1];
          } else {
            const C* a1[1] = {g};
            double gg[1];
            products64<1, C>(a1, a1, n, gg);
            dots[0] = gg[0];
          }
          sc[P_GG] = dots[0];
        }
        sc[P_GMAX] = static_cast<double>(abs_max<C>(g, n));
        if (want_l1) {
          double l1 = 0.0;
          for (int64_t x = 0; x < n; ++x) l1 += std::abs(static_cast<double>(g[x]));
          sc[P_GL1] = l1;
        }
        if (pair) {
          const T* pp = prev_all + c.start;
          for (int64_t t = 0; t < n; ++t) {
            y[t] = as_stored<H, C>(g[t] - static_cast<C>(pp[t]));
          }
          for (int64_t t = 0; t < n; ++t) {  // after y: d may be s itself
            s[t] = as_stored<H, C>(c_alpha * static_cast<C>(d[t]));
          }
          const C* a[5] = {s, s, y, s, y};
          const C* b[5] = {s, y, y, g, g};
          double dots[5];
          products64<5, C>(a, b, n, dots);
          const Scalar columns[5] = {P_SS, P_SY, P_YY, P_SG, P_YG};
          for (int q = 0; q < 5; ++q) sc[columns[q]] = dots[q];
        }
        if (ring) {
          if (pair) {
            const C* v[3] = {g, s, y};
            ring_dots<C, H, 3>(v, hs, hy, c, m, held, n, out, row);
          } else {
            const C* v[1] = {g};
            ring_dots<C, H, 1>(v, hs, hy, c, m, held, n, out, row);
          }
        }
      }
    });
  });
}

// -- lbfgs_two_loop -----------------------------------------------------------------------
void lbfgs_two_loop(const Tensor& partials, const Tensor& arena_rows_t, const Tensor& scales_t,
                    const std::optional<Tensor>& loss, const Tensor& gram, const Tensor& pair_count,
                    const Tensor& sums, const Tensor& model, const Tensor& coef, const Tensor& read,
                    bool pair, bool direction, int64_t m) {
  const int64_t A = scales_t.numel();
  const int64_t W = partial_width(m);
  TORCH_CHECK(arena_rows_t.numel() == A + 1 && arena_rows_t.dtype() == at::kLong && scales_t.dtype() == at::kDouble,
              "mlbfgs_fused::lbfgs_two_loop: arena_rows int64 [A + 1], scales float64 [A]");
  const int64_t* arena_rows = arena_rows_t.const_data_ptr<int64_t>();
  const double* scales = scales_t.const_data_ptr<double>();
  TORCH_CHECK(sums.numel() >= (A + 1) * W && model.numel() >= model_size(m) && coef.numel() >= 2 * m + 1 &&
                  read.numel() >= READ_FIXED + A,
              "mlbfgs_fused::lbfgs_two_loop: scratch too small");
  const double* part = partials.const_data_ptr<double>();
  double* s = sums.data_ptr<double>();
  double* total = s + A * W;
  // Columns needed: the scalars always, the ring's dots of g with a direction, of s and
  // y with a pair.
  const int64_t ring_hi = direction ? (pair ? 6 * m : 2 * m) : 0;
  std::fill(total, total + W, 0.0);
  for (int64_t a = 0; a < A; ++a) {
    double* row = s + a * W;
    std::fill(row, row + W, 0.0);
    for (int64_t k = arena_rows[a]; k < arena_rows[a + 1]; ++k) {
      const double* p = part + k * W;
      for (int64_t j = 0; j < ring_hi; ++j) row[j] += p[j];
      for (int64_t j = 6 * m; j < W; ++j) {
        row[j] = max_column(j, m) ? std::max(row[j], p[j]) : row[j] + p[j];
      }
    }
    for (int64_t j = 0; j < W; ++j) total[j] = max_column(j, m) ? std::max(total[j], row[j]) : total[j] + row[j];
  }
  double* r = read.data_ptr<double>();
  if (loss.has_value() && loss->defined()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loss->scalar_type(), "lbfgs_two_loop", [&] {
      r[READ_LOSS] = static_cast<double>(*loss->const_data_ptr<scalar_t>());
    });
  }
  lbfgs_read(s, A, scales, m, r);
  if (direction) {
    lbfgs_model(s, A, scales, gram.const_data_ptr<double>(), *pair_count.const_data_ptr<int64_t>(), m, pair,
                model.data_ptr<double>(), coef.data_ptr<double>(), r);
  }
}

// -- lbfgs_direction ----------------------------------------------------------------------
void lbfgs_direction(const Tensor& addresses, const std::optional<Tensor>& source, const Tensor& history_s,
                     const Tensor& history_y, const Tensor& direction, const Tensor& prev,
                     const std::optional<Tensor>& saved, const Tensor& chunks, const Tensor& coef,
                     const Tensor& model, const Tensor& partials, const std::optional<Tensor>& gram,
                     const std::optional<Tensor>& pair_count, double alpha, double move, bool push,
                     bool combine, bool do_move, bool save, bool maximize, int64_t m) {
  check_tables(addresses, chunks);
  const int64_t W = partial_width(m);
  const int64_t P = chunks.size(0);
  const double* fixed = model.const_data_ptr<double>() + 3 * m * m;
  const bool accept = push && fixed[MODEL_ACCEPT] > 0.5;
  const int64_t slot = static_cast<int64_t>(fixed[MODEL_SLOT]);
  // The held slots of the ring the coefficients are over (the pair's, if any, included).
  const int64_t held = std::min<int64_t>(static_cast<int64_t>(fixed[MODEL_COUNT]), m);
  TORCH_CHECK(!save || (saved.has_value() && saved->defined()), "mlbfgs_fused::lbfgs_direction: no saved buffer");
  dispatch_types(direction.scalar_type(), history_s.scalar_type(), "mlbfgs_fused::lbfgs_direction",
                 [&](auto t_tag, auto h_tag) {
    using T = typename decltype(t_tag)::type;
    using H = typename decltype(h_tag)::type;
    using C = at::opmath_type<T>;
    const int64_t* table = addresses.const_data_ptr<int64_t>();
    const T* src = source.has_value() && source->defined() ? source->const_data_ptr<T>() : nullptr;
    H* hs = history_s.data_ptr<H>();
    H* hy = history_y.data_ptr<H>();
    T* d_all = direction.data_ptr<T>();
    T* prev_all = prev.data_ptr<T>();
    T* saved_all = save ? saved->data_ptr<T>() : nullptr;
    const int64_t* ctab = chunks.const_data_ptr<int64_t>();
    const double* cf = coef.const_data_ptr<double>();
    double* out_all = partials.data_ptr<double>();
    const C c_alpha = static_cast<C>(alpha), c_move = static_cast<C>(move), c_g = static_cast<C>(cf[0]);
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      alignas(64) C g[CHUNK], d[CHUNK];
      alignas(64) C row[std::is_same_v<C, H> || narrow16<C, H>() ? 1 : RB * CHUNK];
      for (int64_t k = begin; k < end; ++k) {
        const Chunk c(ctab + k * CHUNK_COLUMNS);
        const int64_t n = c.count();
        chunk_gradient<C, T>(table, src, c, maximize, g);
        T* dp = d_all + c.start;
        T* pp = prev_all + c.start;
        if (accept) {  // the pair, as the ring stores it, into its slot
          H* s_row = hs + c.ring(slot);
          H* y_row = hy + c.ring(slot);
          for (int64_t x = 0; x < n; ++x) {
            s_row[x] = static_cast<H>(c_alpha * static_cast<C>(dp[x]));
            y_row[x] = static_cast<H>(g[x] - static_cast<C>(pp[x]));
          }
        }
        if (!combine) continue;
        for (int64_t x = 0; x < n; ++x) d[x] = c_g * g[x];
        ring_combine<C, H>(d, cf, hs, hy, c, m, held, n, row);
        T* theta = reinterpret_cast<T*>(table[c.param * 2]) + c.local;
        T* sp = save ? saved_all + c.start : nullptr;
        for (int64_t x = 0; x < n; ++x) {
          dp[x] = static_cast<T>(d[x]);
          pp[x] = static_cast<T>(g[x]);
        }
        const C dmax = abs_max<C>(as_compute<C, T>(dp, n, d), n);
        if (save) std::copy(theta, theta + n, sp);
        if (do_move) {
          for (int64_t x = 0; x < n; ++x) {
            theta[x] = static_cast<T>(static_cast<C>(theta[x]) + c_move * static_cast<C>(dp[x]));
          }
        }
        out_all[k * W + 6 * m + P_DMAX] = static_cast<double>(dmax);
      }
    });
  });
  if (push && gram.has_value() && gram->defined()) {  // the model becomes the state
    std::copy(model.const_data_ptr<double>(), model.const_data_ptr<double>() + 3 * m * m, gram->data_ptr<double>());
    *pair_count->data_ptr<int64_t>() = static_cast<int64_t>(fixed[MODEL_COUNT]);
  }
}

// -- lbfgs_move -----------------------------------------------------------------------------
void lbfgs_move(const Tensor& addresses, const std::optional<Tensor>& saved, const Tensor& direction,
                const Tensor& chunks, double alpha) {
  check_tables(addresses, chunks);
  const int64_t P = chunks.size(0);
  AT_DISPATCH_FLOATING_TYPES(direction.scalar_type(), "mlbfgs_fused::lbfgs_move", [&] {
    using T = scalar_t;
    using C = at::opmath_type<T>;
    const int64_t* table = addresses.const_data_ptr<int64_t>();
    const T* saved_all = saved.has_value() && saved->defined() ? saved->const_data_ptr<T>() : nullptr;
    const T* d_all = direction.const_data_ptr<T>();
    const int64_t* ctab = chunks.const_data_ptr<int64_t>();
    const C c_alpha = static_cast<C>(alpha);
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const Chunk c(ctab + k * CHUNK_COLUMNS);
        T* theta = reinterpret_cast<T*>(table[c.param * 2]) + c.local;
        const T* base = saved_all != nullptr ? saved_all + c.start : theta;
        const T* dp = d_all + c.start;
        for (int64_t x = 0; x < c.count(); ++x) {
          theta[x] = static_cast<T>(static_cast<C>(base[x]) + c_alpha * static_cast<C>(dp[x]));
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(mlbfgs_fused_native, CPU, m) {
  m.impl("lbfgs_gradient_dots", &lbfgs_gradient_dots);
  m.impl("lbfgs_two_loop", &lbfgs_two_loop);
  m.impl("lbfgs_direction", &lbfgs_direction);
  m.impl("lbfgs_move", &lbfgs_move);
}

}  // namespace lbfgs
}  // namespace mlbfgs_fused
