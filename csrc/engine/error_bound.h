// A proven bound on how far the engine's tile value can sit from the truth, which
// is what makes CertifiedTopK exact. Derivation (a = ||q_c||, b = ||k_c|| after the
// keys' mean is subtracted, S = (a + b)^2, u = 2^-24, ub = unit roundoff of the
// GEMM's inputs: 0 for fp32, 2^-8 for bf16, gamma = D u / (1 - D u)):
//   centering q_c = fl(q - mu):    |d(q_c,k_c) - d(q,k)|       <= 3 u S
//   rounding the GEMM inputs:      2 |q^.k^ - q.k|             <= (2 ub + ub^2) ab * 2
//   fp32 accumulation of the dot:  2 gamma sum|q^_i k^_i|      <= 2 gamma (1+ub)^2 ab
//   fp32 key norm:                 gamma b^2                    <= gamma S
//   the add of norm and cross term: u |s|                        <= 1.01 u S
//   a GEMM that rounds its output (uo = 2^-8 for a bf16 result):
//                                   uo 2 |q^.k^| (1 + gamma)     <= uo (1+ub)^2 (1+gamma) S / 2
// with ab <= S/4. Rankings within a row only need s = ||k||^2 - 2 q.k (the query's
// own norm is a row constant), so E(a, b) bounds every term that moves a ranking.
// Two keys can swap places in the float64 order only if their tile values are
// within 2E, so the candidate window is 2E, times 1.25 to absorb the rounding of
// the bound and of the threshold itself.
#pragma once

#include <cmath>
#include <cstdint>

namespace fastgen {
namespace engine {

inline double unit_roundoff_fp32() { return std::ldexp(1.0, -24); }
inline double unit_roundoff_bf16() { return std::ldexp(1.0, -8); }

// The bound as E(a, b) = coef * (a + b)^2 + slack (the 1.25 safety factor included):
// a tile value of the pair (q, k) is within E(||q_c||, ||k_c||) of the truth.
struct ErrorBound {
  double coef = 0.0, slack = 0.0;
  ErrorBound(int64_t dim, double input_roundoff, double output_roundoff = 0.0) {
    const double u = unit_roundoff_fp32();
    const double du = static_cast<double>(dim) * u;
    const double gamma = du < 0.5 ? du / (1.0 - du) : 1.0;
    const double ub = input_roundoff;
    const double rel = 3.0 * u + 1.01 * u + gamma + 0.5 * (2.0 * ub + ub * ub) +
                       0.5 * gamma * (1.0 + ub) * (1.0 + ub) +
                       0.5 * output_roundoff * (1.0 + ub) * (1.0 + ub) * (1.0 + gamma);
    coef = 1.25 * rel;
    // bf16 dot products flush denormals to zero: a tiny absolute slack covers that.
    slack = 1.25 * 1e-30 * static_cast<double>(dim + 1);
  }
  // The same derivation for a float64 pipeline (centring, norms and GEMM in float64 on
  // fp32 inputs, so no input rounding): u = 2^-53, doubled for the summation orders a
  // BLAS may pick; no slack is needed (products of fp32 values cannot underflow double).
  static ErrorBound float64(int64_t dim) {
    ErrorBound e(dim, 0.0);
    const double u = std::ldexp(1.0, -53);
    const double du = static_cast<double>(dim + 2) * u;
    const double gamma = du < 0.5 ? du / (1.0 - du) : 1.0;
    e.coef = 2.0 * 1.25 * (3.0 * u + 1.01 * u + 1.5 * gamma);
    e.slack = 0.0;
    return e;
  }
  double operator()(double a, double b) const { return coef * (a + b) * (a + b) + slack; }
};

// query_norm = ||q_c||, max_key_norm = max_j ||k_c||, input_roundoff = ub and
// output_roundoff = uo above: 2 E, the window within which two keys of one row can
// swap places (CertifiedTopK sizes it per key instead, see reductions.h).
inline float candidate_window(double query_norm, double max_key_norm, int64_t dim,
                              double input_roundoff, double output_roundoff = 0.0) {
  const double window = 2.0 * ErrorBound(dim, input_roundoff, output_roundoff)(query_norm, max_key_norm);
  return std::isfinite(window) && window < 3.0e38 ? static_cast<float>(window)
                                                  : INFINITY;
}

}  // namespace engine
}  // namespace fastgen
