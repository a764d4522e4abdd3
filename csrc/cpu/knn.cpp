// CPU kernel of fastgen::knn: exact (certified) k nearest neighbours, and the search
// nearest_code and the plain patch_nn share (knn.h).
#include "knn.h"

#include <torch/all.h>
#include <torch/library.h>

#include <atomic>

#include "../engine/error_bound.h"
#include "../engine/reductions.h"
#include "../engine/sqdist_engine.h"
#include "checks.h"
#include "operands.h"

namespace fastgen {
namespace cpu {
namespace {
std::atomic<int64_t> g_overflow_rows{0};
}

int64_t overflow_row_count() { return g_overflow_rows.load(); }

std::tuple<at::Tensor, at::Tensor> certified_topk(const at::Tensor& queries,
                                                  const at::Tensor& keys, int64_t k,
                                                  bool exclude_self,
                                                  const std::string& precision,
                                                  const char* query_name, const char* key_name) {
  const int64_t B = queries.size(0), N = queries.size(1);
  auto dist = at::empty({B, N, k}, queries.options().dtype(at::kFloat));
  auto idx = at::empty({B, N, k}, queries.options().dtype(at::kLong));
  if (B == 0 || N == 0) {
    check_precision(precision);
    return {dist, idx};
  }
  PreparedOperands p(queries, keys, precision, query_name, key_name);
  const int64_t M = p.M, D = p.D;
  const at::Tensor& qn = p.qn;
  const at::Tensor& kn = p.kn;
  const engine::ErrorBound bound(D, p.input_roundoff(), p.output_roundoff());
  // ||q_c|| per query, rounded up (the error bound is sized per (query, key) pair)
  const at::Tensor qlen = qn.sqrt().mul(1.0 + 1e-6).contiguous();
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
                                 qlen.data_ptr<float>(),
                                 bound.coef,
                                 bound.slack,
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
