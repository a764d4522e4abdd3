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
        backend: "auto" (cpp on CPU, triton on CUDA), "cpp", "triton" or "torch".
            cpp (csrc/cpu/fold_patches.cpp) and triton (fastgen/ops/triton/fold_patches.py,
            verified under TRITON_INTERPRET=1 only, never run on a GPU) gather from
            `source` directly, no (N, C*p*p) patch matrix, and sum in fp32; torch is the
            float64 unfold -> gather -> fold reference (reference.fold_patches_reference).

    Returns:
        (C, Hq + p - 1, Wq + p - 1) (or batched), in source's dtype: each pixel the mean
        over the query patches covering it of the pixel their chosen source patch has
        there. cpp and triton are not differentiable; torch is.

    Raises:
        ValueError / TypeError naming the argument on cpp and triton: idx values outside
        [0, (Hs - p + 1) * (Ws - p + 1)), idx not int64, source not float32/float16/bfloat16,
        source smaller than one patch, mismatched batch sizes.
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
    elif be == "triton":
        if source.requires_grad and torch.is_grad_enabled():
            raise ValueError("fold_patches (triton) is not differentiable: pass source.detach(), or backend='torch'")
        _check_like_cpp(src, ids, patch_size)
        from fastgen.ops.triton.fold_patches import fold_patches_triton
        out = fold_patches_triton(src, ids, patch_size)
    else:
        out = reference.fold_patches_reference(src, ids, patch_size).to(src.dtype)
    return out[0] if squeeze else out


def _check_like_cpp(source, idx, patch):
    """The checks (and messages) of csrc/cpu/fold_patches.cpp, for the Triton path: a
    kernel cannot raise, so idx's range is checked here before launching (the kernel
    itself only reads nothing for a bad value and writes NaN where it lands)."""
    if source.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"source must be float32, float16 or bfloat16, got {source.dtype}")
    B, _, Hs, Ws = source.shape
    if idx.shape[0] != B:
        raise ValueError(f"idx has batch size {idx.shape[0]} but source has {B}")
    if Hs < patch or Ws < patch:
        raise ValueError(f"source ({Hs}x{Ws}) is smaller than one patch ({patch}x{patch})")
    _validate.index_range(idx, "idx", (Hs - patch + 1) * (Ws - patch + 1), "source patch positions")

if _ext.CPP_AVAILABLE:
    @torch.library.register_fake("fastgen::fold_patches")
    def _fold_patches_fake(source, idx, patch):
        _validate.one_device(source=source, idx=idx)
        B, C = source.shape[:2]
        return source.new_empty((B, C, idx.shape[1] + patch - 1, idx.shape[2] + patch - 1))
