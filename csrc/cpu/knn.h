// Exact k-nearest-neighbour search on the CPU: the knn op's kernel, also called by
// nearest_code (k = 1) and by patch_nn without alpha (the plain nearest neighbour).
#pragma once

#include <torch/all.h>

#include <string>
#include <tuple>

namespace fastgen {
namespace cpu {

// queries (B, N, D), keys (B, M, D), same floating dtype. precision: "fp32" runs the
// cross term in fp32; "bf16" runs it on bf16 inputs with fp32 accumulation. Both
// return the float64-exact ranking (ties to the lowest index) and float64-accurate
// squared distances, as float32 (B, N, k) and int64 (B, N, k): candidates within a
// proven error bound (engine/error_bound.h) of the running k-th best are re-ranked by
// sum((q - k)^2) computed from the inputs.
std::tuple<at::Tensor, at::Tensor> certified_topk(const at::Tensor& queries,
                                                  const at::Tensor& keys, int64_t k,
                                                  bool exclude_self,
                                                  const std::string& precision,
                                                  const char* query_name = "queries",
                                                  const char* key_name = "keys");

// Rows answered by the full-scan fallback since the process started (near-duplicate
// data); reported by fastgen.info() so a slow case is visible.
int64_t overflow_row_count();
// rows whose fp32 window held a large share of the keys, or passed the candidate cap:
// screened again by float64 GEMMs and re-ranked exactly (knn.cpp rerank_deferred_rows)
int64_t dense_row_count();
// rows of those whose float64 screen still held > 4,096 candidates (exact duplicates):
// answered by the blocked float64 scan over all keys
int64_t scan_row_count();

}  // namespace cpu
}  // namespace fastgen
