// CPU kernel of fastgen::ball_count: per point, the number of balls (centre, squared
// radius) that contain it and its nearest centre, exact (engine/ball_count.h), in one
// sweep of the tiled engine.
#include <torch/all.h>
#include <torch/library.h>

#include <cmath>

#include "../engine/ball_count.h"
#include "../engine/error_bound.h"
#include "../engine/sqdist_engine.h"
#include "checks.h"
#include "operands.h"

namespace fastgen {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> ball_count_cpu(const at::Tensor& points,
                                                              const at::Tensor& centres,
                                                              const at::Tensor& radii,
                                                              c10::string_view precision) {
  check_points(points, "points", 2);
  check_points(centres, "centres", 2);
  TORCH_CHECK_TYPE(points.scalar_type() == centres.scalar_type(), "points (", points.scalar_type(),
                   ") and centres (", centres.scalar_type(), ") must have the same dtype");
  TORCH_CHECK_VALUE(points.size(1) == centres.size(1), "points have D=", points.size(1),
                    " features but centres have D=", centres.size(1));
  TORCH_CHECK_VALUE(centres.size(0) >= 1, "centres is empty (0 balls)");
  const int64_t N = points.size(0), M = centres.size(0);
  const at::Tensor r = checked_vector(radii, "radii", M, at::kFloat);
  const float* rp = r.const_data_ptr<float>();
  for (int64_t j = 0; j < M; ++j)
    TORCH_CHECK_VALUE(std::isfinite(rp[j]) && rp[j] >= 0.f,
                      "radii must be finite and >= 0 (squared radii), got ", rp[j], " at index ", j);

  auto count = at::zeros({N}, points.options().dtype(at::kLong));
  auto dist = at::empty({1, N, 1}, points.options().dtype(at::kFloat));
  auto idx = at::empty({1, N, 1}, points.options().dtype(at::kLong));
  if (N == 0) {
    cpu::check_precision(std::string(precision));
    return {count, dist.view({N}), idx.view({N})};
  }
  cpu::PreparedOperands p(points.unsqueeze(0), centres.unsqueeze(0), std::string(precision), "points",
                          "centres");
  const int64_t D = p.D;
  const engine::ErrorBound bound(D, p.input_roundoff(), p.output_roundoff());
  const at::Tensor plen = p.qn.sqrt().mul(1.0 + 1e-6).contiguous();
  auto centre_len = at::empty({M}, points.options().dtype(at::kFloat));
  auto radii_next = at::empty({M}, points.options().dtype(at::kFloat));
  engine::ball_count_centre_terms(p.kn.data_ptr<float>(), rp, M, centre_len.data_ptr<float>(),
                                  radii_next.data_ptr<float>());
  int64_t ambiguous = 0;
  engine::CertifiedTopKArgs nearest{1, N, M, D, 1, false,
                                    p.kn.data_ptr<float>(), plen.data_ptr<float>(),
                                    bound.coef, bound.slack,
                                    p.q32.data_ptr<float>(), p.k32.data_ptr<float>(),
                                    dist.data_ptr<float>(), idx.data_ptr<int64_t>(), nullptr, nullptr, nullptr};
  engine::BallCountArgs args{N, M, D,
                             p.qn.data_ptr<float>(), plen.data_ptr<float>(),
                             p.kn.data_ptr<float>(), centre_len.data_ptr<float>(), rp,
                             radii_next.data_ptr<float>(),
                             bound.coef, bound.slack,
                             p.q32.data_ptr<float>(), p.k32.data_ptr<float>(),
                             count.data_ptr<int64_t>(), &ambiguous, &nearest};
  engine::for_each_row_block(engine::Shape{1, N, M, D}, p.tiling, p.gemm, engine::BallCount(args));
  return {count, dist.view({N}), idx.view({N})};
}

}  // namespace
}  // namespace fastgen

TORCH_LIBRARY_IMPL(fastgen, CPU, m) { m.impl("ball_count", &fastgen::ball_count_cpu); }
