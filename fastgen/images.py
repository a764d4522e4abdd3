"""Image grids as PNG files (pillow), written atomically."""
import math

import numpy as np
import torch


def to_grid(images, nrow=None, pad=None, scale=None, min_side=48):
    """(N, C, H, W) in [0, 1] -> uint8 array (rows*H', cols*W', C') with a `pad`-pixel
    grey border between tiles (default: 1/12 of a tile, at least 2); small images are
    upscaled (nearest) so each tile is at least `min_side` pixels, unless `scale` is given."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("images is empty (N = 0)")
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    scale = scale or max(1, math.ceil(min_side / max(h, w)))
    x = images.detach().float().cpu().clamp(0, 1)
    if scale > 1:
        x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w = h * scale, w * scale
    pad = max(2, max(h, w) // 12) if pad is None else pad
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = nrow
    nrows = math.ceil(n / ncol)
    grid = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), 0.5)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i]
    arr = (grid * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return arr[..., 0] if c == 1 else arr


def save_grid(images, path, nrow=None, pad=None, scale=None):
    """Save (N, C, H, W) images in [0, 1] as one PNG grid at `path` (tmp file + os.replace)."""
    from PIL import Image
    from fastgen.training import atomic_write
    arr = to_grid(images, nrow=nrow, pad=pad, scale=scale)
    return atomic_write(path, lambda f: Image.fromarray(np.ascontiguousarray(arr)).save(f, format="PNG"))


# --- image files: list a folder, read one (or the built-in sample), write, contact sheet ---

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def list_image_files(folder, recursive=False):
    """Sorted image files (by extension) in `folder` (and its subfolders when recursive);
    [] when there are none. A missing folder raises FileNotFoundError, a file ValueError."""
    import os
    if not os.path.exists(folder):
        raise FileNotFoundError(f"{folder!r}: no such folder")
    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is a file, not a folder of images")
    if recursive:
        files = [os.path.join(root, n) for root, _, names in os.walk(folder) for n in names]
    else:
        files = [os.path.join(folder, n) for n in os.listdir(folder)]
    return sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(f))


def load_source_image(path=None, max_side=None):
    """(3, H, W) in [0, 1] from an image file, or sklearn's china.jpg when path is None
    (data that ships with a package: no download), shrunk to max_side as load_image."""
    if path is not None:
        return load_image(path, max_side)
    try:
        from sklearn.datasets import load_sample_image
    except ImportError:
        raise ValueError("no IMAGE given and scikit-learn (which ships the default china.jpg) "
                         "is not installed; pass an image file") from None
    x = torch.from_numpy(load_sample_image("china.jpg").copy()).permute(2, 0, 1).float().div_(255)
    return shrink_to(x, max_side)


def _pillow_limit():
    """Pillow refuses images over Image.MAX_IMAGE_PIXELS (a decompression-bomb guard);
    FASTGEN_MAX_IMAGE_PIXELS=N sets that limit for fastgen's loaders."""
    import os
    from PIL import Image
    v = os.environ.get("FASTGEN_MAX_IMAGE_PIXELS")
    if v:
        try:
            Image.MAX_IMAGE_PIXELS = int(v)
        except ValueError:
            raise ValueError(f"FASTGEN_MAX_IMAGE_PIXELS must be an integer, got {v!r}") from None
    return Image.MAX_IMAGE_PIXELS


def bomb_message(path, exc):
    return (f"cannot read image {path!r}: {exc} -- fastgen keeps Pillow's decompression-bomb "
            "limit; set FASTGEN_MAX_IMAGE_PIXELS to a larger number of pixels if the file is trusted")


def load_image(path, max_side=None, mode="RGB"):
    """Image file -> float32 (C, H, W) in [0, 1] (C = 3 for "RGB", 1 for "L"), shrunk
    (antialiased) so that its longer side is at most `max_side` when given.
    A missing file raises FileNotFoundError, an unreadable one ValueError.

    A large image is reduced while still 8-bit (JPEG: decoded at a smaller DCT scale; any
    format: integer box reduction down to about twice max_side) before the float copy,
    so a 36-megapixel photo never becomes a ~430 MB float32 tensor."""
    import os
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path!r}")
    _pillow_limit()
    try:
        with Image.open(path) as im:
            if max_side:
                w, h = im.size
                s = max_side / max(w, h)
                if s < 0.5:
                    im.draft(mode, (max(1, int(2 * w * s)), max(1, int(2 * h * s))))
                im = im.convert(mode)
                f = max(im.size) // (2 * max_side)
                if f >= 2:
                    im = im.reduce(f)
            else:
                im = im.convert(mode)
            arr = np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError as exc:
        raise ValueError(bomb_message(path, exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot read image {path!r}: {exc}") from None
    x = torch.from_numpy(arr.copy()).float().div_(255)
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    return shrink_to(x, max_side)


def shrink_to(x, max_side):
    """(C, H, W) shrunk (bicubic, antialiased, clamped) so max(H, W) <= max_side; unchanged
    when it already fits or max_side is None/0."""
    import torch.nn.functional as F
    h, w = x.shape[-2:]
    if not max_side or max(h, w) <= max_side:
        return x
    s = max_side / max(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    return F.interpolate(x[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0].clamp_(0, 1)


def save_image(x, path):
    """One (C, H, W) image in [0, 1] (C = 1 or 3) as a PNG at `path`, written atomically."""
    from fastgen.training import atomic_write
    from PIL import Image
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"x must be a (C, H, W) tensor with C = 1 or 3, got {getattr(x, 'shape', type(x))}")
    arr = (x.detach().float().cpu().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    arr = np.ascontiguousarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    return atomic_write(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))


def save_contact_sheet(images, path, nrow=None):
    """(C, H, W) images of different sizes in one PNG grid: each padded (grey, centred)
    to the largest height and width."""
    h = max(x.shape[-2] for x in images)
    w = max(x.shape[-1] for x in images)
    c = max(x.shape[0] for x in images)
    tiles = torch.full((len(images), c, h, w), 0.5)
    for t, x in zip(tiles, images):
        top, left = (h - x.shape[-2]) // 2, (w - x.shape[-1]) // 2
        t[:, top:top + x.shape[-2], left:left + x.shape[-1]] = x.detach().float().cpu().expand(c, -1, -1)
    return save_grid(tiles, path, nrow=nrow)
