// The tiled squared-L2 engine shared by nearest_code, knn and (later) patch_nn.
//
// Distances ||q||^2 + ||k||^2 - 2 q.k are produced one (row block x column block)
// tile at a time into a per-thread buffer and handed to a *reduction* while the
// tile is still in cache, so the N x M matrix never exists. The engine knows
// nothing about torch: the cross term comes from a `TileGemm` callback (MKL
// sgemm, a bf16 GEMM, or a naive loop in the C++ tests) and the reduction is a
// template parameter. That keeps the header testable under ASan/UBSan without
// libtorch (see csrc/tests/test_engine.cpp).
//
// Two traversal orders:
//   for_each_row_block  - a thread owns a block of query rows and sweeps every key
//                         block; for row reductions (argmin, top-k, weighted argmin).
//   for_each_col_block  - a thread owns a block of key columns and sweeps every
//                         query block; for column reductions (GPNN's column minimum).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "gemm.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastgen {
namespace engine {

struct Shape {
  int64_t batch;  // B
  int64_t rows;   // N queries per batch
  int64_t cols;   // M keys per batch
  int64_t dim;    // D
};

struct Tiling {
  // 128 x 512 fp32 = 256 KiB: the tile and the key norms it reads stay in L2
  // while the reduction sweeps it. Measured choices live in benchmarks/RESULTS.md.
  int64_t block_rows = 128;
  int64_t block_cols = 512;
  int threads = 0;  // 0: the OpenMP default
};

inline int engine_threads(const Tiling& t) {
#ifdef _OPENMP
  return t.threads > 0 ? t.threads : omp_get_max_threads();
#else
  (void)t;
  return 1;
#endif
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Row reduction interface (duck-typed):
//   struct Local {                       // one per thread
//     void begin(int64_t b, int64_t r0, int64_t nr);
//     // tile[r * ldc + c] holds -2 q.k; the reduction adds the norms it needs
//     void tile(const float* tile, int64_t ldc, int64_t b, int64_t r0, int64_t nr,
//               int64_t c0, int64_t nc);
//     void end(int64_t b, int64_t r0, int64_t nr);
//   };
//   Local make_local() const;
template <class Reduction>
void for_each_row_block(const Shape& s, const Tiling& t, const TileGemm& gemm,
                        const Reduction& red) {
  if (s.batch == 0 || s.rows == 0 || s.cols == 0) return;
  const int64_t nrb = ceil_div(s.rows, t.block_rows);
  const int64_t ncb = ceil_div(s.cols, t.block_cols);
  const int64_t work = s.batch * nrb;
#pragma omp parallel num_threads(engine_threads(t))
  {
    std::vector<float> tile(static_cast<size_t>(t.block_rows * t.block_cols));
    auto local = red.make_local();
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < work; ++w) {
      const int64_t b = w / nrb;
      const int64_t r0 = (w % nrb) * t.block_rows;
      const int64_t nr = std::min(t.block_rows, s.rows - r0);
      local.begin(b, r0, nr);
      for (int64_t cb = 0; cb < ncb; ++cb) {
        const int64_t c0 = cb * t.block_cols;
        const int64_t nc = std::min(t.block_cols, s.cols - c0);
        gemm(b, r0, nr, c0, nc, tile.data(), t.block_cols);
        local.tile(tile.data(), t.block_cols, b, r0, nr, c0, nc);
      }
      local.end(b, r0, nr);
    }
  }
}

// Column reduction interface: the same Local, with begin/end taking a column range
// and tile() called for every row block of that column range.
template <class Reduction>
void for_each_col_block(const Shape& s, const Tiling& t, const TileGemm& gemm,
                        const Reduction& red) {
  if (s.batch == 0 || s.rows == 0 || s.cols == 0) return;
  const int64_t nrb = ceil_div(s.rows, t.block_rows);
  const int64_t ncb = ceil_div(s.cols, t.block_cols);
  const int64_t work = s.batch * ncb;
#pragma omp parallel num_threads(engine_threads(t))
  {
    std::vector<float> tile(static_cast<size_t>(t.block_rows * t.block_cols));
    auto local = red.make_local();
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < work; ++w) {
      const int64_t b = w / ncb;
      const int64_t c0 = (w % ncb) * t.block_cols;
      const int64_t nc = std::min(t.block_cols, s.cols - c0);
      local.begin(b, c0, nc);
      for (int64_t rb = 0; rb < nrb; ++rb) {
        const int64_t r0 = rb * t.block_rows;
        const int64_t nr = std::min(t.block_rows, s.rows - r0);
        gemm(b, r0, nr, c0, nc, tile.data(), t.block_cols);
        local.tile(tile.data(), t.block_cols, b, r0, nr, c0, nc);
      }
      local.end(b, c0, nc);
    }
  }
}

}  // namespace engine
}  // namespace fastgen
