// BallCount: for each point (row), how many balls (centre_j, radius_j) contain it, and
// its nearest centre -- on the tiled squared-L2 engine (sqdist_engine.h), so the
// N x M distance matrix never exists. What fastgen's precision / recall / density /
// coverage are made of (fastgen/metrics/prdc.py).
//
// The contract is knn's: a point is inside ball j when fl32(d) <= r_j, d the float64
// squared distance sum((p - c_j)^2) from the original inputs and r_j the float32 squared
// radius (on the boundary counts as inside). The tile gives an fp32 (or bf16-input)
// approximation d~ = ||p_c||^2 + ||c_c||^2 - 2 p_c.c_c of d, within
//     W(a, b) = 2 E(a, b),    a = ||p_c||, b = ||c_c||
// of it, E the bound of error_bound.h: E covers every rounding of ||c||^2 - 2 p.c (the
// part that ranks keys), and the second E -- which holds another 1.25 (gamma + 1.01 u) S
// -- covers the fp32 norm ||p_c||^2 (gamma a^2 <= gamma S) and the rounding of the
// final add (u |d~| <= u S). Then
//     d~ + W <= r_j            -> d <= r_j, so fl32(d) <= r_j: inside, no more work;
//     d~ - W >= next(r_j)      -> d >= next float above r_j, so fl32(d) > r_j: outside;
//     otherwise                -> ambiguous: d is computed in float64 and decided.
// On real data few pairs are ambiguous (those within ~1e-6 relative of a radius).
// The nearest centre is CertifiedTopK with k = 1 fed the same tiles (exact, ties to the
// lowest index), so one sweep gives both.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "reductions.h"

namespace fastgen {
namespace engine {

// The per-centre inputs BallCountArgs wants precomputed: ||c_c|| rounded up, and the
// next float above each radius.
inline void ball_count_centre_terms(const float* centre_norms, const float* radii, int64_t m, float* centre_len,
                                    float* radii_next) {
  for (int64_t c = 0; c < m; ++c) {
    centre_len[c] = std::sqrt(std::max(centre_norms[c], 0.f)) * (1.0f + 1e-6f);
    radii_next[c] = std::nextafter(radii[c], std::numeric_limits<float>::infinity());
  }
}

struct BallCountArgs {
  int64_t rows, cols, dim;
  const float* point_norms;   // (N) ||p_c||^2 of the points the GEMM saw
  const float* point_len;     // (N) ||p_c||, rounded up
  const float* centre_norms;  // (M) ||c_c||^2
  const float* centre_len;    // (M) ||c_c||, rounded up (precomputed once: every row block reads it)
  const float* radii;         // (M) squared radii, finite, >= 0
  const float* radii_next;    // (M) the next float above each radius
  double err_coef, err_slack; // E(a, b) = err_coef (a + b)^2 + err_slack
  const float* points;        // (N, D) original values, fp32
  const float* centres;       // (M, D) original values, fp32
  int64_t* out_count;         // (N)
  int64_t* ambiguous;         // optional counter: pairs decided in float64
  // the nearest centre (k = 1): the CertifiedTopK arguments, or nullptr to skip it
  const CertifiedTopKArgs* nearest;
};

class BallCount {
 public:
  explicit BallCount(const BallCountArgs& a) : a_(a) {}

  class Local {
   public:
    explicit Local(const BallCountArgs& a) : a_(a) {
      if (a_.nearest) nearest_.emplace_back(*a_.nearest);
    }

    void begin(int64_t b, int64_t r0, int64_t nr) {
      count_.assign(static_cast<size_t>(nr), 0);
      if (!nearest_.empty()) nearest_[0].begin(b, r0, nr);
    }

    void tile(const float* tile, int64_t ldc, int64_t b, int64_t r0, int64_t nr, int64_t c0,
              int64_t nc) {
      const float* cn = a_.centre_norms + c0;
      const float* rad = a_.radii + c0;
      const float* blen = a_.centre_len + c0;
      const float* rnext = a_.radii_next + c0;
      const float coef = static_cast<float>(2.0 * a_.err_coef * (1.0 + 1e-6));
      const float slack = static_cast<float>(2.0 * a_.err_slack) + std::numeric_limits<float>::denorm_min();
      for (int64_t r = 0; r < nr; ++r) {
        const float* t = tile + r * ldc;
        const float pn = a_.point_norms[r0 + r];
        const float pa = a_.point_len[r0 + r];
        int64_t inside = 0, unsure = 0;
        // vectorisable: two compares per pair, no branches
        for (int64_t c = 0; c < nc; ++c) {
          const float d = pn + t[c] + cn[c];
          const float ab = pa + blen[c];
          const float w = coef * ab * ab + slack;
          const bool in = d + w <= rad[c];
          const bool out = d - w >= rnext[c];
          inside += in;
          unsure += !(in || out);
        }
        if (unsure) inside += decide(t, pn, pa, r0 + r, c0, nc, coef, slack);
        count_[r] += inside;
      }
      if (!nearest_.empty()) nearest_[0].tile(tile, ldc, b, r0, nr, c0, nc);
    }

    void end(int64_t b, int64_t r0, int64_t nr) {
      for (int64_t r = 0; r < nr; ++r) a_.out_count[r0 + r] = count_[r];
      if (!nearest_.empty()) nearest_[0].end(b, r0, nr);
    }

   private:
    // The ambiguous pairs of one row of one tile: float64 distance, rounded to fp32.
    int64_t decide(const float* t, float pn, float pa, int64_t row, int64_t c0, int64_t nc, float coef,
                   float slack) {
      const float* cn = a_.centre_norms + c0;
      const float* rad = a_.radii + c0;
      const float* blen = a_.centre_len + c0;
      const float* rnext = a_.radii_next + c0;
      const float* p = a_.points + row * a_.dim;
      int64_t inside = 0, n = 0;
      for (int64_t c = 0; c < nc; ++c) {
        const float d = pn + t[c] + cn[c];
        const float ab = pa + blen[c];
        const float w = coef * ab * ab + slack;
        if (d + w <= rad[c] || d - w >= rnext[c]) continue;
        ++n;
        const double exact = exact_sqdist(p, a_.centres + (c0 + c) * a_.dim, a_.dim);
        inside += static_cast<float>(exact) <= rad[c];
      }
      if (a_.ambiguous) {
#pragma omp atomic
        *a_.ambiguous += n;
      }
      return inside;
    }

    const BallCountArgs& a_;
    std::vector<CertifiedTopK::Local> nearest_;  // empty or one (no default constructor)
    std::vector<int64_t> count_;
  };

  Local make_local() const { return Local(a_); }

 private:
  BallCountArgs a_;
};

}  // namespace engine
}  // namespace fastgen
