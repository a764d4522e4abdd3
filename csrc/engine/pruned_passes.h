// GPNN's two passes with exact pruning by ball and annulus bounds.
//
// Natural-image patches are far from uniform. Keys are grouped by k-means into balls
// (centre c, members k_j at distance rho_j = ||k_j - c||, sorted by rho_j inside the
// ball); queries are sorted by their nearest ball and cut into blocks. For a query q
// the triangle inequality bounds every key of a ball at once:
//     ||q - k_j|| >= | ||q - c|| - rho_j |
// so, given a threshold t (a running minimum), only keys with rho_j within t of
// ||q - c|| can matter: an interval of rho, i.e. a contiguous range of the ball's
// sorted members. One GEMM of queries against the centres yields every ||q - c||;
// the passes then compute distances only for those ranges:
//   pass 1 (column minimum, per ball): for each query block b, keys with
//          gap(rho_j, [min_b ||q - c||, max_b ||q - c||])^2 <= colmin_j so far;
//   pass 2 (weighted argmin, per query block): for each ball, keys with rho_j in the
//          union over rows of [||q_i - c|| -+ sqrt(best_i / min_ball w)], then each of
//          those against each row with its own weight: gap^2 w_j <= best_i.
// Blocks/balls are visited in order of increasing bound, so the running minima shrink
// fast; surviving rows/keys are gathered into GEMMs of ~`batch` rows/columns. Pass 2
// can start from hinted thresholds (hint_thresholds) instead of infinity.
//
// Exactness: a skipped key's true distance exceeds the value already computed for its
// row/column, so the result is what the full sweep returns up to the fp32 rounding of
// values it computes anyway (the same guarantee as the full sweep). Every ||q - c|| is
// computed in fp32 with a proven error window (error_bound.h): the intervals use
// [sqrt(g - W), sqrt(g + W)] and thresholds are widened by W (which also covers the
// centring). Ties go to the lowest original key index, whatever the visiting order.
//
// Like sqdist_engine.h this header knows nothing about torch (tested under
// ASan/UBSan in csrc/tests/test_engine.cpp); GEMMs come from callbacks.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "candidates.h"
#include "error_bound.h"
#include "exact_sqdist.h"
#include "gemm.h"
#include "simd_kernels.h"
#include "sqdist_engine.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastgen {
namespace engine {

// Largest group of an offsets list.
inline int64_t max_group(const std::vector<int64_t>& offsets) {
  int64_t m = 0;
  for (size_t g = 0; g + 1 < offsets.size(); ++g) m = std::max(m, offsets[g + 1] - offsets[g]);
  return m;
}

// Groups of consecutive points (rows of a row-major (n, dim) fp32 array), each with a
// ball that provably contains it.
struct Balls {
  int64_t dim = 0;
  std::vector<int64_t> offsets;  // count() + 1 ascending, offsets[0] = 0
  std::vector<float> centres;    // count() x dim
  std::vector<float> centre_norms;  // ||c||^2
  std::vector<float> member_dist;   // per point: ||x - c|| of its ball (float64, rounded)
  std::vector<float> dist_min, dist_max;  // per ball: range of member_dist, widened
                                          // (dist_max: the radius, rounded up)
  int64_t count() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t size(int64_t g) const { return offsets[g + 1] - offsets[g]; }
  int64_t max_size() const { return max_group(offsets); }
};

// Ranges [offsets[g], offsets[g+1]) of `points`, split so no group exceeds max_size.
// Centres are float64 means rounded to fp32; member distances and radii (dist_max) are
// float64 distances to the
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
  b.member_dist.assign(static_cast<size_t>(b.offsets.back()), 0.0f);
  b.dist_min.assign(n, 0.0f);
  b.dist_max.assign(n, 0.0f);
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
    double r2 = 0.0, dmin = INFINITY;
    for (int64_t i = s; i < e; ++i) {
      double acc = 0.0;
      for (int64_t d = 0; d < dim; ++d) {
        const double v = static_cast<double>(points[i * dim + d]);
        acc += (v - c[d]) * (v - c[d]);
      }
      r2 = std::max(r2, acc);
      b.member_dist[i] = static_cast<float>(std::sqrt(acc));
      dmin = std::min(dmin, std::sqrt(acc));
    }
    b.dist_min[g] = static_cast<float>(dmin * (1.0 - 1e-6));
    b.centre_norms[g] = static_cast<float>(cn);
    // float64 sums of <= 2^20 terms are off by far less than 1e-6 relative
    b.dist_max[g] = std::nextafter(static_cast<float>(std::sqrt(r2) * (1.0 + 1e-6)), INFINITY);
  }
  return b;
}

// [lo, hi] containing the true ||x - c|| given the computed g = ||x||^2 + ||c||^2 - 2 x.c
// and the window W on g's error.
inline void centre_distance_range(float g, float window, float* lo, float* hi) {
  *lo = g - window > 0.0f ? std::sqrt(g - window) * (1.0f - 1e-6f) : 0.0f;
  *hi = std::sqrt(std::max(g + window, 0.0f)) * (1.0f + 1e-6f);
}

// Distance from rho to the interval [lo, hi] (0 inside), made a little smaller so the
// float rounding of rho and of the subtraction cannot lift it.
inline float interval_gap(float rho, float lo, float hi) { return FASTGEN_INTERVAL_GAP(rho, lo, hi); }

// Work counters for tests and benchmarks: (query, key) distances computed out of all.
struct PruneStats {
  std::atomic<int64_t> pairs_total{0};
  std::atomic<int64_t> pairs_computed{0};
};

struct PrunedPassArgs {
  int64_t rows, cols, dim;          // one (N, D) x (M, D) problem
  const void* query_rows;           // (N, D) GEMM operand of element size elem_bytes
  const void* key_rows;             // (M, D), each ball's members contiguous
  int64_t elem_bytes;
  const float* query_norms;         // (N) ||q||^2 (the operands' coordinates)
  const float* key_norms;           // (M)
  const float* query_windows;       // (N) error window of a computed ||q - c||^2
  const std::vector<int64_t>* query_offsets;  // query blocks: [offsets[b], offsets[b+1])
  const Balls* key_balls;           // over the M keys
  PtrGemm gemm;                     // cross term of gathered rows
  TileGemm centre_gemm;             // fp32 rows of queries x key-ball centres
  int threads = 0;
  PruneStats* stats = nullptr;
  // Surviving rows/keys are gathered into one GEMM of about this many rows/columns: one
  // small GEMM per (block, ball) pair runs at half the speed of a large one. The first
  // GEMMs of a ball (pass 1) or block (pass 2) are smaller (first_batch, doubling up to
  // batch) because the running minima they produce are what lets the bounds skip the rest.
  int64_t batch = 512;
  int64_t first_batch = 128;
};

namespace detail {
inline int pass_threads(int t) {
#ifdef _OPENMP
  return t > 0 ? t : omp_get_max_threads();
#else
  (void)t;
  return 1;
#endif
}
// Appends rows [r0, r0 + n) of a row-major operand to `buf`.
inline void append_rows(std::vector<unsigned char>& buf, const void* base, int64_t r0, int64_t n,
                        int64_t row_bytes) {
  const auto* p = static_cast<const unsigned char*>(base) + r0 * row_bytes;
  buf.insert(buf.end(), p, p + n * row_bytes);
}
// ||q - c|| ranges of rows [r0, r0 + nr) against every ball: lo/hi (nr x count).
inline void centre_ranges(const PrunedPassArgs& a, int64_t r0, int64_t nr, std::vector<float>& lo,
                          std::vector<float>& hi) {
  const Balls& kb = *a.key_balls;
  const int64_t nkb = kb.count();
  a.centre_gemm(0, r0, nr, 0, nkb, lo.data(), nkb);
  for (int64_t r = 0; r < nr; ++r)
    centre_range_row(lo.data() + r * nkb, kb.centre_norms.data(), a.query_norms[r0 + r],
                     a.query_windows[r0 + r], nkb, lo.data() + r * nkb, hi.data() + r * nkb);
}
// The items whose bound is <= limit, by increasing (bound, index): only these can be
// visited, and a full sort of all of them would cost more than the visits.
inline std::vector<std::pair<float, int64_t>> sorted_below(const float* bound, int64_t n, float limit,
                                                           int64_t skip) {
  std::vector<std::pair<float, int64_t>> v;
  for (int64_t i = 0; i < n; ++i)
    if (bound[i] <= limit && i != skip) v.emplace_back(bound[i], i);
  std::sort(v.begin(), v.end());
  return v;
}
inline int64_t argmin(const float* v, int64_t n) { return std::min_element(v, v + n) - v; }
// Flush sizes: first_batch, then doubling up to batch.
struct FlushSchedule {
  int64_t next, cap;
  FlushSchedule(const PrunedPassArgs& a) : next(std::min(a.first_batch, a.batch)), cap(a.batch) {}
  bool due(int64_t pending) {
    if (pending < next) return false;
    next = std::min(2 * next, cap);
    return true;
  }
};
// The visiting order both passes share: the item of smallest bound alone first (its
// GEMM's minima are what make the bounds bite), then the items still under limit(),
// by increasing bound, flushing gathered work on the schedule. limit() shrinks as
// flushes lower the running minima; sorted: the first item over it ends the walk.
template <class Limit, class Visit, class Flush, class Pending>
void visit_by_bound(const PrunedPassArgs& a, const float* bound, int64_t n, Limit limit, Visit visit,
                    Flush flush, Pending pending) {
  const int64_t first = argmin(bound, n);
  visit(first);
  flush();
  FlushSchedule schedule(a);
  for (const auto& [b, i] : sorted_below(bound, n, limit(), first)) {
    if (b > limit()) break;
    visit(i);
    if (schedule.due(pending())) flush();
  }
  flush();
}
inline void count_pairs(const PrunedPassArgs& a, int64_t computed) {
  if (a.stats) {
    a.stats->pairs_total += a.rows * a.cols;
    a.stats->pairs_computed += computed;
  }
}
// The keys of ball g that some row of a query block [r0, r0 + nr) may still need, in
// runs of consecutive key positions: run(p0, p1) for each. A row takes part if its bound
// on the ball (lb[r * nkb + g]) is under its score threshold thr[r]; the union of those
// rows' rho intervals (threshold / wmin_g, the ball's smallest weight) gives (about) a
// contiguous range of the members, sorted by rho from the k-means centre (close to, not
// exactly, the ball's own centre); inside it each key is tested against each such row
// with its own weight (weights: per key position). need: scratch of max_size() ints.
template <class Run>
void needed_key_runs(const PrunedPassArgs& a, int64_t g, int64_t r0, int64_t nr, const float* lo,
                     const float* hi, const float* lb, const float* thr, float wmin_g, const float* weights,
                     std::vector<int32_t>& need, Run run) {
  const Balls& kb = *a.key_balls;
  const int64_t nkb = kb.count(), c0 = kb.offsets[g], nk = kb.size(g);
  const float* rho = kb.member_dist.data() + c0;
  float ulo = INFINITY, uhi = -INFINITY;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = r * nkb + g;
    if (!(lb[i] <= thr[r])) continue;
    const float t = std::sqrt(std::max(thr[r], 0.0f) / wmin_g + a.query_windows[r0 + r]) * (1.0f + 1e-6f);
    ulo = std::min(ulo, lo[i] - t);
    uhi = std::max(uhi, hi[i] + t);
  }
  if (!(ulo <= uhi)) return;
  int64_t j0 = nk, j1 = 0;
  for (int64_t j = 0; j < nk; ++j)
    if (interval_gap(rho[j], ulo, uhi) <= 0.0f) {
      j0 = std::min(j0, j);
      j1 = j + 1;
    }
  if (j0 >= j1) return;
  std::fill(need.begin(), need.begin() + (j1 - j0), 0);
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t i = r * nkb + g;
    if (!(lb[i] <= thr[r])) continue;
    mark_keys_weighted(rho + j0, weights + c0 + j0, j1 - j0, lo[i], hi[i], a.query_windows[r0 + r], thr[r],
                       need.data());
  }
  for (int64_t j = j0; j < j1;) {  // runs of needed keys, one copy each
    if (!need[j - j0]) {
      ++j;
      continue;
    }
    int64_t e = j + 1;
    while (e < j1 && need[e - j0]) ++e;
    run(c0 + j, c0 + e);
    j = e;
  }
}
}  // namespace detail

// Per (ball, query block): the range of ||q - c|| over the block's queries, and the
// largest error window of each block. What pass 1 needs to order and skip blocks.
struct BlockRanges {
  std::vector<float> lo, hi;  // (balls x blocks): ball-major, pass 1 reads one ball's row
  std::vector<float> window;  // (blocks)
};

inline BlockRanges block_ranges(const PrunedPassArgs& a) {
  const std::vector<int64_t>& qo = *a.query_offsets;
  const int64_t nqb = static_cast<int64_t>(qo.size()) - 1, nkb = a.key_balls->count();
  const int64_t qmax = max_group(qo);
  constexpr int64_t kChunk = 16;  // blocks per transposed store: one cache line per ball
  BlockRanges br;
  br.lo.assign(static_cast<size_t>(nqb * nkb), INFINITY);
  br.hi.assign(static_cast<size_t>(nqb * nkb), 0.0f);
  br.window.assign(nqb, 0.0f);
#pragma omp parallel num_threads(detail::pass_threads(a.threads))
  {
    std::vector<float> lo(static_cast<size_t>(qmax * nkb)), hi(lo.size());
    std::vector<float> clo(static_cast<size_t>(kChunk * nkb)), chi(clo.size());
#pragma omp for schedule(dynamic, 1)
    for (int64_t b0 = 0; b0 < nqb; b0 += kChunk) {
      const int64_t nb = std::min(kChunk, nqb - b0);
      std::fill(clo.begin(), clo.end(), INFINITY);
      std::fill(chi.begin(), chi.end(), 0.0f);
      for (int64_t i = 0; i < nb; ++i) {
        const int64_t b = b0 + i, r0 = qo[b], nr = qo[b + 1] - qo[b];
        detail::centre_ranges(a, r0, nr, lo, hi);
        float* blo = clo.data() + i * nkb;
        float* bhi = chi.data() + i * nkb;
        for (int64_t r = 0; r < nr; ++r) {
          br.window[b] = std::max(br.window[b], a.query_windows[r0 + r]);
          const float* rlo = lo.data() + r * nkb;
          const float* rhi = hi.data() + r * nkb;
#pragma omp simd
          for (int64_t g = 0; g < nkb; ++g) {
            blo[g] = std::min(blo[g], rlo[g]);
            bhi[g] = std::max(bhi[g], rhi[g]);
          }
        }
      }
      for (int64_t g = 0; g < nkb; ++g)
        for (int64_t i = 0; i < nb; ++i) {
          br.lo[g * nqb + b0 + i] = clo[i * nkb + g];
          br.hi[g * nqb + b0 + i] = chi[i * nkb + g];
        }
    }
  }
  return br;
}

// Pass 1: colmin[j] = max(min_i ||q_i - k_j||^2, 0). Per ball: query blocks in order of
// their bound; a block joins the next GEMM if its ||q - c|| range may lower some key's
// running minimum, with the span of those keys. (Testing each row's own ||q - c||
// computed 25 % fewer pairs but cost as much in dot products, which read the rows
// from memory once more: measured, no faster.)
// init (optional): per key a starting value instead of infinity, so colmin[j] =
// min(init[j], ...); a key whose init is below every possible distance (-inf) is never
// computed. colarg (optional): per key the row (query position) that set colmin[j], -1
// where init[j] stood (incremental GPNN updates need to know which query covers a key).
inline void pruned_column_min(const PrunedPassArgs& a, const BlockRanges& br, float* colmin,
                              const float* init = nullptr, int64_t* colarg = nullptr) {
  const std::vector<int64_t>& qo = *a.query_offsets;
  const Balls& kb = *a.key_balls;
  const int64_t nqb = static_cast<int64_t>(qo.size()) - 1, nkb = kb.count();
  const int64_t kmax = kb.max_size();
  const int64_t qmax = max_group(qo);
  const int64_t row_bytes = a.dim * a.elem_bytes;
  if (nqb <= 0) {  // no queries: nothing covers any key
    for (int64_t j = 0; j < a.cols; ++j) colmin[j] = init ? init[j] : std::numeric_limits<float>::infinity();
    if (colarg) std::fill(colarg, colarg + a.cols, int64_t{-1});
    return;
  }
  const float wall = *std::max_element(br.window.begin(), br.window.end());
  int64_t computed = 0;
#pragma omp parallel num_threads(detail::pass_threads(a.threads)) reduction(+ : computed)
  {
    std::vector<float> tile(static_cast<size_t>((a.batch + qmax) * kmax));
    std::vector<float> lb(nqb), cm(kmax), dist(kmax), qn;
    std::vector<unsigned char> rows;
    std::vector<int32_t> need(kmax), darg(colarg ? kmax : 0);
    std::vector<int64_t> rid, carg(colarg ? kmax : 0);  // gathered rows' positions; arg of cm
#pragma omp for schedule(dynamic, 1)
    for (int64_t g = 0; g < nkb; ++g) {
      const int64_t k0 = kb.offsets[g], nk = kb.size(g);
      if (nk == 0) continue;
      const float* rho = kb.member_dist.data() + k0;
      const float* blo = br.lo.data() + g * nqb;
      const float* bhi = br.hi.data() + g * nqb;
#pragma omp simd
      for (int64_t b = 0; b < nqb; ++b) {
        // gap between the block's ||q - c|| range and the ball's rho range
        const float gap = std::max(blo[b] - kb.dist_max[g], kb.dist_min[g] - bhi[b]);
        lb[b] = gap > 0.0f ? gap * gap * (1.0f - 1e-6f) : 0.0f;
      }
      if (init)
        std::copy(init + k0, init + k0 + nk, cm.begin());
      else
        std::fill(cm.begin(), cm.begin() + nk, std::numeric_limits<float>::infinity());
      if (colarg) std::fill(carg.begin(), carg.begin() + nk, int64_t{-1});
      std::fill(need.begin(), need.begin() + nk, 0);
      float worst = *std::max_element(cm.begin(), cm.begin() + nk);  // max_j of the running colmin
      if (!(worst > -std::numeric_limits<float>::infinity())) {  // every key settled by init
        std::copy(cm.begin(), cm.begin() + nk, colmin + k0);
        if (colarg) std::fill(colarg + k0, colarg + k0 + nk, int64_t{-1});
        continue;
      }
      auto flush = [&] {
        const int64_t nr = static_cast<int64_t>(qn.size());
        if (nr == 0) return;
        int64_t s0 = 0, s1 = nk;  // the span of keys some pending row may lower
        while (s0 < nk && !need[s0]) ++s0;
        while (s1 > s0 && !need[s1 - 1]) --s1;
        const int64_t nc = s1 - s0;
        const void* K = static_cast<const unsigned char*>(a.key_rows) + (k0 + s0) * row_bytes;
        a.gemm(rows.data(), nr, K, nc, tile.data(), nc);
        // -2 q.k + ||q||^2 per key; the key norm is added once at the end (as ColumnMin)
        std::fill(dist.begin(), dist.begin() + nc, std::numeric_limits<float>::infinity());
        if (colarg) {
          for (int64_t r = 0; r < nr; ++r)
            column_argmin_update(dist.data(), darg.data(), tile.data() + r * nc, qn[r], static_cast<int32_t>(r), nc);
          for (int64_t c = 0; c < nc; ++c) {
            const float v = std::max(dist[c] + a.key_norms[k0 + s0 + c], 0.0f);
            if (v < cm[s0 + c]) {
              cm[s0 + c] = v;
              carg[s0 + c] = rid[darg[c]];
            }
          }
        } else {
          for (int64_t r = 0; r < nr; ++r) column_min_update(dist.data(), tile.data() + r * nc, qn[r], nc);
          for (int64_t c = 0; c < nc; ++c)
            cm[s0 + c] = std::min(cm[s0 + c], std::max(dist[c] + a.key_norms[k0 + s0 + c], 0.0f));
        }
        worst = *std::max_element(cm.begin(), cm.begin() + nk);
        computed += nr * nc;
        rows.clear();
        qn.clear();
        rid.clear();
        std::fill(need.begin(), need.begin() + nk, 0);
      };
      // block b's rows, if its ||q - c|| range may lower some key's running minimum
      auto visit = [&](int64_t b) {
        if (mark_keys_colmin(rho, cm.data(), nk, blo[b], bhi[b], br.window[b], need.data()) == 0) return;
        detail::append_rows(rows, a.query_rows, qo[b], qo[b + 1] - qo[b], row_bytes);
        qn.insert(qn.end(), a.query_norms + qo[b], a.query_norms + qo[b + 1]);
        if (colarg)
          for (int64_t i = qo[b]; i < qo[b + 1]; ++i) rid.push_back(i);
      };
      // blocks past worst + wall cannot lower any key's minimum
      detail::visit_by_bound(
          a, lb.data(), nqb, [&] { return worst + wall; }, visit, flush,
          [&] { return static_cast<int64_t>(qn.size()); });
      for (int64_t j = 0; j < nk; ++j) colmin[k0 + j] = cm[j];
      if (colarg) std::copy(carg.begin(), carg.begin() + nk, colarg + k0);
    }
  }
  detail::count_pairs(a, computed);
}

// Pass 2's starting thresholds from one candidate key per query (GPNN: the previous
// iteration's choice): init_best[i] >= any score the GEMM can compute for (i, hint[i]),
// so that key, and every key that can tie or beat it, is still computed (the answer is
// unchanged) while keys whose bound passes it are skipped from the first GEMM on.
// q32/k32: the fp32 rows the GEMM operands were rounded from; input_roundoff and
// output_roundoff: the GEMM's, as error_bound.h defines them (0 for fp32).
inline void hint_thresholds(const float* q32, const float* k32, const float* query_norms,
                            const float* key_norms, int64_t rows, int64_t dim, const int64_t* hint,
                            const float* weights, double input_roundoff, double output_roundoff,
                            float* init_best) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t h = hint[i];
    const float* q = q32 + i * dim;
    const float* k = k32 + h * dim;
    float dotp = 0.0f;
    for (int64_t d = 0; d < dim; ++d) dotp += q[d] * k[d];
    // the GEMM's value and this one both sit within the error bound of the true
    // distance, so within the window (2.5 bounds) of each other
    const float window = candidate_window(std::sqrt(static_cast<double>(query_norms[i])),
                                          std::sqrt(static_cast<double>(key_norms[h])), dim, input_roundoff,
                                          output_roundoff);
    const float d = query_norms[i] + key_norms[h] - 2.0f * dotp + window;
    init_best[i] = std::max(d, 0.0f) * weights[h] * (1.0f + 1e-5f);
  }
}

// Pass 2: out_idx[i] = key_order[argmin_j max(||q_i - k_j||^2, 0) * weights[j]], ties to
// the lowest key_order value. init_best (optional, from hint_thresholds): per query an
// upper bound of its best score. init_arg (optional, with init_best): per query a key id
// (key_order's space) that reaches exactly init_best, outside these keys: the answer is
// then the best of it and of these keys (incremental GPNN: the keys whose weight moved).
// out_best (optional): the winning score per query. Per query block: balls in order of
// their bound; within a ball, the keys that some row's bound (with the key's own weight)
// lets through.
inline void pruned_weighted_argmin(const PrunedPassArgs& a, const float* weights,
                                   const int64_t* key_order, int64_t* out_idx,
                                   const float* init_best = nullptr, const int64_t* init_arg = nullptr,
                                   float* out_best = nullptr) {
  const std::vector<int64_t>& qo = *a.query_offsets;
  const Balls& kb = *a.key_balls;
  const int64_t nqb = static_cast<int64_t>(qo.size()) - 1, nkb = kb.count();
  const int64_t kmax = kb.max_size();
  const int64_t qmax = max_group(qo);
  const int64_t row_bytes = a.dim * a.elem_bytes;
  // the smallest weight of each ball turns a distance bound into a score bound
  std::vector<float> wmin(nkb, std::numeric_limits<float>::infinity());
  for (int64_t g = 0; g < nkb; ++g)
    for (int64_t j = kb.offsets[g]; j < kb.offsets[g + 1]; ++j) wmin[g] = std::min(wmin[g], weights[j]);
  int64_t computed = 0;
#pragma omp parallel num_threads(detail::pass_threads(a.threads)) reduction(+ : computed)
  {
    const int64_t width = a.batch + kmax;
    std::vector<float> lo(static_cast<size_t>(qmax * nkb)), hi(lo.size()), lbw(lo.size());
    std::vector<float> tile(static_cast<size_t>(qmax * width));
    std::vector<float> ball_min(nkb), best(qmax), kn, w;
    std::vector<int64_t> arg(qmax), ord;
    std::vector<unsigned char> cols;
    std::vector<int32_t> need(kmax);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < nqb; ++b) {
      const int64_t r0 = qo[b], nr = qo[b + 1] - qo[b];
      detail::centre_ranges(a, r0, nr, lo, hi);
      std::fill(ball_min.begin(), ball_min.end(), std::numeric_limits<float>::infinity());
      for (int64_t r = 0; r < nr; ++r)
        ball_bound_row(lo.data() + r * nkb, hi.data() + r * nkb, kb.dist_min.data(), kb.dist_max.data(),
                       wmin.data(), a.query_windows[r0 + r], nkb, lbw.data() + r * nkb, ball_min.data());
      for (int64_t r = 0; r < nr; ++r) best[r] = init_best ? init_best[r0 + r] : std::numeric_limits<float>::infinity();
      for (int64_t r = 0; r < nr; ++r) arg[r] = init_arg ? init_arg[r0 + r] : std::numeric_limits<int64_t>::max();
      float worst = std::numeric_limits<float>::infinity();
      const void* Q = static_cast<const unsigned char*>(a.query_rows) + r0 * row_bytes;
      auto flush = [&] {
        const int64_t nc = static_cast<int64_t>(kn.size());
        if (nc == 0) return;
        a.gemm(Q, nr, cols.data(), nc, tile.data(), nc);
        worst = 0.0f;
        for (int64_t r = 0; r < nr; ++r) {
          const float* t = tile.data() + r * nc;
          const float q = a.query_norms[r0 + r];
          const float m = weighted_min(t, kn.data(), w.data(), q, nc);
          if (m <= best[r]) {
            // among the columns reaching m, the lowest original index
            int64_t pick = std::numeric_limits<int64_t>::max();
            for (int64_t c = 0; c < nc; ++c)
              if (std::max(q + t[c] + kn[c], 0.0f) * w[c] == m) pick = std::min(pick, ord[c]);
            if (m < best[r] || pick < arg[r]) {
              best[r] = m;
              arg[r] = pick;
            }
          }
          worst = std::max(worst, best[r]);
        }
        computed += nr * nc;
        cols.clear();
        kn.clear();
        w.clear();
        ord.clear();
      };
      // the keys of ball g that some row may still improve with (each with its own weight)
      auto visit = [&](int64_t g) {
        detail::needed_key_runs(a, g, r0, nr, lo.data(), hi.data(), lbw.data(), best.data(), wmin[g], weights, need,
                                [&](int64_t p0, int64_t p1) {
                                  detail::append_rows(cols, a.key_rows, p0, p1 - p0, row_bytes);
                                  kn.insert(kn.end(), a.key_norms + p0, a.key_norms + p1);
                                  w.insert(w.end(), weights + p0, weights + p1);
                                  ord.insert(ord.end(), key_order + p0, key_order + p1);
                                });
      };
      // balls past worst cannot improve any row's score
      detail::visit_by_bound(
          a, ball_min.data(), nkb, [&] { return worst; }, visit, flush,
          [&] { return static_cast<int64_t>(kn.size()); });
      for (int64_t r = 0; r < nr; ++r) out_idx[r0 + r] = arg[r];
      if (out_best)
        for (int64_t r = 0; r < nr; ++r) out_best[r0 + r] = best[r];
    }
  }
  detail::count_pairs(a, computed);
}


// knn's pruned pass: per query the k keys of smallest float64 distance, exactly the
// certified sweep's answer (CertifiedTopK in reductions.h), computing only the keys the
// row's own bounds leave. Per query block the balls are visited by increasing bound as
// in pass 2 (weight 1); a key joins the block's next GEMM if some row's threshold lets
// it through, and each row then screens every gathered value against its own threshold.
//
// Per row, in distance space: each fp32 value d~ = ||q||^2 + t + ||k||^2 is within
// e = 2 E(||q_c||, ||k_c||) of the true distance (E bounds the cross term, the key norm,
// the centring and one add; doubling it covers the query's fp32 norm and the second
// add), so U, the k-th smallest d~ + e seen, bounds the true k-th distance from above;
// keys with d~ - e <= U are kept as candidates and re-ranked by exact_sqdist on the
// original inputs, ties to the lowest original id. A key skipped by the ball bound has
// a true distance above U (the bound's window covers the centre GEMM and the centring).
// So the answer is the sweep's, bit for bit. Rows whose window holds too many keys
// (near-duplicates) are flagged in `deferred` for the caller's dense path.
struct PrunedTopKArgs {
  int64_t k = 1;
  double err_coef = 0.0, err_slack = 0.0;  // ErrorBound of the gathered-row GEMM
  const float* query_len = nullptr;    // (N) ||q_c||, rounded up (sorted query positions)
  const float* key_len = nullptr;      // (M) ||k_c||, rounded up (key positions)
  const float* queries = nullptr;      // (n_orig, D) original fp32 query rows
  const int64_t* query_row = nullptr;  // (N) sorted query position -> row of `queries`
  const float* keys = nullptr;         // (M, D) original fp32 keys (key positions)
  const int64_t* key_order = nullptr;  // (M) key position -> original key id
  const float* bound = nullptr;        // optional (N): distances above it do not matter
  float* out_dist = nullptr;           // (N, k) by sorted query position
  int64_t* out_idx = nullptr;          // (N, k) original ids, -1 where nothing within bound
  unsigned char* deferred = nullptr;   // (N) 1: the row is left to the caller
};

inline void pruned_topk(const PrunedPassArgs& a, const PrunedTopKArgs& t) {
  const std::vector<int64_t>& qo = *a.query_offsets;
  const Balls& kb = *a.key_balls;
  const int64_t nqb = static_cast<int64_t>(qo.size()) - 1, nkb = kb.count();
  const int64_t kmax = kb.max_size();
  const int64_t qmax = max_group(qo);
  const int64_t row_bytes = a.dim * a.elem_bytes;
  const int64_t k = t.k, D = a.dim, M = a.cols;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  // weight 1 for every ball (ball_bound_row) and every key position (needed_key_runs)
  const std::vector<float> ones(static_cast<size_t>(std::max(nkb, M)), 1.0f);
  auto err = [&](double ql, double kl) {   // 2 E as a float, rounded up
    const double e = 2.0 * (t.err_coef * (ql + kl) * (ql + kl) + t.err_slack);
    return e < 3.0e38 ? static_cast<float>(e) * (1.0f + 1e-6f) : kInf;
  };
  int64_t computed = 0;
#pragma omp parallel num_threads(detail::pass_threads(a.threads)) reduction(+ : computed)
  {
    const int64_t width = a.batch + kmax;
    std::vector<float> lo(static_cast<size_t>(qmax * nkb)), hi(lo.size()), lb(lo.size());
    std::vector<float> tile(static_cast<size_t>(qmax * width));
    std::vector<float> ball_min(nkb), thr(qmax), up(static_cast<size_t>(qmax * k)), kn, kl;
    std::vector<int64_t> filled(qmax), next_prune(qmax), pos;
    std::vector<std::vector<std::pair<float, int64_t>>> cand(qmax);
    std::vector<std::pair<double, int64_t>> ranked;
    std::vector<unsigned char> cols, dense(qmax);
    std::vector<int32_t> need(kmax);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < nqb; ++b) {
      const int64_t r0 = qo[b], nr = qo[b + 1] - qo[b];
      detail::centre_ranges(a, r0, nr, lo, hi);
      std::fill(ball_min.begin(), ball_min.end(), kInf);
      for (int64_t r = 0; r < nr; ++r)
        ball_bound_row(lo.data() + r * nkb, hi.data() + r * nkb, kb.dist_min.data(), kb.dist_max.data(),
                       ones.data(), a.query_windows[r0 + r], nkb, lb.data() + r * nkb, ball_min.data());
      for (int64_t r = 0; r < nr; ++r) {
        // the caller's bound, rounded up (it is a float32 rounding of a float64 distance)
        thr[r] = t.bound ? t.bound[r0 + r] * (1.0f + 1e-6f) : kInf;
        filled[r] = 0;
        next_prune[r] = first_prune_at(k);
        dense[r] = 0;
        cand[r].clear();
      }
      float worst = kInf;
      const void* Q = static_cast<const unsigned char*>(a.query_rows) + r0 * row_bytes;
      auto flush = [&] {
        const int64_t nc = static_cast<int64_t>(kn.size());
        if (nc == 0) return;
        a.gemm(Q, nr, cols.data(), nc, tile.data(), nc);
        float klmax = 0.0f;
        for (float v : kl) klmax = std::max(klmax, v);
        worst = -kInf;
        for (int64_t r = 0; r < nr; ++r) {
          if (!dense[r]) {
            const float* tr = tile.data() + r * nc;
            const float qn = a.query_norms[r0 + r];
            const double ql = t.query_len[r0 + r];
            const float emax = err(ql, klmax);
            float* u = up.data() + r * k;
            for (int64_t c = 0; c < nc; ++c) {
              const float d = qn + tr[c] + kn[c];
              if (!(d - emax <= thr[r])) continue;
              const float e = err(ql, kl[c]);
              if (!(d - e <= thr[r])) continue;
              cand[r].emplace_back(d - e, pos[c]);
              thr[r] = std::min(thr[r], push_upper_bound(u, filled[r], k, d + e));
              if (static_cast<int64_t>(cand[r].size()) >= next_prune[r] &&
                  prune_candidates(cand[r], thr[r], k, &next_prune[r])) {
                dense[r] = 1;   // answered by the caller; nothing more to compute for it
                thr[r] = -kInf;
                break;
              }
            }
          }
          worst = std::max(worst, thr[r]);
        }
        computed += nr * nc;
        cols.clear();
        kn.clear();
        kl.clear();
        pos.clear();
      };
      // the keys of ball g that some row's threshold lets through (weight 1)
      auto visit = [&](int64_t g) {
        detail::needed_key_runs(a, g, r0, nr, lo.data(), hi.data(), lb.data(), thr.data(), 1.0f, ones.data(), need,
                                [&](int64_t p0, int64_t p1) {
                                  detail::append_rows(cols, a.key_rows, p0, p1 - p0, row_bytes);
                                  kn.insert(kn.end(), a.key_norms + p0, a.key_norms + p1);
                                  kl.insert(kl.end(), t.key_len + p0, t.key_len + p1);
                                  for (int64_t p = p0; p < p1; ++p) pos.push_back(p);
                                });
      };
      detail::visit_by_bound(
          a, ball_min.data(), nkb, [&] { return worst; }, visit, flush,
          [&] { return static_cast<int64_t>(kn.size()); });
      // the exact re-rank of each row's candidates still inside its final window
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = r0 + r;
        float* od = t.out_dist + row * k;
        int64_t* oi = t.out_idx + row * k;
        int64_t inside = 0;
        if (!dense[r])
          for (const auto& c : cand[r]) inside += c.first <= thr[r];
        if (dense[r] || window_is_dense(inside, M)) {
          t.deferred[row] = 1;
          std::fill(od, od + k, kInf);
          std::fill(oi, oi + k, int64_t{-1});
          continue;
        }
        t.deferred[row] = 0;
        const float* q = t.queries + t.query_row[row] * D;
        ranked.clear();
        for (const auto& c : cand[r])
          if (c.first <= thr[r]) ranked.emplace_back(exact_sqdist(q, t.keys + c.second * D, D), t.key_order[c.second]);
        const int64_t got = std::min<int64_t>(k, static_cast<int64_t>(ranked.size()));
        std::partial_sort(ranked.begin(), ranked.begin() + got, ranked.end());
        const float limit = t.bound ? t.bound[row] : kInf;
        for (int64_t j = 0; j < k; ++j) {
          // compared as the float32 the caller holds: a float tie with the bound stays
          const bool ok = j < got && static_cast<float>(ranked[j].first) <= limit;
          od[j] = ok ? static_cast<float>(ranked[j].first) : kInf;
          oi[j] = ok ? ranked[j].second : -1;
        }
      }
    }
  }
  detail::count_pairs(a, computed);
}

}  // namespace engine
}  // namespace fastgen
