"""fastgen: fast non-adversarial generative models on fused nearest-neighbour kernels."""
__version__ = "0.1.0"

from fastgen import ops  # noqa: E402
from fastgen.info import info  # noqa: E402

__all__ = ["ops", "info", "__version__"]
