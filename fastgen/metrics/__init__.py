"""Sample-quality metrics on features (kNN-based; no N x M distance matrix)."""
from fastgen.metrics.prdc import precision_recall_density_coverage

__all__ = ["precision_recall_density_coverage"]
