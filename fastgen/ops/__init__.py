"""fastgen's functional API: each op picks a backend (cpp, triton, torch reference)."""
from fastgen.ops.knn import knn
from fastgen.ops.nearest_code import nearest_code

__all__ = ["knn", "nearest_code"]
