"""Gradient of d = sum((q_i - k_idx)^2) w.r.t. queries and keys, shared by knn and nearest_code.

Memory is O(N * k * D), the size of the gathered neighbours, never N x M.
"""
import torch


def sqdist_backward(queries, keys, idx, grad, need_q, need_k):
    """queries (B, N, D), keys (B, M, D), idx (B, N, k), grad (B, N, k)."""
    B, N, k = idx.shape
    D = queries.shape[-1]
    flat = idx.reshape(B, N * k)
    gathered = torch.gather(keys.float(), 1, flat.unsqueeze(-1).expand(B, N * k, D)).view(B, N, k, D)
    weighted = 2.0 * grad.float().unsqueeze(-1) * (queries.float().unsqueeze(2) - gathered)
    gq = weighted.sum(2).to(queries.dtype) if need_q else None
    gk = None
    if need_k:
        gk = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device)
        gk.scatter_add_(1, flat.unsqueeze(-1).expand(B, N * k, D), -weighted.reshape(B, N * k, D))
        gk = gk.to(keys.dtype)
    return gq, gk
