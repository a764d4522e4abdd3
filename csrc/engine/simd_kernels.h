// The per-tile loops of the reductions, as free functions compiled several times
// (AVX-512, AVX2, baseline) and picked at load time by the CPU's features: the
// build needs no -march=native to be correct, yet runs wide vectors where they exist.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(FASTGEN_NO_CLONES)
#define FASTGEN_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTGEN_SIMD_CLONES
#endif

namespace fastgen {
namespace engine {

constexpr int64_t kScreenChunk = 16;

// mc[j] = min over columns c of chunk j (kScreenChunk wide) of t[c] + kn[c].
FASTGEN_SIMD_CLONES static void chunk_minima(const float* t, const float* kn, int64_t nc,
                                             float* mc) {
  int64_t j = 0, c0 = 0;
  for (; c0 + kScreenChunk <= nc; c0 += kScreenChunk, ++j) {
    float m = std::numeric_limits<float>::infinity();
#pragma omp simd reduction(min : m)
    for (int64_t c = c0; c < c0 + kScreenChunk; ++c) m = std::min(m, t[c] + kn[c]);
    mc[j] = m;
  }
  if (c0 < nc) {
    float m = std::numeric_limits<float>::infinity();
    for (int64_t c = c0; c < nc; ++c) m = std::min(m, t[c] + kn[c]);
    mc[j] = m;
  }
}

// cm[c] = min(cm[c], t[c] + q) over one tile row (GPNN pass 1).
FASTGEN_SIMD_CLONES static void column_min_update(float* cm, const float* t, float q, int64_t nc) {
#pragma omp simd
  for (int64_t c = 0; c < nc; ++c) cm[c] = std::min(cm[c], t[c] + q);
}

// min over c of max(q + t[c] + kn[c], 0) * w[c] (GPNN pass 2).
FASTGEN_SIMD_CLONES static float weighted_min(const float* t, const float* kn, const float* w,
                                              float q, int64_t nc) {
  float m = std::numeric_limits<float>::infinity();
#pragma omp simd reduction(min : m)
  for (int64_t c = 0; c < nc; ++c) m = std::min(m, std::max(q + t[c] + kn[c], 0.0f) * w[c]);
  return m;
}

}  // namespace engine
}  // namespace fastgen
