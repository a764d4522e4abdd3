// GPNN's two passes with exact pruning of whole tiles by ball bounds.
//
// Natural-image patches are far from uniform: grouped into tight clusters, most
// (query block, key cluster) pairs are provably too far apart to matter. Points are
// pre-sorted so that every group is a contiguous range, each group gets a ball
// (centre c, radius r >= max ||x - c||), and the triangle inequality
//     ||q - k|| >= ||q - c_K|| - r_K        (k in ball K)
// gives a lower bound on every distance of a tile from one small GEMM against the
// centres. A tile is skipped only when that bound proves that no entry of it can
// change the result:
//   pass 1 (column minimum, per key ball):  lb(k_j, query block) > current colmin_j
//                                           for every key j of the ball;
//   pass 2 (weighted argmin, per query block): lb(q_i, key ball) * min_{j in ball} w_j
//                                           > current best score of q_i for every row i.
// Tiles are visited in order of increasing bound, so the running minima shrink fast
// and the rest are skipped; once the smallest remaining bound exceeds the largest
// running minimum the sweep stops.
//
// Exactness: a skipped key's true distance exceeds the best value already computed,
// so the result is what the full sweep returns up to the fp32 rounding of values
// that it computes anyway (the same guarantee as the full sweep). The bound itself is
// computed in fp32: `bound_window[i]` (a proven bound on the error of the computed
// ||x_i - c||^2, from error_bound.h) is subtracted before the square root and again
// after squaring, which also covers centring. Ties go to the lowest original key
// index, whatever order the clusters are visited in.
//
// Like sqdist_engine.h this header knows nothing about torch (tested under
// ASan/UBSan in csrc/tests/test_engine.cpp); tiles come from TileGemm callbacks.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "simd_kernels.h"
#include "sqdist_engine.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastgen {
namespace engine {

// Groups of consecutive points (rows of a row-major (n, dim) fp32 array), each with a
// ball that provably contains it.
struct Balls {
  int64_t dim = 0;
  std::vector<int64_t> offsets;  // count() + 1 ascending, offsets[0] = 0
  std::vector<float> centres;    // count() x dim
  std::vector<float> centre_norms;  // ||c||^2
  std::vector<float> radii;      // >= max ||x - c|| over the members, rounded up
  std::vector<float> norm_max;   // max ||x|| over the members (for error windows)
  int64_t count() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t size(int64_t g) const { return offsets[g + 1] - offsets[g]; }
  int64_t max_size() const {
    int64_t m = 0;
    for (int64_t g = 0; g < count(); ++g) m = std::max(m, size(g));
    return m;
  }
};

// Ranges [offsets[g], offsets[g+1]) of `points`, split so no group exceeds max_size.
// Centres are float64 means rounded to fp32; radii are float64 distances to the
// rounded centre, rounded up, so the ball holds every member exactly.
inline Balls make_balls(const float* points, int64_t dim, const std::vector<int64_t>& offsets,
                        int64_t max_size) {
  Balls b;
  b.dim = dim;
  b.offsets.push_back(0);
  for (size_t g = 0; g + 1 < offsets.size(); ++g) {
    for (int64_t s = offsets[g]; s < offsets[g + 1]; s += max_size)
      b.offsets.push_back(std::min(s + max_size, offsets[g + 1]));
  }
  const int64_t n = b.count();
  b.centres.assign(static_cast<size_t>(n * dim), 0.0f);
  b.centre_norms.assign(n, 0.0f);
  b.radii.assign(n, 0.0f);
  b.norm_max.assign(n, 0.0f);
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t g = 0; g < n; ++g) {
    const int64_t s = b.offsets[g], e = b.offsets[g + 1];
    std::vector<double> mean(static_cast<size_t>(dim), 0.0);
    for (int64_t i = s; i < e; ++i)
      for (int64_t d = 0; d < dim; ++d) mean[d] += points[i * dim + d];
    float* c = b.centres.data() + g * dim;
    double cn = 0.0;
    for (int64_t d = 0; d < dim; ++d) {
      c[d] = static_cast<float>(mean[d] / static_cast<double>(std::max<int64_t>(e - s, 1)));
      cn += static_cast<double>(c[d]) * c[d];
    }
    double r2 = 0.0, x2max = 0.0;
    for (int64_t i = s; i < e; ++i) {
      double acc = 0.0, x2 = 0.0;
      for (int64_t d = 0; d < dim; ++d) {
        const double v = static_cast<double>(points[i * dim + d]);
        acc += (v - c[d]) * (v - c[d]);
        x2 += v * v;
      }
      r2 = std::max(r2, acc);
      x2max = std::max(x2max, x2);
    }
    b.centre_norms[g] = static_cast<float>(cn);
    // float64 sums of <= 2^20 terms are off by far less than 1e-6 relative
    b.radii[g] = std::nextafter(static_cast<float>(std::sqrt(r2) * (1.0 + 1e-6)), INFINITY);
    b.norm_max[g] = static_cast<float>(std::sqrt(x2max) * (1.0 + 1e-6));
  }
  return b;
}

// Lower bound on ||x - y||^2 for every y in a ball, from the computed ||x - c||^2 =
// norm_x + norm_c + cross (cross = -2 x.c from the GEMM) and the window on its error.
inline float ball_lower_bound(float norm_x, float norm_c, float cross, float radius, float window) {
  const float g = norm_x + norm_c + cross - window;
  if (!(g > 0.0f)) return 0.0f;
  const float gap = std::sqrt(g) * (1.0f - 1e-6f) - radius;
  if (!(gap > 0.0f)) return 0.0f;
  return std::max(gap * gap * (1.0f - 1e-6f) - window, 0.0f);
}

// Work counters for tests and benchmarks: tiles computed out of all tiles.
struct PruneStats {
  std::atomic<int64_t> tiles_total{0};
  std::atomic<int64_t> tiles_computed{0};
};

struct PrunedPassArgs {
  int64_t rows, cols, dim;          // one (N, D) x (M, D) problem
  const float* query_norms;         // (N) ||q||^2 (the operands' coordinates)
  const float* key_norms;           // (M)
  const float* query_windows;       // (N) error window of a computed ||q - c||^2
  const float* key_windows;         // (M) error window of a computed ||k - c||^2
  const Balls* query_blocks;        // over the N queries (pass 1's inner groups)
  const Balls* key_balls;           // over the M keys
  TileGemm gemm;                    // rows of queries x cols of keys: -2 q.k
  TileGemm query_centre_gemm;       // rows of queries x key-ball centres
  TileGemm key_centre_gemm;         // rows of keys x query-block centres
  int threads = 0;
  PruneStats* stats = nullptr;
};

namespace detail {
inline std::vector<int64_t> order_by(const std::vector<float>& v) {
  std::vector<int64_t> o(v.size());
  std::iota(o.begin(), o.end(), 0);
  std::stable_sort(o.begin(), o.end(), [&](int64_t a, int64_t b) { return v[a] < v[b]; });
  return o;
}
inline int pass_threads(int t) {
#ifdef _OPENMP
  return t > 0 ? t : omp_get_max_threads();
#else
  (void)t;
  return 1;
#endif
}
}  // namespace detail

// Pass 1: colmin[j] = max(min_i ||q_i - k_j||^2, 0).
inline void pruned_column_min(const PrunedPassArgs& a, float* colmin) {
  const Balls& qb = *a.query_blocks;
  const Balls& kb = *a.key_balls;
  const int64_t nqb = qb.count(), nkb = kb.count();
  const int64_t kmax = kb.max_size(), qmax = qb.max_size();
  int64_t computed = 0;
#pragma omp parallel num_threads(detail::pass_threads(a.threads)) reduction(+ : computed)
  {
    std::vector<float> bound(static_cast<size_t>(kmax * nqb));
    std::vector<float> tile(static_cast<size_t>(qmax * kmax));
    std::vector<float> block_min(nqb), cm(kmax), dist(kmax);
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < nkb; ++g) {
      const int64_t k0 = kb.offsets[g], nk = kb.size(g);
      // bound[j][b]: lower bound on ||q - k_j||^2 over query block b
      a.key_centre_gemm(0, k0, nk, 0, nqb, bound.data(), nqb);
      std::fill(block_min.begin(), block_min.end(), std::numeric_limits<float>::infinity());
      for (int64_t j = 0; j < nk; ++j) {
        float* bj = bound.data() + j * nqb;
        for (int64_t b = 0; b < nqb; ++b) {
          bj[b] = ball_lower_bound(a.key_norms[k0 + j], qb.centre_norms[b], bj[b], qb.radii[b],
                                   a.key_windows[k0 + j]);
          block_min[b] = std::min(block_min[b], bj[b]);
        }
      }
      const std::vector<int64_t> order = detail::order_by(block_min);
      std::fill(cm.begin(), cm.begin() + nk, std::numeric_limits<float>::infinity());
      float worst = std::numeric_limits<float>::infinity();  // max_j of the running colmin
      for (int64_t b : order) {
        if (block_min[b] > worst) break;  // sorted: no later block can help any key
        bool needed = false;
        for (int64_t j = 0; j < nk && !needed; ++j)
          needed = bound[j * nqb + b] <= cm[j];
        if (!needed) continue;
        const int64_t r0 = qb.offsets[b], nr = qb.size(b);
        a.gemm(0, r0, nr, k0, nk, tile.data(), kmax);
        // dist = -2 q.k + ||q||^2, the key norm added at the end (as ColumnMin)
        std::fill(dist.begin(), dist.begin() + nk, std::numeric_limits<float>::infinity());
        for (int64_t r = 0; r < nr; ++r)
          column_min_update(dist.data(), tile.data() + r * kmax, a.query_norms[r0 + r], nk);
        worst = 0.0f;
        for (int64_t j = 0; j < nk; ++j) {
          cm[j] = std::min(cm[j], std::max(dist[j] + a.key_norms[k0 + j], 0.0f));
          worst = std::max(worst, cm[j]);
        }
        ++computed;
      }
      for (int64_t j = 0; j < nk; ++j) colmin[k0 + j] = cm[j];
    }
  }
  if (a.stats) {
    a.stats->tiles_total += nqb * nkb;
    a.stats->tiles_computed += computed;
  }
}

// Pass 2: out_idx[i] = key_order[argmin_j max(||q_i - k_j||^2, 0) * weights[j]], ties to
// the lowest key_order value.
inline void pruned_weighted_argmin(const PrunedPassArgs& a, const float* weights,
                                   const int64_t* key_order, int64_t* out_idx) {
  const Balls& qb = *a.query_blocks;
  const Balls& kb = *a.key_balls;
  const int64_t nqb = qb.count(), nkb = kb.count();
  const int64_t kmax = kb.max_size(), qmax = qb.max_size();
  // the smallest weight of each key ball scales its distance bound into a score bound
  std::vector<float> wmin(nkb, std::numeric_limits<float>::infinity());
  for (int64_t g = 0; g < nkb; ++g)
    for (int64_t j = kb.offsets[g]; j < kb.offsets[g + 1]; ++j) wmin[g] = std::min(wmin[g], weights[j]);
  int64_t computed = 0;
#pragma omp parallel num_threads(detail::pass_threads(a.threads)) reduction(+ : computed)
  {
    std::vector<float> bound(static_cast<size_t>(qmax * nkb));
    std::vector<float> tile(static_cast<size_t>(qmax * kmax));
    std::vector<float> ball_min(nkb), best(qmax);
    std::vector<int64_t> arg(qmax);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < nqb; ++b) {
      const int64_t r0 = qb.offsets[b], nr = qb.size(b);
      a.query_centre_gemm(0, r0, nr, 0, nkb, bound.data(), nkb);
      std::fill(ball_min.begin(), ball_min.end(), std::numeric_limits<float>::infinity());
      for (int64_t r = 0; r < nr; ++r) {
        float* br = bound.data() + r * nkb;
        for (int64_t g = 0; g < nkb; ++g) {
          // (1 - 1e-6): the product's own rounding must not lift the bound
          br[g] = ball_lower_bound(a.query_norms[r0 + r], kb.centre_norms[g], br[g], kb.radii[g],
                                   a.query_windows[r0 + r]) * wmin[g] * (1.0f - 1e-6f);
          ball_min[g] = std::min(ball_min[g], br[g]);
        }
      }
      const std::vector<int64_t> order = detail::order_by(ball_min);
      std::fill(best.begin(), best.begin() + nr, std::numeric_limits<float>::infinity());
      std::fill(arg.begin(), arg.begin() + nr, std::numeric_limits<int64_t>::max());
      float worst = std::numeric_limits<float>::infinity();
      for (int64_t g : order) {
        if (ball_min[g] > worst) break;
        bool needed = false;
        for (int64_t r = 0; r < nr && !needed; ++r) needed = bound[r * nkb + g] <= best[r];
        if (!needed) continue;
        const int64_t c0 = kb.offsets[g], nc = kb.size(g);
        a.gemm(0, r0, nr, c0, nc, tile.data(), kmax);
        const float* kn = a.key_norms + c0;
        const float* w = weights + c0;
        worst = 0.0f;
        for (int64_t r = 0; r < nr; ++r) {
          const float* t = tile.data() + r * kmax;
          const float q = a.query_norms[r0 + r];
          const float m = weighted_min(t, kn, w, q, nc);
          if (m <= best[r]) {
            // among the columns reaching m, the lowest original index
            int64_t pick = std::numeric_limits<int64_t>::max();
            for (int64_t c = 0; c < nc; ++c)
              if (std::max(q + t[c] + kn[c], 0.0f) * w[c] == m) pick = std::min(pick, key_order[c0 + c]);
            if (m < best[r] || pick < arg[r]) {
              best[r] = m;
              arg[r] = pick;
            }
          }
          worst = std::max(worst, best[r]);
        }
        ++computed;
      }
      for (int64_t r = 0; r < nr; ++r) out_idx[r0 + r] = arg[r];
    }
  }
  if (a.stats) {
    a.stats->tiles_total += nqb * nkb;
    a.stats->tiles_computed += computed;
  }
}

}  // namespace engine
}  // namespace fastgen
