// C++ tests of the torch-free engine core (sqdist_engine.h, reductions.h and
// pruned_passes.h), built by CMake under AddressSanitizer + UBSan: an out-of-bounds
// tile index fails here instead of silently corrupting results. Tiny, odd tile sizes
// make every edge case (partial row blocks, partial column blocks, one-element tiles)
// appear.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "../engine/ball_count.h"
#include "../engine/error_bound.h"
#include "../engine/pruned_passes.h"
#include "../engine/reductions.h"
#include "../engine/sqdist_engine.h"

using namespace fastgen::engine;

namespace {

int g_failures = 0;
#define EXPECT(cond, ...)                                   \
  do {                                                      \
    if (!(cond)) {                                          \
      ++g_failures;                                         \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                    \
      std::fprintf(stderr, "\n");                           \
    }                                                       \
  } while (0)

struct Problem {
  int64_t B, N, M, D;
  std::vector<float> q, k;  // (B, N, D), (B, M, D)
};

struct NaiveCtx {
  const Problem* p;
};

// The reference cross term: C = -2 q.k, plain loops with exact indexing.
void naive_gemm(const void* ctx, int64_t b, int64_t r0, int64_t nr, int64_t c0, int64_t nc,
                float* C, int64_t ldc) {
  const Problem& p = *static_cast<const NaiveCtx*>(ctx)->p;
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t c = 0; c < nc; ++c) {
      float acc = 0.f;
      const float* q = &p.q.at(((b * p.N) + r0 + r) * p.D);
      const float* k = &p.k.at(((b * p.M) + c0 + c) * p.D);
      for (int64_t d = 0; d < p.D; ++d) acc += q[d] * k[d];
      C[r * ldc + c] = -2.f * acc;
    }
}

Problem make_problem(std::mt19937& rng, int64_t B, int64_t N, int64_t M, int64_t D,
                     bool integer, float offset) {
  Problem p{B, N, M, D, {}, {}};
  std::normal_distribution<float> g(0.f, 1.f);
  std::uniform_int_distribution<int> u(0, 2);
  auto draw = [&]() { return (integer ? static_cast<float>(u(rng)) : g(rng)) + offset; };
  p.q.resize(B * N * D);
  p.k.resize(B * M * D);
  for (auto& v : p.q) v = draw();
  for (auto& v : p.k) v = draw();
  return p;
}

// fp32 squared norm of every D-long row of x
void squared_norms(const std::vector<float>& x, int64_t D, std::vector<float>& out) {
  for (size_t i = 0; i < out.size(); ++i) {
    float s = 0;
    for (int64_t d = 0; d < D; ++d) s += x[i * D + d] * x[i * D + d];
    out[i] = s;
  }
}

void check_topk(std::mt19937& rng, int64_t B, int64_t N, int64_t M, int64_t D, int64_t K,
                bool exclude_self, bool integer, Tiling tiling, bool outlier = false) {
  Problem p = make_problem(rng, B, N, M, D, integer, 0.f);
  if (exclude_self) p.k = p.q;  // the same set
  std::vector<float> kn(B * M), qlen(B * N);
  for (int64_t j = 0; j < B * M; ++j) {
    double s = 0;
    for (int64_t d = 0; d < D; ++d) s += double(p.k[j * D + d]) * p.k[j * D + d];
    kn[j] = float(s);
  }
  if (outlier && M > 1) {  // one key far out: its own bound is wide, the others' are not
    for (int64_t d = 0; d < D; ++d) p.k[(M / 2) * D + d] *= 1000.f;
    double s = 0;
    for (int64_t d = 0; d < D; ++d) s += double(p.k[(M / 2) * D + d]) * p.k[(M / 2) * D + d];
    kn[M / 2] = float(s);
  }
  for (int64_t i = 0; i < B * N; ++i) {
    double s = 0;
    for (int64_t d = 0; d < D; ++d) s += double(p.q[i * D + d]) * p.q[i * D + d];
    qlen[i] = float(std::sqrt(s) * (1 + 1e-6));
  }
  const ErrorBound bound(D, 0.0);
  std::vector<float> dist(B * N * K, -1.f);
  std::vector<int64_t> idx(B * N * K, -1);
  int64_t overflow = 0;
  CertifiedTopKArgs a{B, N, M, D, K, exclude_self, kn.data(), qlen.data(), bound.coef, bound.slack,
                      p.q.data(), p.k.data(), dist.data(), idx.data(), &overflow, nullptr, nullptr};
  NaiveCtx ctx{&p};
  for_each_row_block(Shape{B, N, M, D}, tiling, TileGemm{naive_gemm, &ctx}, CertifiedTopK(a));

  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < N; ++i) {
      std::vector<std::pair<double, int64_t>> all;
      for (int64_t j = 0; j < M; ++j) {
        if (exclude_self && j == i) continue;
        all.emplace_back(exact_sqdist(&p.q[(b * N + i) * D], &p.k[(b * M + j) * D], D), j);
      }
      std::sort(all.begin(), all.end());
      for (int64_t j = 0; j < K; ++j) {
        const int64_t o = (b * N + i) * K + j;
        EXPECT(idx[o] == all[j].second,
               "B=%ld N=%ld M=%ld D=%ld K=%ld tile=%ldx%ld: row %ld rank %ld idx %ld want %ld",
               (long)B, (long)N, (long)M, (long)D, (long)K, (long)tiling.block_rows,
               (long)tiling.block_cols, (long)i, (long)j, (long)idx[o], (long)all[j].second);
        EXPECT(std::fabs(dist[o] - all[j].first) <= 1e-6 * (1 + all[j].first),
               "dist %g want %g", dist[o], all[j].first);
      }
    }
}

void check_column_min(std::mt19937& rng, int64_t B, int64_t N, int64_t M, int64_t D,
                      Tiling tiling) {
  Problem p = make_problem(rng, B, N, M, D, false, 0.f);
  std::vector<float> qn(B * N), kn(B * M), out(B * M, -1.f);
  squared_norms(p.q, D, qn);
  squared_norms(p.k, D, kn);
  ColumnMinArgs a{B, N, M, qn.data(), kn.data(), out.data()};
  NaiveCtx ctx{&p};
  for_each_col_block(Shape{B, N, M, D}, tiling, TileGemm{naive_gemm, &ctx}, ColumnMin(a));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < M; ++j) {
      double best = INFINITY;
      for (int64_t i = 0; i < N; ++i)
        best = std::min(best, exact_sqdist(&p.q[(b * N + i) * D], &p.k[(b * M + j) * D], D));
      EXPECT(std::fabs(out[b * M + j] - best) <= 1e-4 * (1 + best), "colmin %g want %g",
             out[b * M + j], best);
    }
}

// Pass 2 of patch_nn against a brute force doing the same fp32 arithmetic on the
// whole matrix: indices must match exactly, ties to the lowest index.
void check_weighted_argmin(std::mt19937& rng, int64_t B, int64_t N, int64_t M, int64_t D,
                           bool integer, Tiling tiling) {
  Problem p = make_problem(rng, B, N, M, D, integer, 0.f);
  std::vector<float> qn(B * N), kn(B * M), w(B * M), score(B * N);
  std::vector<int64_t> idx(B * N, -1);
  std::uniform_real_distribution<float> uw(0.5f, 2.f);
  squared_norms(p.q, D, qn);
  squared_norms(p.k, D, kn);
  for (auto& v : w) v = integer ? 1.f : uw(rng);
  WeightedArgminArgs a{B, N, M, qn.data(), kn.data(), w.data(), idx.data(), score.data()};
  NaiveCtx ctx{&p};
  for_each_row_block(Shape{B, N, M, D}, tiling, TileGemm{naive_gemm, &ctx}, WeightedArgmin(a));
  std::vector<float> row(M);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < N; ++i) {
      naive_gemm(&ctx, b, i, 1, 0, M, row.data(), M);
      int64_t best = 0;
      float bs = INFINITY;
      for (int64_t j = 0; j < M; ++j) {
        const float s = std::max(qn[b * N + i] + row[j] + kn[b * M + j], 0.0f) * w[b * M + j];
        if (s < bs) {
          bs = s;
          best = j;
        }
      }
      EXPECT(idx[b * N + i] == best, "weighted argmin row %ld: %ld want %ld", (long)i,
             (long)idx[b * N + i], (long)best);
    }
}


// ---- pruned_passes.h ---------------------------------------------------------------

// make_balls: groups split at max_size inside the given ranges (empty ranges dropped),
// every member within its ball's radius in float64, the centre the group's mean.
void check_make_balls(std::mt19937& rng, int64_t n, int64_t dim,
                      const std::vector<int64_t>& offsets, int64_t max_size, float scale,
                      float offset) {
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> x(n * dim);
  for (auto& v : x) v = offset + scale * g(rng);
  if (n >= 3)  // one group of identical points: radius 0 must still hold them
    for (int64_t d = 0; d < dim; ++d) x[1 * dim + d] = x[2 * dim + d] = x[0 * dim + d];
  const Balls b = make_balls(x.data(), dim, offsets, max_size);
  std::vector<int64_t> want{0};
  for (size_t r = 0; r + 1 < offsets.size(); ++r)
    for (int64_t s = offsets[r]; s < offsets[r + 1]; s += max_size)
      want.push_back(std::min(s + max_size, offsets[r + 1]));
  size_t first_diff = 0;
  while (first_diff < std::min(b.offsets.size(), want.size()) && b.offsets[first_diff] == want[first_diff])
    ++first_diff;
  EXPECT(b.dim == dim && b.offsets == want,
         "make_balls n=%ld max_size=%ld: %ld groups, want %ld; first wrong offset at entry %ld", (long)n,
         (long)max_size, (long)b.count(), (long)want.size() - 1, (long)first_diff);
  if (b.offsets != want) return;
  const int64_t nb = b.count();
  EXPECT(b.centres.size() == size_t(nb * dim) && b.centre_norms.size() == size_t(nb) &&
             b.member_dist.size() == size_t(n) && b.dist_min.size() == size_t(nb) &&
             b.dist_max.size() == size_t(nb),
         "make_balls: array sizes");
  if (b.member_dist.size() != size_t(n) || b.dist_min.size() != size_t(nb) ||
      b.dist_max.size() != size_t(nb))
    return;
  int64_t largest = 0;
  for (int64_t gi = 0; gi < nb; ++gi) {
    const int64_t s = b.offsets[gi], e = b.offsets[gi + 1];
    EXPECT(e - s >= 1 && e - s <= max_size && b.size(gi) == e - s, "group %ld has %ld points",
           (long)gi, (long)(e - s));
    largest = std::max(largest, e - s);
    const float* c = &b.centres[gi * dim];
    double cn = 0.0;
    for (int64_t d = 0; d < dim; ++d) {
      double mean = 0.0;
      for (int64_t i = s; i < e; ++i) mean += x[i * dim + d];
      mean /= double(e - s);
      EXPECT(std::fabs(c[d] - mean) <= 1e-6 * (1.0 + std::fabs(mean)), "group %ld centre[%ld] %g, mean %g",
             (long)gi, (long)d, c[d], mean);
      cn += double(c[d]) * c[d];
    }
    EXPECT(std::fabs(b.centre_norms[gi] - cn) <= 1e-6 * cn + 1e-30, "group %ld centre norm %g want %g",
           (long)gi, b.centre_norms[gi], cn);
    double rmax = 0.0;
    for (int64_t i = s; i < e; ++i) {
      const double r = std::sqrt(exact_sqdist(&x[i * dim], c, dim));
      rmax = std::max(rmax, r);
      EXPECT(r <= double(b.dist_max[gi]),
             "n=%ld dim=%ld offset=%g: point %ld at %.17g from its centre, radius %.17g", (long)n,
             (long)dim, offset, (long)i, r, double(b.dist_max[gi]));
      // rho: the member's distance to the centre (float64, rounded), inside the ball's rho range
      EXPECT(std::fabs(b.member_dist[i] - r) <= 1e-7 * r + 1e-37 &&
                 double(b.dist_min[gi]) <= r && r <= double(b.dist_max[gi]),
             "n=%ld dim=%ld offset=%g: point %ld at %.17g, member_dist %.17g, range [%.17g, %.17g]", (long)n,
             (long)dim, offset, (long)i, r, double(b.member_dist[i]), double(b.dist_min[gi]),
             double(b.dist_max[gi]));
    }
    // rounded up, not inflated: a loose radius would only cost pruning, but say so
    EXPECT(double(b.dist_max[gi]) <= rmax * (1 + 1e-5) + 1e-30, "group %ld radius %g for max distance %g",
           (long)gi, b.dist_max[gi], rmax);
  }
  EXPECT(b.max_size() == largest, "max_size %ld want %ld", (long)b.max_size(), (long)largest);
}

// Points around `clusters` centres `sep` apart (integer data: small integer offsets
// from integer centres, so equal distances are exactly equal). Keys are stored one
// cluster after another (key_offsets, some clusters empty); key_order maps a stored key
// to its "original" id (a random permutation, so ties must follow it, not storage).
struct ClusteredProblem {
  int64_t N, M, D;
  std::vector<float> q, k;
  std::vector<int64_t> key_offsets, key_order;
};

ClusteredProblem make_clustered(std::mt19937& rng, int64_t N, int64_t M, int64_t D, int64_t clusters,
                                float sep, float spread, bool integer, bool sort_queries, float offset,
                                bool sort_by_rho = true) {
  ClusteredProblem p{N, M, D, {}, {}, {0}, {}};
  std::normal_distribution<float> g(0.f, 1.f);
  std::uniform_int_distribution<int> small(-1, 1), cl(0, int(clusters) - 1);
  std::vector<float> centres(clusters * D);
  for (auto& v : centres)
    v = offset + (integer ? sep * float(small(rng)) + float(2 * small(rng)) : sep * g(rng));
  auto point = [&](int64_t c, float* out) {
    for (int64_t d = 0; d < D; ++d)
      out[d] = centres[c * D + d] + (integer ? float(small(rng)) : spread * g(rng));
  };
  // keys: a random size per cluster (zero allowed), one cluster after another
  std::vector<int64_t> of_key(M);
  for (auto& c : of_key) c = cl(rng);
  std::sort(of_key.begin(), of_key.end());
  p.k.resize(M * D);
  for (int64_t j = 0; j < M; ++j) point(of_key[j], &p.k[j * D]);
  for (int64_t c = 0; c < clusters; ++c)
    p.key_offsets.push_back(std::upper_bound(of_key.begin(), of_key.end(), c) - of_key.begin());
  if (integer && M >= 4)  // exact copies of keys stored in other clusters' ranges
    for (int64_t t = 0; t < M / 4; ++t) {
      const int64_t from = std::uniform_int_distribution<int64_t>(0, M - 1)(rng);
      const int64_t to = std::uniform_int_distribution<int64_t>(0, M - 1)(rng);
      std::copy(&p.k[from * D], &p.k[from * D] + D, &p.k[to * D]);
    }
  // inside a cluster by distance to its mean, as cluster_keys stores them: the annulus
  // bound then selects a contiguous range (the passes must be exact either way)
  if (sort_by_rho)
    for (int64_t c = 0; c < clusters; ++c) {
      const int64_t s = p.key_offsets[c], e = p.key_offsets[c + 1];
      if (e - s < 2) continue;
      std::vector<float> mean(D, 0.f);
      for (int64_t d = 0; d < D; ++d) {
        double m = 0.0;
        for (int64_t j = s; j < e; ++j) m += p.k[j * D + d];
        mean[d] = float(m / double(e - s));
      }
      std::vector<std::pair<double, int64_t>> rho;
      for (int64_t j = s; j < e; ++j) rho.emplace_back(exact_sqdist(&p.k[j * D], mean.data(), D), j);
      std::stable_sort(rho.begin(), rho.end());
      std::vector<float> sorted;
      for (const auto& r : rho) sorted.insert(sorted.end(), &p.k[r.second * D], &p.k[r.second * D] + D);
      std::copy(sorted.begin(), sorted.end(), &p.k[s * D]);
    }
  p.key_order.resize(M);
  std::iota(p.key_order.begin(), p.key_order.end(), 0);
  std::shuffle(p.key_order.begin(), p.key_order.end(), rng);
  std::vector<int64_t> of_query(N);
  for (auto& c : of_query) c = cl(rng);
  if (sort_queries) std::sort(of_query.begin(), of_query.end());  // as patch_nn.cpp does
  p.q.resize(N * D);
  for (int64_t i = 0; i < N; ++i) point(of_query[i], &p.q[i * D]);
  return p;
}

// The pruned passes' cross term on gathered rows: the naive loop of naive_gemm (same
// fp32 operations in the same order, so the same values) on fp32 rows, or on bf16 rows
// (elem_bytes 2: the upper half of an fp32, exact for the small integers used with it).
struct PtrCtx {
  int64_t D, elem_bytes;
};
float load_elem(const void* base, int64_t i, int64_t elem_bytes) {
  if (elem_bytes == 4) return static_cast<const float*>(base)[i];
  const uint32_t bits = uint32_t(static_cast<const uint16_t*>(base)[i]) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
void naive_ptr_gemm(const void* ctx, const void* Q, int64_t nr, const void* K, int64_t nc, float* C,
                    int64_t ldc) {
  const PtrCtx& c = *static_cast<const PtrCtx*>(ctx);
  for (int64_t r = 0; r < nr; ++r)
    for (int64_t j = 0; j < nc; ++j) {
      float acc = 0.f;
      for (int64_t d = 0; d < c.D; ++d)
        acc += load_elem(Q, r * c.D + d, c.elem_bytes) * load_elem(K, j * c.D + d, c.elem_bytes);
      C[r * ldc + j] = -2.f * acc;
    }
}
std::vector<uint16_t> to_bf16_bits(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    uint32_t bits;
    std::memcpy(&bits, &x[i], sizeof bits);
    out[i] = uint16_t(bits >> 16);
  }
  return out;
}

struct PrunedConfig {
  int64_t query_block, max_ball, batch, elem_bytes;
  int threads;
  bool random_weights;
  bool mutant_must_fail = false;  // data on which a wrong ball bound must show
};

// Both pruned passes against brute force: (1) the same fp32 arithmetic on the whole
// matrix, which a correct pruning reproduces bit for bit (a skipped tile's values all
// exceed what was kept), ties to the lowest key_order; (2) float64 distances, within
// the fp32 error window. Returns the fraction of (query, key) pairs computed.
double check_pruned_passes(const ClusteredProblem& p, const PrunedConfig& cfg, std::mt19937& rng) {
  const int64_t N = p.N, M = p.M, D = p.D;
  std::vector<int64_t> qoff;
  for (int64_t s = 0; s < N; s += cfg.query_block) qoff.push_back(s);
  qoff.push_back(N);
  const Balls kb = make_balls(p.k.data(), D, p.key_offsets, cfg.max_ball);
  std::vector<float> qn(N), kn(M), qwin(N);
  squared_norms(p.q, D, qn);
  squared_norms(p.k, D, kn);
  // error windows of the fp32 ||q - c||^2, as patch_nn.cpp computes them
  float cmax2 = 0.f;
  for (float v : kb.centre_norms) cmax2 = std::max(cmax2, v);
  for (float v : kn) cmax2 = std::max(cmax2, v);
  const double kc_max = std::sqrt(double(cmax2)) * (1.0 + 1e-6);
  for (int64_t i = 0; i < N; ++i) qwin[i] = candidate_window(std::sqrt(double(qn[i])), kc_max, D, 0.0);

  Problem all{1, N, M, D, p.q, p.k};
  Problem q_kc{1, N, kb.count(), D, p.q, kb.centres};
  NaiveCtx c_all{&all}, c_qkc{&q_kc};
  const PtrCtx pc{D, cfg.elem_bytes};
  const std::vector<uint16_t> q16 = to_bf16_bits(p.q), k16 = to_bf16_bits(p.k);
  const void* qrows = cfg.elem_bytes == 4 ? static_cast<const void*>(p.q.data()) : q16.data();
  const void* krows = cfg.elem_bytes == 4 ? static_cast<const void*>(p.k.data()) : k16.data();
  PruneStats stats;
  PrunedPassArgs a{N, M, D, qrows, krows, cfg.elem_bytes, qn.data(), kn.data(), qwin.data(), &qoff, &kb,
                   PtrGemm{naive_ptr_gemm, &pc}, TileGemm{naive_gemm, &c_qkc}, cfg.threads, &stats};
  a.batch = cfg.batch;
  a.first_batch = std::max<int64_t>(1, cfg.batch / 4);
  char what[200];
  std::snprintf(what, sizeof what, "N=%ld M=%ld D=%ld block=%ld ball=%ld batch=%ld bytes=%ld threads=%d",
                (long)N, (long)M, (long)D, (long)cfg.query_block, (long)cfg.max_ball, (long)cfg.batch,
                (long)cfg.elem_bytes, cfg.threads);

  // pass 1
  std::vector<float> colmin(M, -1.f);
  pruned_column_min(a, block_ranges(a), colmin.data());
  // every key ball computes its nearest query block at least: M <= computed <= N M pairs
  const int64_t pairs = N * M;
  // (one block against one ball: nothing can be skipped, all N M are computed)
  const bool one_tile = N <= cfg.query_block && kb.count() == 1;
  EXPECT(stats.pairs_total == pairs && stats.pairs_computed <= pairs && stats.pairs_computed >= M &&
             (!one_tile || stats.pairs_computed == pairs),
         "%s: pass 1 computed %ld of %ld pairs", what, (long)stats.pairs_computed.load(),
         (long)stats.pairs_total.load());
  std::vector<float> t(N * M);  // the whole fp32 cross-term matrix
  naive_gemm(&c_all, 0, 0, N, 0, M, t.data(), M);
  double qmax = 0, kmax = 0;
  for (float v : qn) qmax = std::max(qmax, std::sqrt(double(v)));
  for (float v : kn) kmax = std::max(kmax, std::sqrt(double(v)));
  for (int64_t j = 0; j < M; ++j) {
    float m = INFINITY;
    double m64 = INFINITY;
    for (int64_t i = 0; i < N; ++i) {
      m = std::min(m, t[i * M + j] + qn[i]);
      m64 = std::min(m64, exact_sqdist(&p.q[i * D], &p.k[j * D], D));
    }
    const float want = std::max(m + kn[j], 0.0f);
    EXPECT(colmin[j] == want, "%s: colmin[%ld] = %.9g, the full fp32 sweep gives %.9g (float64 %.9g)", what,
           (long)j, colmin[j], want, m64);
    const double tol = candidate_window(std::sqrt(double(kn[j])), qmax, D, 0.0);
    EXPECT(std::fabs(colmin[j] - m64) <= tol, "%s: colmin[%ld] = %.9g, float64 %.9g", what, (long)j,
           colmin[j], m64);
  }

  // pass 1 again with the covering query (colarg) and with start values: the same minima;
  // colarg's row reaches each key's minimum in the same fp32 arithmetic; a start value
  // at the minimum stands (no row), -inf is never computed, +inf is searched as before
  {
    const int64_t computed_pass1 = stats.pairs_computed;
    std::vector<float> cm2(M), init(M);
    std::vector<int64_t> arg(M, -2), arg2(M, -2);
    pruned_column_min(a, block_ranges(a), cm2.data(), nullptr, arg.data());
    for (int64_t j = 0; j < M; ++j) {
      EXPECT(cm2[j] == colmin[j], "%s: colmin[%ld] with colarg %.9g, without %.9g", what, (long)j, cm2[j], colmin[j]);
      const int64_t i = arg[j];
      EXPECT(i >= 0 && i < N, "%s: colarg[%ld] = %ld", what, (long)j, (long)i);
      if (i < 0 || i >= N) continue;
      const float v = std::max(t[i * M + j] + qn[i] + kn[j], 0.0f);
      EXPECT(v == colmin[j], "%s: colarg[%ld] = %ld reaches %.9g, colmin %.9g", what, (long)j, (long)i, v, colmin[j]);
    }
    for (int64_t j = 0; j < M; ++j) init[j] = j % 3 == 0 ? -INFINITY : j % 3 == 1 ? colmin[j] : INFINITY;
    pruned_column_min(a, block_ranges(a), cm2.data(), init.data(), arg2.data());
    for (int64_t j = 0; j < M; ++j) {
      const float want = j % 3 == 0 ? -INFINITY : colmin[j];
      EXPECT(cm2[j] == want && (j % 3 == 2 ? arg2[j] >= 0 : arg2[j] == -1),
             "%s: colmin[%ld] from start %.9g is %.9g (row %ld), want %.9g", what, (long)j, init[j], cm2[j],
             (long)arg2[j], want);
    }
    stats.pairs_total = pairs;  // extra runs: the counts below are of the first passes
    stats.pairs_computed = computed_pass1;
  }

  // pass 2, on GPNN's weights (or arbitrary positive ones: the bound scales by the
  // smallest weight of a ball)
  std::vector<float> w(M);
  std::uniform_real_distribution<float> uw(0.05f, 3.f);
  for (int64_t j = 0; j < M; ++j) w[j] = cfg.random_weights ? uw(rng) : 1.0f / (0.005f + colmin[j]);
  float wmax = 0.f;
  for (float v : w) wmax = std::max(wmax, v);
  std::vector<int64_t> idx(N, -1);
  const int64_t computed1 = stats.pairs_computed;
  pruned_weighted_argmin(a, w.data(), p.key_order.data(), idx.data());
  const int64_t computed2 = stats.pairs_computed - computed1;
  EXPECT(stats.pairs_total == 2 * pairs && computed2 <= pairs && computed2 >= N &&
             (!one_tile || computed2 == pairs),
         "%s: pass 2 computed %ld of %ld pairs", what, (long)computed2, (long)pairs);
  for (int64_t i = 0; i < N; ++i) {
    float best = INFINITY;
    int64_t want = -1;
    double best64 = INFINITY;
    for (int64_t j = 0; j < M; ++j) {
      const float s = std::max(qn[i] + t[i * M + j] + kn[j], 0.0f) * w[j];
      if (s < best || (s == best && p.key_order[j] < want)) {
        best = s;
        want = p.key_order[j];
      }
      best64 = std::min(best64, exact_sqdist(&p.q[i * D], &p.k[j * D], D) * w[j]);
    }
    EXPECT(idx[i] == want, "%s: row %ld picks key %ld, the full fp32 sweep key %ld", what, (long)i,
           (long)idx[i], (long)want);
    if (idx[i] < 0 || idx[i] >= M) continue;
    // float64 score of the pick (key_order maps stored position -> id)
    const int64_t at = std::find(p.key_order.begin(), p.key_order.end(), idx[i]) - p.key_order.begin();
    const double got64 = exact_sqdist(&p.q[i * D], &p.k[at * D], D) * w[at];
    const double tol = 2.0 * candidate_window(std::sqrt(double(qn[i])), kmax, D, 0.0) * wmax + 1e-6 * best64;
    EXPECT(got64 <= best64 + tol, "%s: row %ld reaches %.9g, float64 optimum %.9g", what, (long)i, got64, best64);
  }

  // pass 2 with the winning scores out, then from (those scores, those keys) as a reached
  // start: the same picks and scores; from a start every key beats: the same picks
  {
    std::vector<int64_t> i2(N, -1), i3(N, -1), start_arg(N, M + 7);
    std::vector<float> b2(N), b3(N), huge(N, 1e30f);
    pruned_weighted_argmin(a, w.data(), p.key_order.data(), i2.data(), nullptr, nullptr, b2.data());
    pruned_weighted_argmin(a, w.data(), p.key_order.data(), i3.data(), b2.data(), i2.data(), b3.data());
    for (int64_t i = 0; i < N; ++i)
      EXPECT(i2[i] == idx[i] && i3[i] == idx[i] && b3[i] == b2[i],
             "%s: row %ld with scores out picks %ld, from its own start %ld (score %.9g vs %.9g), want %ld", what,
             (long)i, (long)i2[i], (long)i3[i], b3[i], b2[i], (long)idx[i]);
    pruned_weighted_argmin(a, w.data(), p.key_order.data(), i3.data(), huge.data(), start_arg.data());
    for (int64_t i = 0; i < N; ++i)
      EXPECT(i3[i] == idx[i], "%s: row %ld from a beaten start picks %ld, want %ld", what, (long)i, (long)i3[i],
             (long)idx[i]);
  }

  // pass 2 again from hinted thresholds (a random key, or the answer itself): the same
  // picks, bit for bit, whatever the hint
  for (int mode = 0; mode < 2; ++mode) {
    std::vector<int64_t> hint(N);
    std::vector<int64_t> position(M);
    for (int64_t j = 0; j < M; ++j) position[p.key_order[j]] = j;
    std::uniform_int_distribution<int64_t> any_key(0, M - 1);
    for (int64_t i = 0; i < N; ++i)  // (idx was checked above; a failed check must not read out of bounds)
      hint[i] = mode == 0 || idx[i] < 0 || idx[i] >= M ? any_key(rng) : position[idx[i]];
    std::vector<float> init(N);
    const double ub = cfg.elem_bytes == 2 ? unit_roundoff_bf16() : 0.0;
    hint_thresholds(p.q.data(), p.k.data(), qn.data(), kn.data(), N, D, hint.data(), w.data(), ub, 0.0, init.data());
    std::vector<int64_t> idx2(N, -1);
    const int64_t before = stats.pairs_computed;
    pruned_weighted_argmin(a, w.data(), p.key_order.data(), idx2.data(), init.data());
    const int64_t computed3 = stats.pairs_computed - before;
    EXPECT(computed3 >= N && computed3 <= pairs,
           "%s: hinted pass 2 (mode %d) computed %ld pairs, unhinted %ld", what, mode, (long)computed3,
           (long)computed2);
    for (int64_t i = 0; i < N; ++i)
      EXPECT(idx2[i] == idx[i], "%s: hinted pass 2 (mode %d) row %ld picks key %ld, unhinted %ld", what, mode,
             (long)i, (long)idx2[i], (long)idx[i]);
  }
  // knn's pruned top-k: the float64 top-k (ties to the lowest id), with and without a
  // bound; a mutant whose balls claim members 5x nearer their centres must go wrong
  // somewhere on separated data (the check can fail)
  {
    const double ub = cfg.elem_bytes == 2 ? unit_roundoff_bf16() : 0.0;
    const ErrorBound eb(D, ub);
    std::vector<float> qlen(N), klen(M);
    for (int64_t i = 0; i < N; ++i) qlen[i] = std::sqrt(qn[i]) * (1.0f + 1e-6f);
    for (int64_t j = 0; j < M; ++j) klen[j] = std::sqrt(kn[j]) * (1.0f + 1e-6f);
    std::vector<int64_t> rows(N);
    for (int64_t i = 0; i < N; ++i) rows[i] = i;
    Balls shrunk = kb;
    for (auto& v : shrunk.member_dist) v *= 0.2f;
    for (auto& v : shrunk.dist_min) v *= 0.2f;
    for (auto& v : shrunk.dist_max) v *= 0.2f;
    PrunedPassArgs am = a;
    am.key_balls = &shrunk;
    for (int64_t k : {int64_t{1}, std::min<int64_t>(M, 3), std::min<int64_t>(M, 7)}) {
      // brute force: per row the sorted (float64 distance, id)
      std::vector<std::vector<std::pair<double, int64_t>>> want(N);
      for (int64_t i = 0; i < N; ++i) {
        for (int64_t j = 0; j < M; ++j) want[i].emplace_back(exact_sqdist(&p.q[i * D], &p.k[j * D], D), p.key_order[j]);
        std::sort(want[i].begin(), want[i].end());
      }
      for (int mode = 0; mode < 3; ++mode) {  // 0: no bound, 1: bound at the k-th, 2: mutant
        std::vector<float> bound(N), dist(N * k, -1.f);
        std::vector<int64_t> idx(N * k, -2);
        std::vector<unsigned char> deferred(N, 2);
        for (int64_t i = 0; i < N; ++i) bound[i] = float(want[i][k - 1].first);
        PrunedTopKArgs t;
        t.k = k;
        t.err_coef = eb.coef;
        t.err_slack = eb.slack;
        t.query_len = qlen.data();
        t.key_len = klen.data();
        t.queries = p.q.data();
        t.query_row = rows.data();
        t.keys = p.k.data();
        t.key_order = p.key_order.data();
        t.bound = mode == 1 ? bound.data() : nullptr;
        t.out_dist = dist.data();
        t.out_idx = idx.data();
        t.deferred = deferred.data();
        const int64_t before_t = stats.pairs_computed, before_total = stats.pairs_total;
        pruned_topk(mode == 2 ? am : a, t);
        stats.pairs_computed = before_t;
        stats.pairs_total = before_total;
        int64_t wrong = 0;
        for (int64_t i = 0; i < N; ++i) {
          EXPECT(deferred[i] <= 1, "%s: top-k row %ld deferred flag unset", what, (long)i);
          if (deferred[i] == 1) continue;  // the caller's dense path (tested in Python)
          for (int64_t j = 0; j < k; ++j) {
            // with a bound, entries past it (float ties with it stay) may be padding
            const bool past = mode == 1 && float(want[i][j].first) > bound[i];
            const bool ok = past ? idx[i * k + j] == -1 : (idx[i * k + j] == want[i][j].second &&
                                                           dist[i * k + j] == float(want[i][j].first));
            wrong += !ok;
            if (mode < 2)
              EXPECT(ok, "%s: top-%ld (bound %d) row %ld slot %ld: id %ld dist %.9g, want %ld %.9g", what, (long)k,
                     mode, (long)i, (long)j, (long)idx[i * k + j], dist[i * k + j], (long)want[i][j].second,
                     want[i][j].first);
          }
        }
        if (mode == 2 && cfg.mutant_must_fail)
          EXPECT(wrong > 0, "%s: the shrunk-ball mutant of the top-%ld pass went unnoticed", what, (long)k);
      }
    }
  }

  stats.pairs_total = 2 * pairs;  // the hinted runs are extra: report the first two passes
  stats.pairs_computed = computed1 + computed2;
  return double(stats.pairs_computed) / double(stats.pairs_total);
}

void check_pruned(std::mt19937& rng) {
  // make_balls: odd sizes, empty ranges, splits at max_size, far from the origin
  const std::vector<int64_t> ranges[] = {{0, 1}, {0, 3, 3, 10, 11, 40}, {0, 0, 7, 7, 40}, {0, 40}};
  for (const auto& r : ranges)
    for (int64_t max_size : {1, 2, 3, 8, 64})
      for (int64_t dim : {1, 5})
        for (float offset : {0.f, 1000.f}) check_make_balls(rng, r.back(), dim, r, max_size, 1.f, offset);
  check_make_balls(rng, 300, 3, {0, 128, 300}, 128, 1e-3f, 3e4f);  // tiny balls, huge coordinates

  struct Case {
    int64_t N, M, D, clusters;
    float sep, spread;
    bool integer, sorted;
    float offset;
  };
  const Case cases[] = {
      {1, 1, 1, 1, 10.f, 1.f, false, true, 0.f},
      {1, 37, 3, 4, 10.f, 1.f, false, true, 0.f},
      {29, 1, 5, 3, 10.f, 1.f, false, true, 0.f},
      {70, 90, 5, 6, 20.f, 0.5f, false, true, 0.f},   // well separated
      {90, 120, 1, 6, 20.f, 1.f, false, true, 0.f},   // D = 1, 2: annulus bounds are nearly tight,
      {80, 100, 2, 5, 10.f, 1.f, false, true, 0.f},   // so every threshold decides something
      {70, 90, 5, 6, 20.f, 0.5f, false, false, 0.f},  // query blocks span clusters
      {64, 200, 7, 5, 3.f, 1.f, false, true, 0.f},    // overlapping clusters
      {50, 80, 4, 5, 20.f, 0.5f, false, true, 500.f}, // far from the origin (not centred)
      {60, 60, 3, 4, 8.f, 1.f, true, true, 0.f},      // exact ties and copies
      {45, 77, 2, 3, 4.f, 1.f, true, false, 0.f},
  };
  int variant = 0;
  for (const Case& c : cases)
    for (int64_t block : {1, 7, 64})
      for (int64_t ball : {1, 5, 256})
        for (int64_t batch : {1, 40, 512}) {
          ++variant;
          const ClusteredProblem p = make_clustered(rng, c.N, c.M, c.D, c.clusters, c.sep, c.spread, c.integer,
                                                    c.sorted, c.offset, /*sort_by_rho=*/variant % 4 != 1);
          const int64_t bytes = c.integer && variant % 2 ? 2 : 4;  // bf16 rows: exact for small integers
          // overlapping clusters, one row per block, small balls: a row's neighbours lie in
          // several balls, one ball per GEMM, so a wrong ball bound must lose some of them
          const bool must_fail = c.sep == 3.f && block == 1 && ball == 5 && batch == 1;
          check_pruned_passes(p, {block, ball, batch, bytes, 1 + (variant / 2) % 2, variant % 3 == 0, must_fail},
                              rng);
        }
  // Far from the origin with tiny clusters: the fp32 rounding of ||x||^2 ~ 1e5 rivals the
  // distances themselves, so the bounds hold only if the error windows cover it.
  for (int rep = 0; rep < 4; ++rep)
    for (int64_t D : {1, 3, 8})
      for (float spread : {0.01f, 0.1f}) {
        const ClusteredProblem p = make_clustered(rng, 40, 60, D, 4, 0.3f, spread, false, true, 300.f);
        for (int64_t block : {1, 7})
          for (int64_t ball : {1, 5, 256})
            for (int64_t batch : {1, 512}) check_pruned_passes(p, {block, ball, batch, 4, 1, batch == 1}, rng);
      }
  // well-separated clusters, queries sorted by cluster: most pairs provably useless
  for (int64_t D : {2, 9})
    for (int64_t batch : {1, 512}) {
      const ClusteredProblem p = make_clustered(rng, 200, 240, D, 8, 30.f, 0.5f, false, true, 0.f);
      const double frac = check_pruned_passes(p, {16, 32, batch, 4, 2, false}, rng);
      // gathering surviving tiles into batches decides on staler minima: fewer skipped
      EXPECT(frac < (batch == 1 ? 0.5 : 0.75),
             "D=%ld batch=%ld well-separated clusters: computed %.2f of the pairs", (long)D, (long)batch, frac);
    }
}

}  // namespace

// Ball counts with radii exactly on the boundary (ball j passes through point j % N, its
// radius fl32 of the float64 distance) and one float32 step inside it: the pairs an fp32
// distance decides wrongly, which only the error window gets right.
void check_ball_count(std::mt19937& rng, int64_t N, int64_t M, int64_t D, float offset, Tiling tiling) {
  Problem p = make_problem(rng, 1, N, M, D, false, offset);
  std::vector<float> pn(N), cn(M), plen(N);
  squared_norms(p.q, D, pn);
  squared_norms(p.k, D, cn);
  for (int64_t i = 0; i < N; ++i) plen[i] = std::sqrt(pn[i]) * (1 + 1e-6f);
  const ErrorBound bound(D, 0.0);
  for (int below = 0; below < 2; ++below) {
    std::vector<float> rad(M);
    for (int64_t j = 0; j < M; ++j) {
      rad[j] = float(exact_sqdist(&p.q[(j % N) * D], &p.k[j * D], D));
      if (below) rad[j] = std::nextafter(rad[j], 0.f);
    }
    std::vector<int64_t> count(N, -1), idx(N, -1);
    std::vector<float> dist(N, -1.f);
    int64_t ambiguous = 0;
    CertifiedTopKArgs near{1, N, M, D, 1, false, cn.data(), plen.data(), bound.coef, bound.slack,
                           p.q.data(), p.k.data(), dist.data(), idx.data(), nullptr, nullptr, nullptr};
    std::vector<float> clen(M), rnext(M);
    ball_count_centre_terms(cn.data(), rad.data(), M, clen.data(), rnext.data());
    BallCountArgs a{N, M, D, pn.data(), plen.data(), cn.data(), clen.data(), rad.data(), rnext.data(),
                    bound.coef, bound.slack, p.q.data(), p.k.data(), count.data(), &ambiguous, &near};
    NaiveCtx ctx{&p};
    for_each_row_block(Shape{1, N, M, D}, tiling, TileGemm{naive_gemm, &ctx}, BallCount(a));
    for (int64_t i = 0; i < N; ++i) {
      int64_t want = 0, best = 0;
      double bd = INFINITY;
      for (int64_t j = 0; j < M; ++j) {
        const double d = exact_sqdist(&p.q[i * D], &p.k[j * D], D);
        want += float(d) <= rad[j];
        if (d < bd) bd = d, best = j;
      }
      EXPECT(count[i] == want, "ball_count N=%ld M=%ld D=%ld below=%d: row %ld count %ld want %ld",
             (long)N, (long)M, (long)D, below, (long)i, (long)count[i], (long)want);
      EXPECT(idx[i] == best, "ball_count nearest: row %ld idx %ld want %ld", (long)i, (long)idx[i], (long)best);
    }
    EXPECT(ambiguous >= (below ? 0 : 1) || M == 0, "no pair was ambiguous: the boundary test tests nothing");
  }
}

// The blocked float64 scan against exact_sqdist pair by pair: the same values bit for bit,
// ascending, ties to the lowest index, the skipped key left out; partial groups of 4
// rows, an odd last key, dims below and above 8 with tails, duplicate keys.
void check_exact_scan(std::mt19937& rng, int64_t nq, int64_t m, int64_t dim, int64_t k) {
  std::uniform_int_distribution<int> small(-3, 3);
  std::vector<float> q(nq * dim), keys(m * dim);
  for (auto& x : q) x = float(small(rng));          // integers: many exact ties
  for (auto& x : keys) x = float(small(rng)) * 0.5f;
  std::vector<const float*> qp(nq);
  std::vector<int64_t> skip(nq);
  for (int64_t i = 0; i < nq; ++i) {
    qp[i] = &q[i * dim];
    skip[i] = (i % 3 == 0) ? -1 : int64_t(rng() % m);
  }
  std::vector<double> bd(nq * k);
  std::vector<int64_t> bi(nq * k);
  ExactScanBuffers buf;
  exact_topk_scan(qp.data(), skip.data(), nq, keys.data(), m, dim, k, bd.data(), bi.data(), buf);
  for (int64_t i = 0; i < nq; ++i) {
    std::vector<std::pair<double, int64_t>> all;
    for (int64_t j = 0; j < m; ++j)
      if (j != skip[i]) all.emplace_back(exact_sqdist(qp[i], &keys[j * dim], dim), j);
    std::sort(all.begin(), all.end());
    for (int64_t r = 0; r < k && r < int64_t(all.size()); ++r)
      EXPECT(bi[i * k + r] == all[r].second && bd[i * k + r] == all[r].first,
             "exact scan nq=%ld m=%ld dim=%ld k=%ld: row %ld rank %ld got (%g, %ld) want (%g, %ld)",
             (long)nq, (long)m, (long)dim, (long)k, (long)i, (long)r, bd[i * k + r],
             (long)bi[i * k + r], all[r].first, (long)all[r].second);
  }
}

int main() {
  std::mt19937 rng(1234);
  const Tiling tilings[] = {{1, 1, 0}, {3, 5, 0}, {7, 4, 2}, {128, 512, 0}};
  for (const Tiling& t : tilings) {
    for (int64_t N : {1, 6, 13})
      for (int64_t M : {1, 5, 11, 40})
        for (int64_t D : {1, 3, 17})
          for (int64_t K : {1, 3})
            if (K <= M) check_topk(rng, 2, N, M, D, K, false, false, t);
    // integer data: exact ties, which must go to the lowest index
    check_topk(rng, 1, 20, 37, 2, 5, false, true, t);
    check_topk(rng, 2, 19, 19, 3, 4, true, false, t);   // exclude_self
    check_topk(rng, 1, 21, 21, 1, 6, true, true, t);    // exclude_self with duplicates
    check_topk(rng, 2, 17, 40, 5, 3, false, false, t, true);  // one key of huge norm
    check_topk(rng, 1, 20, 37, 2, 5, false, true, t, true);   // ... with exact ties
    for (int64_t N : {1, 9, 30})
      for (int64_t M : {1, 8, 23}) {
        check_column_min(rng, 2, N, M, 5, t);
        check_weighted_argmin(rng, 2, N, M, 5, false, t);
        check_weighted_argmin(rng, 1, N, M, 2, true, t);  // exact ties
      }
  }
  for (const Tiling& t : tilings)
    for (int64_t N : {1, 7, 30})
      for (int64_t M : {1, 9, 33}) check_ball_count(rng, N, M, 37, 20.f, t);
  // more candidates than the cap: the full-scan fallback answers these rows
  check_topk(rng, 1, 2, 9000, 1, 3, false, true, Tiling{64, 256, 0});
  check_pruned(rng);
  for (int64_t nq : {1, 3, 4, 9})
    for (int64_t m : {2, 7, 33, 70})
      for (int64_t dim : {1, 8, 13, 37, 600}) check_exact_scan(rng, nq, m, dim, std::min<int64_t>(m - 1, 4));
  // empty problems return without touching anything
  for_each_row_block(Shape{0, 5, 5, 3}, Tiling{}, TileGemm{nullptr, nullptr}, ColumnMin({}));
  if (g_failures) {
    std::fprintf(stderr, "%d failures\n", g_failures);
    return 1;
  }
  std::printf("engine tests passed\n");
  return 0;
}
