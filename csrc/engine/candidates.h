// The candidate bookkeeping of one row of a certified top-k search, shared by the sweep
// (CertifiedTopK, reductions.h) and knn's pruned pass (pruned_topk, pruned_passes.h):
// per row the k smallest upper bounds seen (their k-th bounds the true k-th value from
// above: the row's threshold) and the candidates (lower bound, key) still under it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

namespace fastgen {
namespace engine {

// Past this many candidates a row is answered by a dense exact path instead (bounded
// memory: near-duplicate data can keep many keys inside the window).
constexpr int64_t kMaxCandidates = 8192;
// A row whose final window holds more than 1/kDenseShare of the keys, and more than
// kDenseMin of them (a few keys are cheaper pair by pair), goes to the dense path too.
constexpr int64_t kDenseShare = 4;
constexpr int64_t kDenseMin = 256;

inline bool window_is_dense(int64_t inside, int64_t keys) { return inside * kDenseShare > keys && inside > kDenseMin; }

// When the candidate list is first pruned.
inline int64_t first_prune_at(int64_t k) { return std::max<int64_t>(64, 4 * k); }

// Inserts the upper bound v into best[0 .. filled) (ascending, at most k of them).
// Returns the k-th smallest once there are k (a valid threshold), else +inf.
inline float push_upper_bound(float* best, int64_t& filled, int64_t k, float v) {
  if (filled < k || v < best[k - 1]) {
    int64_t pos = std::min<int64_t>(filled, k - 1);
    while (pos > 0 && best[pos - 1] > v) {
      best[pos] = best[pos - 1];
      --pos;
    }
    best[pos] = v;
    if (filled < k) ++filled;
  }
  return filled == k ? best[k - 1] : std::numeric_limits<float>::infinity();
}

// Drops the candidates whose lower bound is over thr. Returns true when more than the
// cap remain (the caller sends the row to its dense path; the list is freed); else sets
// *next_prune: the next prune waits until the list doubles (amortised), but comes no
// later than the cap, so the cap really bounds memory.
inline bool prune_candidates(std::vector<std::pair<float, int64_t>>& cand, float thr, int64_t k,
                             int64_t* next_prune) {
  cand.erase(std::remove_if(cand.begin(), cand.end(),
                            [thr](const std::pair<float, int64_t>& c) { return c.first > thr; }),
             cand.end());
  const int64_t n = static_cast<int64_t>(cand.size());
  if (n > kMaxCandidates + k) {
    cand.clear();
    cand.shrink_to_fit();
    return true;
  }
  *next_prune = std::min<int64_t>(std::max<int64_t>(first_prune_at(k), 2 * n), kMaxCandidates + k + 1);
  return false;
}

}  // namespace engine
}  // namespace fastgen
