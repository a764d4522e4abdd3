// The one schema file: every fastgen op is declared here; each backend registers
// its implementation with TORCH_LIBRARY_IMPL in its own file (csrc/cpu/*.cpp).
#include <Python.h>
#include <torch/all.h>
#include <torch/library.h>

#include "cpu/patch_nn.h"
#include "cpu/tile_gemm.h"
#include "cpu/topk_search.h"

TORCH_LIBRARY(fastgen, m) {
  // (B, N, D) x (B, M, D) -> dist (B, N, k) float32 ascending, idx (B, N, k) int64
  m.def("knn(Tensor queries, Tensor keys, int k, bool exclude_self, str precision) -> (Tensor, Tensor)");
  // (N, D) x (K, D) -> idx (N,) int64, dist (N,) float32
  m.def("nearest_code(Tensor x, Tensor codebook, str precision) -> (Tensor, Tensor)");
  // (B, N, D) x (B, M, D) -> idx (B, N) int64 of argmin_j d_ij / (alpha + min_i d_ij)
  m.def("patch_nn(Tensor queries, Tensor keys, float? alpha, str precision) -> Tensor");
  // (B, N, D) x keys (M, D) sorted so that each [key_offsets[g], key_offsets[g+1]) is one
  // cluster, key_order (M,) = original index of each sorted key -> idx (B, N) int64 of
  // ORIGINAL key indices; the same result as patch_nn, with provably useless tiles skipped
  m.def("patch_nn_clustered(Tensor queries, Tensor keys, Tensor key_offsets, Tensor key_order, float alpha, str precision, Tensor? hint=None) -> Tensor");
  // The two pruned passes of patch_nn_clustered alone, on one query set (N, D) (incremental
  // updates compose them on subsets): colmin (M,) float32 = min(init, min_i d_ij) with
  // colarg (M,) int64 the query that set it (-1 where init stood); then idx (N,) original
  // key ids of argmin_j d_ij * weights[j] (optionally against a reached (init_best, init_arg))
  // with its score (N,) float32 (init_arg: any key id, returned where nothing beats
  // init_best; a hint and a start are exclusive). centre (D,): subtracted from both sets (default: the
  // keys' mean); calls on subsets of one key set pass the whole set's, to round alike.
  m.def("patch_nn_colmin(Tensor queries, Tensor keys, Tensor key_offsets, str precision, Tensor? init=None, Tensor? centre=None) -> (Tensor, Tensor)");
  m.def("patch_nn_argmin(Tensor queries, Tensor keys, Tensor key_offsets, Tensor key_order, Tensor weights, str precision, Tensor? hint=None, Tensor? init_best=None, Tensor? init_arg=None, Tensor? centre=None) -> (Tensor, Tensor)");
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
