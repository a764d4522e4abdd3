// Operand preparation shared by every distance op on the CPU (knn, nearest_code,
// patch_nn, PatchIndex): fp32 copies, centring, squared norms, the finiteness check
// and the GEMM operands, each input prepared in one pass.
#pragma once

#include <torch/all.h>

#include <string>

#include "../engine/sqdist_engine.h"
#include "tile_gemm.h"

namespace fastgen {
namespace cpu {

// One key set (B, M, D) centred on `mu`: what every search against these keys reads,
// so a search object can prepare it once and reuse it for many query sets.
struct PreparedKeys {
  // Both sets are centred on mu: the keys' mean snapped to a power-of-two grid, per
  // batch element (centering_shift in operands.cpp, the same as the torch and Triton
  // backends' fastgen.ops.baselines.centering_shift). Subtracting a point
  // leaves every distance unchanged but shrinks the norms, and with them the
  // cancellation in ||q||^2 + ||k||^2 - 2 q.k (see DESIGN.md): data far from the
  // origin ranks as well as centred data.
  PreparedKeys(const at::Tensor& keys, const std::string& precision, const char* name);
  // Rows `rows` (int64 positions) of a single key set (B == 1), prepared exactly as the
  // full set (same centre, so a search on a subset rounds like one on the whole); its
  // k32 is left undefined (the pruned passes do not read it).
  PreparedKeys gather(const at::Tensor& rows) const;

  int64_t B = 0, M = 0, D = 0;
  bool bf16 = false;
  at::Tensor k32;  // (B, M, D) fp32 originals (exact for fp16/bf16 inputs)
  at::Tensor mu;   // (B, 1, D) fp32 centre
  at::Tensor kc;   // (B, M, D) fp32 centred
  at::Tensor kn;   // (B, M) fp32 squared norms of kc
  at::Tensor kg;   // the GEMM operand: kc, or its bf16 copy

 private:
  PreparedKeys() = default;
};

// Everything the engine needs for one (queries, keys) pair: the keys as above, the
// queries centred on the same point, the tile and gathered-row GEMMs.
struct PreparedOperands {
  PreparedOperands(const at::Tensor& queries, const at::Tensor& keys, const std::string& precision,
                   const char* query_name, const char* key_name);
  // queries (B, N, D) against keys prepared already (one batch element of keys serves
  // every query batch element when keys.B == 1).
  PreparedOperands(const at::Tensor& queries, const PreparedKeys& keys, const char* query_name);
  PreparedOperands(const PreparedOperands&) = delete;  // gemm points into ops
  double input_roundoff() const;   // of the GEMM's inputs (0 for fp32)
  double output_roundoff() const;  // of the GEMM's output (0 for fp32)

  int64_t B, N, M, D;
  bool bf16;
  at::Tensor q32, k32, qc, kc, qn, kn, qg, kg;
  GemmOperands ops;
  engine::TileGemm gemm;
  engine::PtrGemm ptr_gemm;  // the same GEMM on gathered rows (pruned passes)
  engine::Tiling tiling;

  // Re-points the GEMMs after qg was replaced (e.g. queries permuted).
  void set_query_operand(const at::Tensor& new_qg);
};

// The precision argument: "fp32" or "bf16", else a ValueError naming it.
void check_precision(const std::string& precision);

}  // namespace cpu
}  // namespace fastgen
