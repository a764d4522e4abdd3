// CPU kernel of fastgen::nearest_code: the VQ codebook lookup (exact argmin).
#include <torch/all.h>
#include <torch/library.h>

#include "checks.h"
#include "knn.h"

namespace fastgen {
namespace {

std::tuple<at::Tensor, at::Tensor> nearest_code_cpu(const at::Tensor& x,
                                                    const at::Tensor& codebook,
                                                    c10::string_view precision) {
  check_points(x, "x", 2);
  check_points(codebook, "codebook", 2);
  TORCH_CHECK_TYPE(x.scalar_type() == codebook.scalar_type(), "x (", x.scalar_type(),
              ") and codebook (", codebook.scalar_type(), ") must have the same dtype");
  TORCH_CHECK_VALUE(x.size(1) == codebook.size(1), "x has D=", x.size(1), " features but codebook has D=",
              codebook.size(1));
  TORCH_CHECK_VALUE(codebook.size(0) >= 1, "codebook is empty (0 codes)");
  auto [dist, idx] = cpu::certified_topk(x.unsqueeze(0), codebook.unsqueeze(0), 1, false,
                                         std::string(precision), "x", "codebook");
  return {dist.view({x.size(0)}), idx.view({x.size(0)})};
}

}  // namespace
}  // namespace fastgen

TORCH_LIBRARY_IMPL(fastgen, CPU, m) { m.impl("nearest_code", &fastgen::nearest_code_cpu); }
