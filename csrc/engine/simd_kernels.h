// The per-tile loops of the reductions, as free functions compiled several times
// (AVX-512, AVX2, baseline) and picked at load time by the CPU's features: the
// build needs no -march=native to be correct, yet runs wide vectors where they exist.
#pragma once

#include <algorithm>
#include <cmath>
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

// column_min_update that also records, per column, the row r that last lowered it.
FASTGEN_SIMD_CLONES static void column_argmin_update(float* cm, int32_t* arg, const float* t, float q,
                                                     int32_t r, int64_t nc) {
#pragma omp simd
  for (int64_t c = 0; c < nc; ++c) {
    const float v = t[c] + q;
    const bool lower = v < cm[c];
    cm[c] = lower ? v : cm[c];
    arg[c] = lower ? r : arg[c];
  }
}

// min over c of max(q + t[c] + kn[c], 0) * w[c] (GPNN pass 2).
FASTGEN_SIMD_CLONES static float weighted_min(const float* t, const float* kn, const float* w,
                                              float q, int64_t nc) {
  float m = std::numeric_limits<float>::infinity();
#pragma omp simd reduction(min : m)
  for (int64_t c = 0; c < nc; ++c) m = std::min(m, std::max(q + t[c] + kn[c], 0.0f) * w[c]);
  return m;
}

// ||q - c|| ranges of one query row against n ball centres, from the GEMM's cross term
// -2 q.c (in place: lo may alias cross); the vector form of centre_distance_range
// (pruned_passes.h), the same correctly rounded sqrt per element.
FASTGEN_SIMD_CLONES static void centre_range_row(const float* cross, const float* cnorm, float qn,
                                                 float window, int64_t n, float* lo, float* hi) {
#pragma omp simd
  for (int64_t g = 0; g < n; ++g) {
    const float v = qn + cnorm[g] + cross[g];
    const float a = v - window, b = v + window;
    const float l = std::sqrt(std::max(a, 0.0f)) * (1.0f - 1e-6f);
    lo[g] = a > 0.0f ? l : 0.0f;
    hi[g] = std::sqrt(std::max(b, 0.0f)) * (1.0f + 1e-6f);
  }
}

// The gap between rho and [lo, hi] (0 inside), shrunk so float rounding cannot lift it:
// the same expression as interval_gap (pruned_passes.h), inlined into the loops below.
#define FASTGEN_INTERVAL_GAP(rho, lo, hi)                                                \
  std::max(std::max((lo) - (rho) * (1.0f + 2e-6f), (rho) * (1.0f - 2e-6f) - (hi)) * (1.0f - 1e-6f), 0.0f)

// Pass 2, one query row against n balls: lbw[g] = a lower bound of the row's weighted
// score over every key of ball g (its rho range [dmin, dmax], smallest weight wmin),
// ball_min[g] = min(ball_min[g], lbw[g]).
FASTGEN_SIMD_CLONES static void ball_bound_row(const float* lo, const float* hi, const float* dmin,
                                               const float* dmax, const float* wmin, float window,
                                               int64_t n, float* lbw, float* ball_min) {
#pragma omp simd
  for (int64_t g = 0; g < n; ++g) {
    const float gap = std::max(lo[g] - dmax[g], dmin[g] - hi[g]);
    const float d = gap > 0.0f ? std::max(gap * gap * (1.0f - 1e-6f) - window, 0.0f) : 0.0f;
    // (1 - 1e-6): the product's own rounding must not lift the bound
    lbw[g] = d * wmin[g] * (1.0f - 1e-6f);
    ball_min[g] = std::min(ball_min[g], lbw[g]);
  }
}

// Pass 2, one query row (||q - c|| in [lo, hi], window W, best score so far) against n
// keys of a ball (rho, weight w): need[j] |= the key's score may reach best.
FASTGEN_SIMD_CLONES static void mark_keys_weighted(const float* rho, const float* w, int64_t n,
                                                   float lo, float hi, float window, float best,
                                                   int32_t* need) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float gap = FASTGEN_INTERVAL_GAP(rho[j], lo, hi);
    const float d = std::max(gap * gap * (1.0f - 1e-6f) - window, 0.0f);
    need[j] |= d * w[j] * (1.0f - 1e-6f) <= best ? 1 : 0;
  }
}

// Pass 1, one query row against n keys of a ball (rho, running column minimum cm):
// need[j] |= the row may lower cm[j]. Returns how many keys the row may lower.
FASTGEN_SIMD_CLONES static int64_t mark_keys_colmin(const float* rho, const float* cm, int64_t n,
                                                    float lo, float hi, float window,
                                                    int32_t* need) {
  // int32 flags and count: byte vectors would need AVX-512BW, not in the avx512f clone
  int32_t count = 0;
#pragma omp simd reduction(+ : count)
  for (int64_t j = 0; j < n; ++j) {
    const float gap = FASTGEN_INTERVAL_GAP(rho[j], lo, hi);
    const int32_t may = gap * gap <= cm[j] + window ? 1 : 0;
    need[j] |= may;
    count += may;
  }
  return count;
}


}  // namespace engine
}  // namespace fastgen
