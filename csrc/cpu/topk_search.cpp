#include "topk_search.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>

#include "../engine/error_bound.h"
#include "../engine/reductions.h"
#include "../engine/sqdist_engine.h"
#include "tile_gemm.h"

namespace fastgen {
namespace cpu {
namespace {
std::atomic<int64_t> g_overflow_rows{0};
}

int64_t overflow_row_count() { return g_overflow_rows.load(); }

// FASTGEN_BF16_GEMM=mkl picks MKL's bf16 GEMM (for comparing the two bf16 paths).
bool bf16_via_mkl() {
  static const bool enabled = [] {
    const char* v = std::getenv("FASTGEN_BF16_GEMM");
    return v != nullptr && std::string(v) == "mkl" && has_blas_bf16_gemm();
  }();
  return enabled;
}

std::tuple<at::Tensor, at::Tensor> certified_topk(const at::Tensor& queries,
                                                  const at::Tensor& keys, int64_t k,
                                                  bool exclude_self,
                                                  const std::string& precision) {
  TORCH_CHECK(precision == "fp32" || precision == "bf16",
              "precision must be 'fp32' or 'bf16', got '", precision, "'");
  const int64_t B = queries.size(0), N = queries.size(1), M = keys.size(1), D = keys.size(2);
  auto dist = at::empty({B, N, k}, queries.options().dtype(at::kFloat));
  auto idx = at::empty({B, N, k}, queries.options().dtype(at::kLong));
  if (B == 0 || N == 0) return {dist, idx};

  // Original values in fp32 (exact for fp16/bf16 inputs): the re-rank reads these.
  const at::Tensor q32 = queries.to(at::kFloat).contiguous();
  const at::Tensor k32 = keys.to(at::kFloat).contiguous();
  // Subtracting the keys' mean leaves every distance unchanged but shrinks the
  // norms, and with them the cancellation in ||q||^2 + ||k||^2 - 2 q.k: data far
  // from the origin (+1000 on every coordinate) ranks as well as centred data.
  const at::Tensor mu = k32.mean(1, /*keepdim=*/true);
  at::Tensor qc = (q32 - mu).contiguous();
  at::Tensor kc = (k32 - mu).contiguous();
  const at::Tensor qn = qc.square().sum(-1).contiguous();  // (B, N)
  const at::Tensor kn = kc.square().sum(-1).contiguous();  // (B, M)

  const bool bf16 = precision == "bf16";
  const double ub = bf16 ? engine::unit_roundoff_bf16() : 0.0;
  const double uout = bf16 && !bf16_via_mkl() ? engine::unit_roundoff_bf16() : 0.0;
  // max ||k_c|| per batch, nudged up by one ulp-scale factor for the norm's own rounding
  const at::Tensor kmax = kn.amax(1).sqrt().mul(1.0 + 1e-6).to(at::kDouble).contiguous();
  const at::Tensor qnorm = qn.sqrt().to(at::kDouble).contiguous();
  at::Tensor window = at::empty({B, N}, qn.options());
  {
    const double* qa = qnorm.data_ptr<double>();
    const double* km = kmax.data_ptr<double>();
    float* w = window.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < N; ++i)
        w[b * N + i] = engine::candidate_window(qa[b * N + i], km[b], D, ub, uout);
  }

  // Operands for the cross term. bf16 goes through oneDNN's bf16 matmul (at::mm),
  // whose bf16 *output* rounding is part of the error bound; FASTGEN_BF16_GEMM=mkl
  // selects MKL's bf16 GEMM with fp32 output instead (slower on CPUs MKL does not tune for).
  at::Tensor qg = qc, kg = kc;
  if (bf16) {
    // -2 folded into the queries: exact (a power of two), saves a pass per tile
    qg = (qc * (bf16_via_mkl() ? 1.0 : -2.0)).to(at::kBFloat16).contiguous();
    kg = kc.to(at::kBFloat16).contiguous();
  }
  GemmOperands ops{qg.data_ptr(), kg.data_ptr(), N, M, D};
  const engine::TileGemm gemm = !bf16         ? fp32_tile_gemm(&ops)
                                : bf16_via_mkl() ? bf16_mkl_tile_gemm(&ops)
                                                 : bf16_aten_tile_gemm(&ops);

  int64_t overflow = 0;
  engine::CertifiedTopKArgs args{B,
                                 N,
                                 M,
                                 D,
                                 k,
                                 exclude_self,
                                 kn.data_ptr<float>(),
                                 window.data_ptr<float>(),
                                 q32.data_ptr<float>(),
                                 k32.data_ptr<float>(),
                                 dist.data_ptr<float>(),
                                 idx.data_ptr<int64_t>(),
                                 &overflow};
  engine::Tiling tiling;
  tiling.threads = at::get_num_threads();
  engine::for_each_row_block(engine::Shape{B, N, M, D}, tiling, gemm,
                             engine::CertifiedTopK(args));
  g_overflow_rows += overflow;
  return {dist, idx};
}

}  // namespace cpu
}  // namespace fastgen
