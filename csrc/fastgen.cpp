// The one schema file: every fastgen op is declared here; each backend registers
// its implementation with TORCH_LIBRARY_IMPL in its own file (csrc/cpu/*.cpp).
#include <Python.h>
#include <torch/all.h>
#include <torch/library.h>

#include "cpu/knn.h"
#include "cpu/patch_index.h"
#include "cpu/tile_gemm.h"

TORCH_LIBRARY(fastgen, m) {
  // (B, N, D) x (B, M, D) -> dist (B, N, k) float32 ascending, idx (B, N, k) int64
  m.def("knn(Tensor queries, Tensor keys, int k, bool exclude_self, str precision) -> (Tensor, Tensor)");
  // (N, D) x (K, D) -> dist (N,) float32, idx (N,) int64 (knn's order)
  m.def("nearest_code(Tensor x, Tensor codebook, str precision) -> (Tensor, Tensor)");
  // points (N, D), centres (M, D), radii (M,) float32 squared -> count (N,) int64 of the
  // balls with fl32(||p - c_j||^2) <= radii_j, nearest dist (N,) float32, idx (N,) int64
  m.def("ball_count(Tensor points, Tensor centres, Tensor radii, str precision) -> (Tensor, Tensor, Tensor)");
  // (B, N, D) x (B, M, D) -> idx (B, N) int64 of argmin_j d_ij / (alpha + min_i d_ij)
  m.def("patch_nn(Tensor queries, Tensor keys, float? alpha, str precision) -> Tensor");
  // (GPNN's pruned search over clustered keys is the class torch.classes.fastgen.PatchIndex,
  // csrc/cpu/patch_index.cpp: it keeps the prepared keys across searches.)
  // source (B, C, Hs, Ws), idx (B, Hq, Wq) -> (B, C, Hq + p - 1, Wq + p - 1): mean of chosen patches
  m.def("fold_patches(Tensor source, Tensor idx, int patch) -> Tensor");
  // mu, logvar, eps (B, ...) same shape and dtype -> z (B, ...) dtype of mu,
  // kl (B,) float32 (float64 for float64) = 0.5 * sum_row(mu^2 + exp(lv) - lv - 1)
  m.def("reparameterize(Tensor mu, Tensor logvar, Tensor eps, float? logvar_min, float? logvar_max) -> (Tensor, Tensor)");
  // -> (grad_mu, grad_logvar), one fused pass; either incoming gradient may be None
  m.def("reparameterize_backward(Tensor? grad_z, Tensor? grad_kl, Tensor mu, Tensor logvar, Tensor eps, float? logvar_min, float? logvar_max) -> (Tensor, Tensor)");
}

namespace {

// Not an op: what was compiled in, for fastgen.info() / `fastgen doctor`.
PyObject* build_info(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  auto set = [d](const char* key, PyObject* v) {
    PyDict_SetItemString(d, key, v);
    Py_DECREF(v);
  };
#ifdef _OPENMP
  set("openmp", PyLong_FromLong(_OPENMP));
#else
  set("openmp", PyBool_FromLong(0));
#endif
  set("compiler", PyUnicode_FromString(__VERSION__));
  set("blas_sgemm", PyBool_FromLong(fastgen::cpu::has_blas_sgemm()));
  set("blas_bf16_gemm", PyBool_FromLong(fastgen::cpu::has_blas_bf16_gemm()));
  set("overflow_rows", PyLong_FromLongLong(fastgen::cpu::overflow_row_count()));
  set("dense_rows", PyLong_FromLongLong(fastgen::cpu::dense_row_count()));
  set("scan_rows", PyLong_FromLongLong(fastgen::cpu::scan_row_count()));
  const auto tiles = fastgen::cpu::patch_nn_prune_stats();
  set("patch_nn_pairs_total", PyLong_FromLongLong(tiles.first));
  set("patch_nn_pairs_computed", PyLong_FromLongLong(tiles.second));
#ifdef FASTGEN_CXX_FLAGS
  set("cxx_flags", PyUnicode_FromString(FASTGEN_CXX_FLAGS));
#endif
  return d;
}

PyMethodDef kMethods[] = {
    {"build_info", build_info, METH_NOARGS, "What the extension was built with."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "fastgen C++ kernels", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&kModule); }
