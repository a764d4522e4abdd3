"""Generative models built on fastgen.nn / fastgen.ops."""
import torch

from fastgen.models.autoencoder import AutoEncoder
from fastgen.models.vae import VAE


@torch.no_grad()
def sample_nn_mse(samples, data):
    """Mean over samples of the per-pixel squared distance to the nearest image of `data`
    (exact, fastgen.ops.knn). Small when samples look like data; AE prior samples score
    far worse than reconstructions or a VAE's samples."""
    from fastgen.ops import knn
    s = samples.flatten(1).float().contiguous()
    d = data.flatten(1).float().contiguous()
    dist, _ = knn(s, d, 1)
    return float(dist.mean()) / s.shape[1]


MODELS = {"ae": AutoEncoder, "vae": VAE}


def build_model(kind, config):
    """Model from its `config` dict (what checkpoints store)."""
    if kind not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {kind!r}")
    return MODELS[kind](**config)


__all__ = ["AutoEncoder", "VAE", "build_model", "sample_nn_mse", "MODELS"]

# the VQ-VAE family
from fastgen.models.pixelcnn import GatedPixelCNN  # noqa: E402
from fastgen.models.vqvae import VQVAE  # noqa: E402

MODELS.update({"vqvae": VQVAE, "pixelcnn": GatedPixelCNN})
__all__ += ["VQVAE", "GatedPixelCNN"]

# IMLE: a generator trained so every data point has a sample near it
from fastgen.models.imle import IMLE  # noqa: E402

MODELS["imle"] = IMLE
__all__ += ["IMLE"]

# GPNN: single-image patch nearest neighbours, no training, so not in MODELS
from fastgen.models.gpnn import GPNN  # noqa: E402

__all__ += ["GPNN"]

# VQ-VAE-2: two code levels, a prior per level
from fastgen.models.vqvae2 import VQVAE2, BottomPrior  # noqa: E402

MODELS.update({"vqvae2": VQVAE2, "vqvae2_top_prior": GatedPixelCNN, "vqvae2_bottom_prior": BottomPrior})
__all__ += ["VQVAE2", "BottomPrior"]

# a DALL-E-style transformer prior over VQ codes, prompted by captions
from fastgen.models.transformer import CodeTransformer  # noqa: E402

MODELS["transformer"] = CodeTransformer
__all__ += ["CodeTransformer"]

# a CLIP-style image-text scorer (re-ranks the transformer's samples)
from fastgen.models.clip import ContrastiveScorer  # noqa: E402

MODELS["clip"] = ContrastiveScorer
__all__ += ["ContrastiveScorer"]
