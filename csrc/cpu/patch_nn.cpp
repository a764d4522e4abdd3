// CPU kernel of fastgen::patch_nn: GPNN's normalised patch nearest neighbour,
//   idx_i = argmin_j ||q_i - k_j||^2 / (alpha + min_i' ||q_i' - k_j||^2),
// in two full passes of the tiled engine (column minimum, then weighted argmin), never
// an N x M buffer. alpha = None is the plain nearest neighbour (exact, certified).
// The pruned passes over clustered keys are csrc/cpu/patch_index.cpp.
#include <torch/all.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "../engine/reductions.h"
#include "../engine/sqdist_engine.h"
#include "checks.h"
#include "knn.h"
#include "operands.h"

namespace fastgen {
namespace {

at::Tensor patch_nn_cpu(const at::Tensor& queries, const at::Tensor& keys,
                        std::optional<double> alpha, c10::string_view precision) {
  check_point_sets(queries, keys);
  TORCH_CHECK_VALUE(keys.size(1) >= 1, "keys is empty (0 patches)");
  if (alpha.has_value()) check_alpha(*alpha);
  const std::string prec(precision);
  const int64_t B = queries.size(0), N = queries.size(1), M = keys.size(1);
  if (!alpha.has_value()) {
    auto [dist, idx] = cpu::certified_topk(queries, keys, 1, false, prec);
    return idx.view({B, N});
  }
  auto idx = at::empty({B, N}, queries.options().dtype(at::kLong));
  if (N == 0) {
    cpu::check_precision(prec);
    return idx;
  }
  cpu::PreparedOperands p(queries, keys, prec, "queries", "keys");
  const engine::Shape shape{B, N, M, p.D};

  // pass 1: how well each key is covered by the queries
  at::Tensor colmin = at::empty({B, M}, p.kn.options());
  engine::ColumnMinArgs ca{B, N, M, p.qn.data_ptr<float>(), p.kn.data_ptr<float>(),
                           colmin.data_ptr<float>()};
  engine::for_each_col_block(shape, p.tiling, p.gemm, engine::ColumnMin(ca));

  // pass 2: keys already well covered are penalised, which pushes every key to be used
  at::Tensor weights = (colmin + *alpha).reciprocal_();
  engine::WeightedArgminArgs wa{B, N, M, p.qn.data_ptr<float>(), p.kn.data_ptr<float>(),
                                weights.data_ptr<float>(), idx.data_ptr<int64_t>(), nullptr};
  engine::for_each_row_block(shape, p.tiling, p.gemm, engine::WeightedArgmin(wa));
  return idx;
}

}  // namespace
}  // namespace fastgen

TORCH_LIBRARY_IMPL(fastgen, CPU, m) { m.impl("patch_nn", &fastgen::patch_nn_cpu); }
