#include "operands.h"

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "../engine/error_bound.h"

namespace fastgen {
namespace cpu {
namespace {

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
  const int64_t mu_batches = mu.size(0);  // 1: one centre for every batch element
  const float* src = x.const_data_ptr<float>();
  const float* m = mu.const_data_ptr<float>();
  float* dst = xc.data_ptr<float>();
  float* nrm = xn.data_ptr<float>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, B * R, 256, [&](int64_t s, int64_t e) {
    bool ok = true;
    for (int64_t row = s; row < e; ++row) {
      const float* mb = m + (mu_batches == 1 ? 0 : (row / R)) * D;
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

// The keys' mean snapped to a power-of-two grid at the data's scale (the largest
// |k - mean|), per batch element: (B, M, D) fp32 -> (B, 1, D). Integer-valued data stays
// integer-valued after the shift, so exact ties stay ties. The same formula as
// fastgen.ops.baselines.centering_shift (the torch and Triton backends).
at::Tensor centering_shift(const at::Tensor& k32) {
  const at::Tensor mu = k32.mean(1);  // (B, D)
  const at::Tensor spread = at::maximum(k32.amax(1) - mu, mu - k32.amin(1)).amax(1, /*keepdim=*/true);
  const at::Tensor step = at::exp2(at::floor(at::log2(spread)).clamp_min(-126.0));
  const at::Tensor snapped = at::round(mu / step) * step;
  const at::Tensor keep = (spread == 0) | at::isfinite(spread).logical_not() |
                          at::isfinite(mu).all(1, /*keepdim=*/true).logical_not();
  return at::where(keep, mu, snapped).unsqueeze(1).contiguous();
}

}  // namespace

void check_precision(const std::string& precision) {
  TORCH_CHECK_VALUE(precision == "fp32" || precision == "bf16",
                    "precision must be 'fp32' or 'bf16', got '", precision, "'");
}

PreparedKeys::PreparedKeys(const at::Tensor& keys, const std::string& precision, const char* name) {
  check_precision(precision);
  B = keys.size(0);
  M = keys.size(1);
  D = keys.size(2);
  bf16 = precision == "bf16";
  k32 = keys.to(at::kFloat).contiguous();
  mu = M > 0 ? centering_shift(k32) : at::zeros({B, 1, D}, k32.options());
  kc = at::empty_like(k32);
  kn = at::empty({B, M}, k32.options());
  center_and_norm(k32, mu, kc, kn, name);
  kg = bf16 ? kc.to(at::kBFloat16).contiguous() : kc;
}

PreparedKeys PreparedKeys::gather(const at::Tensor& rows) const {
  TORCH_CHECK(B == 1, "PreparedKeys::gather needs a single key set, got ", B);
  PreparedKeys s;
  s.B = 1;
  s.M = rows.numel();
  s.D = D;
  s.bf16 = bf16;
  s.mu = mu;
  // row by row the same values the full preparation made (centring is per element);
  // k32 stays undefined: only the exact re-rank of certified_topk reads it, never a subset

  s.kc = kc.index_select(1, rows).contiguous();
  s.kn = kn.index_select(1, rows).contiguous();
  s.kg = bf16 ? kg.index_select(1, rows).contiguous() : s.kc;
  return s;
}

PreparedOperands::PreparedOperands(const at::Tensor& queries, const at::Tensor& keys,
                                   const std::string& precision, const char* query_name,
                                   const char* key_name)
    // keys first, so a NaN in them is reported as the keys' fault
    : PreparedOperands(queries, PreparedKeys(keys, precision, key_name), query_name) {}

PreparedOperands::PreparedOperands(const at::Tensor& queries, const PreparedKeys& keys,
                                   const char* query_name) {
  B = queries.size(0);
  N = queries.size(1);
  M = keys.M;
  D = keys.D;
  bf16 = keys.bf16;
  TORCH_CHECK(keys.B == 1 || keys.B == B, "internal error: ", keys.B, " key sets for ", B, " query sets");
  k32 = keys.k32;
  kc = keys.kc;
  kn = keys.kn;
  kg = keys.kg;
  // Original values in fp32 (exact for fp16/bf16 inputs): the exact re-rank reads these.
  q32 = queries.to(at::kFloat).contiguous();
  qc = at::empty_like(q32);
  qn = at::empty({B, N}, q32.options());
  center_and_norm(q32, keys.mu, qc, qn, query_name);
  // Operands for the cross term. bf16 goes through oneDNN's bf16 matmul (at::mm),
  // whose bf16 *output* rounding is part of the error bound; FASTGEN_BF16_GEMM=mkl
  // selects MKL's bf16 GEMM with fp32 output instead (slower on CPUs MKL does not tune for).
  qg = qc;
  if (bf16) {
    // -2 folded into the queries: exact (a power of two), saves a pass per tile
    qg = (qc * (bf16_via_mkl() ? 1.0 : -2.0)).to(at::kBFloat16).contiguous();
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

void PreparedOperands::set_query_operand(const at::Tensor& new_qg) {
  qg = new_qg;
  ops.queries = qg.data_ptr();
}

double PreparedOperands::input_roundoff() const { return bf16 ? engine::unit_roundoff_bf16() : 0.0; }
double PreparedOperands::output_roundoff() const {
  return bf16 && !bf16_via_mkl() ? engine::unit_roundoff_bf16() : 0.0;
}

}  // namespace cpu
}  // namespace fastgen
