// Argument checks shared by the CPU ops. Every failure names the argument; the
// _VALUE/_TYPE forms reach Python as ValueError/TypeError, like the Python-side checks.
#pragma once

#include <torch/all.h>

#include <vector>

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

// A 1-D tensor of n entries of `type` on the CPU (contiguous), or a clear error.
inline at::Tensor checked_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType type) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must be a 1-D tensor of ", n, " entries, got shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == type, name, " must be ", type, ", got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  return t.contiguous();
}

// Group boundaries over n items: int64, 0 = first <= ... <= last = n; returned as a vector.
inline std::vector<int64_t> checked_offsets(const at::Tensor& offsets, const char* name, int64_t n) {
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 2, name,
                    " must be a 1-D tensor of at least 2 entries, got shape ", offsets.sizes());
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, name, " must be int64, got ", offsets.scalar_type());
  TORCH_CHECK(offsets.device().is_cpu(), name, " must be on the CPU, got ", offsets.device());
  const at::Tensor o = offsets.contiguous();
  std::vector<int64_t> v(o.data_ptr<int64_t>(), o.data_ptr<int64_t>() + o.numel());
  TORCH_CHECK_VALUE(v.front() == 0 && v.back() == n, name, " must start at 0 and end at the number of items (", n,
                    "), got ", v.front(), " ... ", v.back());
  for (size_t g = 1; g < v.size(); ++g)
    TORCH_CHECK_VALUE(v[g] >= v[g - 1], name, " must be non-decreasing (entry ", g, ")");
  return v;
}

// A permutation of 0..n-1 (int64, CPU); returned contiguous.
inline at::Tensor checked_permutation(const at::Tensor& perm, const char* name, int64_t n) {
  const at::Tensor o = checked_vector(perm, name, n, at::kLong);
  const int64_t* p = o.data_ptr<int64_t>();
  std::vector<char> seen(static_cast<size_t>(n), 0);
  for (int64_t j = 0; j < n; ++j) {
    TORCH_CHECK_VALUE(p[j] >= 0 && p[j] < n && !seen[p[j]], name, " must be a permutation of 0..", n - 1,
                      " (entry ", j, " is ", p[j], ")");
    seen[p[j]] = 1;
  }
  return o;
}

// int64 indices, each in [0, n): one pass, the message names the argument and the range.
inline void check_index_range(const at::Tensor& t, const char* name, int64_t n, const char* what) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  if (t.numel() == 0) return;
  const auto [mn, mx] = at::aminmax(t);
  const int64_t lo = mn.item<int64_t>(), hi = mx.item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < n, name, " values must be in [0, ", n, ") (", what, "), got values in [", lo,
                    ", ", hi, "]");
}

// GPNN's alpha: float32 weights 1 / (alpha + colmin) must neither overflow nor vanish.
inline void check_alpha(double alpha) {
  TORCH_CHECK_VALUE(alpha >= 1e-30 && alpha <= 1e30, "alpha must be in [1e-30, 1e30] or None, got ", alpha);
}

}  // namespace fastgen
