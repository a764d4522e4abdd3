// CPU kernel of fastgen::fold_patches: GPNN's output image as the mean of the chosen
// value patches, gathered straight from the source image. The (N, C*p*p) patch
// matrix that unfold -> gather -> fold would build never exists: each output pixel
// sums the pixels that the (at most p*p) query patches covering it point to.
#include <torch/all.h>
#include <torch/library.h>

#include "checks.h"

namespace fastgen {
namespace {

at::Tensor fold_patches_cpu(const at::Tensor& source, const at::Tensor& idx, int64_t patch) {
  TORCH_CHECK_VALUE(source.dim() == 4, "source must be (B, C, H, W), got shape ", source.sizes());
  TORCH_CHECK_VALUE(idx.dim() == 3, "idx must be (B, Hq, Wq), got shape ", idx.sizes());
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "idx must be int64, got ", idx.scalar_type());
  const auto st = source.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                   "source must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK_VALUE(source.device().is_cpu() && idx.device().is_cpu(),
                    "source and idx must be CPU tensors for this kernel");
  TORCH_CHECK_VALUE(patch >= 1, "patch must be >= 1, got ", patch);
  const int64_t B = source.size(0), C = source.size(1), Hs = source.size(2), Ws = source.size(3);
  TORCH_CHECK_VALUE(idx.size(0) == B, "idx has batch size ", idx.size(0), " but source has ", B);
  TORCH_CHECK_VALUE(Hs >= patch && Ws >= patch, "source (", Hs, "x", Ws,
                    ") is smaller than one patch (", patch, "x", patch, ")");
  const int64_t Hq = idx.size(1), Wq = idx.size(2);
  TORCH_CHECK_VALUE(Hq >= 1 && Wq >= 1, "idx has an empty query grid (", Hq, "x", Wq, ")");
  const int64_t Wsp = Ws - patch + 1, nsrc = (Hs - patch + 1) * Wsp;
  const int64_t Ho = Hq + patch - 1, Wo = Wq + patch - 1;
  if (idx.numel() > 0) {
    TORCH_CHECK_VALUE(idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < nsrc,
                      "idx values must be in [0, ", nsrc, ") (source patch positions)");
  }
  const at::Tensor src = source.to(at::kFloat).contiguous();
  const at::Tensor id = idx.contiguous();
  at::Tensor out = at::empty({B, C, Ho, Wo}, src.options());
  if (out.numel() == 0) return out.to(st);
  const float* S = src.const_data_ptr<float>();
  const int64_t* I = id.const_data_ptr<int64_t>();
  float* O = out.data_ptr<float>();
  // one output row per task: writes never overlap, so no atomics
  at::parallel_for(0, B * Ho, 4, [&](int64_t s, int64_t e) {
    std::vector<float> acc(static_cast<size_t>(C * Wo));
    for (int64_t task = s; task < e; ++task) {
      const int64_t b = task / Ho, y = task % Ho;
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t qy0 = std::max<int64_t>(0, y - patch + 1), qy1 = std::min(Hq - 1, y);
      for (int64_t qy = qy0; qy <= qy1; ++qy) {
        const int64_t dy = y - qy;
        for (int64_t qx = 0; qx < Wq; ++qx) {
          const int64_t p = I[(b * Hq + qy) * Wq + qx];
          const int64_t sy = p / Wsp + dy, sx = p % Wsp;
          for (int64_t c = 0; c < C; ++c) {
            const float* srow = S + ((b * C + c) * Hs + sy) * Ws + sx;
            float* arow = acc.data() + c * Wo + qx;
            for (int64_t dx = 0; dx < patch; ++dx) arow[dx] += srow[dx];
          }
        }
      }
      const float ny = static_cast<float>(qy1 - qy0 + 1);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t x = 0; x < Wo; ++x) {
          const int64_t nx = std::min(Wq - 1, x) - std::max<int64_t>(0, x - patch + 1) + 1;
          O[((b * C + c) * Ho + y) * Wo + x] = acc[c * Wo + x] / (ny * static_cast<float>(nx));
        }
    }
  });
  return out.to(st);
}

}  // namespace
}  // namespace fastgen

TORCH_LIBRARY_IMPL(fastgen, CPU, m) { m.impl("fold_patches", &fastgen::fold_patches_cpu); }
