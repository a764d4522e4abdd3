"""Drop-in nn.Modules built only on fastgen.ops."""
from fastgen.nn.gaussian_latent import GaussianLatent, LatentSample

__all__ = ["GaussianLatent", "LatentSample"]

from fastgen.nn.vector_quantizer import ResidualVQ, VectorQuantizer, VQOutput  # noqa: E402

__all__ += ["VectorQuantizer", "ResidualVQ", "VQOutput"]

from fastgen.nn.fsq import FSQ  # noqa: E402

__all__ += ["FSQ"]

from fastgen.nn.lfq import LFQ  # noqa: E402

__all__ += ["LFQ"]

from fastgen.nn.quantizers import QUANTIZERS, make_quantizer  # noqa: E402

__all__ += ["QUANTIZERS", "make_quantizer"]

from fastgen.nn.residual import ResidualFSQ, ResidualLFQ, ResidualQuantizer  # noqa: E402

__all__ += ["ResidualQuantizer", "ResidualFSQ", "ResidualLFQ"]

from fastgen.nn.grouped import GroupedQuantizer  # noqa: E402

__all__ += ["GroupedQuantizer"]
