"""Sample-quality metrics: on features (kNN balls with no N x M distance matrix, the
Frechet distance, digit features and class coverage) and on single images (GPNN)."""
from fastgen.metrics.frechet import FeatureStats, frechet_distance
from fastgen.metrics.prdc import precision_recall_density_coverage
from fastgen.metrics.single_image import (layout_similarity, pairwise_diversity, patch_fidelity, patch_swd,
                                          pixel_diversity)

__all__ = ["frechet_distance", "FeatureStats", "precision_recall_density_coverage", "layout_similarity", "pairwise_diversity", "patch_fidelity",
           "pixel_diversity", "patch_swd"]
