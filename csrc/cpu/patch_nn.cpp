// CPU kernel of fastgen::patch_nn: GPNN's normalised patch nearest neighbour,
//   idx_i = argmin_j ||q_i - k_j||^2 / (alpha + min_i' ||q_i' - k_j||^2),
// in two passes of the tiled engine (column minimum, then weighted argmin), never
// an N x M buffer. alpha = None is the plain nearest neighbour (exact, certified).
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <vector>

#include "../engine/error_bound.h"
#include "../engine/pruned_passes.h"
#include "../engine/reductions.h"
#include "checks.h"
#include "patch_nn.h"
#include "topk_search.h"

namespace fastgen {
namespace {

engine::PruneStats g_prune_stats;

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

void check_alpha(double alpha) {
  // float32 weights 1 / (alpha + colmin) must neither overflow nor vanish
  TORCH_CHECK_VALUE(alpha >= 1e-30 && alpha <= 1e30, "alpha must be in [1e-30, 1e30] or None, got ",
                    alpha);
}

std::vector<int64_t> checked_offsets(const at::Tensor& key_offsets, int64_t M) {
  TORCH_CHECK_VALUE(key_offsets.dim() == 1 && key_offsets.size(0) >= 2,
                    "key_offsets must be a 1-D tensor of at least 2 entries, got shape ", key_offsets.sizes());
  TORCH_CHECK_TYPE(key_offsets.scalar_type() == at::kLong, "key_offsets must be int64, got ",
                   key_offsets.scalar_type());
  TORCH_CHECK(key_offsets.device().is_cpu(), "key_offsets must be on the CPU, got ", key_offsets.device());
  const at::Tensor o = key_offsets.contiguous();
  std::vector<int64_t> v(o.data_ptr<int64_t>(), o.data_ptr<int64_t>() + o.numel());
  TORCH_CHECK_VALUE(v.front() == 0 && v.back() == M, "key_offsets must start at 0 and end at the number of keys (",
                    M, "), got ", v.front(), " ... ", v.back());
  for (size_t g = 1; g < v.size(); ++g)
    TORCH_CHECK_VALUE(v[g] >= v[g - 1], "key_offsets must be non-decreasing (entry ", g, ")");
  return v;
}

void check_order(const at::Tensor& key_order, int64_t M) {
  TORCH_CHECK_VALUE(key_order.dim() == 1 && key_order.size(0) == M,
                    "key_order must be a 1-D tensor of ", M, " entries (one per key), got shape ",
                    key_order.sizes());
  TORCH_CHECK_TYPE(key_order.scalar_type() == at::kLong, "key_order must be int64, got ",
                   key_order.scalar_type());
  TORCH_CHECK(key_order.device().is_cpu(), "key_order must be on the CPU, got ", key_order.device());
  const at::Tensor o = key_order.contiguous();
  const int64_t* p = o.data_ptr<int64_t>();
  std::vector<char> seen(static_cast<size_t>(M), 0);
  for (int64_t j = 0; j < M; ++j) {
    TORCH_CHECK_VALUE(p[j] >= 0 && p[j] < M && !seen[p[j]],
                      "key_order must be a permutation of 0..", M - 1, " (entry ", j, " is ", p[j], ")");
    seen[p[j]] = 1;
  }
}

// A float32 CPU vector of n entries named `name`, or a clear error.
at::Tensor checked_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType type) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must be a 1-D tensor of ", n, " entries, got shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == type, name, " must be ", type, ", got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  return t.contiguous();
}

// key_order of a key subset: original ids, distinct (a hint or tie names keys by them).
// Returns the (id, position) pairs sorted by id, which also map a hint's ids to positions.
std::vector<std::pair<int64_t, int64_t>> checked_key_ids(const at::Tensor& key_order, int64_t M) {
  const at::Tensor o = checked_vector(key_order, "key_order", M, at::kLong);
  const int64_t* p = o.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> by_id(M);
  for (int64_t s = 0; s < M; ++s) by_id[s] = {p[s], s};
  std::sort(by_id.begin(), by_id.end());
  TORCH_CHECK_VALUE(M == 0 || by_id.front().first >= 0, "key_order must hold key ids >= 0");
  for (int64_t s = 1; s < M; ++s)
    TORCH_CHECK_VALUE(by_id[s].first != by_id[s - 1].first, "key_order must hold distinct key ids");
  return by_id;
}

at::Tensor patch_nn_cpu(const at::Tensor& queries, const at::Tensor& keys,
                        std::optional<double> alpha, c10::string_view precision) {
  check_point_sets(queries, keys);
  TORCH_CHECK_VALUE(keys.size(1) >= 1, "keys is empty (0 patches)");
  if (alpha.has_value()) check_alpha(*alpha);
  const std::string prec(precision);
  const int64_t B = queries.size(0), N = queries.size(1), M = keys.size(1);
  if (!alpha.has_value()) {
    auto [dist, idx] = cpu::certified_topk(queries, keys, 1, false, prec);
    return idx.view({B, N});
  }
  auto idx = at::empty({B, N}, queries.options().dtype(at::kLong));
  if (N == 0) {
    TORCH_CHECK_VALUE(prec == "fp32" || prec == "bf16", "precision must be 'fp32' or 'bf16', got '", prec, "'");
    return idx;
  }
  cpu::PreparedOperands p(queries, keys, prec, "queries", "keys");
  const engine::Shape shape{B, N, M, p.D};

  // pass 1: how well each key is covered by the queries
  at::Tensor colmin = at::empty({B, M}, p.kn.options());
  engine::ColumnMinArgs ca{B, N, M, p.qn.data_ptr<float>(), p.kn.data_ptr<float>(),
                           colmin.data_ptr<float>()};
  engine::for_each_col_block(shape, p.tiling, p.gemm, engine::ColumnMin(ca));

  // pass 2: keys already well covered are penalised, which pushes every key to be used
  at::Tensor weights = (colmin + *alpha).reciprocal_();
  engine::WeightedArgminArgs wa{B, N, M, p.qn.data_ptr<float>(), p.kn.data_ptr<float>(),
                                weights.data_ptr<float>(), idx.data_ptr<int64_t>(), nullptr};
  engine::for_each_row_block(shape, p.tiling, p.gemm, engine::WeightedArgmin(wa));
  return idx;
}

// Query order for pruned_one: stably by nearest ball centre (argmin_g ||c_g||^2 - 2 q.c_g),
// one fp32 GEMM tile of rows against all centres per chunk, then a counting sort.
at::Tensor order_by_nearest_ball(const at::Tensor& qc, const engine::Balls& kb) {
  const int64_t N = qc.size(0), D = qc.size(1), C = kb.count();
  constexpr int64_t kRows = 64;
  cpu::GemmOperands ops{qc.data_ptr<float>(), kb.centres.data(), N, C, D};
  const engine::TileGemm gemm = cpu::fp32_tile_gemm(&ops);
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

// One (N, D) problem against keys sorted by cluster, set up for both pruned passes
// (engine/pruned_passes.h): key balls, queries sorted by their nearest ball and cut into
// blocks, error windows. Positions inside are sorted query positions; perm maps them
// back (perm[position] = original query index). Not copyable: args points into it.
struct PrunedProblem {
  PrunedProblem(const at::Tensor& queries, const at::Tensor& keys, const std::vector<int64_t>& offsets,
                const std::string& prec, const at::Tensor* centre = nullptr)
      : p(queries.unsqueeze(0), keys.unsqueeze(0), prec, "queries", "keys", centre) {
    const int64_t N = p.N, M = p.M, D = p.D;
    const PruneShape shape = prune_shape();
    kb = engine::make_balls(p.kc.data_ptr<float>(), D, offsets, shape.max_ball);
    // Queries sorted by nearest key ball make query blocks that sit near few balls.
    // Only a heuristic for speed: any order gives the same answer.
    perm = order_by_nearest_ball(p.qc[0], kb);
    p.qc = p.qc.index_select(1, perm).contiguous();
    p.qn = p.qn.index_select(1, perm).contiguous();
    p.qg = p.bf16 ? p.qg.index_select(1, perm).contiguous() : p.qc;
    p.ops.queries = p.qg.data_ptr();
    for (int64_t s = 0; s < N; s += shape.query_block) qoff.push_back(s);
    qoff.push_back(N);
    // Error windows: of the fp32 ||q - c||^2, and of every fp32 (query, key) value the
    // passes compare with a bound, so sized by the largest key or centre norm (a ball's
    // outlier can sit further from the origin than any centre). In bf16 the GEMM's own
    // error is larger than this window: there the pruned answer is judged against the
    // float64 optimum within bf16 error (tests), not bit for bit against the bf16 sweep.
    const float* qn = p.qn.data_ptr<float>();
    const float* kn = p.kn.data_ptr<float>();
    float cmax2 = 0.0f;
    for (float v : kb.centre_norms) cmax2 = std::max(cmax2, v);
    for (int64_t j = 0; j < M; ++j) cmax2 = std::max(cmax2, kn[j]);
    const double kc_max = std::sqrt(static_cast<double>(cmax2)) * (1.0 + 1e-6);
    qwin.resize(N);
    for (int64_t i = 0; i < N; ++i)
      qwin[i] = engine::candidate_window(std::sqrt(static_cast<double>(qn[i])), kc_max, D, 0.0);
    q_kcentres = cpu::GemmOperands{p.qc.data_ptr<float>(), kb.centres.data(), N, kb.count(), D};
    args = engine::PrunedPassArgs{N, M, D, p.qg.data_ptr(), p.kg.data_ptr(),
                                  static_cast<int64_t>(p.qg.element_size()), qn, kn, qwin.data(),
                                  &qoff, &kb, p.ptr_gemm, cpu::fp32_tile_gemm(&q_kcentres),
                                  at::get_num_threads(), &g_prune_stats, shape.batch};
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
    if (init_best != nullptr) {  // a reached score (never with a hint: the op refuses both)
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

  cpu::PreparedOperands p;
  engine::Balls kb;
  at::Tensor perm;
  std::vector<int64_t> qoff;
  std::vector<float> qwin;
  cpu::GemmOperands q_kcentres{};
  engine::PrunedPassArgs args{};
};

// One (N, D) problem, both passes. hint_pos: null or, per query, the position of a key
// that is likely a good answer.
void pruned_one(const at::Tensor& queries, const at::Tensor& keys, const std::vector<int64_t>& offsets,
                const int64_t* key_order, double alpha, const std::string& prec, const int64_t* hint_pos,
                int64_t* out) {
  PrunedProblem prob(queries, keys, offsets, prec);
  const at::Tensor colmin = prob.column_min(nullptr, false).first;
  const at::Tensor weights = (colmin + alpha).reciprocal_();
  prob.weighted_argmin(weights.data_ptr<float>(), key_order, hint_pos, nullptr, nullptr, out, nullptr);
}

// The optional centre of the pass ops: (D,) float32 and finite, or undefined.
at::Tensor checked_centre(const std::optional<at::Tensor>& centre, const at::Tensor& keys) {
  if (!centre.has_value()) return at::Tensor();
  const at::Tensor c = checked_vector(*centre, "centre", keys.size(1), at::kFloat);
  TORCH_CHECK_VALUE(at::isfinite(c).all().item<bool>(), "centre must be finite");
  return c;
}

void check_bound_table(int64_t N, int64_t clusters) {
  // The pass-1 bounds keep a (query block x cluster) table: with absurdly small clusters
  // it would approach the N x M matrix this op exists to avoid.
  const int64_t blocks = (N + prune_shape().query_block - 1) / prune_shape().query_block;
  TORCH_CHECK_VALUE(blocks * clusters <= (int64_t{1} << 27), "too many key clusters (", clusters, ") for ", N,
                    " queries: the bound table would pass 1 GB; cluster the keys more coarsely "
                    "(cluster_keys(keys, cluster_size=...) with a larger cluster_size)");
}

// Operands of the clustered op ((B, N, D) queries) and of the pass ops ((N, D)): (M, D)
// keys of the same dtype in clusters given by key_offsets (returned), at least one key,
// a known precision.
std::vector<int64_t> checked_pruned_operands(const at::Tensor& queries, int64_t query_dims, const at::Tensor& keys,
                                             const at::Tensor& key_offsets, const std::string& prec) {
  check_points(queries, "queries", query_dims);
  check_points(keys, "keys", 2);
  TORCH_CHECK_TYPE(queries.scalar_type() == keys.scalar_type(), "queries (", queries.scalar_type(),
                   ") and keys (", keys.scalar_type(), ") must have the same dtype");
  TORCH_CHECK_VALUE(queries.size(query_dims - 1) == keys.size(1), "queries have D=", queries.size(query_dims - 1),
                    " features but keys have D=", keys.size(1));
  TORCH_CHECK_VALUE(keys.size(0) >= 1, "keys is empty (0 patches)");
  TORCH_CHECK_VALUE(prec == "fp32" || prec == "bf16", "precision must be 'fp32' or 'bf16', got '", prec, "'");
  return checked_offsets(key_offsets, keys.size(0));
}

at::Tensor patch_nn_clustered_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                  const at::Tensor& key_offsets, const at::Tensor& key_order,
                                  double alpha, c10::string_view precision,
                                  const std::optional<at::Tensor>& hint) {
  const std::string prec(precision);
  const std::vector<int64_t> offsets = checked_pruned_operands(queries, 3, keys, key_offsets, prec);
  const int64_t B = queries.size(0), N = queries.size(1), M = keys.size(0);
  check_alpha(alpha);
  check_order(key_order, M);
  check_bound_table(N, static_cast<int64_t>(offsets.size()) - 1);
  at::Tensor hints;
  if (hint.has_value()) {
    TORCH_CHECK_VALUE(hint->dim() == 2 && hint->size(0) == B && hint->size(1) == N,
                      "hint must be (B, N) = (", B, ", ", N, ") like the queries, got shape ", hint->sizes());
    TORCH_CHECK_TYPE(hint->scalar_type() == at::kLong, "hint must be int64, got ", hint->scalar_type());
    TORCH_CHECK(hint->device().is_cpu(), "hint must be on the CPU, got ", hint->device());
    hints = hint->contiguous();
    if (hints.numel() > 0) {
      const auto [mn, mx] = at::aminmax(hints);
      const int64_t lo = mn.item<int64_t>(), hi = mx.item<int64_t>();
      TORCH_CHECK_VALUE(lo >= 0 && hi < M, "hint values must be in [0, ", M, ") (key indices), got values in [",
                        lo, ", ", hi, "]");
    }
  }
  const at::Tensor order = key_order.contiguous();
  auto idx = at::empty({B, N}, queries.options().dtype(at::kLong));
  if (N == 0) return idx;
  std::vector<int64_t> hint_pos;  // hinted ids -> key positions (key_order is a permutation)
  if (hints.defined()) {
    std::vector<int64_t> position(M);
    const int64_t* o = order.data_ptr<int64_t>();
    for (int64_t s = 0; s < M; ++s) position[o[s]] = s;
    const int64_t* h = hints.data_ptr<int64_t>();
    hint_pos.resize(static_cast<size_t>(B * N));
    for (int64_t i = 0; i < B * N; ++i) hint_pos[i] = position[h[i]];
  }
  const at::Tensor q = queries.contiguous(), k = keys.contiguous();
  for (int64_t b = 0; b < B; ++b)
    pruned_one(q[b], k, offsets, order.data_ptr<int64_t>(), alpha, prec,
               hint_pos.empty() ? nullptr : hint_pos.data() + b * N, idx.data_ptr<int64_t>() + b * N);
  return idx;
}

// The pruned passes one at a time, on one (N, D) query set (incremental GPNN updates in
// fastgen/ops/patch_nn.py compose them on subsets of queries and keys).
std::tuple<at::Tensor, at::Tensor> patch_nn_colmin_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                                       const at::Tensor& key_offsets, c10::string_view precision,
                                                       const std::optional<at::Tensor>& init,
                                                       const std::optional<at::Tensor>& centre) {
  const std::string prec(precision);
  const std::vector<int64_t> offsets = checked_pruned_operands(queries, 2, keys, key_offsets, prec);
  const int64_t N = queries.size(0), M = keys.size(0);
  check_bound_table(N, static_cast<int64_t>(offsets.size()) - 1);
  at::Tensor start;
  if (init.has_value()) {
    start = checked_vector(*init, "init", M, at::kFloat);
    TORCH_CHECK_VALUE(!at::isnan(start).any().item<bool>(), "init must not contain NaN");
  }
  const at::Tensor mu = checked_centre(centre, keys);
  if (N == 0) {
    at::Tensor cm = start.defined() ? start.clone() : at::full({M}, INFINITY, at::TensorOptions().dtype(at::kFloat));
    return {cm, at::full({M}, -1, at::TensorOptions().dtype(at::kLong))};
  }
  PrunedProblem prob(queries.contiguous(), keys.contiguous(), offsets, prec, mu.defined() ? &mu : nullptr);
  auto [colmin, colarg] = prob.column_min(start.defined() ? start.data_ptr<float>() : nullptr, true);
  return {colmin, colarg};
}

std::tuple<at::Tensor, at::Tensor> patch_nn_argmin_cpu(const at::Tensor& queries, const at::Tensor& keys,
                                                       const at::Tensor& key_offsets, const at::Tensor& key_order,
                                                       const at::Tensor& weights, c10::string_view precision,
                                                       const std::optional<at::Tensor>& hint,
                                                       const std::optional<at::Tensor>& init_best,
                                                       const std::optional<at::Tensor>& init_arg,
                                                       const std::optional<at::Tensor>& centre) {
  const std::string prec(precision);
  const std::vector<int64_t> offsets = checked_pruned_operands(queries, 2, keys, key_offsets, prec);
  const int64_t N = queries.size(0), M = keys.size(0);
  const auto by_id = checked_key_ids(key_order, M);
  const at::Tensor order = key_order.contiguous();
  const at::Tensor w = checked_vector(weights, "weights", M, at::kFloat);
  TORCH_CHECK_VALUE(at::isfinite(w).all().item<bool>() && w.min().item<float>() > 0.0f,
                    "weights must be finite and > 0");
  TORCH_CHECK_VALUE(init_best.has_value() == init_arg.has_value(),
                    "init_best and init_arg go together (a score and the key that reaches it)");
  TORCH_CHECK_VALUE(!(hint.has_value() && init_best.has_value()),
                    "hint and init_best/init_arg cannot be combined (a hint is for a search from scratch)");
  const at::Tensor mu = checked_centre(centre, keys);
  at::Tensor b0, a0;
  std::vector<int64_t> hint_pos;  // hinted ids -> key positions, by binary search in by_id
  if (hint.has_value()) {
    const at::Tensor h = checked_vector(*hint, "hint", N, at::kLong);
    const int64_t* hp = h.data_ptr<int64_t>();
    hint_pos.resize(N);
    for (int64_t i = 0; i < N; ++i) {
      const auto it = std::lower_bound(by_id.begin(), by_id.end(), std::make_pair(hp[i], int64_t{-1}));
      TORCH_CHECK_VALUE(it != by_id.end() && it->first == hp[i], "hint names key ", hp[i],
                        ", which is not among these keys");
      hint_pos[i] = it->second;
    }
  }
  if (init_best.has_value()) {
    b0 = checked_vector(*init_best, "init_best", N, at::kFloat);
    a0 = checked_vector(*init_arg, "init_arg", N, at::kLong);
    TORCH_CHECK_VALUE(N == 0 || (at::isfinite(b0).all().item<bool>() && b0.min().item<float>() >= 0.0f),
                      "init_best must be finite and >= 0");
    TORCH_CHECK_VALUE(N == 0 || a0.min().item<int64_t>() >= 0, "init_arg must be key indices >= 0");
  }
  at::Tensor idx = at::empty({N}, at::TensorOptions().dtype(at::kLong));
  at::Tensor best = at::empty({N}, at::TensorOptions().dtype(at::kFloat));
  if (N == 0) return {idx, best};
  PrunedProblem prob(queries.contiguous(), keys.contiguous(), offsets, prec, mu.defined() ? &mu : nullptr);
  prob.weighted_argmin(w.data_ptr<float>(), order.data_ptr<int64_t>(), hint_pos.empty() ? nullptr : hint_pos.data(),
                       b0.defined() ? b0.data_ptr<float>() : nullptr, a0.defined() ? a0.data_ptr<int64_t>() : nullptr,
                       idx.data_ptr<int64_t>(), best.data_ptr<float>());
  return {idx, best};
}

}  // namespace

namespace cpu {
std::pair<int64_t, int64_t> patch_nn_prune_stats() {
  return {g_prune_stats.pairs_total.load(), g_prune_stats.pairs_computed.load()};
}
}  // namespace cpu
}  // namespace fastgen

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("patch_nn", &fastgen::patch_nn_cpu);
  m.impl("patch_nn_clustered", &fastgen::patch_nn_clustered_cpu);
  m.impl("patch_nn_colmin", &fastgen::patch_nn_colmin_cpu);
  m.impl("patch_nn_argmin", &fastgen::patch_nn_argmin_cpu);
}
