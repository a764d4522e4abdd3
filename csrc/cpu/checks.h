// Argument checks shared by the CPU ops. Every failure names the argument; the
// _VALUE/_TYPE forms reach Python as ValueError/TypeError, like the Python-side checks.
#pragma once

#include <torch/all.h>

namespace fastgen {

inline void check_points(const at::Tensor& t, const char* name, int64_t ndim) {
  TORCH_CHECK_VALUE(t.dim() == ndim, name, " must be a ", ndim, "-D tensor, got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU for this kernel, got ", t.device());
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(t.size(-1) > 0, name, " has zero features (last dimension is 0)");
}


}  // namespace fastgen
