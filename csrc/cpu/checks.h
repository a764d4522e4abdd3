// Argument checks shared by the CPU ops. Every failure is a TORCH_CHECK that names
// the argument, so Python sees a RuntimeError instead of a crash.
#pragma once

#include <torch/all.h>

namespace fastgen {

inline void check_points(const at::Tensor& t, const char* name, int64_t ndim) {
  TORCH_CHECK(t.dim() == ndim, name, " must be a ", ndim, "-D tensor, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU for this kernel, got ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(t.size(-1) > 0, name, " has zero features (last dimension is 0)");
}

inline void check_finite(const at::Tensor& t, const char* name) {
  if (t.numel() == 0) return;
  TORCH_CHECK(at::isfinite(t).all().item<bool>(), name, " contains NaN or infinite values");
}

}  // namespace fastgen
