// torch.classes.fastgen.PatchIndex: GPNN's key patches prepared once for many pruned
// patch_nn searches (engine/pruned_passes.h).
//
// A GPNN level searches the same keys 10 times (and once per sample); everything that
// depends on the keys alone -- their fp32 centred copy, norms, bf16 copy, the k-means
// balls and the error window's key term -- is built here once, in the constructor, and
// every search prepares only its queries. fastgen/ops/patch_index.py drives it (the
// incremental updates compose column_min / weighted_argmin on subsets of queries and
// keys; a key subset is gathered from the prepared keys, so it rounds like the full set).
//
// Keys arrive sorted by cluster (each [key_offsets[g], key_offsets[g+1]) one k-means
// cluster, members by distance to its centre) with key_order (M,) = the original index
// of each sorted key. "Positions" below are sorted-key positions; indices a user sees
// (answers, hints, init_arg) are original key ids.
#include "patch_index.h"

#include <torch/all.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "../engine/error_bound.h"
#include "../engine/pruned_passes.h"
#include "checks.h"
#include "operands.h"

namespace fastgen {
namespace cpu {
namespace {

engine::PruneStats g_prune_stats;  // every index of this process

// Query blocks of this many rows, key balls of at most this many keys, GEMMs of about
// `batch` gathered rows/columns: measured on china.jpg patches (benchmarks/RESULTS.md);
// smaller blocks prune more but cost more bound work per distance computed.
struct PruneShape {
  int64_t query_block = 32;   // queries per block
  int64_t max_ball = 1024;    // larger key clusters are split (bounds the scratch tiles)
  int64_t batch = 512;        // rows/columns gathered into one GEMM
};

// FASTGEN_PRUNE=QUERY_BLOCKxMAX_BALLxBATCH overrides the shape (for benchmarking).
PruneShape prune_shape() {
  PruneShape s;
  if (const char* v = std::getenv("FASTGEN_PRUNE")) {
    long q = 0, k = 0, b = 0;
    if (std::sscanf(v, "%ldx%ldx%ld", &q, &k, &b) == 3 && q > 0 && k > 0 && b > 0 && q <= 4096 &&
        k <= 4096 && b <= 8192) {
      s.query_block = q;
      s.max_ball = k;
      s.batch = b;
    }
  }
  return s;
}

// Query order for a problem: stably by nearest ball centre (argmin_g ||c_g||^2 - 2 q.c_g),
// one fp32 GEMM tile of rows against all centres per chunk, then a counting sort.
at::Tensor order_by_nearest_ball(const at::Tensor& qc, const engine::Balls& kb) {
  const int64_t N = qc.size(0), D = qc.size(1), C = kb.count();
  constexpr int64_t kRows = 64;
  GemmOperands ops{qc.data_ptr<float>(), kb.centres.data(), N, C, D};
  const engine::TileGemm gemm = fp32_tile_gemm(&ops);
  std::vector<int64_t> nearest(N);
  at::parallel_for(0, (N + kRows - 1) / kRows, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> tile(static_cast<size_t>(kRows * C));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * kRows, nr = std::min(kRows, N - r0);
      gemm(0, r0, nr, 0, C, tile.data(), C);
      for (int64_t r = 0; r < nr; ++r) {
        const float* t = tile.data() + r * C;
        int64_t best = 0;
        float bv = t[0] + kb.centre_norms[0];
        for (int64_t g = 1; g < C; ++g)
          if (t[g] + kb.centre_norms[g] < bv) {
            bv = t[g] + kb.centre_norms[g];
            best = g;
          }
        nearest[r0 + r] = best;
      }
    }
  });
  std::vector<int64_t> start(C + 1, 0);
  for (int64_t g : nearest) ++start[g + 1];
  for (int64_t g = 0; g < C; ++g) start[g + 1] += start[g];
  at::Tensor perm = at::empty({N}, at::TensorOptions().dtype(at::kLong));
  int64_t* pp = perm.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) pp[start[nearest[i]]++] = i;
  return perm;
}

// The key side of the pruned passes: prepared keys, their balls, and the largest key or
// centre norm (the error windows' key term).
struct PrunedKeys {
  PrunedKeys(PreparedKeys prepared, std::vector<int64_t> key_offsets, at::Tensor order)
      : keys(std::move(prepared)), offsets(std::move(key_offsets)), key_order(std::move(order)) {
    balls = engine::make_balls(keys.kc.data_ptr<float>(), keys.D, offsets, prune_shape().max_ball);
    // sized by the largest key norm too: a ball's outlier can sit further from the
    // origin than any centre
    const float* kn = keys.kn.data_ptr<float>();
    float cmax2 = 0.0f;
    for (float v : balls.centre_norms) cmax2 = std::max(cmax2, v);
    for (int64_t j = 0; j < keys.M; ++j) cmax2 = std::max(cmax2, kn[j]);
    kc_max = std::sqrt(static_cast<double>(cmax2)) * (1.0 + 1e-6);
  }
  PreparedKeys keys;
  std::vector<int64_t> offsets;
  at::Tensor key_order;  // (M,) int64 original ids of these keys
  engine::Balls balls;
  double kc_max = 0.0;
};

// One (N, D) query set against PrunedKeys, set up for both pruned passes: queries
// sorted by their nearest ball and cut into blocks, error windows. Positions inside are
// sorted query positions; perm maps them back (perm[position] = original query index).
// Not copyable: args points into it.
struct PrunedProblem {
  PrunedProblem(const at::Tensor& queries, const PrunedKeys& pk, engine::PruneStats* stats)
      : p(queries.unsqueeze(0), pk.keys, "queries"), kb(pk.balls) {
    const int64_t N = p.N, M = p.M, D = p.D;
    const PruneShape shape = prune_shape();
    // Queries sorted by nearest key ball make query blocks that sit near few balls.
    // Only a heuristic for speed: any order gives the same answer.
    perm = order_by_nearest_ball(p.qc[0], kb);
    p.qc = p.qc.index_select(1, perm).contiguous();
    p.qn = p.qn.index_select(1, perm).contiguous();
    p.set_query_operand(p.bf16 ? p.qg.index_select(1, perm).contiguous() : p.qc);
    for (int64_t s = 0; s < N; s += shape.query_block) qoff.push_back(s);
    qoff.push_back(N);
    // Error windows of the fp32 ||q - c||^2 and of every fp32 (query, key) value the
    // passes compare with a bound. In bf16 the GEMM's own error is larger than this
    // window: there the pruned answer is judged against the float64 optimum within bf16
    // error (tests), not bit for bit against the bf16 sweep.
    const float* qn = p.qn.data_ptr<float>();
    qwin.resize(N);
    for (int64_t i = 0; i < N; ++i)
      qwin[i] = engine::candidate_window(std::sqrt(static_cast<double>(qn[i])), pk.kc_max, D, 0.0);
    q_kcentres = GemmOperands{p.qc.data_ptr<float>(), kb.centres.data(), N, kb.count(), D};
    args = engine::PrunedPassArgs{N, M, D, p.qg.data_ptr(), p.kg.data_ptr(),
                                  static_cast<int64_t>(p.qg.element_size()), qn, p.kn.data_ptr<float>(),
                                  qwin.data(), &qoff, &kb, p.ptr_gemm, fp32_tile_gemm(&q_kcentres),
                                  at::get_num_threads(), stats, shape.batch};
  }
  PrunedProblem(const PrunedProblem&) = delete;

  // pass 1: (colmin (M), colarg (M) original query indices or -1 where init stood)
  std::pair<at::Tensor, at::Tensor> column_min(const float* init, bool want_arg) {
    at::Tensor colmin = at::empty({p.M}, at::TensorOptions().dtype(at::kFloat));
    at::Tensor colarg = at::empty({want_arg ? p.M : 0}, at::TensorOptions().dtype(at::kLong));
    int64_t* ca = want_arg ? colarg.data_ptr<int64_t>() : nullptr;
    engine::pruned_column_min(args, engine::block_ranges(args), colmin.data_ptr<float>(), init, ca);
    if (want_arg) {
      const int64_t* pp = perm.data_ptr<int64_t>();
      for (int64_t j = 0; j < p.M; ++j)
        if (ca[j] >= 0) ca[j] = pp[ca[j]];
    }
    return {colmin, colarg};
  }

  // pass 2 into out_idx (N, original query order; original key ids through key_order);
  // hint_pos: per query (original order) the position of a likely key, or null;
  // init_best/init_arg: original query order or null; out_best: the winning scores
  // (original query order) or null.
  void weighted_argmin(const float* weights, const int64_t* key_order, const int64_t* hint_pos,
                       const float* init_best, const int64_t* init_arg, int64_t* out_idx, float* out_best) {
    const int64_t N = p.N;
    const int64_t* pp = perm.data_ptr<int64_t>();
    std::vector<float> best0;
    std::vector<int64_t> arg0;
    if (hint_pos != nullptr) {
      // the hinted key's score as each query's starting threshold (sorted positions)
      std::vector<int64_t> hint_sorted(N);
      for (int64_t i = 0; i < N; ++i) hint_sorted[i] = hint_pos[pp[i]];
      best0.resize(N);
      engine::hint_thresholds(p.qc.data_ptr<float>(), p.kc.data_ptr<float>(), p.qn.data_ptr<float>(),
                              p.kn.data_ptr<float>(), N, p.D, hint_sorted.data(), weights,
                              p.input_roundoff(), p.output_roundoff(), best0.data());
    }
    if (init_best != nullptr) {  // a reached score (never with a hint: the caller refuses both)
      best0.resize(N);
      for (int64_t i = 0; i < N; ++i) best0[i] = init_best[pp[i]];
    }
    if (init_arg != nullptr) {
      arg0.resize(N);
      for (int64_t i = 0; i < N; ++i) arg0[i] = init_arg[pp[i]];
    }
    std::vector<int64_t> sorted_idx(N);
    std::vector<float> sorted_best(out_best ? N : 0);
    engine::pruned_weighted_argmin(args, weights, key_order, sorted_idx.data(), best0.empty() ? nullptr : best0.data(),
                                   arg0.empty() ? nullptr : arg0.data(), out_best ? sorted_best.data() : nullptr);
    // every query must have found a key (the hint's threshold is provably reachable); a
    // bug there would otherwise surface later as an index error far from its cause
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK(sorted_idx[i] >= 0 && sorted_idx[i] != std::numeric_limits<int64_t>::max(),
                  "internal error in patch_nn's pruned pass 2: query ", pp[i],
                  " found no key (please report with the inputs)");
      out_idx[pp[i]] = sorted_idx[i];
      if (out_best) out_best[pp[i]] = sorted_best[i];
    }
  }

  // knn's pruned pass (engine::pruned_topk) for k nearest keys: dist/idx (N, k) in
  // original query order, original key ids; deferred (N) bool: rows left to the caller's
  // dense path (their entries are inf / -1). bound: (N) float32 or null.
  void topk(int64_t k, const at::Tensor& key_order, const at::Tensor& keys32, const float* bound, float* out_dist,
            int64_t* out_idx, bool* out_deferred) {
    const int64_t N = p.N, D = p.D;
    const int64_t* pp = perm.data_ptr<int64_t>();
    const engine::ErrorBound eb(D, p.input_roundoff(), p.output_roundoff());
    const at::Tensor qlen = p.qn[0].sqrt().mul(1.0 + 1e-6).contiguous();
    const at::Tensor klen = p.kn[0].sqrt().mul(1.0 + 1e-6).contiguous();
    std::vector<float> bound_sorted;
    if (bound != nullptr) {
      bound_sorted.resize(N);
      for (int64_t i = 0; i < N; ++i) bound_sorted[i] = bound[pp[i]];
    }
    std::vector<float> dist(N * k);
    std::vector<int64_t> idx(N * k);
    std::vector<unsigned char> deferred(N);
    engine::PrunedTopKArgs t;
    t.k = k;
    t.err_coef = eb.coef;
    t.err_slack = eb.slack;
    t.query_len = qlen.data_ptr<float>();
    t.key_len = klen.data_ptr<float>();
    t.queries = p.q32.data_ptr<float>();
    t.query_row = pp;
    t.keys = keys32.data_ptr<float>();
    t.key_order = key_order.data_ptr<int64_t>();
    t.bound = bound ? bound_sorted.data() : nullptr;
    t.out_dist = dist.data();
    t.out_idx = idx.data();
    t.deferred = deferred.data();
    engine::pruned_topk(args, t);
    for (int64_t i = 0; i < N; ++i) {
      std::copy(dist.begin() + i * k, dist.begin() + (i + 1) * k, out_dist + pp[i] * k);
      std::copy(idx.begin() + i * k, idx.begin() + (i + 1) * k, out_idx + pp[i] * k);
      out_deferred[pp[i]] = deferred[i] != 0;
    }
  }

  PreparedOperands p;
  const engine::Balls& kb;
  at::Tensor perm;
  std::vector<int64_t> qoff;
  std::vector<float> qwin;
  GemmOperands q_kcentres{};
  engine::PrunedPassArgs args{};
};

// Counts one call's pairs into its index and into the process-wide total.
struct CallStats {
  explicit CallStats(engine::PruneStats& index) : index(index) {}
  ~CallStats() {
    const int64_t t = call.pairs_total.load(), c = call.pairs_computed.load();
    index.pairs_total += t;
    index.pairs_computed += c;
    g_prune_stats.pairs_total += t;
    g_prune_stats.pairs_computed += c;
  }
  engine::PruneStats call;
  engine::PruneStats& index;
};

}  // namespace

std::pair<int64_t, int64_t> patch_nn_prune_stats() {
  return {g_prune_stats.pairs_total.load(), g_prune_stats.pairs_computed.load()};
}

// The class. Methods check their arguments like ops do (errors name the argument).
struct PatchIndex : torch::CustomClassHolder {
  PatchIndex(const at::Tensor& sorted_keys, const at::Tensor& key_offsets, const at::Tensor& key_order,
             const std::string& precision) {
    check_precision(precision);
    check_points(sorted_keys, "keys", 2);
    const int64_t M = sorted_keys.size(0);
    TORCH_CHECK_VALUE(M >= 1, "keys is empty (0 patches)");
    std::vector<int64_t> offsets = checked_offsets(key_offsets, "key_offsets", M);
    at::Tensor order = checked_permutation(key_order, "key_order", M);
    position_ = at::empty({M}, order.options());
    position_.index_put_({order}, at::arange(M, order.options()));
    precision_ = precision;
    dtype_ = sorted_keys.scalar_type();
    keys_ = std::make_unique<PrunedKeys>(PreparedKeys(sorted_keys.unsqueeze(0).contiguous(), precision, "keys"),
                                         std::move(offsets), order);
    cluster_of_ = at::repeat_interleave(at::diff(at::tensor(keys_->offsets, order.options())));
  }

  int64_t size() const { return keys_->keys.M; }
  int64_t dim() const { return keys_->keys.D; }
  int64_t clusters() const { return static_cast<int64_t>(keys_->offsets.size()) - 1; }
  // (M,) int64: original key id -> sorted position (the key space of weights and keep)
  at::Tensor positions() const { return position_.clone(); }
  // (pairs in this index's searches, pairs whose distance was computed)
  std::tuple<int64_t, int64_t> pairs() const {
    return {stats_.pairs_total.load(), stats_.pairs_computed.load()};
  }

  // Both passes for (B, N, D) queries: idx (B, N) original key ids. hint: (B, N) ids or None.
  at::Tensor search(const at::Tensor& queries, double alpha, const std::optional<at::Tensor>& hint) {
    check_queries(queries, 3);
    check_alpha(alpha);
    const int64_t B = queries.size(0), N = queries.size(1);
    check_bound_table(N, clusters());
    at::Tensor hint_pos;
    if (hint.has_value()) {
      TORCH_CHECK_VALUE(hint->dim() == 2 && hint->size(0) == B && hint->size(1) == N,
                        "hint must be (B, N) = (", B, ", ", N, ") like the queries, got shape ", hint->sizes());
      TORCH_CHECK(hint->device().is_cpu(), "hint must be on the CPU, got ", hint->device());
      check_index_range(*hint, "hint", size(), "key indices");
      hint_pos = position_.index_select(0, hint->reshape({-1})).contiguous();
    }
    auto idx = at::empty({B, N}, queries.options().dtype(at::kLong));
    if (N == 0) return idx;
    const at::Tensor q = queries.contiguous();
    CallStats cs(stats_);
    for (int64_t b = 0; b < B; ++b) {
      PrunedProblem prob(q[b], *keys_, &cs.call);
      const at::Tensor colmin = prob.column_min(nullptr, false).first;
      const at::Tensor weights = (colmin + alpha).reciprocal_();
      prob.weighted_argmin(weights.data_ptr<float>(), keys_->key_order.data_ptr<int64_t>(),
                           hint_pos.defined() ? hint_pos.data_ptr<int64_t>() + b * N : nullptr, nullptr, nullptr,
                           idx.data_ptr<int64_t>() + b * N, nullptr);
    }
    return idx;
  }

  // The k nearest keys of each of (N, D) queries, exact (the certified sweep's answer,
  // bit for bit): dist (N, k) float32 squared distances, idx (N, k) original key ids,
  // deferred (N,) bool -- rows whose error window held too many keys (near-duplicates),
  // left with (inf, -1) for the caller's dense path. bound (N,) float32 (optional):
  // distances above bound[i] do not matter to the caller; such entries are (inf, -1).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> knn(const at::Tensor& queries, int64_t k,
                                                     const std::optional<at::Tensor>& bound) {
    check_queries(queries, 2);
    const int64_t N = queries.size(0);
    TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
    TORCH_CHECK_VALUE(k <= size(), "k=", k, " exceeds the number of keys available (", size(), ")");
    check_bound_table(N, clusters());
    at::Tensor b0;
    if (bound.has_value()) {
      b0 = checked_vector(*bound, "bound", N, at::kFloat);
      TORCH_CHECK_VALUE(!at::isnan(b0).any().item<bool>(), "bound must not contain NaN");
    }
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    at::Tensor dist = at::empty({N, k}, opts);
    at::Tensor idx = at::empty({N, k}, opts.dtype(at::kLong));
    at::Tensor deferred = at::empty({N}, opts.dtype(at::kBool));
    if (N == 0) return {dist, idx, deferred};
    CallStats cs(stats_);
    PrunedProblem prob(queries.contiguous(), *keys_, &cs.call);
    prob.topk(k, keys_->key_order, keys_->keys.k32[0], b0.defined() ? b0.data_ptr<float>() : nullptr,
              dist.data_ptr<float>(), idx.data_ptr<int64_t>(), deferred.data_ptr<bool>());
    return {dist, idx, deferred};
  }

  // Pass 1 on one (N, D) query set: colmin (M,) float32 = min(init, min_i d_ij) with
  // colarg (M,) int64 the query that set it (-1 where init stood). keep: ascending key
  // positions to search (None: all); then init and the outputs are over those keys.
  std::tuple<at::Tensor, at::Tensor> column_min(const at::Tensor& queries, const std::optional<at::Tensor>& init,
                                                const std::optional<at::Tensor>& keep) {
    check_queries(queries, 2);
    std::unique_ptr<PrunedKeys> sub = subset(keep);
    const PrunedKeys& pk = sub ? *sub : *keys_;
    const int64_t N = queries.size(0), M = pk.keys.M;
    check_bound_table(N, static_cast<int64_t>(pk.offsets.size()) - 1);
    at::Tensor start;
    if (init.has_value()) {
      start = checked_vector(*init, "init", M, at::kFloat);
      TORCH_CHECK_VALUE(!at::isnan(start).any().item<bool>(), "init must not contain NaN");
    }
    if (N == 0 || M == 0) {
      at::Tensor cm = start.defined() ? start.clone() : at::full({M}, INFINITY, at::TensorOptions().dtype(at::kFloat));
      return {cm, at::full({M}, -1, at::TensorOptions().dtype(at::kLong))};
    }
    CallStats cs(stats_);
    PrunedProblem prob(queries.contiguous(), pk, &cs.call);
    auto [colmin, colarg] = prob.column_min(start.defined() ? start.data_ptr<float>() : nullptr, true);
    return {colmin, colarg};
  }

  // Pass 2 on one (N, D) query set: idx (N,) original key ids of argmin_j d_ij * weights[j]
  // and its score (N,) float32. weights (M,) over ALL key positions. hint (N,) ids: a
  // likely key per query (start the threshold there); init_best/init_arg: a reached
  // score and the key id reaching it (returned where nothing beats it). keep: ascending
  // key positions to search (None: all); a hint needs all keys.
  std::tuple<at::Tensor, at::Tensor> weighted_argmin(const at::Tensor& queries, const at::Tensor& weights,
                                                     const std::optional<at::Tensor>& hint,
                                                     const std::optional<at::Tensor>& init_best,
                                                     const std::optional<at::Tensor>& init_arg,
                                                     const std::optional<at::Tensor>& keep) {
    check_queries(queries, 2);
    const int64_t N = queries.size(0);
    at::Tensor w = checked_vector(weights, "weights", size(), at::kFloat);
    TORCH_CHECK_VALUE(at::isfinite(w).all().item<bool>() && w.min().item<float>() > 0.0f,
                      "weights must be finite and > 0");
    TORCH_CHECK_VALUE(init_best.has_value() == init_arg.has_value(),
                      "init_best and init_arg go together (a score and the key that reaches it)");
    TORCH_CHECK_VALUE(!(hint.has_value() && init_best.has_value()),
                      "hint and init_best/init_arg cannot be combined (a hint is for a search from scratch)");
    TORCH_CHECK_VALUE(!(hint.has_value() && keep.has_value()),
                      "hint and keep cannot be combined (a hint may name a key outside the subset)");
    std::unique_ptr<PrunedKeys> sub = subset(keep);
    const PrunedKeys& pk = sub ? *sub : *keys_;
    check_bound_table(N, static_cast<int64_t>(pk.offsets.size()) - 1);
    if (sub) w = w.index_select(0, *keep).contiguous();
    at::Tensor hint_pos, b0, a0;
    if (hint.has_value()) {
      const at::Tensor h = checked_vector(*hint, "hint", N, at::kLong);
      check_index_range(h, "hint", size(), "key indices");
      hint_pos = position_.index_select(0, h).contiguous();
    }
    if (init_best.has_value()) {
      b0 = checked_vector(*init_best, "init_best", N, at::kFloat);
      a0 = checked_vector(*init_arg, "init_arg", N, at::kLong);
      TORCH_CHECK_VALUE(N == 0 || (at::isfinite(b0).all().item<bool>() && b0.min().item<float>() >= 0.0f),
                        "init_best must be finite and >= 0");
      check_index_range(a0, "init_arg", size(), "key indices");
    }
    at::Tensor idx = at::empty({N}, at::TensorOptions().dtype(at::kLong));
    at::Tensor best = at::empty({N}, at::TensorOptions().dtype(at::kFloat));
    if (N == 0) return {idx, best};
    if (pk.keys.M == 0) {  // no key to search: the start stands
      TORCH_CHECK_VALUE(b0.defined(), "keep is empty and no init_best/init_arg was given: no key to return");
      return {a0.clone(), b0.clone()};
    }
    CallStats cs(stats_);
    PrunedProblem prob(queries.contiguous(), pk, &cs.call);
    prob.weighted_argmin(w.data_ptr<float>(), pk.key_order.data_ptr<int64_t>(),
                         hint_pos.defined() ? hint_pos.data_ptr<int64_t>() : nullptr,
                         b0.defined() ? b0.data_ptr<float>() : nullptr, a0.defined() ? a0.data_ptr<int64_t>() : nullptr,
                         idx.data_ptr<int64_t>(), best.data_ptr<float>());
    return {idx, best};
  }

 private:
  void check_queries(const at::Tensor& queries, int64_t dims) const {
    check_points(queries, "queries", dims);
    TORCH_CHECK_TYPE(queries.scalar_type() == dtype_, "queries are ", queries.scalar_type(),
                     " but the index's keys are ", dtype_, "; cast one of them");
    TORCH_CHECK_VALUE(queries.size(dims - 1) == dim(), "queries have D=", queries.size(dims - 1),
                      " features but keys have D=", dim());
  }

  void check_bound_table(int64_t N, int64_t clusters) const {
    // The pass-1 bounds keep a (query block x cluster) table: with absurdly small clusters
    // it would approach the N x M matrix this index exists to avoid.
    const int64_t blocks = (N + prune_shape().query_block - 1) / prune_shape().query_block;
    TORCH_CHECK_VALUE(blocks * clusters <= (int64_t{1} << 27), "too many key clusters (", clusters, ") for ", N,
                      " queries: the bound table would pass 1 GB; cluster the keys more coarsely "
                      "(PatchIndex(keys, cluster_size=...) with a larger cluster_size)");
  }

  // The keys at ascending positions `keep`, in their clusters (null: keep is None).
  std::unique_ptr<PrunedKeys> subset(const std::optional<at::Tensor>& keep) const {
    if (!keep.has_value()) return nullptr;
    TORCH_CHECK_VALUE(keep->dim() == 1, "keep must be a 1-D tensor of key positions, got shape ", keep->sizes());
    TORCH_CHECK(keep->device().is_cpu(), "keep must be on the CPU, got ", keep->device());
    check_index_range(*keep, "keep", size(), "key positions");
    const at::Tensor k = keep->contiguous();
    TORCH_CHECK_VALUE(k.numel() < 2 || (k.diff() > 0).all().item<bool>(), "keep must be strictly ascending");
    const at::Tensor counts = at::bincount(cluster_of_.index_select(0, k), {}, clusters());
    std::vector<int64_t> off(clusters() + 1, 0);
    const int64_t* c = counts.data_ptr<int64_t>();
    for (int64_t g = 0; g < clusters(); ++g) off[g + 1] = off[g] + c[g];
    return std::make_unique<PrunedKeys>(keys_->keys.gather(k), std::move(off),
                                        keys_->key_order.index_select(0, k).contiguous());
  }

  std::unique_ptr<PrunedKeys> keys_;
  at::Tensor position_;    // original id -> sorted position
  at::Tensor cluster_of_;  // sorted position -> cluster
  std::string precision_;
  at::ScalarType dtype_;
  engine::PruneStats stats_;
};

}  // namespace cpu
}  // namespace fastgen

TORCH_LIBRARY_FRAGMENT(fastgen, m) {
  m.class_<fastgen::cpu::PatchIndex>("PatchIndex")
      .def(torch::init<at::Tensor, at::Tensor, at::Tensor, std::string>())
      .def("size", &fastgen::cpu::PatchIndex::size)
      .def("dim", &fastgen::cpu::PatchIndex::dim)
      .def("clusters", &fastgen::cpu::PatchIndex::clusters)
      .def("positions", &fastgen::cpu::PatchIndex::positions)
      .def("pairs", &fastgen::cpu::PatchIndex::pairs)
      .def("search", &fastgen::cpu::PatchIndex::search)
      .def("knn", &fastgen::cpu::PatchIndex::knn)
      .def("column_min", &fastgen::cpu::PatchIndex::column_min)
      .def("weighted_argmin", &fastgen::cpu::PatchIndex::weighted_argmin);
}
