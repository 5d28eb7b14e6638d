// The fused mL-BFGS passes on the CPU (schemas and order in csrc/ops.cpp), and the whole
// step as one call (csrc/cpu/step.h).
//
// Each pass runs at::parallel_for over the chunks of csrc/ops.h. A chunk is walked in
// sub-blocks of at most SB elements: every stream the pass reads (gradient, parameters,
// averages, the 2m ring rows) is read once, a sub-block at a time, and everything the
// sub-block needs is done while its tiles are in L1 (docs/design.md, "The C++ and CUDA
// backends"). The inner loops are at::vec::Vectorized, 16-bit data widened a vector at
// a time as it is loaded, and keep several independent accumulator chains (rows inside
// the loop over vectors for the dots, vectors inside the loop over rows for the
// combination), so they run at the FMA units' throughput rather than their latency.
// Reductions go to a per-chunk float64 row and are added per block in chunk order;
// within a chunk each product goes to an accumulator chosen by its position in the
// chunk: the same bits for any thread count and any sub-block size.
//
// Bytes per element (E parameter bytes, H history bytes, m slots; float32, m = 10):
//   gradient_dots  reads E (grad) [+ E theta with weight decay] + 2 m H; on a
//                  pair-forming step also theta, P, G, P0, G0 (the newest pair is a ring
//                  row it reads anyway): + 5 E
//   update         reads 5 E + 2 m H, writes 4 E; where a pair is due it also reads
//                  P0, G0 (2 E) and writes the ring slot (2 H) and P0, G0 (2 E); the
//                  pair's Gram row comes from the ring rows the pass reads anyway
//   push           the counters and the Gram row: nothing per element, except under
//                  variant="released" (its pair pass: reads 4 E + 2 m H, writes 2 H + 2 E)
// so a plain step moves (16 m + 44) N bytes and a pair step (16 m + 84) N in float32
// ((8 m + 44) N and (8 m + 80) N with a 16-bit history): one pass over the ring more
// than nothing, never a third.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../dispatch.h"
#include "../ops.h"
#include "step.h"

namespace mlbfgs_fused {
namespace cpu {
namespace {

using at::Tensor;
template <typename C>
using Vec = at::vec::Vectorized<C>;

// Elements per sub-block: a multiple of two vectors of every arithmetic type, so which
// accumulator a product goes to depends on its position in the chunk only.
// The largest sub-block, and the one a pass takes: the 2 m ring rows' tiles of a
// sub-block within 24 KiB (half of a 48 KiB L1), 64 elements at least.
constexpr int64_t SB = 256;
static_assert(CHUNK % SB == 0, "a chunk is whole sub-blocks");
inline int64_t sub_block(int64_t m, int64_t history_bytes) {
  int64_t sb = SB;
  while (sb > 64 && 2 * m * sb * history_bytes > (24 << 10)) sb /= 2;
  return sb;
}

// -- vector loads and stores, widening and rounding --------------------------------------
// A vector of C from W consecutive T values (exact widening for 16-bit T).
template <typename C, typename T>
inline Vec<C> load(const T* p) {
  if constexpr (std::is_same_v<C, T>) {
    return Vec<C>::loadu(p);
  }
#if defined(CPU_CAPABILITY_AVX2)
  else if constexpr (std::is_same_v<C, float> && std::is_same_v<T, at::BFloat16>) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  } else if constexpr (std::is_same_v<C, float> && std::is_same_v<T, at::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else if constexpr (std::is_same_v<C, double> && std::is_same_v<T, float>) {
    return _mm256_cvtps_pd(_mm_loadu_ps(p));
  }
#endif
  else {
    alignas(64) C lanes[Vec<C>::size()];
    for (int64_t l = 0; l < Vec<C>::size(); ++l) lanes[l] = static_cast<C>(p[l]);
    return Vec<C>::loadu(lanes);
  }
}

// The first `count` (< W) lanes from p, the rest zero.
template <typename C, typename T>
inline Vec<C> load(const T* p, int64_t count) {
  alignas(64) C lanes[Vec<C>::size()] = {};
  for (int64_t l = 0; l < count; ++l) lanes[l] = static_cast<C>(p[l]);
  return Vec<C>::loadu(lanes);
}

template <bool Full, typename C, typename T>
inline Vec<C> load_n(const T* p, int64_t count) {
  if constexpr (Full) {
    return load<C, T>(p);
  } else {
    return load<C, T>(p, count);
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// float -> bfloat16, rounded to nearest even as c10::BFloat16 rounds (a NaN stays a
// NaN): 32-bit lanes whose top 16 bits are the bfloat16.
inline __m256i bfloat16_bits(const __m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc00000), nan);
}
#endif

// Store the first `count` lanes of v (all when Full) as T (16-bit T rounded a vector at
// a time where the build has AVX2 and F16C; the same bits as c10's scalar conversions).
template <bool Full, typename T, typename C>
inline void store_n(T* p, const Vec<C>& v, int64_t count) {
  if constexpr (Full && std::is_same_v<C, T>) {
    v.store(p);
    return;
  }
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (Full && std::is_same_v<C, float> && std::is_same_v<T, at::BFloat16>) {
    const __m256i top = _mm256_srli_epi32(bfloat16_bits(v), 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1)));
    return;
  } else if constexpr (Full && std::is_same_v<C, float> && std::is_same_v<T, at::Half>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return;
  }
#endif
  alignas(64) C lanes[Vec<C>::size()];
  v.store(lanes);
  const int64_t k = Full ? Vec<C>::size() : count;
  for (int64_t l = 0; l < k; ++l) p[l] = static_cast<T>(lanes[l]);
}

// v as a store to T and a load back would give it.
template <typename T, typename C>
inline Vec<C> rounded(const Vec<C>& v) {
  if constexpr (std::is_same_v<C, T>) {
    return v;
  }
#if defined(CPU_CAPABILITY_AVX2)
  else if constexpr (std::is_same_v<C, float> && std::is_same_v<T, at::BFloat16>) {
    return _mm256_castsi256_ps(_mm256_and_si256(bfloat16_bits(v), _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  } else if constexpr (std::is_same_v<C, float> && std::is_same_v<T, at::Half>) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  else {
    alignas(64) C lanes[Vec<C>::size()];
    v.store(lanes);
    for (int64_t l = 0; l < Vec<C>::size(); ++l) lanes[l] = static_cast<C>(static_cast<T>(lanes[l]));
    return Vec<C>::loadu(lanes);
  }
}

// torch.lerp's formula (csrc/ops.h lerp) with a scalar weight, lane by lane.
template <typename C>
inline Vec<C> lerp(const Vec<C>& a, const Vec<C>& b, C w) {
  return w < C(0.5) ? a + Vec<C>(w) * (b - a) : b - (b - a) * Vec<C>(C(1) - w);
}

// Horizontal sum of a vector's lanes in float64, in lane order.
template <typename C>
inline double lane_sum(const Vec<C>& v) {
  alignas(64) C lanes[Vec<C>::size()];
  v.store(lanes);
  double total = 0.0;
  for (int64_t l = 0; l < Vec<C>::size(); ++l) total += static_cast<double>(lanes[l]);
  return total;
}

// Sums of float64 products of C vectors, lane by lane (g.g and a pair's damping sums:
// no finite input overflows them; a float product is exact in float64).
template <typename C>
struct Sum64 {
  static constexpr int64_t W = Vec<C>::size();
  double lanes[W] = {};
  void add(const Vec<C>& a, const Vec<C>& b) {
    alignas(64) C x[W], y[W];
    a.store(x);
    b.store(y);
    for (int64_t l = 0; l < W; ++l) lanes[l] += static_cast<double>(x[l]) * static_cast<double>(y[l]);
  }
  double total() const {
    double t = 0.0;
    for (int64_t l = 0; l < W; ++l) t += lanes[l];
    return t;
  }
};
// A candidate pair's s.s, s.y, y.y (float64 products).
template <typename C>
struct PairSums {
  Sum64<C> ss, sy, yy;
  void add(const Vec<C>& s, const Vec<C>& y) {
    ss.add(s, s);
    sy.add(s, y);
    yy.add(y, y);
  }
  void write(double* out) const {
    out[P_SS] = ss.total();
    out[P_SY] = sy.total();
    out[P_YY] = yy.total();
  }
};

#if defined(CPU_CAPABILITY_AVX2)
template <>
struct Sum64<float> {
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  void add(const Vec<float>& a, const Vec<float>& b) {
    const __m256 x = a, y = b;
    lo = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), _mm256_cvtps_pd(_mm256_castps256_ps128(y)), lo);
    hi = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)), _mm256_cvtps_pd(_mm256_extractf128_ps(y, 1)), hi);
  }
  double total() const {
    alignas(32) double l[4], h[4];
    _mm256_store_pd(l, lo);
    _mm256_store_pd(h, hi);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((h[0] + h[1]) + (h[2] + h[3]));
  }
};
template <>
struct PairSums<float> {
  __m256d ss[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
  __m256d sy[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
  __m256d yy[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};
  void add(const Vec<float>& s8, const Vec<float>& y8) {
    const __m256 s = s8, y = y8;
    const __m256d sd[2] = {_mm256_cvtps_pd(_mm256_castps256_ps128(s)), _mm256_cvtps_pd(_mm256_extractf128_ps(s, 1))};
    const __m256d yd[2] = {_mm256_cvtps_pd(_mm256_castps256_ps128(y)), _mm256_cvtps_pd(_mm256_extractf128_ps(y, 1))};
    for (int h = 0; h < 2; ++h) {
      ss[h] = _mm256_fmadd_pd(sd[h], sd[h], ss[h]);
      sy[h] = _mm256_fmadd_pd(sd[h], yd[h], sy[h]);
      yy[h] = _mm256_fmadd_pd(yd[h], yd[h], yy[h]);
    }
  }
  static double total(const __m256d* v) {  // the order of Sum64<float>::total
    alignas(32) double l[4], h[4];
    _mm256_store_pd(l, v[0]);
    _mm256_store_pd(h, v[1]);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((h[0] + h[1]) + (h[2] + h[3]));
  }
  void write(double* out) const {
    out[P_SS] = total(ss);
    out[P_SY] = total(sy);
    out[P_YY] = total(yy);
  }
};
template <>
struct Sum64<double> {
  Vec<double> acc = Vec<double>(0.0);
  void add(const Vec<double>& a, const Vec<double>& b) { acc = at::vec::fmadd(a, b, acc); }
  double total() const { return lane_sum<double>(acc); }
};
#endif

// Calls body(x, count, std::true_type) for each whole vector of [0, n) and
// body(x, count, std::false_type) for a last partial one.
template <typename C, typename F>
inline void for_vectors(int64_t n, F&& body) {
  constexpr int64_t W = Vec<C>::size();
  int64_t x = 0;
  for (; x + W <= n; x += W) body(x, W, std::true_type{});
  if (x < n) body(x, n - x, std::false_type{});
}

// Per-thread scratch that lives as long as the thread: sized on first use, then reused
// (no allocation in a steady-state step).
template <typename V>
V* scratch(int64_t count, int slot) {
  thread_local std::vector<V> buffers[4];
  auto& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

// -- the dots of a sub-block against ring rows -------------------------------------------
// The accumulators are named locals, not arrays: an array of vectors may alias the rows
// (a vector type may alias anything), which would make the compiler store it back at
// every iteration. The last whole vector and a partial one of a sub-block are added
// to the accumulators in memory (only at a parameter's end).

// acc[2 r + e] += u . row_r over [0, n), e the parity of the vector's index: four rows
// at a time, two chains each, the loop over rows inside the loop over vectors.
template <typename C, typename H>
inline void dots_rows4(const C* u, const H* const* rows, int64_t x0, int64_t n, Vec<C>* acc) {
  constexpr int64_t W = Vec<C>::size();
  const H *p0 = rows[0] + x0, *p1 = rows[1] + x0, *p2 = rows[2] + x0, *p3 = rows[3] + x0;
  Vec<C> a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3], a4 = acc[4], a5 = acc[5], a6 = acc[6], a7 = acc[7];
  int64_t x = 0;
  for (; x + 2 * W <= n; x += 2 * W) {
    const Vec<C> u0 = Vec<C>::loadu(u + x), u1 = Vec<C>::loadu(u + x + W);
    a0 = at::vec::fmadd(u0, load<C>(p0 + x), a0);
    a1 = at::vec::fmadd(u1, load<C>(p0 + x + W), a1);
    a2 = at::vec::fmadd(u0, load<C>(p1 + x), a2);
    a3 = at::vec::fmadd(u1, load<C>(p1 + x + W), a3);
    a4 = at::vec::fmadd(u0, load<C>(p2 + x), a4);
    a5 = at::vec::fmadd(u1, load<C>(p2 + x + W), a5);
    a6 = at::vec::fmadd(u0, load<C>(p3 + x), a6);
    a7 = at::vec::fmadd(u1, load<C>(p3 + x + W), a7);
  }
  acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3, acc[4] = a4, acc[5] = a5, acc[6] = a6, acc[7] = a7;
  const H* p[4] = {p0, p1, p2, p3};
  for (; x < n; x += W) {  // a parameter's last vectors
    const int64_t k = std::min(W, n - x);
    const Vec<C> u0 = k == W ? Vec<C>::loadu(u + x) : Vec<C>::loadu(u + x, k);
    for (int r = 0; r < 4; ++r) {
      acc[2 * r] = at::vec::fmadd(u0, k == W ? load<C>(p[r] + x) : load<C>(p[r] + x, k), acc[2 * r]);
    }
  }
}

template <typename C, typename H>
inline void dots_row1(const C* u, const H* row, int64_t x0, int64_t n, Vec<C>* acc) {
  constexpr int64_t W = Vec<C>::size();
  const H* p0 = row + x0;
  Vec<C> a0 = acc[0], a1 = acc[1];
  int64_t x = 0;
  for (; x + 2 * W <= n; x += 2 * W) {
    a0 = at::vec::fmadd(Vec<C>::loadu(u + x), load<C>(p0 + x), a0);
    a1 = at::vec::fmadd(Vec<C>::loadu(u + x + W), load<C>(p0 + x + W), a1);
  }
  for (; x < n; x += W) {
    const int64_t k = std::min(W, n - x);
    a0 = k == W ? at::vec::fmadd(Vec<C>::loadu(u + x), load<C>(p0 + x), a0)
                : at::vec::fmadd(Vec<C>::loadu(u + x, k), load<C>(p0 + x, k), a0);
  }
  acc[0] = a0, acc[1] = a1;
}

// Every row of `rows` (count of them) against u; acc holds two chains per row.
template <typename C, typename H>
inline void dots_all_rows(const C* u, const H* const* rows, int64_t count, int64_t x0, int64_t n,
                          Vec<C>* acc) {
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) dots_rows4<C, H>(u, rows + r, x0, n, acc + 2 * r);
  for (; r < count; ++r) dots_row1<C, H>(u, rows[r], x0, n, acc + 2 * r);
}

// acc[2 r + k] += (k ? v : u) . row_r: four rows at a time, one chain per (row, vector),
// each row vector loaded once for both products.
template <typename C, typename H>
inline void dots2_rows4(const C* u, const C* v, const H* const* rows, int64_t x0, int64_t n, Vec<C>* acc) {
  constexpr int64_t W = Vec<C>::size();
  const H *p0 = rows[0] + x0, *p1 = rows[1] + x0, *p2 = rows[2] + x0, *p3 = rows[3] + x0;
  Vec<C> a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3], a4 = acc[4], a5 = acc[5], a6 = acc[6], a7 = acc[7];
  int64_t x = 0;
  for (; x + W <= n; x += W) {
    const Vec<C> u0 = Vec<C>::loadu(u + x), v0 = Vec<C>::loadu(v + x);
    const Vec<C> q0 = load<C>(p0 + x), q1 = load<C>(p1 + x), q2 = load<C>(p2 + x), q3 = load<C>(p3 + x);
    a0 = at::vec::fmadd(u0, q0, a0);
    a1 = at::vec::fmadd(v0, q0, a1);
    a2 = at::vec::fmadd(u0, q1, a2);
    a3 = at::vec::fmadd(v0, q1, a3);
    a4 = at::vec::fmadd(u0, q2, a4);
    a5 = at::vec::fmadd(v0, q2, a5);
    a6 = at::vec::fmadd(u0, q3, a6);
    a7 = at::vec::fmadd(v0, q3, a7);
  }
  acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3, acc[4] = a4, acc[5] = a5, acc[6] = a6, acc[7] = a7;
  if (x < n) {  // a parameter's last, partial vector
    const Vec<C> u0 = Vec<C>::loadu(u + x, n - x), v0 = Vec<C>::loadu(v + x, n - x);
    const H* p[4] = {p0, p1, p2, p3};
    for (int r = 0; r < 4; ++r) {
      const Vec<C> q = load<C>(p[r] + x, n - x);
      acc[2 * r] = at::vec::fmadd(u0, q, acc[2 * r]);
      acc[2 * r + 1] = at::vec::fmadd(v0, q, acc[2 * r + 1]);
    }
  }
}

template <typename C, typename H>
inline void dots2_row1(const C* u, const C* v, const H* row, int64_t x0, int64_t n, Vec<C>* acc) {
  constexpr int64_t W = Vec<C>::size();
  const H* p0 = row + x0;
  Vec<C> a0 = acc[0], a1 = acc[1];
  int64_t x = 0;
  for (; x + W <= n; x += W) {
    const Vec<C> q = load<C>(p0 + x);
    a0 = at::vec::fmadd(Vec<C>::loadu(u + x), q, a0);
    a1 = at::vec::fmadd(Vec<C>::loadu(v + x), q, a1);
  }
  if (x < n) {
    const Vec<C> q = load<C>(p0 + x, n - x);
    a0 = at::vec::fmadd(Vec<C>::loadu(u + x, n - x), q, a0);
    a1 = at::vec::fmadd(Vec<C>::loadu(v + x, n - x), q, a1);
  }
  acc[0] = a0, acc[1] = a1;
}

template <typename C, typename H>
inline void dots2_all_rows(const C* u, const C* v, const H* const* rows, int64_t count, int64_t x0,
                           int64_t n, Vec<C>* acc) {
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) dots2_rows4<C, H>(u, v, rows + r, x0, n, acc + 2 * r);
  for (; r < count; ++r) dots2_row1<C, H>(u, v, rows[r], x0, n, acc + 2 * r);
}

// -- a step's per-element pieces -----------------------------------------------------------
// How the averages move (docs/design.md, "The step", 6, and "The released variant", E1):
// lerp weights (paper) or the sample's weight and the decay (released); both start at
// their first sample.
template <typename C>
struct Averages {
  C w_param = 1, w_grad = 1;
  C decay_param = 0, decay_grad = 0;
  Averages(bool first, bool released, double beta_p, double beta_g) {
    w_param = first ? C(1) : static_cast<C>(released ? 1.0 : 1 - beta_p);
    w_grad = first ? C(1) : static_cast<C>(released ? 1.0 : 1 - beta_g);
    decay_param = first ? C(0) : static_cast<C>(beta_p);
    decay_grad = first ? C(0) : static_cast<C>(beta_g);
  }
};

// The effective gradient (csrc/ops.h effective_gradient, AMP's unscaling folded in).
template <typename C>
struct Gradient {
  C signed_scale, weight_decay;
  Vec<C> operator()(const Vec<C>& grad, const Vec<C>& theta) const {
    return weight_decay != C(0) ? grad * Vec<C>(signed_scale) + Vec<C>(weight_decay) * theta
                                : grad * Vec<C>(signed_scale);
  }
};

// A sub-block's effective gradient into g (and theta into th where NeedTheta; zero
// otherwise). Pass 1 (SumSquares) adds g.g, from float64 products, to gg.
template <bool NeedTheta, bool SumSquares, typename C, typename T>
inline void gradient_subblock(const T* grad, const T* theta, int64_t n, const Gradient<C>& eff, C* g,
                              C* th, Sum64<C>& gg) {
  for_vectors<C>(n, [&](int64_t x, int64_t k, auto full) {
    constexpr bool F = decltype(full)::value;
    Vec<C> t(C(0));
    if constexpr (NeedTheta) {
      t = load_n<F, C>(theta + x, k);
      t.store(th + x);
    }
    const Vec<C> v = eff(load_n<F, C>(grad + x, k), t);
    v.store(g + x);
    if constexpr (SumSquares) gg.add(v, v);
  });
}

// The pair this step forms on a block (docs/design.md, "The step", 7), decided once per
// block from pass 1's candidate sums in chunk order, before pass 2 writes it.
struct PairDecision {
  bool due = false, forms = false, accepted = false;
  double phi = 0.0;
  int64_t slot = 0;
};

PairDecision decide(int64_t b, const int64_t* btab, const int64_t* step, const int64_t* count,
                    const double* pair_partials, int64_t m, double damping, double sigma_low,
                    double sigma_high, double eps, int64_t period) {
  PairDecision dec;
  dec.due = pair_due(step[b], period);
  dec.forms = forms_pair(step[b], period);
  dec.slot = count[b] % m;
  if (!dec.forms) return dec;
  double ss = 0.0, sy = 0.0;
  for (int64_t k = btab[b * BLOCK_COLUMNS + B_FIRST]; k < btab[b * BLOCK_COLUMNS + B_END]; ++k) {
    ss += pair_partials[k * PAIR_COLUMNS + P_SS];
    sy += pair_partials[k * PAIR_COLUMNS + P_SY];
  }
  dec.phi = damping_factor(sy, ss, sigma_low, sigma_high, damping, eps);
  const double curvature = dec.phi * sy + (1.0 - dec.phi) * ss;  // s.yhat
  dec.accepted = std::isfinite(curvature) && curvature > eps;
  return dec;
}

// The candidate pair (s, y) of a sub-block: s = lerp(P' - P0, s_newest, r),
// y = lerp(G' - G0, y_newest, r), with P', G' the averages this step writes.
template <typename C, typename T, typename H>
struct Candidate {
  const T* P0;
  const T* G0;
  const H* s_newest;
  const H* y_newest;
  C r;
  template <bool F>
  void at(int64_t x, int64_t k, const C* Pn, const C* Gn, Vec<C>& s, Vec<C>& y) const {
    s = lerp<C>(Vec<C>::loadu(Pn + x) - load_n<F, C>(P0 + x, k), load_n<F, C>(s_newest + x, k), r);
    y = lerp<C>(Vec<C>::loadu(Gn + x) - load_n<F, C>(G0 + x, k), load_n<F, C>(y_newest + x, k), r);
  }
};

// The averages this step writes over a sub-block, rounded to T: written back to P, G
// where Write, kept in Pn, Gn where Keep (a pair's candidate). Form: the paper's lerp,
// the released code's sums (E1), or G = g (E2, released after its push; P as it is).
enum AverageForm { AVERAGE_LERP, AVERAGE_SUM, AVERAGE_RESET_GRAD };

template <int Form, bool Write, bool Keep, typename C, typename T>
inline void averages_subblock(T* P, T* G, const C* th, const C* g, const Averages<C>& avg, int64_t n,
                              C* Pn, C* Gn) {
  for_vectors<C>(n, [&](int64_t x, int64_t k, auto full) {
    constexpr bool F = decltype(full)::value;
    Vec<C> p = load_n<F, C>(P + x, k), q;
    if constexpr (Form == AVERAGE_RESET_GRAD) {
      q = rounded<T, C>(Vec<C>::loadu(g + x));
    } else if constexpr (Form == AVERAGE_LERP) {
      p = rounded<T, C>(lerp<C>(p, Vec<C>::loadu(th + x), avg.w_param));
      q = rounded<T, C>(lerp<C>(load_n<F, C>(G + x, k), Vec<C>::loadu(g + x), avg.w_grad));
    } else {
      p = rounded<T, C>(p * Vec<C>(avg.decay_param) + Vec<C>::loadu(th + x) * Vec<C>(avg.w_param));
      q = rounded<T, C>(load_n<F, C>(G + x, k) * Vec<C>(avg.decay_grad) + Vec<C>::loadu(g + x) * Vec<C>(avg.w_grad));
    }
    if constexpr (Write) {
      if constexpr (Form != AVERAGE_RESET_GRAD) store_n<F, T, C>(P + x, p, k);
      store_n<F, T, C>(G + x, q, k);
    }
    if constexpr (Keep) {
      p.store(Pn + x);
      q.store(Gn + x);
    }
  });
}

// The averages as they are (a chunk without a gradient), into Pn, Gn.
template <typename C, typename T>
inline void averages_as_stored(const T* P, const T* G, int64_t n, C* Pn, C* Gn) {
  for_vectors<C>(n, [&](int64_t x, int64_t k, auto full) {
    constexpr bool F = decltype(full)::value;
    load_n<F, C>(P + x, k).store(Pn + x);
    load_n<F, C>(G + x, k).store(Gn + x);
  });
}

// averages_subblock with the form and Keep chosen at run time (once per sub-block).
template <bool Write, typename C, typename T>
inline void averages_dispatch(int form, bool keep, T* P, T* G, const C* th, const C* g, const Averages<C>& avg,
                              int64_t n, C* Pn, C* Gn) {
  if (form == AVERAGE_LERP) {
    keep ? averages_subblock<AVERAGE_LERP, Write, true, C, T>(P, G, th, g, avg, n, Pn, Gn)
         : averages_subblock<AVERAGE_LERP, Write, false, C, T>(P, G, th, g, avg, n, Pn, Gn);
  } else if (form == AVERAGE_SUM) {
    keep ? averages_subblock<AVERAGE_SUM, Write, true, C, T>(P, G, th, g, avg, n, Pn, Gn)
         : averages_subblock<AVERAGE_SUM, Write, false, C, T>(P, G, th, g, avg, n, Pn, Gn);
  } else {
    keep ? averages_subblock<AVERAGE_RESET_GRAD, Write, true, C, T>(P, G, th, g, avg, n, Pn, Gn)
         : averages_subblock<AVERAGE_RESET_GRAD, Write, false, C, T>(P, G, th, g, avg, n, Pn, Gn);
  }
}

// The pair of a sub-block where it is due: if accepted, s and yhat = lerp(s, y, phi)
// into ring slot `slot` in the history dtype, and the dots of the rows *as stored* with
// every ring row (the slot's new rows included) into gram_acc; then P0 = P', G0 = G'.
template <typename C, typename T, typename H>
inline void pair_subblock(const Candidate<C, T, H>& cand, const PairDecision& dec, H* s_slot,
                          H* y_slot, const H* const* rows, int64_t m, int64_t x0, int64_t n,
                          const C* Pn, const C* Gn, T* P0, T* G0, C* u, C* v, Vec<C>* gram_acc) {
  if (dec.accepted) {
    const C phi = static_cast<C>(dec.phi);
    for_vectors<C>(n, [&](int64_t x, int64_t k, auto full) {
      constexpr bool F = decltype(full)::value;
      Vec<C> s, y;
      cand.template at<F>(x, k, Pn, Gn, s, y);
      const Vec<C> yhat = lerp<C>(s, y, phi);
      store_n<F, H, C>(s_slot + x, s, k);
      store_n<F, H, C>(y_slot + x, yhat, k);
      rounded<H, C>(s).store(u + x);
      rounded<H, C>(yhat).store(v + x);
    });
    dots2_all_rows<C, H>(u, v, rows, 2 * m, x0, n, gram_acc);
  }
  for_vectors<C>(n, [&](int64_t x, int64_t k, auto full) {
    constexpr bool F = decltype(full)::value;
    store_n<F, T, C>(P0 + x, Vec<C>::loadu(Pn + x), k);
    store_n<F, T, C>(G0 + x, Vec<C>::loadu(Gn + x), k);
  });
}

// The Gram row partials of a chunk from gram_acc: [S S^T [slot, j], S Y^T [j, slot],
// S Y^T [slot, j], Y Y^T [slot, j]] for j < m (rows 0..m-1 of `rows` are s_j, m..2m-1 y_j).
template <typename C>
inline void gram_row(const Vec<C>* acc, int64_t m, double* out) {
  for (int64_t r = 0; r < 2 * m; ++r) {
    const double with_s = lane_sum<C>(acc[2 * r]);
    const double with_yhat = lane_sum<C>(acc[2 * r + 1]);
    if (r < m) {
      out[r] = with_s;           // s_j . s
      out[m + r] = with_yhat;    // s_j . yhat
    } else {
      out[m + r] = with_s;       // s . y_j    (2m + j)
      out[2 * m + r] = with_yhat;  // yhat . y_j (3m + j)
    }
  }
}

// The chunk's ring rows: s_0..s_{m-1}, y_0..y_{m-1}, each at the chunk's first element.
template <typename H>
inline void ring_rows(const H* hs, const H* hy, const Chunk& c, int64_t m, const H** rows) {
  for (int64_t i = 0; i < m; ++i) {
    rows[i] = hs + c.ring(i);
    rows[m + i] = hy + c.ring(i);
  }
}

// A prefetch of the next sub-block's tiles of `count` ring rows: the 2 m rows are more
// streams than the hardware prefetchers follow at once, and a row's tile is a few lines.
template <typename H>
inline void prefetch_rows(const H* const* rows, int64_t count, int64_t x, int64_t n) {
  for (int64_t r = 0; r < count; ++r) {
    const char* p = reinterpret_cast<const char*>(rows[r] + x);
    for (int64_t o = 0; o < n * static_cast<int64_t>(sizeof(H)); o += 64) __builtin_prefetch(p + o, 0, 3);
  }
}

// -- pass 1 ---------------------------------------------------------------------------------
template <typename T, typename H>
struct DotsPass {
  using C = at::opmath_type<T>;
  std::vector<T*> theta;
  std::vector<const T*> grad;
  const H* hs;
  const H* hy;
  const T *P, *G, *P0, *G0;
  const int64_t* table;
  const int64_t* step;
  const int64_t* pair_count;
  double* partials;
  double* pair_partials;
  Gradient<C> eff;
  double beta_p, beta_g, pair_momentum;
  int64_t period, m;
  bool pair_sums;  // the candidate's sums on a pair-forming step (paper variant)

  void chunk(int64_t k) const {
    const Chunk c(table + k * CHUNK_COLUMNS);
    const int64_t n = c.count(), width = 2 * m + 1, b = c.block;
    double* out = partials + k * width;
    const T* gr = grad[c.param];
    const bool has_grad = gr != nullptr && n > 0;
    const bool pair = pair_sums && forms_pair(step[b], period);
    if (!has_grad) std::fill(out, out + width, 0.0);  // no gradient: zero in every dot
    if (!has_grad && !pair) return;
    const H** rows = scratch<const H*>(2 * m, 0);
    ring_rows<H>(hs, hy, c, m, rows);
    Vec<C>* acc = scratch<Vec<C>>(4 * m, 1);
    std::fill(acc, acc + 4 * m, Vec<C>(C(0)));
    alignas(64) C g[SB], th[SB], Pn[SB], Gn[SB];
    const int64_t sb = sub_block(m, sizeof(H));
    Sum64<C> gg;
    PairSums<C> sums;
    const int64_t pc = pair_count[b];
    const Averages<C> avg(step[b] == 0, false, beta_p, beta_g);
    const Candidate<C, T, H> cand{P0 + c.start, G0 + c.start, rows[(pc - 1 + m) % m],
                                  rows[m + (pc - 1 + m) % m],
                                  pc > 0 ? static_cast<C>(pair_momentum) : C(0)};
    const T* theta_chunk = theta[c.param] + c.local;
    for (int64_t x0 = 0; x0 < n; x0 += sb) {
      const int64_t nb = std::min(sb, n - x0);
      if (has_grad) {
        if (x0 + sb < n) prefetch_rows<H>(rows, 2 * m, x0 + sb, std::min(sb, n - x0 - sb));
        if (eff.weight_decay != C(0) || pair) {
          gradient_subblock<true, true, C, T>(gr + c.local + x0, theta_chunk + x0, nb, eff, g, th, gg);
        } else {
          gradient_subblock<false, true, C, T>(gr + c.local + x0, theta_chunk + x0, nb, eff, g, th, gg);
        }
        dots_all_rows<C, H>(g, rows, 2 * m, x0, nb, acc);
      }
      if (pair) {
        if (has_grad) {
          averages_subblock<AVERAGE_LERP, false, true, C, T>(const_cast<T*>(P + c.start + x0),
                                                            const_cast<T*>(G + c.start + x0), th, g, avg, nb, Pn, Gn);
        } else {
          averages_as_stored<C, T>(P + c.start + x0, G + c.start + x0, nb, Pn, Gn);
        }
        const Candidate<C, T, H> here{cand.P0 + x0, cand.G0 + x0, cand.s_newest + x0, cand.y_newest + x0, cand.r};
        for_vectors<C>(nb, [&](int64_t x, int64_t kk, auto full) {
          Vec<C> s, y;
          here.template at<decltype(full)::value>(x, kk, Pn, Gn, s, y);
          sums.add(s, y);
        });
      }
    }
    if (has_grad) {
      for (int64_t r = 0; r < 2 * m; ++r) out[r] = lane_sum<C>(acc[2 * r] + acc[2 * r + 1]);
      out[2 * m] = gg.total();
    }
    if (pair) sums.write(pair_partials + k * PAIR_COLUMNS);
  }
};

// -- the two-loop ----------------------------------------------------------------------------
// Per block: the dots in chunk order, the coefficients of d, the block's status row.
// Returns g.g over the arena (non-finite exactly when some effective gradient entry is).
double two_loop_blocks(const double* part, const int64_t* btab, int64_t B, const double* gram,
                       const int64_t* count, double* coef, double* stats, int64_t m) {
  const int64_t width = 2 * m + 1;
  double* sums = scratch<double>(width + m, 0);
  double* alpha = sums + width;
  double total_gg = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    std::fill(sums, sums + width, 0.0);
    for (int64_t k = btab[b * BLOCK_COLUMNS + B_FIRST]; k < btab[b * BLOCK_COLUMNS + B_END]; ++k) {
      for (int64_t j = 0; j < width; ++j) sums[j] += part[k * width + j];
    }
    total_gg += block_two_loop(gram + b * 3 * m * m, sums, count[b], m, coef + b * width, alpha,
                               stats + b * STATS_COLUMNS);
  }
  return total_gg;
}

// -- pass 2 ----------------------------------------------------------------------------------
// NOTE [pass 2 runs backwards]: each thread walks its range of chunks first to last in
// pass 1 and last to first in pass 2, so pass 2 starts on the tiles pass 1 read last
// (still in L2, or in the last-level cache) and ends on the first ones, where the next
// step's pass 1 starts. at::parallel_for splits the range alike in both passes, so each
// thread meets its own tiles. Which chunk writes which partial sums does not change:
// the same bits.
// d = c_g g + sum_k c_s[k] s_k + c_y[k] y_k (in slot order, the same arithmetic for
// every element), then buf = mu buf + scale d, theta = theta - lr buf, for four whole
// vectors at x (Four) or one vector of `count` elements. x: in the sub-block (g, th);
// x0 + x: in the chunk (theta, buf, the rows).
template <typename C, typename T>
inline void momentum_and_theta(const Vec<C>& d, int64_t at_x, int64_t at_local, int64_t count, bool full,
                               const C* th, T* theta, T* buf, C scale, C momentum, C neg_lr) {
  if (full) {
    const Vec<C> b = load<C>(buf + at_x) * Vec<C>(momentum) + d * Vec<C>(scale);
    store_n<true, T, C>(buf + at_x, b, count);
    store_n<true, T, C>(theta + at_x, Vec<C>::loadu(th + at_local) + b * Vec<C>(neg_lr), count);
  } else {
    const Vec<C> b = load<C>(buf + at_x, count) * Vec<C>(momentum) + d * Vec<C>(scale);
    store_n<false, T, C>(buf + at_x, b, count);
    store_n<false, T, C>(theta + at_x, Vec<C>::loadu(th + at_local, count) + b * Vec<C>(neg_lr), count);
  }
}

template <typename C, typename T, typename H>
inline void direction4(int64_t x, int64_t x0, const C* g, const C* th, T* theta, T* buf,
                       const H* const* rows, const C* coefs, int64_t held, C c_g, C scale, C momentum,
                       C neg_lr) {
  constexpr int64_t W = Vec<C>::size();
  const Vec<C> vg(c_g);
  Vec<C> a0 = vg * Vec<C>::loadu(g + x), a1 = vg * Vec<C>::loadu(g + x + W);
  Vec<C> a2 = vg * Vec<C>::loadu(g + x + 2 * W), a3 = vg * Vec<C>::loadu(g + x + 3 * W);
  const int64_t at = x0 + x;
  for (int64_t k = 0; k < held; ++k) {
    const Vec<C> vs(coefs[k]), vy(coefs[held + k]);
    const H* s = rows[k] + at;
    const H* y = rows[held + k] + at;
    a0 = at::vec::fmadd(vy, load<C>(y), at::vec::fmadd(vs, load<C>(s), a0));
    a1 = at::vec::fmadd(vy, load<C>(y + W), at::vec::fmadd(vs, load<C>(s + W), a1));
    a2 = at::vec::fmadd(vy, load<C>(y + 2 * W), at::vec::fmadd(vs, load<C>(s + 2 * W), a2));
    a3 = at::vec::fmadd(vy, load<C>(y + 3 * W), at::vec::fmadd(vs, load<C>(s + 3 * W), a3));
  }
  momentum_and_theta<C, T>(a0, at, x, W, true, th, theta, buf, scale, momentum, neg_lr);
  momentum_and_theta<C, T>(a1, at + W, x + W, W, true, th, theta, buf, scale, momentum, neg_lr);
  momentum_and_theta<C, T>(a2, at + 2 * W, x + 2 * W, W, true, th, theta, buf, scale, momentum, neg_lr);
  momentum_and_theta<C, T>(a3, at + 3 * W, x + 3 * W, W, true, th, theta, buf, scale, momentum, neg_lr);
}

template <typename C, typename T, typename H>
inline void direction1(int64_t x, int64_t x0, int64_t count, const C* g, const C* th, T* theta, T* buf,
                       const H* const* rows, const C* coefs, int64_t held, C c_g, C scale, C momentum,
                       C neg_lr) {
  constexpr int64_t W = Vec<C>::size();
  const bool full = count == W;
  Vec<C> a0 = Vec<C>(c_g) * (full ? Vec<C>::loadu(g + x) : Vec<C>::loadu(g + x, count));
  const int64_t at = x0 + x;
  for (int64_t k = 0; k < held; ++k) {
    const Vec<C> s = full ? load<C>(rows[k] + at) : load<C>(rows[k] + at, count);
    const Vec<C> y = full ? load<C>(rows[held + k] + at) : load<C>(rows[held + k] + at, count);
    a0 = at::vec::fmadd(Vec<C>(coefs[held + k]), y, at::vec::fmadd(Vec<C>(coefs[k]), s, a0));
  }
  momentum_and_theta<C, T>(a0, at, x, count, full, th, theta, buf, scale, momentum, neg_lr);
}

template <typename T, typename H>
struct UpdatePass {
  using C = at::opmath_type<T>;
  std::vector<T*> theta;
  std::vector<const T*> grad;
  H *hs, *hy;
  T *P, *G, *buf, *P0, *G0;
  const int64_t* table;
  const double* coef;
  const int64_t* step;
  const int64_t* pair_count;
  const PairDecision* decision;  // per block, where the pair is written here (else null)
  double* pair_partials;         // the candidate's sums here (unfused modes), else null
  double* gram_partials;
  Gradient<C> eff;
  double scale, lr, momentum, beta_p, beta_g, pair_momentum;
  int64_t period, m, mode;

  void chunk(int64_t k) const {
    const Chunk c(table + k * CHUNK_COLUMNS);
    const int64_t n = c.count(), b = c.block;
    const bool released = mode != UPDATE_PAPER && mode != UPDATE_PAPER_PAIR;
    const bool direction = mode != UPDATE_RELEASED_AVERAGES;
    const bool sums = pair_partials != nullptr && forms_pair(step[b], period) &&
                      (mode == UPDATE_PAPER || mode == UPDATE_RELEASED_AVERAGES);
    const PairDecision* dec = decision != nullptr && decision[b].due ? &decision[b] : nullptr;
    const T* gr = grad[c.param];
    const bool has_grad = gr != nullptr && n > 0;
    if (!has_grad && !sums && dec == nullptr) return;
    const H** rows = scratch<const H*>(2 * m, 0);
    ring_rows<H>(hs, hy, c, m, rows);
    // The held slots (coefficients not both zero) in slot order: their s rows, then
    // their y rows, and the coefficients alike.
    const double* cf = coef + b * (2 * m + 1);
    const H** held_rows = scratch<const H*>(2 * m, 1);
    C* coefs = scratch<C>(2 * m, 2);
    int64_t held = 0;
    if (direction) {
      for (int64_t i = 0; i < m; ++i) held += cf[1 + i] != 0.0 || cf[1 + m + i] != 0.0;
      int64_t j = 0;
      for (int64_t i = 0; i < m; ++i) {
        if (cf[1 + i] == 0.0 && cf[1 + m + i] == 0.0) continue;  // an unheld slot
        held_rows[j] = rows[i];
        held_rows[held + j] = rows[m + i];
        coefs[j] = static_cast<C>(cf[1 + i]);
        coefs[held + j] = static_cast<C>(cf[1 + m + i]);
        ++j;
      }
    }
    Vec<C>* gram_acc = nullptr;
    if (dec != nullptr && dec->accepted) {
      gram_acc = scratch<Vec<C>>(4 * m, 0);
      std::fill(gram_acc, gram_acc + 4 * m, Vec<C>(C(0)));
    }
    alignas(64) C g[SB], th[SB], Pn[SB], Gn[SB], u[SB], v[SB];
    const int64_t sb = sub_block(m, sizeof(H));
    PairSums<C> pair_sums;
    const int64_t pc = pair_count[b];
    const int64_t newest = (pc - 1 + m) % m;
    const Averages<C> avg(step[b] == 0, released, beta_p, beta_g);
    const C c_g = static_cast<C>(cf[0]), c_scale = static_cast<C>(scale);
    const C c_momentum = static_cast<C>(momentum), neg_lr = -static_cast<C>(lr);
    const C r = pc > 0 ? static_cast<C>(pair_momentum) : C(0);
    T* th_chunk = theta[c.param] + c.local;
    const int form = mode == UPDATE_RELEASED_AFTER_PUSH ? AVERAGE_RESET_GRAD : released ? AVERAGE_SUM : AVERAGE_LERP;
    Sum64<C> gg_unused;
    T* Pc = P + c.start;
    T* Gc = G + c.start;
    T* bc = buf + c.start;
    for (int64_t x0 = 0; x0 < n; x0 += sb) {
      const int64_t nb = std::min(sb, n - x0);
      const bool keep = sums || dec != nullptr;  // the candidate needs this step's averages
      if (has_grad) {
        gradient_subblock<true, false, C, T>(gr + c.local + x0, th_chunk + x0, nb, eff, g, th, gg_unused);
        averages_dispatch<true, C, T>(form, keep, Pc + x0, Gc + x0, th, g, avg, nb, Pn, Gn);
      } else if (keep) {
        averages_as_stored<C, T>(Pc + x0, Gc + x0, nb, Pn, Gn);
      }
      if (direction && has_grad) {
        if (x0 + sb < n) prefetch_rows<H>(held_rows, 2 * held, x0 + sb, std::min(sb, n - x0 - sb));
        constexpr int64_t W = Vec<C>::size();
        int64_t x = 0;
        for (; x + 4 * W <= nb; x += 4 * W) {
          direction4<C, T, H>(x, x0, g, th, th_chunk, bc, held_rows, coefs, held, c_g, c_scale, c_momentum, neg_lr);
        }
        for (; x < nb; x += W) {
          direction1<C, T, H>(x, x0, std::min(W, nb - x), g, th, th_chunk, bc, held_rows, coefs, held, c_g,
                              c_scale, c_momentum, neg_lr);
        }
      }
      if (sums) {
        const Candidate<C, T, H> here{P0 + c.start + x0, G0 + c.start + x0, rows[newest] + x0,
                                      rows[m + newest] + x0, r};
        for_vectors<C>(nb, [&](int64_t x, int64_t kk, auto full) {
          Vec<C> s, y;
          here.template at<decltype(full)::value>(x, kk, Pn, Gn, s, y);
          pair_sums.add(s, y);
        });
      }
      if (dec != nullptr) {
        const Candidate<C, T, H> here{P0 + c.start + x0, G0 + c.start + x0, rows[newest] + x0,
                                      rows[m + newest] + x0, r};
        pair_subblock<C, T, H>(here, *dec, hs + c.ring(dec->slot) + x0, hy + c.ring(dec->slot) + x0,
                               rows, m, x0, nb, Pn, Gn, P0 + c.start + x0, G0 + c.start + x0, u, v,
                               gram_acc);
      }
    }
    if (sums) pair_sums.write(pair_partials + k * PAIR_COLUMNS);
    if (gram_acc != nullptr) gram_row<C>(gram_acc, m, gram_partials + k * 4 * m);
  }
};

// The pair pass of variant="released" (its push comes between two update passes): the
// averages as pass 2 wrote them, the pair where due, the snapshots.
template <typename T, typename H>
struct PushPass {
  using C = at::opmath_type<T>;
  H *hs, *hy;
  const T *P, *G;
  T *P0, *G0;
  const int64_t* table;
  const int64_t* pair_count;
  const PairDecision* decision;
  double* gram_partials;
  double pair_momentum;
  int64_t m;

  void chunk(int64_t k) const {
    const Chunk c(table + k * CHUNK_COLUMNS);
    const PairDecision& dec = decision[c.block];
    if (!dec.due) return;
    const int64_t n = c.count();
    const H** rows = scratch<const H*>(2 * m, 0);
    ring_rows<H>(hs, hy, c, m, rows);
    Vec<C>* gram_acc = scratch<Vec<C>>(4 * m, 0);
    std::fill(gram_acc, gram_acc + 4 * m, Vec<C>(C(0)));
    const int64_t pc = pair_count[c.block], newest = (pc - 1 + m) % m;
    const C r = pc > 0 ? static_cast<C>(pair_momentum) : C(0);
    alignas(64) C Pn[SB], Gn[SB], u[SB], v[SB];
    const int64_t sb = sub_block(m, sizeof(H));
    for (int64_t x0 = 0; x0 < n; x0 += sb) {
      const int64_t nb = std::min(sb, n - x0);
      averages_as_stored<C, T>(P + c.start + x0, G + c.start + x0, nb, Pn, Gn);
      const Candidate<C, T, H> here{P0 + c.start + x0, G0 + c.start + x0, rows[newest] + x0,
                                    rows[m + newest] + x0, r};
      pair_subblock<C, T, H>(here, dec, hs + c.ring(dec.slot) + x0, hy + c.ring(dec.slot) + x0, rows,
                             m, x0, nb, Pn, Gn, P0 + c.start + x0, G0 + c.start + x0, u, v, gram_acc);
    }
    if (dec.accepted) gram_row<C>(gram_acc, m, gram_partials + k * 4 * m);
  }
};

// -- the counters ------------------------------------------------------------------------------
// step += 1, and per block that formed a pair: its Gram row and column from the chunk
// partials in chunk order and pair_count += 1, or skipped_pairs += 1.
void commit_blocks(int64_t B, const int64_t* btab, const PairDecision* decision, const double* gp,
                   double* gram, int64_t* step, int64_t* count, int64_t* skipped_pairs, int64_t m) {
  double* rows = scratch<double>(4 * m, 1);
  for (int64_t b = 0; b < B; ++b) {
    const PairDecision& dec = decision[b];
    step[b] += 1;
    if (!dec.forms) continue;
    if (!dec.accepted) {
      skipped_pairs[b] += 1;
      continue;
    }
    std::fill(rows, rows + 4 * m, 0.0);
    for (int64_t k = btab[b * BLOCK_COLUMNS + B_FIRST]; k < btab[b * BLOCK_COLUMNS + B_END]; ++k) {
      for (int64_t j = 0; j < 4 * m; ++j) rows[j] += gp[k * 4 * m + j];
    }
    double* SS = gram + b * 3 * m * m;
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

PairDecision* decisions(int64_t B, const int64_t* btab, const int64_t* step, const int64_t* count,
                        const double* pair_partials, int64_t m, double damping, double sigma_low,
                        double sigma_high, double eps, int64_t period) {
  thread_local std::vector<PairDecision> out;
  out.resize(B);
  for (int64_t b = 0; b < B; ++b) {
    out[b] = decide(b, btab, step, count, pair_partials, m, damping, sigma_low, sigma_high, eps, period);
  }
  return out.data();
}

// -- the ops' arguments ---------------------------------------------------------------------------
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

// A CPU scalar tensor's value (grad_scale, found_inf, lr, ok): read from memory, no
// dispatch (on the CPU this is no device synchronisation).
double scalar_value(const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.numel() == 1, "mlbfgs_fused: expected a 1-element CPU tensor");
  switch (t.scalar_type()) {
    case at::kDouble: return *t.const_data_ptr<double>();
    case at::kFloat: return *t.const_data_ptr<float>();
    case at::kHalf: return static_cast<double>(*t.const_data_ptr<at::Half>());
    case at::kBFloat16: return static_cast<double>(*t.const_data_ptr<at::BFloat16>());
    case at::kBool: return *t.const_data_ptr<bool>() ? 1.0 : 0.0;
    case at::kLong: return static_cast<double>(*t.const_data_ptr<int64_t>());
    case at::kInt: return static_cast<double>(*t.const_data_ptr<int32_t>());
    default: TORCH_CHECK(false, "mlbfgs_fused: unexpected scalar dtype ", t.scalar_type());
  }
}

double grad_scale_value(const std::optional<Tensor>& grad_scale) {
  return grad_scale.has_value() && grad_scale->defined() ? scalar_value(*grad_scale) : 1.0;
}

template <typename C>
Gradient<C> gradient_of(double grad_scale, double weight_decay, bool maximize) {
  const C inv = static_cast<C>(1.0 / grad_scale);
  return Gradient<C>{maximize ? -inv : inv, static_cast<C>(weight_decay)};
}

// -- gradient_dots ------------------------------------------------------------------------------
void gradient_dots(at::TensorList params, at::ArrayRef<std::optional<Tensor>> grads,
                   const Tensor& history_s, const Tensor& history_y, const Tensor& param_ema,
                   const Tensor& grad_ema, const Tensor& param_snapshot, const Tensor& grad_snapshot,
                   const Tensor& chunks, const Tensor& step, const Tensor& pair_count,
                   const Tensor& partials, const Tensor& pair_partials,
                   const std::optional<Tensor>& grad_scale, double weight_decay, bool maximize,
                   double beta_p, double beta_g, double pair_momentum, int64_t period, int64_t m,
                   bool pair_sums) {
  check_chunks(chunks);
  check_params(params, grads);
  const int64_t P = chunks.size(0);
  TORCH_CHECK(partials.dtype() == at::kDouble && partials.numel() >= P * (2 * m + 1));
  TORCH_CHECK(pair_partials.dtype() == at::kDouble && pair_partials.numel() >= P * PAIR_COLUMNS);
  const double scale = grad_scale_value(grad_scale);
  dispatch_types(params[0].scalar_type(), history_s.scalar_type(), "mlbfgs_fused::gradient_dots", [&](auto t_tag, auto h_tag) {
    using T = typename decltype(t_tag)::type;
    using H = typename decltype(h_tag)::type;
    using C = at::opmath_type<T>;
    const DotsPass<T, H> pass{data_ptrs<T>(params), grad_ptrs<T>(grads), history_s.const_data_ptr<H>(),
                              history_y.const_data_ptr<H>(), param_ema.const_data_ptr<T>(),
                              grad_ema.const_data_ptr<T>(), param_snapshot.const_data_ptr<T>(),
                              grad_snapshot.const_data_ptr<T>(), chunks.const_data_ptr<int64_t>(),
                              step.const_data_ptr<int64_t>(), pair_count.const_data_ptr<int64_t>(),
                              partials.data_ptr<double>(), pair_partials.data_ptr<double>(),
                              gradient_of<C>(scale, weight_decay, maximize), beta_p, beta_g,
                              pair_momentum, period, m, pair_sums};
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) pass.chunk(k);
    });
  });
}

// -- two_loop ----------------------------------------------------------------------------------
void two_loop(const Tensor& partials, const Tensor& blocks, const Tensor& gram,
              const Tensor& pair_count, const Tensor& coef, const Tensor& stats,
              const Tensor& probe, int64_t block_offset, int64_t m) {
  *probe.data_ptr<double>() = two_loop_blocks(
      partials.const_data_ptr<double>(), blocks.const_data_ptr<int64_t>(), blocks.size(0),
      gram.const_data_ptr<double>(), pair_count.const_data_ptr<int64_t>(), coef.data_ptr<double>(),
      stats.data_ptr<double>() + block_offset * STATS_COLUMNS, m);
}

// -- update ------------------------------------------------------------------------------------
template <typename T, typename H>
void run_update(at::TensorList params, at::ArrayRef<std::optional<Tensor>> grads, const Tensor& history_s,
                const Tensor& history_y, const Tensor& param_ema, const Tensor& grad_ema,
                const Tensor& momentum_buffer, const Tensor& param_snapshot, const Tensor& grad_snapshot,
                const Tensor& chunks, const Tensor& coef, const Tensor& step, const Tensor& pair_count,
                const PairDecision* decision, double* pair_partials, const Tensor& gram_partials,
                double grad_scale, double scale, double lr, double momentum, double weight_decay,
                double beta_p, double beta_g, double pair_momentum, int64_t period, int64_t m,
                bool maximize, int64_t mode) {
  using C = at::opmath_type<T>;
  const UpdatePass<T, H> pass{data_ptrs<T>(params), grad_ptrs<T>(grads), history_s.data_ptr<H>(),
                              history_y.data_ptr<H>(), param_ema.data_ptr<T>(), grad_ema.data_ptr<T>(),
                              momentum_buffer.data_ptr<T>(), param_snapshot.data_ptr<T>(),
                              grad_snapshot.data_ptr<T>(), chunks.const_data_ptr<int64_t>(),
                              coef.const_data_ptr<double>(), step.const_data_ptr<int64_t>(),
                              pair_count.const_data_ptr<int64_t>(), decision, pair_partials,
                              gram_partials.data_ptr<double>(), gradient_of<C>(grad_scale, weight_decay, maximize),
                              scale, lr, momentum, beta_p, beta_g, pair_momentum, period, m, mode};
  at::parallel_for(0, chunks.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = end; k-- > begin;) pass.chunk(k);  // see NOTE [pass 2 runs backwards]
  });
}

void update(at::TensorList params, at::ArrayRef<std::optional<Tensor>> grads,
            const Tensor& history_s, const Tensor& history_y, const Tensor& param_ema,
            const Tensor& grad_ema, const Tensor& momentum_buffer, const Tensor& param_snapshot,
            const Tensor& grad_snapshot, const Tensor& chunks, const Tensor& blocks, const Tensor& coef,
            const Tensor& step, const Tensor& pair_count, const Tensor& stats, const Tensor& ok,
            const std::optional<Tensor>& grad_scale, const Tensor& pair_partials,
            const Tensor& gram_partials, const Tensor& lr, double momentum, double weight_decay,
            double beta_p, double beta_g, double pair_momentum, double damping, double sigma_low,
            double sigma_high, double eps, int64_t period, int64_t m, bool maximize,
            int64_t normalize, int64_t mode) {
  check_chunks(chunks);
  check_params(params, grads);
  TORCH_CHECK(mode >= UPDATE_PAPER && mode <= UPDATE_PAPER_PAIR, "mlbfgs_fused::update: bad mode");
  if (scalar_value(ok) == 0.0) return;  // a non-finite step changes nothing (push counts it)
  // docs/design.md, "The step", 4: the group's scale of d.
  const double scale = direction_scale(stats.const_data_ptr<double>(), stats.size(0), normalize);
  const PairDecision* decision = nullptr;
  if (mode == UPDATE_PAPER_PAIR) {
    decision = decisions(blocks.size(0), blocks.const_data_ptr<int64_t>(), step.const_data_ptr<int64_t>(),
                         pair_count.const_data_ptr<int64_t>(), pair_partials.const_data_ptr<double>(), m,
                         damping, sigma_low, sigma_high, eps, period);
  }
  double* sums = mode == UPDATE_PAPER_PAIR ? nullptr : pair_partials.data_ptr<double>();
  dispatch_types(params[0].scalar_type(), history_s.scalar_type(), "mlbfgs_fused::update", [&](auto t_tag, auto h_tag) {
    using T = typename decltype(t_tag)::type;
    using H = typename decltype(h_tag)::type;
    run_update<T, H>(params, grads, history_s, history_y, param_ema, grad_ema, momentum_buffer,
                     param_snapshot, grad_snapshot, chunks, coef, step, pair_count, decision, sums,
                     gram_partials, grad_scale_value(grad_scale), scale, scalar_value(lr), momentum,
                     weight_decay, beta_p, beta_g, pair_momentum, period, m, maximize, mode);
  });
}

// -- push --------------------------------------------------------------------------------------
// A step that is not `ok` only counts itself skipped (every block).
bool skip_step(const Tensor& ok, const Tensor& skipped_steps, int64_t B) {
  if (scalar_value(ok) != 0.0) return false;
  int64_t* skipped_s = skipped_steps.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) skipped_s[b] += 1;
  return true;
}

// The pair's own pass over the chunks of the blocks with a pair due (PushPass).
void push_chunks(const Tensor& param_ema, const Tensor& grad_ema, const Tensor& param_snapshot,
                 const Tensor& grad_snapshot, const Tensor& history_s, const Tensor& history_y,
                 const Tensor& chunks, const int64_t* count, const PairDecision* decision,
                 const Tensor& gram_partials, double pair_momentum, int64_t m) {
  dispatch_types(param_ema.scalar_type(), history_s.scalar_type(), "mlbfgs_fused::push", [&](auto t_tag, auto h_tag) {
    using T = typename decltype(t_tag)::type;
    using H = typename decltype(h_tag)::type;
    const PushPass<T, H> pass{history_s.data_ptr<H>(), history_y.data_ptr<H>(), param_ema.const_data_ptr<T>(),
                              grad_ema.const_data_ptr<T>(), param_snapshot.data_ptr<T>(),
                              grad_snapshot.data_ptr<T>(), chunks.const_data_ptr<int64_t>(), count,
                              decision, gram_partials.data_ptr<double>(), pair_momentum, m};
    at::parallel_for(0, chunks.size(0), 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) pass.chunk(k);
    });
  });
}

void push(const Tensor& param_ema, const Tensor& grad_ema, const Tensor& param_snapshot,
          const Tensor& grad_snapshot, const Tensor& history_s, const Tensor& history_y,
          const Tensor& gram, const Tensor& chunks, const Tensor& blocks,
          const Tensor& pair_partials, const Tensor& gram_partials, const Tensor& ok,
          const Tensor& step, const Tensor& pair_count, const Tensor& skipped_pairs,
          const Tensor& skipped_steps, double pair_momentum, double damping, double sigma_low,
          double sigma_high, double eps, int64_t period, int64_t m, bool pair_written) {
  check_chunks(chunks);
  const int64_t B = blocks.size(0);
  if (skip_step(ok, skipped_steps, B)) return;
  const int64_t* btab = blocks.const_data_ptr<int64_t>();
  int64_t* step_ptr = step.data_ptr<int64_t>();
  int64_t* count = pair_count.data_ptr<int64_t>();
  const PairDecision* decision = decisions(B, btab, step_ptr, count, pair_partials.const_data_ptr<double>(),
                                           m, damping, sigma_low, sigma_high, eps, period);
  const bool any_due = std::any_of(decision, decision + B, [](const PairDecision& d) { return d.due; });
  if (any_due && !pair_written) {
    push_chunks(param_ema, grad_ema, param_snapshot, grad_snapshot, history_s, history_y, chunks, count,
                decision, gram_partials, pair_momentum, m);
  }
  commit_blocks(B, btab, decision, gram_partials.const_data_ptr<double>(), gram.data_ptr<double>(), step_ptr,
                count, skipped_pairs.data_ptr<int64_t>(), m);
}

// push's two halves, for a rank that holds part of each block (distributed "sharded"):
// the pair's sums and the Gram rows are completed across ranks in between
// (docs/design.md, "Distributed"); `blocks` then has one row per block, and the pair is
// a pass of its own (the update pass summed its candidate: UPDATE_PAPER).
void push_pairs(const Tensor& param_ema, const Tensor& grad_ema, const Tensor& param_snapshot,
                const Tensor& grad_snapshot, const Tensor& history_s, const Tensor& history_y,
                const Tensor& chunks, const Tensor& blocks, const Tensor& pair_partials,
                const Tensor& gram_partials, const Tensor& ok, const Tensor& step,
                const Tensor& pair_count, double pair_momentum, double damping, double sigma_low,
                double sigma_high, double eps, int64_t period, int64_t m) {
  check_chunks(chunks);
  if (scalar_value(ok) == 0.0) return;
  const int64_t B = blocks.size(0);
  const int64_t* count = pair_count.const_data_ptr<int64_t>();
  const PairDecision* decision = decisions(B, blocks.const_data_ptr<int64_t>(), step.const_data_ptr<int64_t>(),
                                           count, pair_partials.const_data_ptr<double>(), m, damping,
                                           sigma_low, sigma_high, eps, period);
  if (std::any_of(decision, decision + B, [](const PairDecision& d) { return d.due; })) {
    push_chunks(param_ema, grad_ema, param_snapshot, grad_snapshot, history_s, history_y, chunks, count,
                decision, gram_partials, pair_momentum, m);
  }
}

// push's second half: the counters and the accepted pairs' Gram rows.
void commit(const Tensor& gram, const Tensor& blocks, const Tensor& pair_partials,
            const Tensor& gram_partials, const Tensor& ok, const Tensor& step,
            const Tensor& pair_count, const Tensor& skipped_pairs, const Tensor& skipped_steps,
            double damping, double sigma_low, double sigma_high, double eps, int64_t period,
            int64_t m) {
  const int64_t B = blocks.size(0);
  if (skip_step(ok, skipped_steps, B)) return;
  const int64_t* btab = blocks.const_data_ptr<int64_t>();
  int64_t* step_ptr = step.data_ptr<int64_t>();
  int64_t* count = pair_count.data_ptr<int64_t>();
  const PairDecision* decision = decisions(B, btab, step_ptr, count, pair_partials.const_data_ptr<double>(),
                                           m, damping, sigma_low, sigma_high, eps, period);
  commit_blocks(B, btab, decision, gram_partials.const_data_ptr<double>(), gram.data_ptr<double>(), step_ptr,
                count, skipped_pairs.data_ptr<int64_t>(), m);
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

// -- the whole step -------------------------------------------------------------------------------
void whole_step(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, const StepState& st,
                const StepHyper& h, double grad_scale, bool found_inf) {
  const int64_t m = st.m, P = st.chunks.size(0), B = st.blocks.size(0);
  const int64_t* table = st.chunks.const_data_ptr<int64_t>();
  const int64_t* btab = st.blocks.const_data_ptr<int64_t>();
  int64_t* step = st.step.data_ptr<int64_t>();
  int64_t* count = st.pair_count.data_ptr<int64_t>();
  dispatch_types(st.param_ema.scalar_type(), st.history_s.scalar_type(), "mlbfgs_fused::step", [&](auto t_tag, auto h_tag) {
    using T = typename decltype(t_tag)::type;
    using H = typename decltype(h_tag)::type;
    using C = at::opmath_type<T>;
    std::vector<T*> theta;
    std::vector<const T*> grad;
    theta.reserve(params.size());
    grad.reserve(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      theta.push_back(params[i].data_ptr<T>());
      grad.push_back(grads[i].defined() ? grads[i].const_data_ptr<T>() : nullptr);
    }
    const Gradient<C> eff = gradient_of<C>(grad_scale, h.weight_decay, h.maximize);
    // Pass 1, then the two-loop and the verdict.
    const DotsPass<T, H> dots{theta, grad, st.history_s.const_data_ptr<H>(), st.history_y.const_data_ptr<H>(),
                              st.param_ema.const_data_ptr<T>(), st.grad_ema.const_data_ptr<T>(),
                              st.param_snapshot.const_data_ptr<T>(), st.grad_snapshot.const_data_ptr<T>(),
                              table, step, count, st.partials.data_ptr<double>(),
                              st.pair_partials.data_ptr<double>(), eff, h.beta_p, h.beta_g,
                              h.pair_momentum, h.period, m, /*pair_sums=*/true};
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) dots.chunk(k);
    });
    double* stats = st.stats.data_ptr<double>();
    const double gg = two_loop_blocks(st.partials.const_data_ptr<double>(), btab, B, st.gram.const_data_ptr<double>(),
                                      count, st.coef.data_ptr<double>(), stats, m);
    if (!std::isfinite(gg) || found_inf) {  // docs/design.md, "Non-finite steps"
      int64_t* skipped = st.skipped_steps.data_ptr<int64_t>();
      for (int64_t b = 0; b < B; ++b) skipped[b] += 1;
      return;
    }
    const double scale = direction_scale(stats, B, h.normalize);
    const PairDecision* decision = decisions(B, btab, step, count, st.pair_partials.const_data_ptr<double>(), m,
                                             h.damping, h.sigma_low, h.sigma_high, h.eps, h.period);
    // Pass 2 (the pair where due), then the counters.
    const UpdatePass<T, H> update{theta, grad, st.history_s.data_ptr<H>(), st.history_y.data_ptr<H>(),
                                  st.param_ema.data_ptr<T>(), st.grad_ema.data_ptr<T>(),
                                  st.momentum_buffer.data_ptr<T>(), st.param_snapshot.data_ptr<T>(),
                                  st.grad_snapshot.data_ptr<T>(), table, st.coef.const_data_ptr<double>(),
                                  step, count, decision, nullptr, st.gram_partials.data_ptr<double>(), eff,
                                  scale, h.lr, h.momentum, h.beta_p, h.beta_g, h.pair_momentum, h.period, m,
                                  UPDATE_PAPER_PAIR};
    at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = end; k-- > begin;) update.chunk(k);  // see NOTE [pass 2 runs backwards]
    });
    commit_blocks(B, btab, decision, st.gram_partials.const_data_ptr<double>(), st.gram.data_ptr<double>(), step,
           count, st.skipped_pairs.data_ptr<int64_t>(), m);
  });
}

TORCH_LIBRARY_IMPL(mlbfgs_fused_native, CPU, m) {
  m.impl("gradient_dots", &gradient_dots);
  m.impl("two_loop", &two_loop);
  m.impl("update", &update);
  m.impl("push", &push);
  m.impl("push_pairs", &push_pairs);
  m.impl("commit", &commit);
  m.impl("block_sums", &block_sums);
}

}  // namespace cpu
}  // namespace mlbfgs_fused
