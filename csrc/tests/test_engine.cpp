// C++ tests of the torch-free engine core (sqdist_engine.h + reductions.h), built by
// CMake under AddressSanitizer + UBSan: an out-of-bounds tile index fails here
// instead of silently corrupting results. Tiny, odd tile sizes make every edge
// case (partial row blocks, partial column blocks, one-element tiles) appear.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../engine/error_bound.h"
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
                bool exclude_self, bool integer, Tiling tiling) {
  Problem p = make_problem(rng, B, N, M, D, integer, 0.f);
  if (exclude_self) p.k = p.q;  // the same set
  std::vector<float> kn(B * M), window(B * N);
  double kmax = 0;
  for (int64_t j = 0; j < B * M; ++j) {
    double s = 0;
    for (int64_t d = 0; d < D; ++d) s += double(p.k[j * D + d]) * p.k[j * D + d];
    kn[j] = float(s);
    kmax = std::max(kmax, std::sqrt(s));
  }
  for (int64_t i = 0; i < B * N; ++i) {
    double s = 0;
    for (int64_t d = 0; d < D; ++d) s += double(p.q[i * D + d]) * p.q[i * D + d];
    window[i] = candidate_window(std::sqrt(s), kmax, D, 0.0);
  }
  std::vector<float> dist(B * N * K, -1.f);
  std::vector<int64_t> idx(B * N * K, -1);
  int64_t overflow = 0;
  CertifiedTopKArgs a{B, N, M, D, K, exclude_self, kn.data(), window.data(), p.q.data(),
                      p.k.data(), dist.data(), idx.data(), &overflow};
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

}  // namespace

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
    for (int64_t N : {1, 9, 30})
      for (int64_t M : {1, 8, 23}) {
        check_column_min(rng, 2, N, M, 5, t);
        check_weighted_argmin(rng, 2, N, M, 5, false, t);
        check_weighted_argmin(rng, 1, N, M, 2, true, t);  // exact ties
      }
  }
  // more candidates than the cap: the full-scan fallback answers these rows
  check_topk(rng, 1, 2, 9000, 1, 3, false, true, Tiling{64, 256, 0});
  // empty problems return without touching anything
  for_each_row_block(Shape{0, 5, 5, 3}, Tiling{}, TileGemm{nullptr, nullptr}, ColumnMin({}));
  if (g_failures) {
    std::fprintf(stderr, "%d failures\n", g_failures);
    return 1;
  }
  std::printf("engine tests passed\n");
  return 0;
}
