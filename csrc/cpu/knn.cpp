// CPU kernel of fastgen::knn: exact (certified) k nearest neighbours.
#include <torch/all.h>
#include <torch/library.h>

#include "checks.h"
#include "topk_search.h"

namespace fastgen {
namespace {

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                           int64_t k, bool exclude_self,
                                           c10::string_view precision) {
  check_point_sets(queries, keys);
  TORCH_CHECK_VALUE(!exclude_self || queries.size(1) == keys.size(1),
              "exclude_self needs queries and keys to be the same set (N == M), got N=",
              queries.size(1), " M=", keys.size(1));
  const int64_t available = keys.size(1) - (exclude_self ? 1 : 0);
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK_VALUE(k <= available, "k=", k, " exceeds the number of keys available (",
              available, exclude_self ? ", self excluded)" : ")");
  return cpu::certified_topk(queries, keys, k, exclude_self, std::string(precision));
}

}  // namespace
}  // namespace fastgen

TORCH_LIBRARY_IMPL(fastgen, CPU, m) { m.impl("knn", &fastgen::knn_cpu); }
