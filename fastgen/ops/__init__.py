"""fastgen's functional API: each op picks a backend (cpp, triton, torch reference).

Everything the README documents is importable from here:
    knn, nearest_code, patch_nn, fold_patches, reparameterize    the ops
    ball_count                                                   points in balls (precision/recall)
    PatchIndex, PatchIndexStats, prune_stats                     GPNN's reusable search
    StreamingKNN                                                 knn over keys that arrive in chunks
    Neighbours, NearestCode                                      named results (dist, idx)
"""
from fastgen.ops.ball_count import BallCounts, ball_count
from fastgen.ops.fold_patches import fold_patches
from fastgen.ops.knn import Neighbours, knn
from fastgen.ops.nearest_code import NearestCode, nearest_code
from fastgen.ops.patch_index import PatchIndex, PatchIndexStats, prune_stats
from fastgen.ops.patch_nn import patch_nn
from fastgen.ops.reparameterize import reparameterize
from fastgen.ops.streaming_knn import StreamingKNN

__all__ = ["ball_count", "BallCounts", "fold_patches", "knn", "nearest_code", "patch_nn", "reparameterize",
           "PatchIndex", "PatchIndexStats", "prune_stats", "Neighbours", "NearestCode", "StreamingKNN"]
