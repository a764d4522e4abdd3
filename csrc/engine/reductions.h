// Reductions that plug into sqdist_engine.h.
//
// CertifiedTopK  - running top-k per row that is *exact*: the tile values are fp32
//                  (or bf16-input) approximations s~ of s = ||k||^2 - 2 q.k, each
//                  within E(||q||, ||k||) = coef (||q|| + ||k||)^2 + slack of the truth
//                  (the caller proves the bound, see engine/error_bound.h). The bound
//                  is sized per key: U, the k-th smallest s~ + E over the keys seen,
//                  bounds the true k-th value from above, and a key is kept as a
//                  candidate while s~ - E <= U (one key of huge norm widens only its
//                  own test, not every row's). At the end the candidates are
//                  re-ranked by the float64 distance sum((q - k)^2) computed from the
//                  original inputs, ties to the lowest index. The answer is therefore
//                  the float64 ranking, whatever the GEMM did, and the returned
//                  distances are accurate (no cancellation).
// ColumnMin      - running minimum of each column (GPNN's normaliser, pass 1).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "candidates.h"
#include "exact_sqdist.h"
#include "simd_kernels.h"

namespace fastgen {
namespace engine {

struct CertifiedTopKArgs {
  int64_t batch, rows, cols, dim, k;
  bool exclude_self;
  const float* key_norms;    // (B, M) squared norms of the keys the GEMM saw
  const float* query_len;    // (B, N) ||q_c|| of the queries the GEMM saw (rounded up)
  double err_coef, err_slack;  // E(a, b) = err_coef (a + b)^2 + err_slack (ErrorBound)
  const float* queries;      // (B, N, D) original values, fp32, contiguous
  const float* keys;         // (B, M, D) original values, fp32, contiguous
  float* out_dist;           // (B, N, k)
  int64_t* out_idx;          // (B, N, k)
  int64_t* overflow_rows;    // optional counter of rows past the candidate cap
  int64_t* dense_rows;       // optional counter of rows re-ranked over all keys
  // optional: such rows (b * rows + r) are appended here for the caller to answer (a
  // float64 GEMM screen, knn.cpp) instead of by the blocked scan below
  std::vector<int64_t>* deferred;
};

class CertifiedTopK {
 public:
  explicit CertifiedTopK(const CertifiedTopKArgs& a) : a_(a) {}

  class Local {
   public:
    explicit Local(const CertifiedTopKArgs& a) : a_(a) {}

    void begin(int64_t /*b*/, int64_t /*r0*/, int64_t nr) {
      const size_t n = static_cast<size_t>(nr);
      if (cand_.size() < n) cand_.resize(n);
      best_.assign(n * static_cast<size_t>(a_.k), kInf);
      filled_.assign(n, 0);
      thr_.assign(n, kInf);
      overflow_.assign(n, 0);
      next_prune_.assign(n, first_prune_at(a_.k));
      for (size_t r = 0; r < n; ++r) cand_[r].clear();
    }

    void tile(const float* tile, int64_t ldc, int64_t b, int64_t r0, int64_t nr, int64_t c0,
              int64_t nc) {
      const float* kn = a_.key_norms + b * a_.cols + c0;
      const int64_t nchunks = (nc + kScreenChunk - 1) / kScreenChunk;
      mc_.resize(static_cast<size_t>(nchunks));
      // the longest key of each chunk: the chunk's screen uses its (largest) error bound
      cb_.resize(static_cast<size_t>(nchunks));
      for (int64_t j = 0; j < nchunks; ++j) {
        float m = 0.f;
        for (int64_t c = j * kScreenChunk; c < std::min(nc, (j + 1) * kScreenChunk); ++c) m = std::max(m, kn[c]);
        cb_[j] = key_len(m);
      }
      ce_.resize(static_cast<size_t>(nchunks));
      for (int64_t r = 0; r < nr; ++r) {
        const float* t = tile + r * ldc;
        const double qa = a_.query_len[b * a_.rows + r0 + r];
        for (int64_t j = 0; j < nchunks; ++j) ce_[j] = err(qa, cb_[j]);
        // Vectorised screen: the minimum of each 16-column chunk. Once the first
        // tiles have set the threshold, most chunks of most rows hold nothing under
        // it and the scalar accept path never sees them.
        chunk_minima(t, kn, nc, mc_.data());
        const int64_t self = a_.exclude_self ? r0 + r - c0 : -1;
        if (self >= 0 && self < nc) {  // the self column never counts: re-take its chunk's min
          const int64_t j = self / kScreenChunk;
          float m = kInf;
          for (int64_t c = j * kScreenChunk; c < std::min(nc, (j + 1) * kScreenChunk); ++c)
            if (c != self) m = std::min(m, t[c] + kn[c]);
          mc_[j] = m;
        }
        if (filled_[r] < a_.k) seed_threshold(r, nchunks);
        for (int64_t j = 0; j < nchunks; ++j) {
          if (!(mc_[j] - ce_[j] <= thr_[r])) continue;
          const int64_t ce = std::min(nc, (j + 1) * kScreenChunk);
          for (int64_t c = j * kScreenChunk; c < ce; ++c) {
            const float s = t[c] + kn[c];
            if (!(s - ce_[j] <= thr_[r]) || c == self) continue;
            const float e = err(qa, key_len(kn[c]));
            if (s - e <= thr_[r]) accept(r, c0 + c, s, e);
          }
        }
      }
    }

    void end(int64_t b, int64_t r0, int64_t nr) {
      const int64_t k = a_.k, D = a_.dim, M = a_.cols;
      const float* keys = a_.keys + b * M * D;
      dense_.clear();
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = b * a_.rows + r0 + r;
        const float* q = a_.queries + row * D;
        // A row whose window holds a large share of the keys (near-identical keys, or
        // past the cap) goes to the dense path (the caller's float64 GEMM screen, or the
        // blocked scan over all keys below): one pass of vectorised float64 tiles costs
        // less than the same keys one pair at a time.
        int64_t inside = 0;
        if (!overflow_[r])
          for (const auto& c : cand_[r]) inside += c.first <= thr_[r];
        if (overflow_[r] || window_is_dense(inside, M)) {
          dense_.push_back(r);
          continue;
        }
        ranked_.clear();
        // only the candidates still inside the final window need the exact distance
        for (const auto& c : cand_[r])
          if (c.first <= thr_[r]) ranked_.emplace_back(exact_sqdist(q, keys + c.second * D, D), c.second);
        const auto mid = ranked_.begin() + std::min<int64_t>(k, ranked_.size());
        std::partial_sort(ranked_.begin(), mid, ranked_.end());
        for (int64_t j = 0; j < k; ++j) {
          a_.out_dist[row * k + j] = static_cast<float>(ranked_[j].first);
          a_.out_idx[row * k + j] = ranked_[j].second;
        }
      }
      if (dense_.empty()) return;
      const size_t nd = dense_.size();
      for (size_t i = 0; i < nd; ++i)
        if (overflow_[dense_[i]] && a_.overflow_rows) {
#pragma omp atomic
          *a_.overflow_rows += 1;
        }
      if (a_.dense_rows) {
#pragma omp atomic
        *a_.dense_rows += static_cast<int64_t>(nd);
      }
      if (a_.deferred) {
#pragma omp critical(fastgen_certified_deferred)
        for (size_t i = 0; i < nd; ++i) a_.deferred->push_back(b * a_.rows + r0 + dense_[i]);
        return;
      }
      qptr_.resize(nd);
      skip_.resize(nd);
      best_d_.resize(nd * static_cast<size_t>(k));
      best_i_.resize(nd * static_cast<size_t>(k));
      for (size_t i = 0; i < nd; ++i) {
        qptr_[i] = a_.queries + (b * a_.rows + r0 + dense_[i]) * D;
        skip_[i] = a_.exclude_self ? r0 + dense_[i] : -1;
      }
      exact_topk_scan(qptr_.data(), skip_.data(), static_cast<int64_t>(nd), keys, M, D, k,
                      best_d_.data(), best_i_.data(), scan_);
      for (size_t i = 0; i < nd; ++i) {
        const int64_t row = b * a_.rows + r0 + dense_[i];
        for (int64_t j = 0; j < k; ++j) {
          a_.out_dist[row * k + j] = static_cast<float>(best_d_[i * k + j]);
          a_.out_idx[row * k + j] = best_i_[i * k + j];
        }
      }
    }

   private:
    static constexpr float kInf = std::numeric_limits<float>::infinity();

    // ||k_c|| from its squared norm, rounded up (a relative 1e-6 covers the sqrt).
    static float key_len(float sq) { return std::sqrt(std::max(sq, 0.f)) * (1.0f + 1e-6f); }
    // E(a, b) as a float, rounded up; an overflow gives +inf (that key is always kept).
    float err(double a, float b) const {
      const double e = a_.err_coef * (a + b) * (a + b) + a_.err_slack;
      return e < 3.0e38 ? static_cast<float>(e) * (1.0f + 1e-6f) : kInf;
    }

    // Before a row has k candidates its threshold is +inf and every value would take
    // the scalar accept path. Each chunk minimum plus its chunk's bound is an upper bound
    // of one key's true value, k distinct keys as soon as there are k chunks, so their
    // k-th smallest bounds the row's true k-th value from above: a valid threshold from
    // the first tile on, for the cost of a selection among a few dozen numbers.
    void seed_threshold(int64_t r, int64_t nchunks) {
      if (nchunks < a_.k) return;
      seed_.resize(static_cast<size_t>(nchunks));
      for (int64_t j = 0; j < nchunks; ++j) seed_[j] = mc_[j] + ce_[j];
      std::nth_element(seed_.begin(), seed_.begin() + (a_.k - 1), seed_.end());
      const float kth = seed_[a_.k - 1];
      if (kth < kInf) thr_[r] = std::min(thr_[r], kth);
    }

    // A key whose lower bound s - e is under the threshold: a candidate (kept with its
    // lower bound); its upper bound s + e may lower the threshold.
    void accept(int64_t r, int64_t col, float s, float e) {
      auto& cand = cand_[r];
      cand.emplace_back(s - e, col);
      const int64_t k = a_.k;
      float* best = best_.data() + r * k;
      const float up = s + e;
      thr_[r] = std::min(thr_[r], push_upper_bound(best, filled_[r], k, up));
      // Near-duplicate data (flat image regions, repeated points) can keep many keys
      // inside the window: past the cap the row is answered by a full exact scan at
      // the end instead (slower, never wrong, bounded memory)
      if (static_cast<int64_t>(cand.size()) >= next_prune_[r] &&
          prune_candidates(cand, thr_[r], k, &next_prune_[r])) {
        overflow_[r] = 1;
        thr_[r] = -kInf;
      }
    }

    const CertifiedTopKArgs& a_;
    std::vector<std::vector<std::pair<float, int64_t>>> cand_;
    std::vector<float> best_;
    std::vector<int64_t> filled_;
    std::vector<float> thr_;
    std::vector<char> overflow_;
    std::vector<int64_t> next_prune_;
    std::vector<std::pair<double, int64_t>> ranked_;
    std::vector<float> seed_;
    std::vector<float> mc_;
    std::vector<float> cb_;  // per chunk of the tile: its longest key's ||k_c||
    std::vector<float> ce_;  // per chunk, for the current row: E(||q||, cb_)
    // the block's rows for the blocked scan, and its buffers
    std::vector<int64_t> dense_, skip_, best_i_;
    std::vector<const float*> qptr_;
    std::vector<double> best_d_;
    ExactScanBuffers scan_;
  };

  Local make_local() const { return Local(a_); }

 private:
  CertifiedTopKArgs a_;
};

struct ColumnMinArgs {
  int64_t batch, rows, cols;
  const float* query_norms;  // (B, N)
  const float* key_norms;    // (B, M)
  float* out;                // (B, M) min_i ||q_i - k_j||^2, clamped at 0
};

class ColumnMin {
 public:
  explicit ColumnMin(const ColumnMinArgs& a) : a_(a) {}

  class Local {
   public:
    explicit Local(const ColumnMinArgs& a) : a_(a) {}
    void begin(int64_t, int64_t, int64_t nc) {
      colmin_.assign(static_cast<size_t>(nc), std::numeric_limits<float>::infinity());
    }
    void tile(const float* tile, int64_t ldc, int64_t b, int64_t r0, int64_t nr, int64_t,
              int64_t nc) {
      float* cm = colmin_.data();
      const float* qn = a_.query_norms + b * a_.rows + r0;
      for (int64_t r = 0; r < nr; ++r) {
        const float* t = tile + r * ldc;
        column_min_update(cm, t, qn[r], nc);
      }
    }
    void end(int64_t b, int64_t c0, int64_t nc) {
      const float* kn = a_.key_norms + b * a_.cols + c0;
      float* out = a_.out + b * a_.cols + c0;
      for (int64_t c = 0; c < nc; ++c) out[c] = std::max(colmin_[c] + kn[c], 0.0f);
    }

   private:
    const ColumnMinArgs& a_;
    std::vector<float> colmin_;
  };

  Local make_local() const { return Local(a_); }

 private:
  ColumnMinArgs a_;
};

// GPNN's normalised nearest neighbour, pass 2: per row, the argmin over keys of
// max(||q_i - k_j||^2, 0) * weight_j with weight_j = 1 / (alpha + colmin_j).
// fp32 scores; ties (equal fp32 scores) to the lowest index.
struct WeightedArgminArgs {
  int64_t batch, rows, cols;
  const float* query_norms;  // (B, N)
  const float* key_norms;    // (B, M)
  const float* weights;      // (B, M)
  int64_t* out_idx;          // (B, N)
  float* out_score;          // (B, N), may be null
};

class WeightedArgmin {
 public:
  explicit WeightedArgmin(const WeightedArgminArgs& a) : a_(a) {}

  class Local {
   public:
    explicit Local(const WeightedArgminArgs& a) : a_(a) {}
    void begin(int64_t, int64_t, int64_t nr) {
      best_.assign(static_cast<size_t>(nr), std::numeric_limits<float>::infinity());
      arg_.assign(static_cast<size_t>(nr), 0);
    }
    void tile(const float* tile, int64_t ldc, int64_t b, int64_t r0, int64_t nr, int64_t c0,
              int64_t nc) {
      const float* kn = a_.key_norms + b * a_.cols + c0;
      const float* w = a_.weights + b * a_.cols + c0;
      const float* qn = a_.query_norms + b * a_.rows + r0;
      for (int64_t r = 0; r < nr; ++r) {
        const float* t = tile + r * ldc;
        const float q = qn[r];
        const float m = weighted_min(t, kn, w, q, nc);
        if (!(m < best_[r])) continue;
        // the first column reaching the tile minimum: lowest index on ties
        for (int64_t c = 0; c < nc; ++c) {
          if (std::max(q + t[c] + kn[c], 0.0f) * w[c] == m) {
            best_[r] = m;
            arg_[r] = c0 + c;
            break;
          }
        }
      }
    }
    void end(int64_t b, int64_t r0, int64_t nr) {
      for (int64_t r = 0; r < nr; ++r) {
        a_.out_idx[b * a_.rows + r0 + r] = arg_[r];
        if (a_.out_score) a_.out_score[b * a_.rows + r0 + r] = best_[r];
      }
    }

   private:
    const WeightedArgminArgs& a_;
    std::vector<float> best_;
    std::vector<int64_t> arg_;
  };

  Local make_local() const { return Local(a_); }

 private:
  WeightedArgminArgs a_;
};

}  // namespace engine
}  // namespace fastgen
