// GEMM providers for the engine's cross term: C = -2 * Q_blk * K_blk^T.
#pragma once

#include <torch/all.h>

#include "../engine/sqdist_engine.h"

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
// bf16 inputs with fp32 accumulation (MKL's cblas_gemm_bf16bf16f32, else at::mm_out
// of bf16 views into an fp32 buffer).
engine::TileGemm bf16_tile_gemm(const GemmOperands* ops);

bool has_blas_sgemm();
bool has_blas_bf16_gemm();

}  // namespace cpu
}  // namespace fastgen
