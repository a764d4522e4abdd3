// The GEMM callbacks through which the engine gets its cross term. The engine knows
// nothing about BLAS or torch: csrc/cpu/tile_gemm.cpp provides these over MKL/oneDNN,
// csrc/tests/test_engine.cpp over a naive loop.
#pragma once

#include <cstdint>

namespace fastgen {
namespace engine {

// Fills C[r * ldc + c] = -2 * <Q[b][row0 + r], K[b][col0 + c]> for r < rows, c < cols.
// `ctx` is whatever the provider needs (pointers, strides, packed copies).
using TileGemmFn = void (*)(const void* ctx, int64_t batch, int64_t row0, int64_t rows,
                            int64_t col0, int64_t cols, float* C, int64_t ldc);

struct TileGemm {
  TileGemmFn fn;
  const void* ctx;
  void operator()(int64_t b, int64_t r0, int64_t nr, int64_t c0, int64_t nc, float* C,
                  int64_t ldc) const {
    fn(ctx, b, r0, nr, c0, nc, C, ldc);
  }
};

// C[r * ldc + c] = -2 <Q_r, K_c> for row-major Q (nr x dim) and K (nc x dim) of the
// operands' element type (fp32 or bf16); ctx carries dim and the type.
using PtrGemmFn = void (*)(const void* ctx, const void* Q, int64_t nr, const void* K, int64_t nc,
                           float* C, int64_t ldc);
struct PtrGemm {
  PtrGemmFn fn;
  const void* ctx;
  void operator()(const void* Q, int64_t nr, const void* K, int64_t nc, float* C, int64_t ldc) const {
    fn(ctx, Q, nr, K, nc, C, ldc);
  }
};

}  // namespace engine
}  // namespace fastgen
