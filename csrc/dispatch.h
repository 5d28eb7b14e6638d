// The (parameter, history) dtype pairs the kernels take, on every device: a history
// as wide as the parameters, a 16-bit one with float32 or 16-bit parameters, or float32
// with 16-bit or float64 parameters. Fewer pairs than all sixteen keep the build short;
// mlbfgs_fused/backends/native.py NARROW_HISTORY lists the same pairs.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace mlbfgs_fused {

template <typename T>
struct Type {
  using type = T;
};

// Calls f(Type<T>{}, Type<H>{}) for parameter dtype T and history dtype H.
template <typename F>
void dispatch_types(c10::ScalarType param, c10::ScalarType history, const char* name, F&& f) {
  using c10::BFloat16;
  using c10::Half;
  using S = c10::ScalarType;
  if (param == S::Float && history == S::Float) return f(Type<float>{}, Type<float>{});
  if (param == S::Float && history == S::BFloat16) return f(Type<float>{}, Type<BFloat16>{});
  if (param == S::Float && history == S::Half) return f(Type<float>{}, Type<Half>{});
  if (param == S::Double && history == S::Double) return f(Type<double>{}, Type<double>{});
  if (param == S::Double && history == S::Float) return f(Type<double>{}, Type<float>{});
  if (param == S::BFloat16 && history == S::BFloat16) return f(Type<BFloat16>{}, Type<BFloat16>{});
  if (param == S::BFloat16 && history == S::Float) return f(Type<BFloat16>{}, Type<float>{});
  if (param == S::Half && history == S::Half) return f(Type<Half>{}, Type<Half>{});
  if (param == S::Half && history == S::Float) return f(Type<Half>{}, Type<float>{});
  if (param == S::Half && history == S::BFloat16) return f(Type<Half>{}, Type<BFloat16>{});
  if (param == S::BFloat16 && history == S::Half) return f(Type<BFloat16>{}, Type<Half>{});
  TORCH_CHECK(false, name, ": parameters of dtype ", param, " with a history of dtype ", history,
              " are not supported");
}

}  // namespace mlbfgs_fused
