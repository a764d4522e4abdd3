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


// queries (B, N, D) and keys (B, M, D): one dtype, one batch size, one D.
inline void check_point_sets(const at::Tensor& queries, const at::Tensor& keys) {
  check_points(queries, "queries", 3);
  check_points(keys, "keys", 3);
  TORCH_CHECK_TYPE(queries.scalar_type() == keys.scalar_type(), "queries (", queries.scalar_type(),
                   ") and keys (", keys.scalar_type(), ") must have the same dtype");
  TORCH_CHECK_VALUE(queries.size(0) == keys.size(0),
                    "queries and keys must have the same batch size, got ", queries.size(0),
                    " and ", keys.size(0));
  TORCH_CHECK_VALUE(queries.size(2) == keys.size(2), "queries have D=", queries.size(2),
                    " features but keys have D=", keys.size(2));
}

}  // namespace fastgen
