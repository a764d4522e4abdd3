"""fastgen.models.GPNN: single-image generation by patch nearest neighbours (Granot et al., CVPR 2022).

Coarse to fine over an image pyramid: at every level each 7x7 patch (stride 1) of the
current image is replaced by the source patch that `fastgen.ops.patch_nn` picks, and the
new image is the mean of the overlapping chosen patches (`fastgen.ops.fold_patches`).
The normalised score  D_ij / (alpha + min_i' D_i'j)  pushes queries towards source patches
nobody uses yet, so the output reuses all of the source instead of collapsing onto a
few patches. No N x M distance matrix exists at any point.

Per level l (finest l = 0), with S_l the source at that level and X the current image:
    queries = patches of X (X upsampled from level l+1 before the first iteration)
    keys    = patches of upsample(S_{l+1}) on the first iteration (the "blurred"
              source: it matches the blur of the upsampled X), of S_l afterwards
    values  = patches of S_l
    X       = fold_patches(S_l, patch_nn(queries, keys, alpha))      (T times)
At the coarsest level the keys are S_L on every iteration and X starts as
S_L + noise.

Choices where public implementations differ (each is tested in tests/test_gpnn.py):

- Value range: images are float in [0, 1] in and out (as in the code published with
  the paper, read here in a public copy; Efficient-GPNN maps images to [-1, 1], which
  makes the same sigma = 0.75 half as strong relative to the image). Inputs outside [0, 1] are rejected, not rescaled.
- The start of a sample (what makes samples diverse; at diversity=1 the public
  Efficient-GPNN code's recipe, in this package's [0, 1] units): X_L = w S_L + (1 - w) 0.5
  + resize(N, coarsest shape), with w = 0.15 (1 - diversity)^2 and N ~ N(0, noise_std^2)
  drawn per pixel and channel at the output's full size and resized (antialiased) to the
  coarsest level, so the noise the coarsest level sees shrinks with the pyramid as in
  that code (its "zeros" start is 0.5 here, its sigma 0.75 in [-1, 1] is noise_std
  0.375). Measured on china.jpg at 128 px (layout similarity of a sample to the source,
  fastgen.metrics): w = 0.15 -> 0.996 (variations close to the source), 0.05 -> 0.84,
  0.025 -> 0.65, 0 -> 0.45; a start of the full source (w = 1, fastgen before 0.2)
  gives copies. The square spreads that range over diversity in [0, 1]. Not clamped (it
  only steers the first matches; every output pixel is a mean of source pixels, so
  outputs stay in [0, 1]). No noise at finer levels.
- alpha of a sample's coarsest level: coarse_alpha = 0.00125, the public code's 0.005 in
  this package's units (its distances are mean squared differences of [-1, 1] images,
  4x ours), where the choice of patches lays out the sample: the small alpha makes every
  source patch about equally attractive to a start of grey + noise, so the noise decides.
  Finer levels keep alpha = 0.005 (fidelity). Measured on 9 seeds at 128 px beside the
  public code (git: commit 534ef5e; the comparison script was not kept, so the figures
  are no longer in benchmarks/RESULTS.md): with alpha 0.005 everywhere china.jpg's
  samples were ~10 % less diverse than the public code's (pairwise 0.224 vs 0.250); with
  coarse_alpha 0.00125 0.254, and patch fidelity better on both images. retarget,
  inpaint, analogy and edit use alpha on every level (their start is not noise).
- Iterations of a sample: coarse_iterations (1) at the coarsest level, `iterations` (10)
  at every other: more coarse iterations pull the invented layout back towards the
  source's (the public code's help warns of copying). retarget, inpaint and analogy run
  `iterations` at every level.
- Structural analogy (B's structure with A's patches): the pyramid's coarsest level is
  half the output's short side (at least coarsest_side) and the start is B itself at
  that size, no noise -- the public code's style-transfer recipe (a coarse level of 200
  for a 400 output): a coarser start lets the search replace B's layout by A's.
- Distance scaling: D_ij is the MEAN squared difference over the C*p*p patch entries
  (as in the published code), so alpha = 0.005 means the same thing for any patch size
  or channel count. patch_nn works on sums, so it is called with alpha * C * p * p,
  which ranks identically.
- Pyramid: n = ceil(log(short_side / coarsest_side) / log(pyramid_ratio)) steps with
  scales (coarsest_side / short_side) ** (l / n), i.e. exactly coarsest_side on the
  short side at the top and a per-step ratio <= pyramid_ratio; aspect ratio kept on
  every level (the published code squashes the top level to a square). Resizing is
  bicubic, antialiased when shrinking, clamped to [0, 1]. Output pyramids (retarget,
  analogy) use the same scales applied to the output size, every side >= patch_size.
- Batching and reuse: the samples of one call go through the batched (B, N, D) form
  of the search. Every key image of a level gets one `fastgen.ops.PatchIndex`, shared
  by all samples and all iterations that search it: the blurred keys of iteration 0
  (a one-shot index) and the sharp keys of iterations 1 to T-1 (an incremental index:
  iteration 1 searches from scratch with iteration 0's answers as hint, later ones
  recompute only what the query patches that changed since the last iteration can
  affect -- patch_nn's answers up to the rounding of near-equal scores). How an index
  searches (pruned C++ passes on the CPU, full Triton sweeps on CUDA, chunking) is the
  index's business, not the model's.
- Seeds: sample i of `sample(..., seed=s)` uses a torch.Generator seeded s + i, so it
  equals `sample(..., num_samples=1, seed=s + i)` -- a large job split over processes
  reproduces a single run sample by sample.
- retarget adds no noise (the result is deterministic); random retargeted samples are
  `sample(image, output_size=...)`. analogy starts from the structure image itself,
  no noise; edit (a user's rough edit or collage made coherent) is the analogy with the
  edit as B and the original as A. inpaint starts from the mean colour of the kept pixels plus noise inside
  the mask; only query patches that touch the mask are matched (the others keep their
  own source patch), and keys are the source patches that do not touch the mask.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

from fastgen.ops import PatchIndex, checks, fold_patches
from fastgen.threads import fine_grained_threads

# levels with fewer output patches than this run under fastgen.threads' busy-machine policy
FINE_LEVEL_PATCHES = 16384


# _synthesize's coarse_alpha when the coarsest level uses alpha too (None means plain NN)
_ALPHA = object()
# the largest share of the source's coarse image in a sample's start (diversity=0)
SOURCE_WEIGHT = 0.15


def _resize(x, size):
    """Bicubic resize of (B, C, H, W) to `size`, antialiased when shrinking, clamped to [0, 1]."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=shrink).clamp_(0, 1)


def _patches(x, p):
    """(B, C, H, W) -> (B, (H-p+1)*(W-p+1), C*p*p): stride-1 patches, row-major positions."""
    return F.unfold(x, p).transpose(1, 2).contiguous()


class GPNN:
    """Generative Patch Nearest Neighbours: samples, retargeting, inpainting, analogies
    from one image, on fastgen.ops.patch_nn (normalised patch NN, no N x M matrix).

    Images are float tensors (C, H, W) in [0, 1]; outputs are float32 in [0, 1] on the
    input's device. See the module docstring for the algorithm and every choice made.

    Args:
        patch_size: side of the square patches (7).
        pyramid_ratio: > 1, the largest scale step between two pyramid levels (4/3).
        coarsest_side: short side of the coarsest level in pixels (14), >= patch_size.
        iterations: patch-NN iterations per level (10).
        alpha: > 0, in mean-squared-difference units (0.005 for sampling; larger =
            weaker push to use every source patch); None = plain nearest neighbour.
        noise_std: std of the start's noise, drawn at the output's full size, [0, 1]
            units (0.375 = the public code's 0.75 in [-1, 1]).
        diversity: in [0, 1]: 1 (default) starts samples from grey + noise (new
            layouts, the public code's start), 0 from the source's coarse image at 15 %
            contrast (variations close to the source); see the module docstring.
        coarse_iterations: patch-NN iterations at the coarsest level (1).
        coarse_alpha: alpha at the coarsest level of `sample` (0.00125, the public code's
            value in these units; see the module docstring); None = alpha there too.
        backend, precision: passed to fastgen.ops.PatchIndex.
        incremental: iterations 2+ of a level update the last search instead of searching
            from scratch (None: where the backend can; same answers up to the rounding of
            near-equal scores).
        on_search: optional callable(level, iteration, queries, idx, index) run after
            every search (diagnostics and tests: queries (B, N, D), idx (B, N) into the
            index's keys).

    After each call, `search_stats` lists per level and key image (level, "blurred" or
    "sharp", PatchIndexStats): how many searches were incremental and the fraction of
    distances the pruned passes computed.
    """

    def __init__(self, patch_size=7, pyramid_ratio=4 / 3, coarsest_side=14, iterations=10,
                 alpha=0.005, noise_std=0.375, backend="auto", precision="fp32", incremental=None,
                 on_search=None, diversity=1.0, coarse_iterations=1, coarse_alpha=0.00125):
        if not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if not pyramid_ratio > 1:
            raise ValueError(f"pyramid_ratio must be > 1, got {pyramid_ratio!r}")
        if not isinstance(coarsest_side, int) or coarsest_side < patch_size:
            raise ValueError(f"coarsest_side must be an int >= patch_size ({patch_size}), got {coarsest_side!r}")
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive int, got {iterations!r}")
        self.alpha = checks.alpha(alpha)     # a number (not bool or str) in [1e-30, 1e30], or None
        self.coarse_alpha = checks.alpha(coarse_alpha, "coarse_alpha")
        if not (0 <= float(noise_std) < float("inf")):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        if not (0.0 <= float(diversity) <= 1.0):
            raise ValueError(f"diversity must be in [0, 1], got {diversity!r}")
        if not isinstance(coarse_iterations, int) or isinstance(coarse_iterations, bool) or coarse_iterations < 1:
            raise ValueError(f"coarse_iterations must be a positive int, got {coarse_iterations!r}")
        self.diversity = float(diversity)
        self.coarse_iterations = coarse_iterations
        self.patch_size = patch_size
        self.pyramid_ratio = float(pyramid_ratio)
        self.coarsest_side = coarsest_side
        self.iterations = iterations
        self.noise_std = float(noise_std)
        checks.flag(incremental, "incremental")
        if on_search is not None and not callable(on_search):
            raise TypeError(f"on_search must be callable or None, got {type(on_search).__name__}")
        self.backend = backend
        self.precision = precision
        self.incremental = incremental
        self.on_search = on_search
        self.search_stats = []

    def __repr__(self):
        return (f"GPNN(patch_size={self.patch_size}, pyramid_ratio={self.pyramid_ratio:.4g}, "
                f"coarsest_side={self.coarsest_side}, iterations={self.iterations}, alpha={self.alpha}, "
                f"noise_std={self.noise_std}, diversity={self.diversity}, coarse_iterations={self.coarse_iterations}, "
                f"coarse_alpha={self.coarse_alpha}, "
                f"backend={self.backend!r}, precision={self.precision!r})")

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def sample(self, image, num_samples=1, output_size=None, seed=None, progress=True):
        """`num_samples` random images with the patches of `image`: (num_samples, C, H, W).

        output_size: (H, W) of the samples (default: the image's size); seed: int, sample i
        uses seed + i (None: drawn from torch's global generator)."""
        image = self._check_image(image, "image")
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        elif not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        return self.sample_seeds(image, [seed + i for i in range(num_samples)], output_size, progress)

    @torch.no_grad()
    def sample_seeds(self, image, seeds, output_size=None, progress=True):
        """One sample per seed in `seeds` (what `sample` and distributed jobs call)."""
        image = self._check_image(image, "image")
        seeds = list(seeds)
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"seeds must be a non-empty list of ints, got {seeds!r}")
        out_size = self._check_size(output_size, "output_size", default=image.shape[-2:])
        src = self._source_pyramid(image)
        out_shapes = self._output_shapes(image.shape[-2:], out_size, len(src))
        c = image.shape[0]
        # noise at the output's full size, shrunk with the pyramid (the public code's recipe;
        # not _resize, which clamps to [0, 1])
        noise = torch.stack([torch.randn((c,) + tuple(out_size), generator=torch.Generator().manual_seed(s))
                             for s in seeds])
        if tuple(out_size) != out_shapes[-1]:
            noise = F.interpolate(noise, size=out_shapes[-1], mode="bicubic", align_corners=False, antialias=True)
        init = 0.5 + self.noise_std * noise.to(image.device)
        w = SOURCE_WEIGHT * (1 - self.diversity) ** 2          # the source's share of the start
        if w > 0:
            init = init + w * (_resize(src[-1], out_shapes[-1]) - 0.5)
        return self._synthesize(src, out_shapes, init, progress=progress, desc="gpnn sample",
                                coarse_iterations=self.coarse_iterations,
                                coarse_alpha=self.alpha if self.coarse_alpha is None else self.coarse_alpha)

    @torch.no_grad()
    def retarget(self, image, size, progress=True):
        """`image` resized to `size` = (H, W) by re-arranging its patches (no noise:
        deterministic); (1, C, H, W)."""
        image = self._check_image(image, "image")
        size = self._check_size(size, "size")
        src = self._source_pyramid(image)
        out_shapes = self._output_shapes(image.shape[-2:], size, len(src))
        init = _resize(src[-1], out_shapes[-1])
        return self._synthesize(src, out_shapes, init, progress=progress, desc="gpnn retarget")

    @torch.no_grad()
    def inpaint(self, image, mask, seed=None, progress=True):
        """Regenerate the pixels where `mask` is 1 from the image's other patches; (1, C, H, W).

        mask: (H, W) or (1, H, W), bool or float (> 0.5 = regenerate). Keys are the source
        patches that do not touch the mask; pixels outside the mask are copied back
        unchanged after every iteration, so they equal the input exactly."""
        image = self._check_image(image, "image")
        mask = self._check_mask(mask, image)
        src = self._source_pyramid(image)
        masks = [(F.interpolate(mask[None, None], size=s.shape[-2:], mode="area") > 0) if i else mask[None, None].bool()
                 for i, s in enumerate(src)]
        p = self.patch_size
        for lvl, (s, m) in enumerate(zip(src, masks)):
            if bool(F.max_pool2d(m.float(), p, stride=1).bool().all()):
                raise ValueError(f"mask leaves no {p}x{p} source patch outside it at pyramid level {lvl} "
                                 f"({s.shape[-2]}x{s.shape[-1]}); use a smaller mask or a smaller patch_size")
        if seed is None:
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        gen = torch.Generator().manual_seed(int(seed))
        coarse, m = src[-1], masks[-1]
        keep = (~m).expand_as(coarse)
        fill = coarse[keep].view(coarse.shape[1], -1).mean(1) if bool(keep.any()) else coarse.mean((0, 2, 3))
        noise = torch.randn((1, 1) + tuple(coarse.shape[-2:]), generator=gen).to(image.device)
        init = torch.where(m, fill.view(1, -1, 1, 1) + self.noise_std * noise, coarse)
        shapes = [tuple(s.shape[-2:]) for s in src]
        return self._synthesize(src, shapes, init, masks=masks, progress=progress, desc="gpnn inpaint")

    @torch.no_grad()
    def analogy(self, structure_image, patch_image, progress=True):
        """The structure of `structure_image` (B) drawn with the patches of `patch_image` (A):
        (1, C, H_B, W_B). Both images need the same number of channels."""
        b = self._check_image(structure_image, "structure_image")
        a = self._check_image(patch_image, "patch_image")
        return self._structure_from(b, a, "structure_image", "patch_image", progress, desc="gpnn analogy")

    @torch.no_grad()
    def edit(self, image, edited, progress=True):
        """`edited` (a rough edit of `image`: objects moved, pasted or removed by hand)
        made coherent with `image`'s patches: (1, C, H_E, W_E). The paper's editing and
        collage recipe -- the analogy's, with the edit as the structure: the start is the
        edit at half its short side, keys and values come from `image`'s pyramid, so the
        edit's layout stays and its seams are redrawn with source patches. For a collage,
        paste the pieces into one canvas and pass it as `edited`."""
        image = self._check_image(image, "image")
        edited = self._check_image(edited, "edited")
        return self._structure_from(edited, image, "edited", "image", progress, desc="gpnn edit")

    @torch.no_grad()
    def _structure_from(self, b, a, b_name, a_name, progress, desc):
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"{b_name} has {b.shape[0]} channels but {a_name} has {a.shape[0]}")
        if a.device != b.device:
            raise ValueError(f"{b_name} is on {b.device} but {a_name} is on {a.device}")
        # a coarsest level of half the output's short side: B's structure survives the search
        coarsest = max(self.coarsest_side, min(b.shape[-2:]) // 2, self.patch_size)
        src = self._source_pyramid(a, coarsest)
        out_shapes = self._output_shapes(a.shape[-2:], b.shape[-2:], len(src), coarsest)
        init = _resize(b[None], out_shapes[-1])
        return self._synthesize(src, out_shapes, init, progress=progress, desc=desc)

    # ------------------------------------------------------------------ the algorithm

    def _scales(self, short, coarsest=None):
        """Scale per level, finest (1.0) first; coarsest gives `coarsest_side` on the short side."""
        coarsest = self.coarsest_side if coarsest is None else coarsest
        if short <= coarsest:
            return [1.0]
        steps = math.ceil(math.log(short / coarsest) / math.log(self.pyramid_ratio) - 1e-9)
        return [(coarsest / short) ** (lvl / steps) for lvl in range(steps + 1)]

    def _source_pyramid(self, image, coarsest=None):
        """[(1, C, h_l, w_l)] finest first; each level resized from the full image."""
        x = image[None].float()
        h, w = x.shape[-2:]
        p = self.patch_size
        return [_resize(x, (max(p, round(h * s)), max(p, round(w * s)))) for s in self._scales(min(h, w), coarsest)]

    def _output_shapes(self, src_size, out_size, levels, coarsest=None):
        p = self.patch_size
        scales = self._scales(min(src_size), coarsest)
        assert len(scales) == levels
        return [(max(p, round(out_size[0] * s)), max(p, round(out_size[1] * s))) for s in scales]

    def _index(self, keys_img, valid_keys, incremental, alpha):
        """A PatchIndex over the stride-1 patches of keys_img (those in valid_keys):
        built once per key image and level, searched by all its iterations and samples.
        alpha is per patch entry (mean squared difference); the index works on sums of
        squares over the D entries, so it gets alpha * D, which ranks identically."""
        keys = _patches(keys_img, self.patch_size)[0]
        if valid_keys is not None:
            keys = keys[valid_keys]
        alpha = None if alpha is None else alpha * keys.shape[1]
        return PatchIndex(keys, alpha, backend=self.backend, precision=self.precision, incremental=incremental)

    def _match(self, x, index, valid_keys=None, query_pos=None, hint=None, where=(0, 0)):
        """(idx (B, Hq, Wq) into the stride-1 patch grid of the key image for every patch
        of x, the raw (B, Nq) indices into the index's keys). hint: the raw indices of the
        previous iteration against the same key grid (a speed hint only)."""
        p = self.patch_size
        bsz = x.shape[0]
        hq, wq = x.shape[-2] - p + 1, x.shape[-1] - p + 1
        queries = _patches(x, p)                                       # (B, N, D)
        if query_pos is not None:
            queries = queries[:, query_pos]
        idx = index.search(queries, hint=hint)
        if self.on_search is not None:
            self.on_search(where[0], where[1], queries, idx, index)
        raw = idx
        if valid_keys is not None:
            idx = valid_keys[idx]                                      # subset -> full grid index
        if query_pos is not None:
            full = torch.arange(hq * wq, device=x.device).expand(bsz, -1).clone()  # own patch
            full[:, query_pos] = idx
            idx = full
        return idx.view(bsz, hq, wq), raw

    def _synthesize(self, src, out_shapes, init, masks=None, progress=True, desc="gpnn", coarse_iterations=None,
                    coarse_alpha=_ALPHA):
        from tqdm.auto import tqdm
        p = self.patch_size
        levels = len(src)
        x = init
        backend = self.backend
        self.search_stats = []
        coarse_iterations = self.iterations if coarse_iterations is None else coarse_iterations
        bar = tqdm(total=(levels - 1) * self.iterations + coarse_iterations, desc=desc, disable=not progress,
                   leave=False)
        try:
            for lvl in reversed(range(levels)):
                # a small level's searches are many short parallel regions: on a busy
                # machine only the free cores' threads (fastgen.threads); a large level's
                # passes are long enough for every thread to pay
                hq, wq = out_shapes[lvl]
                small = (hq - p + 1) * (wq - p + 1) < FINE_LEVEL_PATCHES
                with fine_grained_threads() if small else contextlib.nullcontext():
                    s = src[lvl]
                    h, w = out_shapes[lvl]
                    bar.set_postfix_str(f"level {levels - lvl}/{levels} {h}x{w}")
                    if lvl == levels - 1:
                        blurred = s
                    else:
                        x = _resize(x, (h, w))
                        blurred = _resize(src[lvl + 1], s.shape[-2:])
                    valid_keys = query_pos = None
                    if masks is not None:
                        m = masks[lvl]
                        touch = F.max_pool2d(m.float(), p, stride=1).flatten() > 0
                        valid_keys = torch.nonzero(~touch).flatten()
                        query_pos = torch.nonzero(touch).flatten()
                        if query_pos.numel() == 0:                         # nothing to regenerate here
                            x = s.expand(x.shape[0], -1, -1, -1).clone()
                            bar.update(coarse_iterations if lvl == levels - 1 else self.iterations)
                            continue
                    # iteration 0 searches the blurred keys once; from iteration 1 on the keys
                    # are the sharp source and only part of the image changes per iteration,
                    # which the incremental index exploits
                    alpha = self.alpha if lvl < levels - 1 or coarse_alpha is _ALPHA else coarse_alpha
                    index0 = self._index(blurred, valid_keys, incremental=False, alpha=alpha)
                    iterations = coarse_iterations if lvl == levels - 1 else self.iterations
                    index = self._index(s, valid_keys, self.incremental, alpha=alpha) if iterations > 1 else None
                    raw = None
                    for it in range(iterations):
                        # the last iteration's matches are most queries' answers again: as a
                        # hint they let the pruned search skip more (blurred and sharp keys
                        # share one patch grid)
                        idx, raw = self._match(x, index0 if it == 0 else index, valid_keys, query_pos,
                                               hint=raw if it > 0 else None, where=(lvl, it))
                        x = fold_patches(s.expand(x.shape[0], -1, -1, -1), idx, p, backend=backend)
                        if masks is not None:
                            x = torch.where(masks[lvl], x, s)
                        bar.update(1)
                    self.search_stats.append((lvl, "blurred", index0.stats))
                    if index is not None:
                        self.search_stats.append((lvl, "sharp", index.stats))
        finally:
            bar.close()
        return x

    # ------------------------------------------------------------------ argument checks

    def _check_image(self, image, name):
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (C, H, W) in [0, 1], got {type(image).__name__}")
        if image.dim() != 3:
            raise ValueError(f"{name} must be a (C, H, W) tensor, got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise TypeError(f"{name} must be a float tensor in [0, 1], got {image.dtype} "
                            "(divide 8-bit images by 255)")
        c, h, w = image.shape
        if c == 0:
            raise ValueError(f"{name} has 0 channels")
        p = self.patch_size
        if h < p or w < p:
            raise ValueError(f"{name} is {h}x{w}, smaller than one {p}x{p} patch")
        if not bool(torch.isfinite(image).all()):
            raise ValueError(f"{name} contains NaN or infinite values")
        lo, hi = float(image.min()), float(image.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(f"{name} must have values in [0, 1], got [{lo:.4g}, {hi:.4g}]")
        return image.float().clamp(0, 1)

    def _check_size(self, size, name, default=None):
        if size is None and default is not None:
            return tuple(int(s) for s in default)
        try:
            h, w = (int(s) for s in size)
            ok = (h, w) == tuple(size)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a pair of ints (H, W), got {size!r}")
        p = self.patch_size
        if h < p or w < p:
            raise ValueError(f"{name} must be at least one {p}x{p} patch, got {h}x{w}")
        return h, w

    def _check_mask(self, mask, image):
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor (H, W), got {type(mask).__name__}")
        if mask.dim() == 3 and mask.shape[0] == 1:
            mask = mask[0]
        if mask.dim() != 2 or tuple(mask.shape) != tuple(image.shape[-2:]):
            raise ValueError(f"mask must be (H, W) = {tuple(image.shape[-2:])} like image, "
                             f"got shape {tuple(mask.shape)}")
        if mask.device != image.device:
            raise ValueError(f"mask is on {mask.device} but image is on {image.device}")
        mask = mask.float()
        if not bool(torch.isfinite(mask).all()):
            raise ValueError("mask contains NaN or infinite values")
        return (mask > 0.5).float()
