// GEMM providers for the engine's cross term: C = -2 * Q_blk * K_blk^T.
#pragma once

#include <torch/all.h>

#include "../engine/gemm.h"

namespace fastgen {
namespace cpu {

// Row-major (B, N, D) and (B, M, D) operands of one dtype, contiguous.
struct GemmOperands {
  const void* queries;
  const void* keys;
  int64_t rows, cols, dim;
};

// fp32 inputs through the BLAS that torch links (MKL's sgemm when its symbol is
// visible, else at::mm_out on views of the same memory).
engine::TileGemm fp32_tile_gemm(const GemmOperands* ops);
// bf16 inputs, fp32 accumulation, bf16 output (oneDNN through at::mm), widened into
// the fp32 tile. The caller pre-scales the queries by -2 and accounts for the output
// rounding in the error bound.
engine::TileGemm bf16_aten_tile_gemm(const GemmOperands* ops);
// bf16 inputs, fp32 accumulation and output (MKL's cblas_gemm_bf16bf16f32; needs
// has_blas_bf16_gemm()). Queries NOT pre-scaled: alpha = -2.
engine::TileGemm bf16_mkl_tile_gemm(const GemmOperands* ops);

// The same three GEMMs on gathered rows (engine::PtrGemm), for the pruned passes;
// `ops` only supplies dim.
engine::PtrGemm fp32_ptr_gemm(const GemmOperands* ops);
engine::PtrGemm bf16_aten_ptr_gemm(const GemmOperands* ops);
engine::PtrGemm bf16_mkl_ptr_gemm(const GemmOperands* ops);

bool has_blas_sgemm();
bool has_blas_bf16_gemm();

}  // namespace cpu
}  // namespace fastgen
