// The (parameter, history) dtype pairs the kernels take, on every device: every pair of
// float64, float32, bfloat16 and float16 but a float64 history under narrower parameters
// (mlbfgs_fused/_checks.py HISTORY_DTYPES and check_parameters refuse those first).
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
  if (param == S::Double && history == S::BFloat16) return f(Type<double>{}, Type<BFloat16>{});
  if (param == S::Double && history == S::Half) return f(Type<double>{}, Type<Half>{});
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
