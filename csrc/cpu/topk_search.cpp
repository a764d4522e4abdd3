#include "topk_search.h"

#include <atomic>
#include <cmath>
#include <cstdio>
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

// FASTGEN_TILE=ROWSxCOLS overrides the tile shape (for benchmarking tile choices).
engine::Tiling tiling_from_env() {
  engine::Tiling t;
  if (const char* v = std::getenv("FASTGEN_TILE")) {
    long r = 0, c = 0;
    if (std::sscanf(v, "%ldx%ld", &r, &c) == 2 && r > 0 && c > 0 && r <= 4096 && c <= 8192) {
      t.block_rows = r;
      t.block_cols = c;
    }
  }
  return t;
}

// One pass per input: centred copy, squared norms, and the finiteness check (a
// non-finite norm means a NaN/inf input or a norm past float32's range).
void center_and_norm(const at::Tensor& x, const at::Tensor& mu, at::Tensor& xc, at::Tensor& xn,
                     const char* name) {
  const int64_t B = x.size(0), R = x.size(1), D = x.size(2);
  const float* src = x.const_data_ptr<float>();
  const float* m = mu.const_data_ptr<float>();
  float* dst = xc.data_ptr<float>();
  float* nrm = xn.data_ptr<float>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, B * R, 256, [&](int64_t s, int64_t e) {
    bool ok = true;
    for (int64_t row = s; row < e; ++row) {
      const float* mb = m + (row / R) * D;
      const float* a = src + row * D;
      float* o = dst + row * D;
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) {
        const float v = a[d] - mb[d];
        o[d] = v;
        acc += v * v;
      }
      nrm[row] = acc;
      // 4x: a pairwise distance ||q - k||^2 <= 2||q||^2 + 2||k||^2 must stay finite too
      ok = ok && std::isfinite(4.0f * acc);
    }
    if (!ok) finite = false;
  });
  if (!finite) {
    TORCH_CHECK_VALUE(at::isfinite(x).all().item<bool>(), name, " contains NaN or infinite values");
    TORCH_CHECK_VALUE(false, name, " has values too large for float32 squared distances "
                      "(a squared norm overflows); rescale the data");
  }
}

PreparedOperands::PreparedOperands(const at::Tensor& queries, const at::Tensor& keys,
                                   const std::string& precision, const char* query_name,
                                   const char* key_name, const at::Tensor* centre) {
  TORCH_CHECK_VALUE(precision == "fp32" || precision == "bf16",
                    "precision must be 'fp32' or 'bf16', got '", precision, "'");
  B = queries.size(0);
  N = queries.size(1);
  M = keys.size(1);
  D = keys.size(2);
  bf16 = precision == "bf16";
  // Original values in fp32 (exact for fp16/bf16 inputs): the exact re-rank reads these.
  q32 = queries.to(at::kFloat).contiguous();
  k32 = keys.to(at::kFloat).contiguous();
  // Subtracting the keys' mean leaves every distance unchanged but shrinks the
  // norms, and with them the cancellation in ||q||^2 + ||k||^2 - 2 q.k: data far
  // from the origin (+1000 on every coordinate) ranks as well as centred data.
  const at::Tensor mu = centre != nullptr ? centre->to(at::kFloat).view({1, 1, D}).expand({B, 1, D}).contiguous()
                                           : k32.mean(1, /*keepdim=*/true).contiguous();
  qc = at::empty_like(q32);
  kc = at::empty_like(k32);
  qn = at::empty({B, N}, q32.options());
  kn = at::empty({B, M}, k32.options());
  // keys first, so a NaN in them is reported as the keys' fault
  center_and_norm(k32, mu, kc, kn, key_name);
  center_and_norm(q32, mu, qc, qn, query_name);

  // Operands for the cross term. bf16 goes through oneDNN's bf16 matmul (at::mm),
  // whose bf16 *output* rounding is part of the error bound; FASTGEN_BF16_GEMM=mkl
  // selects MKL's bf16 GEMM with fp32 output instead (slower on CPUs MKL does not tune for).
  qg = qc;
  kg = kc;
  if (bf16) {
    // -2 folded into the queries: exact (a power of two), saves a pass per tile
    qg = (qc * (bf16_via_mkl() ? 1.0 : -2.0)).to(at::kBFloat16).contiguous();
    kg = kc.to(at::kBFloat16).contiguous();
  }
  ops = GemmOperands{qg.data_ptr(), kg.data_ptr(), N, M, D};
  gemm = !bf16            ? fp32_tile_gemm(&ops)
         : bf16_via_mkl() ? bf16_mkl_tile_gemm(&ops)
                          : bf16_aten_tile_gemm(&ops);
  ptr_gemm = !bf16            ? fp32_ptr_gemm(&ops)
             : bf16_via_mkl() ? bf16_mkl_ptr_gemm(&ops)
                              : bf16_aten_ptr_gemm(&ops);
  tiling = tiling_from_env();
  tiling.threads = at::get_num_threads();
}

double PreparedOperands::input_roundoff() const { return bf16 ? engine::unit_roundoff_bf16() : 0.0; }
double PreparedOperands::output_roundoff() const {
  return bf16 && !bf16_via_mkl() ? engine::unit_roundoff_bf16() : 0.0;
}

std::tuple<at::Tensor, at::Tensor> certified_topk(const at::Tensor& queries,
                                                  const at::Tensor& keys, int64_t k,
                                                  bool exclude_self,
                                                  const std::string& precision,
                                                  const char* query_name, const char* key_name) {
  const int64_t B = queries.size(0), N = queries.size(1);
  auto dist = at::empty({B, N, k}, queries.options().dtype(at::kFloat));
  auto idx = at::empty({B, N, k}, queries.options().dtype(at::kLong));
  if (B == 0 || N == 0) {
    TORCH_CHECK_VALUE(precision == "fp32" || precision == "bf16",
                      "precision must be 'fp32' or 'bf16', got '", precision, "'");
    return {dist, idx};
  }
  PreparedOperands p(queries, keys, precision, query_name, key_name);
  const int64_t M = p.M, D = p.D;
  const at::Tensor& qn = p.qn;
  const at::Tensor& kn = p.kn;
  const double ub = p.input_roundoff(), uout = p.output_roundoff();
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
  const at::Tensor& q32 = p.q32;
  const at::Tensor& k32 = p.k32;
  const engine::TileGemm& gemm = p.gemm;

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
  engine::for_each_row_block(engine::Shape{B, N, M, D}, p.tiling, gemm,
                             engine::CertifiedTopK(args));
  g_overflow_rows += overflow;
  return {dist, idx};
}

}  // namespace cpu
}  // namespace fastgen
