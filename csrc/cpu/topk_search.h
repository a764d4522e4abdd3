// Exact k-nearest-neighbour search on the CPU, shared by the knn and nearest_code
// ops: centre, bound the error, run the tiled engine with CertifiedTopK.
#pragma once

#include <torch/all.h>

#include <string>
#include <tuple>

#include "../engine/sqdist_engine.h"
#include "tile_gemm.h"

namespace fastgen {
namespace cpu {

// Everything the engine needs for one (queries, keys) pair, built in one pass per
// input: fp32 originals, copies centred on the keys' mean (see DESIGN.md on
// cancellation), their squared norms, the finiteness check, the GEMM operands.
struct PreparedOperands {
  // centre: the (D,) fp32 point subtracted from both sets (default: the keys' mean);
  // calls on subsets of one key set pass the full set's, so they round alike
  PreparedOperands(const at::Tensor& queries, const at::Tensor& keys, const std::string& precision,
                   const char* query_name, const char* key_name, const at::Tensor* centre = nullptr);
  PreparedOperands(const PreparedOperands&) = delete;  // gemm points into ops
  double input_roundoff() const;   // of the GEMM's inputs (0 for fp32)
  double output_roundoff() const;  // of the GEMM's output (0 for fp32)

  int64_t B, N, M, D;
  bool bf16;
  at::Tensor q32, k32, qc, kc, qn, kn, qg, kg;
  GemmOperands ops;
  engine::TileGemm gemm;
  engine::PtrGemm ptr_gemm;  // the same GEMM on gathered rows (pruned passes)
  engine::Tiling tiling;
};

// queries (B, N, D), keys (B, M, D), same floating dtype. precision: "fp32" runs the
// cross term in fp32; "bf16" runs it on bf16 inputs with fp32 accumulation. Both
// return the float64-exact ranking (ties to the lowest index) and float64-accurate
// squared distances, as float32 (B, N, k) and int64 (B, N, k).
std::tuple<at::Tensor, at::Tensor> certified_topk(const at::Tensor& queries,
                                                  const at::Tensor& keys, int64_t k,
                                                  bool exclude_self,
                                                  const std::string& precision,
                                                  const char* query_name = "queries",
                                                  const char* key_name = "keys");

// Rows answered by the full-scan fallback since the process started (near-duplicate
// data); reported by fastgen.info() so a slow case is visible.
int64_t overflow_row_count();

}  // namespace cpu
}  // namespace fastgen
