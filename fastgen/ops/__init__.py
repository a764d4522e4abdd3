"""fastgen's functional API: each op picks a backend (cpp, triton, torch reference)."""
from fastgen.ops.fold_patches import fold_patches
from fastgen.ops.knn import knn
from fastgen.ops.nearest_code import nearest_code
from fastgen.ops.patch_nn import patch_nn

__all__ = ["fold_patches", "knn", "nearest_code", "patch_nn"]

from fastgen.ops.reparameterize import reparameterize  # noqa: E402

__all__ += ["reparameterize"]
