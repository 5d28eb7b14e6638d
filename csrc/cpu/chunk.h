// What the CPU passes (csrc/cpu/passes.cpp, csrc/cpu/lbfgs.cpp) share for the arrays of
// a chunk: reading them in the arithmetic type C and summing a vector's lanes.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace mlbfgs_fused {
namespace cpu {

// A chunk of a T array as C values: the array itself when T is C, else converted
// into `buffer`.
template <typename C, typename T>
inline const C* as_compute(const T* src, int64_t n, C* buffer) {
  if constexpr (std::is_same_v<C, T>) {
    return src;
  } else if constexpr (std::is_same_v<C, float> &&
                       (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>)) {
    // A 16-bit ring or parameter: widened a vector at a time.
    using Vec = at::vec::Vectorized<T>;
    constexpr int64_t W = at::vec::Vectorized<float>::size();
    int64_t x = 0;
    for (; x + Vec::size() <= n; x += Vec::size()) {
      const auto [lo, hi] = at::vec::convert_to_float<T>(Vec::loadu(src + x));
      lo.store(buffer + x);
      hi.store(buffer + x + W);
    }
    for (; x < n; ++x) buffer[x] = static_cast<float>(src[x]);
    return buffer;
  } else {
    for (int64_t x = 0; x < n; ++x) buffer[x] = static_cast<C>(src[x]);
    return buffer;
  }
}

// Horizontal sum of a vector's lanes in float64, in lane order.
template <typename C>
inline double lane_sum(const at::vec::Vectorized<C>& v) {
  constexpr int64_t W = at::vec::Vectorized<C>::size();
  C lanes[W];
  v.store(lanes);
  double total = 0.0;
  for (int64_t l = 0; l < W; ++l) total += static_cast<double>(lanes[l]);
  return total;
}

}  // namespace cpu
}  // namespace mlbfgs_fused
