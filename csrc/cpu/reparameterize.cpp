// CPU kernels of fastgen::reparameterize and fastgen::reparameterize_backward.
//
// reparameterize(mu, logvar, eps, logvar_min, logvar_max) -> (z, kl)
//   mu, logvar, eps  same shape (B, ...), same dtype (float32, float16, bfloat16 or
//                    float64); row b is everything at index b of dim 0 (R = numel / B
//                    elements), so (B, D) and conv latents (B, C, H, W) both work.
//   logvar_min/max   optional clamp applied to logvar before use; where it clamps, the
//                    gradient w.r.t. logvar is 0 (as torch.clamp).
//   z   (B, ...) dtype of mu:  mu + exp(0.5 * lv) * eps
//   kl  (B,) float32 (float64 for float64 inputs): 0.5 * sum_row(mu^2 + exp(lv) - lv - 1)
//
// reparameterize_backward(grad_z?, grad_kl?, mu, logvar, eps, logvar_min, logvar_max)
//   -> (grad_mu, grad_logvar), both shaped and typed like mu. Either incoming gradient
//   may be absent (the output it belongs to was not used).
//
// Each is one pass over memory: exp(0.5 * lv) is computed once per element and
// exp(lv) = s * s, so forward reads 3 arrays and writes 1, backward reads 4 and
// writes 2. Half/bfloat16 are widened to float32 in small stack buffers; the math
// is float32 (float64 for float64), KL partial sums are float64.
#include <torch/all.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace fastgen {
namespace {

// Elements of one row handled by one task. Rows longer than this are split, and
// their KL is the in-order sum of the per-block partials, so results do not
// depend on the number of threads.
constexpr int64_t kBlock = 16384;
// Half/bfloat16 are widened in chunks of this many elements (stack buffers).
constexpr int64_t kChunk = 512;

// The float32 kernels below are compiled without -ftrapping-math (gcc's default):
// with it, gcc will not turn the selects of the clamps into blends without AVX-512
// masks, and the AVX2 and SSE clones stay scalar (measured: 0.3 vs 1 G elements/s).
// Nothing here reads floating-point exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

// exp(l / 2) and exp(l) - l - 1 for float32, written without branches or library
// calls so the loops that use them vectorize (gcc -O3, one clone per ISA below).
// exp is Cephes' expf: x = l/2 = n ln2 + r, exp(x) = 2^n (1 + r + r^2 q(r)); max
// relative error ~2 ulp on [-87.3, 88.7], inf above, 0 below, NaN kept.
// exp(l) - l - 1 cancels for small |l| (a posterior close to the prior, common for
// unused latent dims). For n = 0, r is exactly l/2 and with p = r + r^2 q(r):
// exp(l) - 1 - l = (1 + p)^2 - 1 - 2r = 2 r^2 q(r) + p^2, free of cancellation.
struct HalfExp {
  float s;  // exp(l / 2), the standard deviation
  float d;  // exp(l) - l - 1, the non-mu part of the KL term
};

static inline __attribute__((always_inline)) HalfExp half_exp(float l) {
  const float x = 0.5f * l;
  const bool under = x < -87.33f;
  const bool over = x > 88.72f;
  const float xc = under ? -87.33f : (over ? 88.72f : x);  // NaN stays NaN
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float q = 1.9875691500E-4f;
  q = q * r + 1.3981999507E-3f;
  q = q * r + 8.3334519073E-3f;
  q = q * r + 4.1665795894E-2f;
  q = q * r + 1.6666665459E-1f;
  q = q * r + 5.0000001201E-1f;
  const float r2q = r * r * q;  // exp(r) - 1 - r
  const float p = r2q + r;      // exp(r) - 1
  // 2^n as 2^(n-1) * 2 so n = 128 (x near 88.7) does not overflow the exponent field
  const int32_t bits = (static_cast<int32_t>(n) + 126) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float s = (p + 1.f) * scale * 2.f;
  s = over ? std::numeric_limits<float>::infinity() : s;
  s = under ? 0.f : s;
  const float d_small = 2.f * r2q + p * p;
  const float d_direct = s * s - l - 1.f;
  return {s, n == 0.f ? d_small : d_direct};
}

static inline __attribute__((always_inline)) float clamp_f(float v, float lo, float hi) {
  v = v < lo ? lo : v;  // NaN stays NaN (both comparisons false)
  return v > hi ? hi : v;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTGEN_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTGEN_ISA_CLONES
#endif

// Forward over n contiguous float32 elements of one row; returns 0.5 * sum of KL terms.
// The sum runs in float over chunks of kSum elements (vector lanes: ~kSum/16 terms
// each, all >= 0) and in double across chunks.
constexpr int64_t kSum = 1024;

FASTGEN_ISA_CLONES
double forward_f32(const float* __restrict mu, const float* __restrict lv,
                   const float* __restrict eps, float* __restrict z, int64_t n, float lo,
                   float hi) {
  double total = 0.0;
  for (int64_t c = 0; c < n; c += kSum) {
    const int64_t end = std::min(n, c + kSum);
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = c; i < end; ++i) {
      const float l = clamp_f(lv[i], lo, hi);
      const HalfExp e = half_exp(l);
      z[i] = mu[i] + e.s * eps[i];
      acc += mu[i] * mu[i] + e.d;
    }
    total += acc;
  }
  return 0.5 * total;
}

// Backward over n float32 elements; gz == nullptr means no gradient through z,
// gk == 0 covers an absent gradient through kl.
FASTGEN_ISA_CLONES
void backward_f32(const float* __restrict gz, float gk, const float* __restrict mu,
                  const float* __restrict lv, const float* __restrict eps,
                  float* __restrict gmu, float* __restrict glv, int64_t n, float lo, float hi) {
  const float half_gk = 0.5f * gk;
  if (gz != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float raw = lv[i];
      const float s = half_exp(clamp_f(raw, lo, hi)).s;
      gmu[i] = gz[i] + gk * mu[i];
      const float g = 0.5f * gz[i] * s * eps[i] + half_gk * (s * s - 1.f);
      const bool clamped = (raw < lo) | (raw > hi);
      glv[i] = clamped ? 0.f : g;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float raw = lv[i];
      const float s = half_exp(clamp_f(raw, lo, hi)).s;
      gmu[i] = gk * mu[i];
      const float g = half_gk * (s * s - 1.f);
      const bool clamped = (raw < lo) | (raw > hi);
      glv[i] = clamped ? 0.f : g;
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// float64: exp(l) - l - 1 with the Taylor series near 0 (the direct form cancels there)
static inline double kl_term_f64(double l, double s) {
  const double l2 = l * l;
  const double series = l2 * (0.5 + l * (1.0 / 6 + l * (1.0 / 24 + l * (1.0 / 120 +
                        l * (1.0 / 720 + l * (1.0 / 5040 + l * (1.0 / 40320 + l / 362880.0)))))));
  return std::fabs(l) < 0.1 ? series : s * s - l - 1.0;
}

// float64: plain loops with std::exp (used by gradcheck and float64 users).
double forward_f64(const double* mu, const double* lv, const double* eps, double* z, int64_t n,
                   double lo, double hi) {
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    double l = lv[i] < lo ? lo : lv[i];
    l = l > hi ? hi : l;
    const double s = std::exp(0.5 * l);
    z[i] = mu[i] + s * eps[i];
    acc += mu[i] * mu[i] + kl_term_f64(l, s);
  }
  return 0.5 * acc;
}

void backward_f64(const double* gz, double gk, const double* mu, const double* lv,
                  const double* eps, double* gmu, double* glv, int64_t n, double lo, double hi) {
  for (int64_t i = 0; i < n; ++i) {
    const double raw = lv[i];
    double l = raw < lo ? lo : raw;
    l = l > hi ? hi : l;
    const double s = std::exp(0.5 * l);
    const double gzi = gz ? gz[i] : 0.0;
    gmu[i] = gzi + gk * mu[i];
    const double g = 0.5 * gzi * s * eps[i] + 0.5 * gk * (s * s - 1.0);
    glv[i] = (raw < lo || raw > hi) ? 0.0 : g;
  }
}

// Half / bfloat16: widen kChunk elements at a time, run the float32 kernel, narrow.
template <typename T>
void widen(const T* mu, const T* lv, const T* eps, int64_t m, float* bm, float* bl, float* be) {
  for (int64_t i = 0; i < m; ++i) {
    bm[i] = static_cast<float>(mu[i]);
    bl[i] = static_cast<float>(lv[i]);
    be[i] = static_cast<float>(eps[i]);
  }
}

template <typename T>
double forward_narrow(const T* mu, const T* lv, const T* eps, T* z, int64_t n, float lo, float hi) {
  float bm[kChunk], bl[kChunk], be[kChunk], bz[kChunk];
  double acc = 0.0;
  for (int64_t s = 0; s < n; s += kChunk) {
    const int64_t m = std::min(kChunk, n - s);
    widen(mu + s, lv + s, eps + s, m, bm, bl, be);
    acc += forward_f32(bm, bl, be, bz, m, lo, hi);
    for (int64_t i = 0; i < m; ++i) z[s + i] = static_cast<T>(bz[i]);
  }
  return acc;
}

template <typename T>
void backward_narrow(const T* gz, float gk, const T* mu, const T* lv, const T* eps, T* gmu,
                     T* glv, int64_t n, float lo, float hi) {
  float bg[kChunk], bm[kChunk], bl[kChunk], be[kChunk], om[kChunk], ol[kChunk];
  for (int64_t s = 0; s < n; s += kChunk) {
    const int64_t m = std::min(kChunk, n - s);
    widen(mu + s, lv + s, eps + s, m, bm, bl, be);
    if (gz)
      for (int64_t i = 0; i < m; ++i) bg[i] = static_cast<float>(gz[s + i]);
    backward_f32(gz ? bg : nullptr, gk, bm, bl, be, om, ol, m, lo, hi);
    for (int64_t i = 0; i < m; ++i) {
      gmu[s + i] = static_cast<T>(om[i]);
      glv[s + i] = static_cast<T>(ol[i]);
    }
  }
}

double forward_block(const float* mu, const float* lv, const float* eps, float* z, int64_t n,
                     double lo, double hi) {
  return forward_f32(mu, lv, eps, z, n, static_cast<float>(lo), static_cast<float>(hi));
}
double forward_block(const double* mu, const double* lv, const double* eps, double* z, int64_t n,
                     double lo, double hi) {
  return forward_f64(mu, lv, eps, z, n, lo, hi);
}
template <typename T>
double forward_block(const T* mu, const T* lv, const T* eps, T* z, int64_t n, double lo, double hi) {
  return forward_narrow(mu, lv, eps, z, n, static_cast<float>(lo), static_cast<float>(hi));
}

void backward_block(const float* gz, double gk, const float* mu, const float* lv,
                    const float* eps, float* gmu, float* glv, int64_t n, double lo, double hi) {
  backward_f32(gz, static_cast<float>(gk), mu, lv, eps, gmu, glv, n, static_cast<float>(lo),
               static_cast<float>(hi));
}
void backward_block(const double* gz, double gk, const double* mu, const double* lv,
                    const double* eps, double* gmu, double* glv, int64_t n, double lo, double hi) {
  backward_f64(gz, gk, mu, lv, eps, gmu, glv, n, lo, hi);
}
template <typename T>
void backward_block(const T* gz, double gk, const T* mu, const T* lv, const T* eps, T* gmu, T* glv,
                    int64_t n, double lo, double hi) {
  backward_narrow(gz, static_cast<float>(gk), mu, lv, eps, gmu, glv, n, static_cast<float>(lo),
                  static_cast<float>(hi));
}

// Outputs are fresh memory, and writing them first costs a page fault per 4 KiB page:
// for a (8192, 1024) float32 output (32 MiB, a fresh mmap every call) that was 16 ms
// of a 27 ms forward on the development VM. Advising transparent huge pages on the
// 2 MiB-aligned interior before the first write makes it 512x fewer faults (measured
// 16 -> 4 ms per 32 MiB). Only this tensor's own range is advised, it is written in
// full right after, and the advice is ignored where THP is off or unsupported.
at::Tensor empty_output(const at::Tensor& like) {
  at::Tensor t = at::empty_like(like, at::MemoryFormat::Contiguous);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + t.nbytes()) & ~(kHuge - 1);
  if (t.nbytes() >= 4 * kHuge && end > begin)
    (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
  return t;
}

struct Layout {
  int64_t rows, row_len, blocks_per_row, tasks, grain;
};

Layout layout_of(const at::Tensor& mu) {
  Layout L;
  L.rows = mu.size(0);
  L.row_len = mu.numel() / L.rows;
  L.blocks_per_row = (L.row_len + kBlock - 1) / kBlock;
  L.tasks = L.rows * L.blocks_per_row;
  // ~32k elements per parallel chunk so tiny rows do not pay per-task overhead
  L.grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, std::min(L.row_len, kBlock)));
  return L;
}

void check_inputs(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& eps,
                  std::optional<double> lo, std::optional<double> hi) {
  const auto st = mu.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "mu must be float32, float16, bfloat16 or float64, got ", st);
  TORCH_CHECK(mu.dim() >= 1, "mu must have a batch dimension (at least 1-D), got a 0-D tensor");
  TORCH_CHECK(mu.numel() > 0, "mu is empty (shape ", mu.sizes(), ")");
  auto like_mu = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == mu.sizes(), name, " has shape ", t.sizes(), " but mu has shape ",
                mu.sizes(), "; they must match");
    TORCH_CHECK(t.scalar_type() == st, name, " is ", t.scalar_type(), " but mu is ", st);
    TORCH_CHECK(t.device() == mu.device(), name, " is on ", t.device(), " but mu is on ", mu.device());
  };
  like_mu(logvar, "logvar");
  like_mu(eps, "eps");
  TORCH_CHECK(mu.device().is_cpu(), "mu must be on the CPU for this kernel, got ", mu.device());
  TORCH_CHECK(!lo || !hi || *lo <= *hi, "logvar_min (", lo.value_or(0), ") must be <= logvar_max (",
              hi.value_or(0), ")");
}

std::tuple<at::Tensor, at::Tensor> reparameterize_cpu(const at::Tensor& mu_in,
                                                      const at::Tensor& logvar_in,
                                                      const at::Tensor& eps_in,
                                                      std::optional<double> logvar_min,
                                                      std::optional<double> logvar_max) {
  check_inputs(mu_in, logvar_in, eps_in, logvar_min, logvar_max);
  const at::Tensor mu = mu_in.contiguous(), logvar = logvar_in.contiguous(), eps = eps_in.contiguous();
  const double lo = logvar_min.value_or(-std::numeric_limits<double>::infinity());
  const double hi = logvar_max.value_or(std::numeric_limits<double>::infinity());
  const Layout L = layout_of(mu);
  at::Tensor z = empty_output(mu);
  const auto kl_type = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor kl = at::empty({L.rows}, mu.options().dtype(kl_type));
  std::vector<double> partial(L.tasks);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparameterize_cpu", [&] {
    const scalar_t* pm = mu.data_ptr<scalar_t>();
    const scalar_t* pl = logvar.data_ptr<scalar_t>();
    const scalar_t* pe = eps.data_ptr<scalar_t>();
    scalar_t* pz = z.data_ptr<scalar_t>();
    at::parallel_for(0, L.tasks, L.grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t row = t / L.blocks_per_row, blk = t % L.blocks_per_row;
        const int64_t start = row * L.row_len + blk * kBlock;
        const int64_t n = std::min(kBlock, L.row_len - blk * kBlock);
        partial[t] = forward_block(pm + start, pl + start, pe + start, pz + start, n, lo, hi);
      }
    });
  });
  // in-order sum of each row's block partials: the same bits for any thread count
  for (int64_t r = 0; r < L.rows; ++r) {
    double s = 0.0;
    for (int64_t b = 0; b < L.blocks_per_row; ++b) s += partial[r * L.blocks_per_row + b];
    if (kl_type == at::kDouble)
      kl.data_ptr<double>()[r] = s;
    else
      kl.data_ptr<float>()[r] = static_cast<float>(s);
  }
  return {z, kl};
}

std::tuple<at::Tensor, at::Tensor> reparameterize_backward_cpu(
    const std::optional<at::Tensor>& grad_z_in, const std::optional<at::Tensor>& grad_kl_in,
    const at::Tensor& mu_in, const at::Tensor& logvar_in, const at::Tensor& eps_in,
    std::optional<double> logvar_min, std::optional<double> logvar_max) {
  check_inputs(mu_in, logvar_in, eps_in, logvar_min, logvar_max);
  const at::Tensor mu = mu_in.contiguous(), logvar = logvar_in.contiguous(), eps = eps_in.contiguous();
  const Layout L = layout_of(mu);
  at::Tensor grad_z;
  if (grad_z_in.has_value() && grad_z_in->defined()) {
    TORCH_CHECK(grad_z_in->sizes() == mu.sizes(), "grad_z has shape ", grad_z_in->sizes(),
                " but mu has shape ", mu.sizes());
    grad_z = grad_z_in->to(mu.scalar_type()).contiguous();
  }
  at::Tensor grad_kl;
  if (grad_kl_in.has_value() && grad_kl_in->defined()) {
    TORCH_CHECK(grad_kl_in->dim() == 1 && grad_kl_in->size(0) == L.rows, "grad_kl must have shape (",
                L.rows, ",), got ", grad_kl_in->sizes());
    grad_kl = grad_kl_in->to(at::kDouble).contiguous();
  }
  const double lo = logvar_min.value_or(-std::numeric_limits<double>::infinity());
  const double hi = logvar_max.value_or(std::numeric_limits<double>::infinity());
  at::Tensor grad_mu = empty_output(mu), grad_logvar = empty_output(mu);
  const double* pk = grad_kl.defined() ? grad_kl.data_ptr<double>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparameterize_backward_cpu", [&] {
    const scalar_t* pg = grad_z.defined() ? grad_z.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pm = mu.data_ptr<scalar_t>();
    const scalar_t* pl = logvar.data_ptr<scalar_t>();
    const scalar_t* pe = eps.data_ptr<scalar_t>();
    scalar_t* om = grad_mu.data_ptr<scalar_t>();
    scalar_t* ol = grad_logvar.data_ptr<scalar_t>();
    at::parallel_for(0, L.tasks, L.grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t row = t / L.blocks_per_row, blk = t % L.blocks_per_row;
        const int64_t start = row * L.row_len + blk * kBlock;
        const int64_t n = std::min(kBlock, L.row_len - blk * kBlock);
        backward_block(pg ? pg + start : nullptr, pk ? pk[row] : 0.0, pm + start, pl + start,
                       pe + start, om + start, ol + start, n, lo, hi);
      }
    });
  });
  return {grad_mu, grad_logvar};
}

}  // namespace
}  // namespace fastgen

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("reparameterize", &fastgen::reparameterize_cpu);
  m.impl("reparameterize_backward", &fastgen::reparameterize_backward_cpu);
}
