#include "tile_gemm.h"

#include <vector>

// MKL's entry points are exported by libtorch_cpu on x86 wheels. Declared weak so a
// torch built on another BLAS still loads this extension and takes the at::mm path.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k,
                            float alpha, const uint16_t* a, int lda, const uint16_t* b, int ldb,
                            float beta, float* c, int ldc) __attribute__((weak));
// The C entry point (the lower-case name is the Fortran one, which takes a pointer).
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));
}

namespace fastgen {
namespace cpu {
namespace {

// The engine already runs one tile per thread; a BLAS that threads inside a tile
// would oversubscribe the cores.
void single_threaded_blas() {
  thread_local bool done = false;
  if (!done && MKL_Set_Num_Threads_Local) {
    MKL_Set_Num_Threads_Local(1);
    done = true;
  }
}

// The raw GEMMs: C[r * ldc + c] = -2 <Q_r, K_c>, row-major Q (nr x dim), K (nc x dim).
void sgemm_rows(int64_t dim, const float* Q, int64_t nr, const float* K, int64_t nc, float* C,
                int64_t ldc) {
  single_threaded_blas();
  // Column-major view: C^T (nc x nr, ld = ldc) = -2 * K_blk (D x nc)^T * Q_blk (D x nr).
  const int m = static_cast<int>(nc), n = static_cast<int>(nr), k = static_cast<int>(dim);
  const int ld = static_cast<int>(dim), ldc_i = static_cast<int>(ldc);
  const float alpha = -2.0f, beta = 0.0f;
  sgemm_("T", "N", &m, &n, &k, &alpha, K, &ld, Q, &ld, &beta, C, &ldc_i);
}

void aten_fp32_rows(int64_t dim, const float* Q, int64_t nr, const float* K, int64_t nc, float* C,
                    int64_t ldc) {
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor c = at::from_blob(C, {nr, nc}, {ldc, 1}, opts);
  at::mm_out(c, at::from_blob(const_cast<float*>(Q), {nr, dim}, opts),
             at::from_blob(const_cast<float*>(K), {nc, dim}, opts).t());
  c.mul_(-2.0f);
}

void bf16_aten_rows(int64_t dim, const at::BFloat16* Q, int64_t nr, const at::BFloat16* K, int64_t nc,
                    float* C, int64_t ldc) {
  auto opts = at::TensorOptions().dtype(at::kBFloat16);
  // oneDNN builds (JIT) and caches a primitive per GEMM shape: the pruned passes' gathered
  // GEMMs come in hundreds of shapes, so round both sizes up to a few fixed steps,
  // padding with zero rows (their products are computed and dropped).
  auto round_up = [](int64_t n) {
    const int64_t step = n <= 64 ? 16 : 64;
    return (n + step - 1) / step * step;
  };
  const int64_t pr = round_up(nr), pc = round_up(nc);
  thread_local std::vector<at::BFloat16> scratch, qpad, kpad;
  if (scratch.size() < static_cast<size_t>(pr * pc)) scratch.resize(pr * pc);
  if (pr != nr) {
    qpad.assign(static_cast<size_t>(pr * dim), at::BFloat16(0.0f));
    std::copy(Q, Q + nr * dim, qpad.begin());
    Q = qpad.data();
  }
  if (pc != nc) {
    kpad.assign(static_cast<size_t>(pc * dim), at::BFloat16(0.0f));
    std::copy(K, K + nc * dim, kpad.begin());
    K = kpad.data();
  }
  at::Tensor out = at::from_blob(scratch.data(), {pr, pc}, opts);
  at::mm_out(out, at::from_blob(const_cast<at::BFloat16*>(Q), {pr, dim}, opts),
             at::from_blob(const_cast<at::BFloat16*>(K), {pc, dim}, opts).t());
  for (int64_t r = 0; r < nr; ++r) {
    const at::BFloat16* src = scratch.data() + r * pc;
    float* dst = C + r * ldc;
#pragma omp simd
    for (int64_t c = 0; c < nc; ++c) dst[c] = static_cast<float>(src[c]);
  }
}

void bf16_mkl_rows(int64_t dim, const uint16_t* Q, int64_t nr, const uint16_t* K, int64_t nc, float* C,
                   int64_t ldc) {
  single_threaded_blas();
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kTrans, static_cast<int>(nr), static_cast<int>(nc),
                         static_cast<int>(dim), -2.0f, Q, static_cast<int>(dim), K,
                         static_cast<int>(dim), 0.0f, C, static_cast<int>(ldc));
}

// The engine's two callback forms around one raw GEMM: a tile of the operands (rows
// [r0, r0 + nr) of batch b's queries, [c0, c0 + nc) of its keys), or gathered rows.
// ctx is the GemmOperands (for the tile form: pointers and sizes; for rows: dim only).
template <class T>
using RowsFn = void (*)(int64_t, const T*, int64_t, const T*, int64_t, float*, int64_t);

template <class T, RowsFn<T> Rows>
void tile_call(const void* ctx, int64_t b, int64_t r0, int64_t nr, int64_t c0, int64_t nc, float* C,
               int64_t ldc) {
  const auto* o = static_cast<const GemmOperands*>(ctx);
  Rows(o->dim, static_cast<const T*>(o->queries) + (b * o->rows + r0) * o->dim, nr,
       static_cast<const T*>(o->keys) + (b * o->cols + c0) * o->dim, nc, C, ldc);
}

template <class T, RowsFn<T> Rows>
void rows_call(const void* ctx, const void* Q, int64_t nr, const void* K, int64_t nc, float* C,
               int64_t ldc) {
  Rows(static_cast<const GemmOperands*>(ctx)->dim, static_cast<const T*>(Q), nr,
       static_cast<const T*>(K), nc, C, ldc);
}

}  // namespace

bool has_blas_sgemm() { return sgemm_ != nullptr; }
bool has_blas_bf16_gemm() { return cblas_gemm_bf16bf16f32 != nullptr; }

engine::TileGemm fp32_tile_gemm(const GemmOperands* ops) {
  if (has_blas_sgemm()) return {tile_call<float, sgemm_rows>, ops};
  return {tile_call<float, aten_fp32_rows>, ops};
}
engine::TileGemm bf16_aten_tile_gemm(const GemmOperands* ops) {
  return {tile_call<at::BFloat16, bf16_aten_rows>, ops};
}
engine::TileGemm bf16_mkl_tile_gemm(const GemmOperands* ops) { return {tile_call<uint16_t, bf16_mkl_rows>, ops}; }

engine::PtrGemm fp32_ptr_gemm(const GemmOperands* ops) {
  if (has_blas_sgemm()) return {rows_call<float, sgemm_rows>, ops};
  return {rows_call<float, aten_fp32_rows>, ops};
}
engine::PtrGemm bf16_aten_ptr_gemm(const GemmOperands* ops) {
  return {rows_call<at::BFloat16, bf16_aten_rows>, ops};
}
engine::PtrGemm bf16_mkl_ptr_gemm(const GemmOperands* ops) { return {rows_call<uint16_t, bf16_mkl_rows>, ops}; }

}  // namespace cpu
}  // namespace fastgen
