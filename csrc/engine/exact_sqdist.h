// The float64 squared distance sum((q - k)^2) of fp32 rows: the exact answer the
// certified reductions re-rank by and report.
//
// Written with GCC vector extensions rather than a scalar loop: the scalar float64
// reduction cannot be vectorised without reordering it, and on near-identical keys
// (an untrained generator's samples, a fresh near-uniform codebook) every key of a row
// is a candidate, so this sum *is* the search. The lane structure (8 partial sums over
// d mod 8, added in a fixed tree, the dim % 8 tail last) is part of the definition: it
// is the same on every CPU (element-wise IEEE operations, no contraction under
// -std=c++17), and the one-pair form and the blocked scan below give bit-identical
// values, so a row's candidates are always compared on equal terms.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "simd_kernels.h"

namespace fastgen {
namespace engine {

typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x8 __attribute__((vector_size(64)));

__attribute__((always_inline)) inline f64x8 load_widen(const float* p) {
  f32x8 x;
  std::memcpy(&x, p, sizeof x);
  return __builtin_convertvector(x, f64x8);
}

__attribute__((always_inline)) inline double lane_sum(f64x8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

inline double tail_sqdist(const float* a, const float* b, int64_t d0, int64_t dim) {
  double acc = 0.0;
  for (int64_t d = d0; d < dim; ++d) {
    const double diff = static_cast<double>(a[d]) - static_cast<double>(b[d]);
    acc += diff * diff;
  }
  return acc;
}

// float64 squared distance between two fp32 rows.
FASTGEN_SIMD_CLONES static double exact_sqdist(const float* a, const float* b, int64_t dim) {
  f64x8 acc = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t body = dim - dim % 8;
  for (int64_t d = 0; d < body; d += 8) {
    const f64x8 diff = load_widen(a + d) - load_widen(b + d);
    acc += diff * diff;
  }
  return lane_sum(acc) + tail_sqdist(a, b, body, dim);
}

// acc[r * lda + c] += the lanes of (q[r] - k[c])^2 over [d0, d1) for 4 rows x 2 keys:
// each key vector loaded serves four rows, each row vector two keys, and the 8
// independent sums keep the vector units busy.
__attribute__((always_inline)) inline void accumulate_4x2(const float* const q[4], const float* const k[2], int64_t d0, int64_t d1,
                           f64x8* acc, int64_t lda) {
  f64x8 a00 = acc[0], a01 = acc[1], a10 = acc[lda], a11 = acc[lda + 1], a20 = acc[2 * lda],
        a21 = acc[2 * lda + 1], a30 = acc[3 * lda], a31 = acc[3 * lda + 1];
  for (int64_t d = d0; d < d1; d += 8) {
    const f64x8 k0 = load_widen(k[0] + d), k1 = load_widen(k[1] + d);
    f64x8 x = load_widen(q[0] + d), t;
    t = x - k0; a00 += t * t; t = x - k1; a01 += t * t;
    x = load_widen(q[1] + d);
    t = x - k0; a10 += t * t; t = x - k1; a11 += t * t;
    x = load_widen(q[2] + d);
    t = x - k0; a20 += t * t; t = x - k1; a21 += t * t;
    x = load_widen(q[3] + d);
    t = x - k0; a30 += t * t; t = x - k1; a31 += t * t;
  }
  acc[0] = a00; acc[1] = a01; acc[lda] = a10; acc[lda + 1] = a11;
  acc[2 * lda] = a20; acc[2 * lda + 1] = a21; acc[3 * lda] = a30; acc[3 * lda + 1] = a31;
}

// The scan's partial sums: doubles with room to start at a 64-byte boundary (a
// std::vector of the vector type would not promise that alignment).
struct ExactScanBuffers {
  std::vector<double> raw;
  f64x8* acc(size_t n) {
    raw.resize(8 * n + 8);
    const uintptr_t p = reinterpret_cast<uintptr_t>(raw.data());
    return reinterpret_cast<f64x8*>((p + 63) & ~static_cast<uintptr_t>(63));
  }
};

// The k nearest of all m keys for each of nq query rows by exact_sqdist, ascending, ties
// to the lowest index, key skip[r] left out of row r (-1: none): best_d / best_i (nq, k).
// Keys go by blocks of kScanKeys and dims by chunks of kScanDims, so a chunk of the
// rows, of the block's keys and their partial sums stay in cache while every group of 4
// rows sweeps them: the keys are read once per call, not once per row. The sums run in
// the same order as exact_sqdist's, so the values are bit-identical to it.
FASTGEN_SIMD_CLONES static void exact_topk_scan(const float* const* q, const int64_t* skip,
                                                int64_t nq, const float* keys, int64_t m,
                                                int64_t dim, int64_t k, double* best_d,
                                                int64_t* best_i, ExactScanBuffers& buf) {
  constexpr int64_t kScanKeys = 32, kScanDims = 512;
  const int64_t groups = (nq + 3) / 4, body = dim - dim % 8;
  std::fill(best_d, best_d + nq * k, std::numeric_limits<double>::infinity());
  std::fill(best_i, best_i + nq * k, int64_t{-1});
  const size_t n_acc = static_cast<size_t>(groups * 4 * kScanKeys);
  f64x8* acc = buf.acc(n_acc);
  const f64x8 zero = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t j0 = 0; j0 < m; j0 += kScanKeys) {
    const int64_t nk = std::min(kScanKeys, m - j0);
    std::fill(acc, acc + n_acc, zero);
    for (int64_t d0 = 0; d0 < body; d0 += kScanDims) {
      const int64_t d1 = std::min(body, d0 + kScanDims);
      for (int64_t g = 0; g < groups; ++g) {
        // a last group of fewer than 4 rows repeats its last row (results unused)
        const float* qr[4];
        for (int64_t r = 0; r < 4; ++r) qr[r] = q[std::min(g * 4 + r, nq - 1)];
        for (int64_t c = 0; c < nk; c += 2) {
          const float* kc[2] = {keys + (j0 + c) * dim, keys + (j0 + std::min(c + 1, nk - 1)) * dim};
          accumulate_4x2(qr, kc, d0, d1, acc + g * 4 * kScanKeys + c, kScanKeys);
        }
      }
    }
    for (int64_t r = 0; r < nq; ++r) {
      double* bd = best_d + r * k;
      int64_t* bi = best_i + r * k;
      for (int64_t c = 0; c < nk; ++c) {
        const int64_t j = j0 + c;
        if (j == skip[r]) continue;
        const double d = lane_sum(acc[r * kScanKeys + c]) + tail_sqdist(q[r], keys + j * dim, body, dim);
        if (!(d < bd[k - 1])) continue;   // keys come in increasing order: ties keep the first
        int64_t pos = k - 1;
        while (pos > 0 && bd[pos - 1] > d) {
          bd[pos] = bd[pos - 1];
          bi[pos] = bi[pos - 1];
          --pos;
        }
        bd[pos] = d;
        bi[pos] = j;
      }
    }
  }
}

}  // namespace engine
}  // namespace fastgen
