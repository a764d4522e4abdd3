"""fastgen.ops.fold_patches: an image as the mean of chosen source patches (GPNN's output step)."""
import torch

from fastgen import _ext
from fastgen.ops import _backend, _validate, reference


def fold_patches(source, idx, patch_size, *, backend="auto"):
    """Average the chosen `patch_size` x `patch_size` patches of `source` into an image.

    Args:
        source: (C, Hs, Ws) or (B, C, Hs, Ws) value image, float32/float16/bfloat16.
        idx: (Hq, Wq) or (B, Hq, Wq) int64: for each query patch position (stride 1),
            the flat index `row * (Ws - p + 1) + col` of the source patch to copy.
        patch_size: p.

    Returns:
        (C, Hq + p - 1, Wq + p - 1) (or batched): each pixel the mean over the query
        patches covering it of the pixel their chosen source patch has there. The cpp
        backend gathers from `source` directly: no (N, C*p*p) patch matrix. Not
        differentiable.
    """
    if not isinstance(source, torch.Tensor) or not isinstance(idx, torch.Tensor):
        raise TypeError("source and idx must be torch.Tensors")
    if source.dim() not in (3, 4):
        raise ValueError(f"source must be (C, H, W) or (B, C, H, W), got shape {tuple(source.shape)}")
    if idx.dim() != source.dim() - 1:
        raise ValueError(f"idx must be {source.dim() - 1}-D to match source, got shape {tuple(idx.shape)}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if source.device != idx.device:
        raise ValueError(f"source is on {source.device} but idx is on {idx.device}")
    if idx.shape[-1] == 0 or idx.shape[-2] == 0:
        raise ValueError(f"idx has an empty query grid (shape {tuple(idx.shape)})")
    squeeze = source.dim() == 3
    src = source.unsqueeze(0) if squeeze else source
    ids = idx.unsqueeze(0) if squeeze else idx
    be = _backend.resolve(backend, src.device)
    if be == "cpp":
        if source.requires_grad and torch.is_grad_enabled():
            raise ValueError("fold_patches (cpp) is not differentiable: pass source.detach(), or backend='torch'")
        out = torch.ops.fastgen.fold_patches(src, ids, patch_size)
    else:
        out = reference.fold_patches_reference(src, ids, patch_size).to(src.dtype)
    return out[0] if squeeze else out


if _ext.CPP_AVAILABLE:
    @torch.library.register_fake("fastgen::fold_patches")
    def _fold_patches_fake(source, idx, patch):
        _validate.one_device(source=source, idx=idx)
        B, C = source.shape[:2]
        return source.new_empty((B, C, idx.shape[1] + patch - 1, idx.shape[2] + patch - 1))
