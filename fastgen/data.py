"""Datasets for the training CLI: sklearn digits (no download) and image folders.

Every dataset is a float32 tensor (N, C, H, W) with values k / (levels - 1) in [0, 1]
plus the number of quantization levels (17 for digits, 256 for 8-bit images), which
the VAE's discretized likelihood needs.
"""
import math
import os
from dataclasses import dataclass

import torch



@dataclass
class Dataset:
    train: torch.Tensor   # (N, C, H, W) float32 in [0, 1]
    test: torch.Tensor
    levels: int           # quantization levels: x = k / (levels - 1)
    source: str

    @property
    def image_shape(self):
        return tuple(self.train.shape[1:])


def split_indices(n, test_fraction, seed=0):
    """(train, test) int64 positions of `split`: a seeded permutation, both parts non-empty."""
    if n < 2:
        raise ValueError(f"need at least 2 images to split into train and test, got {n}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    return perm[n_test:], perm[:n_test]


def split(images, test_fraction, seed=0):
    """A fixed train/test split (seeded permutation), both parts non-empty."""
    tr, te = split_indices(images.shape[0], test_fraction, seed)
    return images[tr], images[te]


def load_digits(test_fraction=0.2, binarize=False, size=None):
    """sklearn's 1,797 8x8 digits (values 0..16) as (N, 1, 8, 8) in [0, 1], 17 levels."""
    from sklearn.datasets import load_digits as sk_digits
    x = torch.tensor(sk_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    levels = 17
    if size is not None and size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = torch.round(x.clamp(0, 1) * 16) / 16
    if binarize:
        x, levels = (x > 0.5).float(), 2
    train, test = split(x, test_fraction)
    return Dataset(train, test, levels, "sklearn digits")


def digits_labels(test_fraction=0.2):
    """The digit (0..9) of every image of load_digits(test_fraction): (train, test) int64,
    by the same seeded permutation as `split`."""
    from sklearn.datasets import load_digits as sk_digits
    y = torch.tensor(sk_digits().target)
    tr, te = split_indices(y.shape[0], test_fraction)
    return y[tr], y[te]


def read_captions(path, max_bytes=None):
    """{normalised relative path: caption} from a text file of lines
    'relative/path<TAB>caption': UTF-8 (a byte-order mark is dropped), lines ending in LF,
    CRLF or CR (none of them kept in the caption), blank lines skipped. Each problem is a
    ValueError naming the file and the line: no tab, an empty path or caption, a caption
    longer than `max_bytes` UTF-8 bytes, an image captioned twice, text that is not UTF-8."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--captions {path!r}: no such file (lines 'relative/path<TAB>caption')")
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    # bytes split first, so a line that is not UTF-8 is reported with its number
    lines = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    caps, where = {}, {}
    for n, b in enumerate(lines, 1):
        at = f"--captions {path!r} line {n}"
        try:
            line = b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{at} is not UTF-8 text ({e.reason} at byte {e.start + 1} of the line)") from None
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(f"{at}: expected 'relative/path<TAB>caption', got {line[:60]!r}")
        name, cap = line.split("\t", 1)
        if not name.strip():
            raise ValueError(f"{at}: the image path before the tab is empty")
        if not cap.strip():
            raise ValueError(f"{at}: the caption of {name!r} is empty")
        size = len(cap.encode("utf-8"))
        if max_bytes is not None and size > max_bytes:
            raise ValueError(f"{at}: the caption of {name!r} is {size} bytes, longer than the {max_bytes} of "
                             "--text-tokens")
        key = os.path.normpath(name)
        if key in caps:
            raise ValueError(f"{at}: {name!r} already has a caption (line {where[key]})")
        caps[key], where[key] = cap, n
    return caps


def folder_captions(folder, path, test_fraction=0.1, max_bytes=None):
    """Captions of the images of an image folder from a text file of lines
    'relative/path<TAB>caption' (read_captions; every image needs one), ordered as
    load_image_folder's (train, test) split: two lists of str."""
    files = list_images(folder)
    caps = read_captions(path, max_bytes)
    missing = [os.path.relpath(f, folder) for f in files if os.path.normpath(os.path.relpath(f, folder)) not in caps]
    if missing:
        raise ValueError(f"--captions {path!r} has no caption for {len(missing)} image(s) of {folder!r}, "
                         f"e.g. {missing[:3]}")
    ordered = [caps[os.path.normpath(os.path.relpath(f, folder))] for f in files]
    tr, te = split_indices(len(files), test_fraction)
    return [ordered[i] for i in tr.tolist()], [ordered[i] for i in te.tolist()]


def list_images(folder):
    """Image files in `folder` and its subfolders, or an error naming --data."""
    from fastgen.images import IMAGE_EXTENSIONS, list_image_files
    if not os.path.exists(folder):
        raise FileNotFoundError(f"--data {folder!r}: no such file or folder (use 'digits' or an image folder)")
    if not os.path.isdir(folder):
        raise ValueError(f"--data {folder!r} is a file; point it at a folder of images")
    files = list_image_files(folder, recursive=True)
    if not files:
        raise ValueError(f"no images found in {folder!r} (looked for {', '.join(IMAGE_EXTENSIONS)} "
                         f"in it and its subfolders)")
    return files


def _center_square(img):
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def load_image_folder(folder, size=None, grayscale=None, test_fraction=0.1, binarize=False):
    """Every image under `folder` as (N, C, H, W) in [0, 1], 256 levels.

    size: None keeps the images' own size (they must all match); an int center-crops
    each image to a square and resizes it to size x size. grayscale: None picks 1
    channel if every image is greyscale, else RGB; True/False forces it.
    Unreadable files, mixed sizes and empty folders raise ValueError naming the files.
    """
    from PIL import Image, UnidentifiedImageError

    from fastgen.images import _pillow_limit, bomb_message
    files = list_images(folder)
    imgs = []
    _pillow_limit()
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                imgs.append(im.copy())
        except Image.DecompressionBombError as exc:
            raise ValueError(bomb_message(f, exc)) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"cannot read image {f!r}: {exc}") from exc
    if grayscale is None:
        grayscale = all(im.mode in ("1", "L", "I;16", "I", "LA") for im in imgs)
    mode = "L" if grayscale else "RGB"
    if size is not None:
        if size < 1:
            raise ValueError(f"size must be a positive number of pixels, got {size}")
        imgs = [_center_square(im.convert(mode)).resize((size, size), Image.BICUBIC) for im in imgs]
    else:
        sizes = {}
        for f, im in zip(files, imgs):
            sizes.setdefault(im.size, f)
        if len(sizes) > 1:
            examples = "; ".join(f"{w}x{h} ({os.path.relpath(f, folder)})" for (w, h), f in list(sizes.items())[:3])
            raise ValueError(f"images in {folder!r} have {len(sizes)} different sizes, e.g. {examples}; "
                             f"pass --size N to center-crop and resize them all to N x N")
        imgs = [im.convert(mode) for im in imgs]
    import numpy as np
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in imgs])
    x = torch.from_numpy(arr).float().div_(255.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()
    levels = 256
    if binarize:
        x, levels = (x > 0.5).float(), 2
    train, test = split(x, test_fraction)
    return Dataset(train, test, levels, os.path.abspath(folder))


def photo_crop_boxes(count, size, height, width, strip, test_fraction, generator):
    """(train, test) lists of (image 0/1, top, left) for load_photo_crops: test crops lie
    in the last `strip` columns, training crops entirely left of them."""
    n_test = min(count - 1, max(1, round(count * test_fraction)))

    def boxes(n, x0, x1, first):
        out = []
        for i in range(n):
            y = int(torch.randint(0, height - size + 1, (1,), generator=generator))
            x = int(torch.randint(x0, x1 - size + 1, (1,), generator=generator))
            out.append(((i + first) % 2, y, x))
        return out

    return boxes(count - n_test, 0, width - strip, 0), boxes(n_test, width - strip, width, 1)


def load_photo_crops(size=None, test_fraction=0.1, binarize=False, count=2000, seed=0):
    """`count` random size x size (default 64) RGB crops of sklearn's china.jpg and
    flower.jpg (no download), 256 levels: a photo data set for VQ-VAE-2's demo.

    The test crops are held out by place: they come from a strip at the right edge of
    each photo (test_fraction of its width, at least 2 x size) that no training crop
    touches, so a test NLL measures pixels the model never saw."""
    from sklearn.datasets import load_sample_image
    size = size or 64
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    imgs = [torch.from_numpy(load_sample_image(n).copy()).permute(2, 0, 1) for n in ("china.jpg", "flower.jpg")]
    height, width = imgs[0].shape[1:]
    strip = max(math.ceil(width * test_fraction), 2 * size)
    if size > height or width - strip < size:
        raise ValueError(f"--size {size}: photo crops need room for training crops and a held-out strip of "
                         f"2 x size columns in the {height} x {width} sample images (use --size <= {width // 3})")
    train_boxes, test_boxes = photo_crop_boxes(count, size, height, width, strip, test_fraction, g)

    def cut(boxes):
        return torch.stack([imgs[i][:, y:y + size, x:x + size] for i, y, x in boxes]).float().div_(255.0)

    train, test = cut(train_boxes), cut(test_boxes)
    levels = 256
    if binarize:
        train, test, levels = (train > 0.5).float(), (test > 0.5).float(), 2
    return Dataset(train, test, levels, "random crops of sklearn's china.jpg and flower.jpg "
                                        f"(test crops from the right {strip} columns, unseen in training)")


def load(data, size=None, test_fraction=None, binarize=False):
    """--data digits|photo-crops|PATH -> Dataset."""
    if data == "digits":
        return load_digits(0.2 if test_fraction is None else test_fraction, binarize, size)
    if data == "photo-crops":
        return load_photo_crops(size, 0.1 if test_fraction is None else test_fraction, binarize)
    return load_image_folder(data, size=size, test_fraction=0.1 if test_fraction is None else test_fraction,
                             binarize=binarize)
