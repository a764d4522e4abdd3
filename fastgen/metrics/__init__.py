"""Sample-quality metrics on features (kNN-based; no N x M distance matrix)."""
from fastgen.metrics.prdc import precision_recall_density_coverage
from fastgen.metrics.single_image import layout_similarity, pairwise_diversity, patch_fidelity

__all__ = ["precision_recall_density_coverage", "layout_similarity", "pairwise_diversity", "patch_fidelity"]
