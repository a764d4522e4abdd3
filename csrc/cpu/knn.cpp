// CPU kernel of fastgen::knn: exact (certified) k nearest neighbours, and the search
// nearest_code and the plain patch_nn share (knn.h).
#include "knn.h"

#include <torch/all.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <utility>
#include <vector>

#include "../engine/exact_sqdist.h"

#include "../engine/error_bound.h"
#include "../engine/reductions.h"
#include "../engine/sqdist_engine.h"
#include "checks.h"
#include "operands.h"

namespace fastgen {
namespace cpu {
namespace {
std::atomic<int64_t> g_overflow_rows{0};
std::atomic<int64_t> g_dense_rows{0};

// The rows whose fp32 window held a large share of the keys (near-identical keys, a
// fresh codebook far from the data): screened again with float64 GEMMs, whose window
// (ErrorBound::float64, 2^-29 of fp32's) holds only near-exact ties, then re-ranked by
// exact_sqdist like every other row. A GEMM runs at BLAS speed where the pairwise
// float64 scan cannot; rows whose float64 window still holds more than kMaxFloat64
// candidates (exact duplicates) take the blocked scan. Rows go in blocks of kRowBlock
// and keys in chunks of kChunkElems / max(D, rows) doubles: no rows x M matrix, and a
// key chunk stays wide enough for the GEMM however many rows are deferred.
std::atomic<int64_t> g_scan_rows{0};

void rerank_row_block(const at::Tensor& q32, const at::Tensor& kb, const at::Tensor& mu, int64_t b,
                      const std::vector<int64_t>& local, int64_t k, bool exclude_self, float* out_dist,
                      int64_t* out_idx) {
  constexpr int64_t kChunkElems = int64_t{1} << 22;
  constexpr int64_t kMaxFloat64 = 4096;
  const int64_t N = q32.size(1), M = kb.size(0), D = q32.size(2);
  const int64_t nr = static_cast<int64_t>(local.size());
  const engine::ErrorBound bound = engine::ErrorBound::float64(D);
  const int64_t kc = std::max<int64_t>(k, std::min<int64_t>(M, kChunkElems / std::max<int64_t>(1, std::max(D, nr))));
  // Buffers reused across chunks: a fresh 30 MB tensor per chunk is a fresh mmap, and
  // zeroing its pages took a fifth of this pass's time.
  at::Tensor kbuf = at::empty({kc, D}, q32.options().dtype(at::kDouble));
  at::Tensor sbuf = at::empty({nr * kc}, q32.options().dtype(at::kDouble));
  const at::Tensor sel = at::tensor(local, q32.options().dtype(at::kLong));
  const at::Tensor qc = q32[b].index_select(0, sel).to(at::kDouble) - mu;   // (nr, D)
  const at::Tensor qlen = qc.norm(2, 1, /*keepdim=*/true);                 // (nr, 1)
  // per row: the k smallest upper bounds so far, and the candidates (lower bound, key)
  std::vector<double> best_up(nr * k, INFINITY);
  std::vector<std::vector<std::pair<double, int64_t>>> cand(nr);
  std::vector<char> crowded(nr, 0);
  const auto qlen_a = qlen.accessor<double, 2>();
  for (int64_t c0 = 0; c0 < M; c0 += kc) {
    const int64_t nc = std::min(kc, M - c0);
    at::Tensor kcen = kbuf.narrow(0, 0, nc);   // (nc, D) centred keys
    kcen.copy_(kb.narrow(0, c0, nc));
    kcen.sub_(mu);
    // squared norms by a loop: kcen.square() would be one more chunk-sized temporary
    at::Tensor ksq = at::empty({1, nc}, kcen.options());
    double* kq = ksq.data_ptr<double>();
    const double* kp = kcen.data_ptr<double>();
    at::parallel_for(0, nc, 64, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        double a = 0.0;
        for (int64_t t = 0; t < D; ++t) a += kp[j * D + t] * kp[j * D + t];
        kq[j] = a;
      }
    });
    // one bound per row and chunk, with the chunk's longest key rounded up (keeps the
    // pass per pair to a compare; the bound must not be under the true one)
    const double kmax = std::sqrt(*std::max_element(kq, kq + nc)) * (1.0 + 1e-12);
    at::Tensor sc = sbuf.narrow(0, 0, nr * nc).view({nr, nc});   // contiguous
    at::addmm_out(sc, ksq, qc, kcen.t(), 1.0, -2.0);
    const double* sp = sc.data_ptr<double>();
    at::parallel_for(0, nr, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const double e = bound(qlen_a[i][0], kmax);
        const double* si = sp + i * nc;
        const int64_t self = exclude_self ? local[i] - c0 : -1;
        double* bu = best_up.data() + i * k;
        for (int64_t c = 0; c < nc; ++c) {   // the k smallest upper bounds s + e
          const double up = si[c] + e;
          if (!(up < bu[k - 1]) || c == self) continue;
          int64_t pos = k - 1;
          while (pos > 0 && bu[pos - 1] > up) {
            bu[pos] = bu[pos - 1];
            --pos;
          }
          bu[pos] = up;
        }
        if (crowded[i]) continue;
        auto& ci = cand[i];
        const double limit = bu[k - 1] + e;   // lower bound s - e <= U
        for (int64_t c = 0; c < nc; ++c)
          if (si[c] <= limit && c != self) ci.emplace_back(si[c] - e, c0 + c);
        if (static_cast<int64_t>(ci.size()) > 2 * kMaxFloat64) {
          // drop what the tighter bound rules out; past the cap, the row goes to the scan
          const double ui = bu[k - 1];
          ci.erase(std::remove_if(ci.begin(), ci.end(),
                                  [ui](const std::pair<double, int64_t>& x) { return x.first > ui; }),
                   ci.end());
          if (static_cast<int64_t>(ci.size()) > kMaxFloat64) {
            crowded[i] = 1;
            ci.clear();
            ci.shrink_to_fit();
          }
        }
      }
    });
  }
  const float* keys = kb.data_ptr<float>();
  const float* qbase = q32.data_ptr<float>();
  // the exact re-rank, row by row, on every thread
  at::parallel_for(0, nr, 8, [&](int64_t i0, int64_t i1) {
    std::vector<std::pair<double, int64_t>> ranked;
    for (int64_t i = i0; i < i1; ++i) {
      if (crowded[i]) continue;
      const int64_t row = b * N + local[i];
      const float* q = qbase + row * D;
      ranked.clear();
      for (const auto& c : cand[i])
        if (c.first <= best_up[i * k + k - 1]) ranked.emplace_back(engine::exact_sqdist(q, keys + c.second * D, D), c.second);
      std::partial_sort(ranked.begin(), ranked.begin() + k, ranked.end());
      for (int64_t j = 0; j < k; ++j) {
        out_dist[row * k + j] = static_cast<float>(ranked[j].first);
        out_idx[row * k + j] = ranked[j].second;
      }
    }
  });
  // crowded rows (exact duplicates): the blocked scan over all keys, groups of rows per thread
  std::vector<int64_t> scan;
  for (int64_t i = 0; i < nr; ++i)
    if (crowded[i]) scan.push_back(i);
  if (scan.empty()) return;
  g_scan_rows += static_cast<int64_t>(scan.size());
  at::parallel_for(0, static_cast<int64_t>(scan.size()), 4, [&](int64_t s0, int64_t s1) {
    const int64_t ns = s1 - s0;
    std::vector<const float*> qp(ns);
    std::vector<int64_t> skip(ns);
    for (int64_t t = 0; t < ns; ++t) {
      qp[t] = qbase + (b * N + local[scan[s0 + t]]) * D;
      skip[t] = exclude_self ? local[scan[s0 + t]] : -1;
    }
    std::vector<double> bd(ns * k);
    std::vector<int64_t> bi(ns * k);
    engine::ExactScanBuffers buf;
    engine::exact_topk_scan(qp.data(), skip.data(), ns, keys, M, D, k, bd.data(), bi.data(), buf);
    for (int64_t t = 0; t < ns; ++t) {
      const int64_t row = b * N + local[scan[s0 + t]];
      for (int64_t j = 0; j < k; ++j) {
        out_dist[row * k + j] = static_cast<float>(bd[t * k + j]);
        out_idx[row * k + j] = bi[t * k + j];
      }
    }
  });
}

void rerank_deferred_rows(const at::Tensor& q32, const at::Tensor& k32, std::vector<int64_t> rows,
                          int64_t k, bool exclude_self, float* out_dist, int64_t* out_idx) {
  constexpr int64_t kRowBlock = 2048;
  constexpr int64_t kMeanChunk = 4096;
  std::sort(rows.begin(), rows.end());
  const int64_t N = q32.size(1), M = k32.size(1);
  size_t lo = 0;
  while (lo < rows.size()) {
    const int64_t b = rows[lo] / N;
    size_t hi = lo;
    while (hi < rows.size() && rows[hi] / N == b) ++hi;
    const at::Tensor kb = k32[k32.size(0) == 1 ? 0 : b];
    // the key mean in float64, chunk by chunk (no float64 copy of every key)
    at::Tensor mu = at::zeros({1, k32.size(2)}, q32.options().dtype(at::kDouble));
    for (int64_t c0 = 0; c0 < M; c0 += kMeanChunk)
      mu.add_(kb.narrow(0, c0, std::min(kMeanChunk, M - c0)).to(at::kDouble).sum(0, /*keepdim=*/true));
    mu.div_(static_cast<double>(M));
    for (size_t r0 = lo; r0 < hi; r0 += kRowBlock) {
      const size_t r1 = std::min(hi, r0 + static_cast<size_t>(kRowBlock));
      std::vector<int64_t> local(r1 - r0);
      for (size_t i = r0; i < r1; ++i) local[i - r0] = rows[i] - b * N;
      rerank_row_block(q32, kb, mu, b, local, k, exclude_self, out_dist, out_idx);
    }
    lo = hi;
  }
}

}  // namespace

int64_t overflow_row_count() { return g_overflow_rows.load(); }
int64_t dense_row_count() { return g_dense_rows.load(); }
int64_t scan_row_count() { return g_scan_rows.load(); }

std::tuple<at::Tensor, at::Tensor> certified_topk(const at::Tensor& queries,
                                                  const at::Tensor& keys, int64_t k,
                                                  bool exclude_self,
                                                  const std::string& precision,
                                                  const char* query_name, const char* key_name) {
  const int64_t B = queries.size(0), N = queries.size(1);
  auto dist = at::empty({B, N, k}, queries.options().dtype(at::kFloat));
  auto idx = at::empty({B, N, k}, queries.options().dtype(at::kLong));
  if (B == 0 || N == 0) {
    check_precision(precision);
    return {dist, idx};
  }
  PreparedOperands p(queries, keys, precision, query_name, key_name);
  const int64_t M = p.M, D = p.D;
  const at::Tensor& qn = p.qn;
  const at::Tensor& kn = p.kn;
  const engine::ErrorBound bound(D, p.input_roundoff(), p.output_roundoff());
  // ||q_c|| per query, rounded up (the error bound is sized per (query, key) pair)
  const at::Tensor qlen = qn.sqrt().mul(1.0 + 1e-6).contiguous();
  const at::Tensor& q32 = p.q32;
  const at::Tensor& k32 = p.k32;
  const engine::TileGemm& gemm = p.gemm;

  int64_t overflow = 0, dense = 0;
  std::vector<int64_t> deferred;
  engine::CertifiedTopKArgs args{B,
                                 N,
                                 M,
                                 D,
                                 k,
                                 exclude_self,
                                 kn.data_ptr<float>(),
                                 qlen.data_ptr<float>(),
                                 bound.coef,
                                 bound.slack,
                                 q32.data_ptr<float>(),
                                 k32.data_ptr<float>(),
                                 dist.data_ptr<float>(),
                                 idx.data_ptr<int64_t>(),
                                 &overflow,
                                 &dense,
                                 &deferred};
  engine::for_each_row_block(engine::Shape{B, N, M, D}, p.tiling, gemm,
                             engine::CertifiedTopK(args));
  g_overflow_rows += overflow;
  g_dense_rows += dense;
  if (!deferred.empty())
    rerank_deferred_rows(q32, k32, std::move(deferred), k, exclude_self, dist.data_ptr<float>(),
                         idx.data_ptr<int64_t>());
  return {dist, idx};
}

}  // namespace cpu

namespace {

std::tuple<at::Tensor, at::Tensor> knn_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                           int64_t k, bool exclude_self,
                                           c10::string_view precision) {
  check_point_sets(queries, keys);
  TORCH_CHECK_VALUE(!exclude_self || queries.size(1) == keys.size(1),
              "exclude_self needs queries and keys to be the same set (N == M), got N=",
              queries.size(1), " M=", keys.size(1));
  const int64_t available = keys.size(1) - (exclude_self ? 1 : 0);
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK_VALUE(k <= available, "k=", k, " exceeds the number of keys available (",
              available, exclude_self ? ", self excluded)" : ")");
  return cpu::certified_topk(queries, keys, k, exclude_self, std::string(precision));
}

}  // namespace
}  // namespace fastgen

TORCH_LIBRARY_IMPL(fastgen, CPU, m) { m.impl("knn", &fastgen::knn_cpu); }
