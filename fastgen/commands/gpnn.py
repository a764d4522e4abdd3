"""`fastgen gpnn sample|retarget|inpaint|analogy|edit`: GPNN on an image file (or folder).

    fastgen gpnn sample [IMAGE] -n 8 --out DIR          (default image: sklearn's china.jpg)
    fastgen gpnn sample --images FOLDER -n 100 --out DIR  (torchrun-ready, see fastgen.gpnn_distributed)
    fastgen gpnn retarget IMAGE --size 128x256 --out DIR
    fastgen gpnn inpaint IMAGE --mask MASK --out DIR      (mask: white = regenerate)
    fastgen gpnn analogy A B --out DIR                    (B's structure, A's patches)
    fastgen gpnn edit IMAGE EDITED --out DIR              (a rough edit/collage made coherent)

Inputs are shrunk to --max-side (default 128) on their longer side first: a quick demo
on a CPU; pass --max-side 0 for full resolution. Every output is a PNG in --out, plus
a contact sheet (*_sheet.png: the inputs and the outputs side by side).
"""
import os

from fastgen.images import load_source_image


def add_parser(sub):
    p = sub.add_parser("gpnn", help="GPNN single-image generation: sample, retarget, inpaint, analogy, edit",
                       description=__doc__.splitlines()[0])
    tasks = p.add_subparsers(dest="task", required=True)

    s = tasks.add_parser("sample", help="random images with the patches of IMAGE (or of each image in --images)")
    src = s.add_mutually_exclusive_group()
    src.add_argument("image", nargs="?", default=None, help="image file (default: sklearn's china.jpg)")
    src.add_argument("--images", default=None, help="folder of images: -n samples of each (works under torchrun)")
    s.add_argument("-n", type=int, default=8,
                   help=f"samples per image (default 8; at most {MAX_SAMPLES:,} samples in all per run)")
    s.add_argument("--size", default=None, help="output size HxW (default: the (shrunk) input's size)")
    s.add_argument("--batch", type=int, default=4, help="samples of one image matched together (default 4)")
    s.add_argument("--overwrite", action="store_true", help="redo samples whose PNG exists (default: skip them)")
    _common(s)
    s.set_defaults(func=run_sample)

    r = tasks.add_parser("retarget", help="IMAGE re-arranged to a new size")
    r.add_argument("image")
    r.add_argument("--size", required=True, help="output size HxW")
    _common(r)
    r.set_defaults(func=run_retarget)

    i = tasks.add_parser("inpaint", help="regenerate the white pixels of MASK in IMAGE")
    i.add_argument("image")
    i.add_argument("--mask", required=True, help="mask image of IMAGE's size; white (>= 128) = regenerate")
    _common(i)
    i.set_defaults(func=run_inpaint)

    a = tasks.add_parser("analogy", help="B's structure drawn with A's patches")
    a.add_argument("a", help="image that gives the patches")
    a.add_argument("b", help="image that gives the structure (and the output size)")
    _common(a)
    a.set_defaults(func=run_analogy)

    e = tasks.add_parser("edit", help="EDITED (IMAGE with pieces moved or pasted by hand) redrawn with IMAGE's patches")
    e.add_argument("image", help="the original image (gives the patches)")
    e.add_argument("edited", help="the rough edit or collage (gives the layout and the output size)")
    _common(e)
    e.set_defaults(func=run_edit)


def _common(p):
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-side", type=int, default=128,
                   help="shrink inputs so their longer side is at most this (0 = full size; default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=10, help="patch-NN iterations per pyramid level")
    p.add_argument("--patch-size", type=int, default=7)
    p.add_argument("--alpha", type=float, default=None,
                   help="normalisation (default 0.005; inpaint and edit 0.05); larger = closer to plain NN")
    p.add_argument("--noise-std", type=float, default=0.375,
                   help="std of the start's noise, [0, 1] units, drawn at full size (default 0.375)")
    p.add_argument("--diversity", type=float, default=1.0,
                   help="samples, in [0, 1]: 1 = new layouts (start from grey + noise), 0 = variations close "
                        "to the source (start from its faded coarse image); default 1")
    p.add_argument("--coarse-iterations", type=int, default=1,
                   help="samples: patch-NN iterations at the coarsest level (more = closer to the source; default 1)")
    p.add_argument("--coarse-alpha", type=float, default=0.00125,
                   help="samples: alpha at the coarsest level, where the layout is chosen (default 0.00125, the "
                        "public code's value in these units; larger = layouts closer to the source)")
    p.add_argument("--backend", default="auto", choices=["auto", "cpp", "torch"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")


def parse_size(text, name="--size"):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except (ValueError, AttributeError):
        raise ValueError(f"{name} must look like HxW (e.g. 128x256), got {text!r}") from None
    if not (1 <= h <= MAX_OUTPUT_SIDE and 1 <= w <= MAX_OUTPUT_SIDE):
        raise ValueError(f"{name} sides must be in [1, {MAX_OUTPUT_SIDE}] pixels, got {h}x{w} (every output "
                         "pixel is a patch query of every pyramid level: memory and time grow with it)")
    return h, w


# an output side past this is a typo or a resource exhaustion, not a GPNN job
MAX_OUTPUT_SIDE = 8192

# `gpnn sample` draws at most this many samples (-n x images) per run: each is seconds of
# work and a PNG, and the job list alone of -n 1000000000 took 13 GB. Split larger runs
# (--images folders, or the same command again with another --seed).
MAX_SAMPLES = 1_000_000


def _source_hw(path, max_side):
    """(H, W) an input will have after load_source_image's shrink, from the file's header
    alone (None when it cannot be read: the loader then says why)."""
    if path is None:
        h, w = 427, 640                              # sklearn's china.jpg
    else:
        import warnings
        from PIL import Image
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as im:
                    w, h = im.size
        except Exception:       # noqa: BLE001 -- the loader reports unreadable files with their name
            return None
    if max_side and max(h, w) > max_side:
        s = max_side / max(h, w)
        h, w = max(1, round(h * s)), max(1, round(w * s))
    return h, w


def gpnn_bytes(model, source_hw, output_hw, batch, channels=3):
    """An estimate of what GPNN takes at its finest pyramid level: the query patches of
    `batch` outputs (unfolded, copied for the search), the patches of the source's two key
    images (blurred and sharp indexes) and the images themselves; float32."""
    p = model.patch_size
    d = channels * p * p
    patches = lambda h, w: max(1, h - p + 1) * max(1, w - p + 1)     # noqa: E731
    return 4 * (d * (3 * batch * patches(*output_hw) + 3 * patches(*source_hw))
                + 4 * channels * batch * output_hw[0] * output_hw[1])


def _check_fits(args, model, task, source_hw, output_hw, batch, device):
    """Refuse, before anything is allocated, an output size (or batch) whose patches
    cannot fit in the memory of `device`: one line naming the flags."""
    from fastgen.commands.train import refuse_unless_fits
    if source_hw is None:
        return
    flags = f"--size {args.size}" if getattr(args, "size", None) else f"--max-side {args.max_side}"
    if batch > 1:
        flags += f", --batch {batch}"
    refuse_unless_fits(f"gpnn {task} at {output_hw[0]}x{output_hw[1]} ({flags})", 0, str(device),
                       gpnn_bytes(model, source_hw, output_hw, batch),
                       hint="use a smaller --size or --max-side" + (" or --batch" if batch > 1 else ""))


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _model(args, alpha=0.005):
    from fastgen.models.gpnn import GPNN
    if args.max_side < 0:
        raise ValueError(f"--max-side must be >= 0, got {args.max_side}")
    return GPNN(patch_size=args.patch_size, iterations=args.iterations,
                alpha=alpha if args.alpha is None else args.alpha, noise_std=args.noise_std,
                diversity=args.diversity, coarse_iterations=args.coarse_iterations, coarse_alpha=args.coarse_alpha,
                backend=args.backend, precision=args.precision)


def _device(args, rank_local=0):
    """--device checked as every command checks it (train.device_of: a ValueError naming
    the flag for a CPU-only torch, no GPU, a GPU index past the last, a typo); by default
    cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    import torch
    from fastgen.commands.train import device_of
    name = device_of(args.device)
    if args.device is None and name == "cuda":
        name = f"cuda:{rank_local}"
    return torch.device(name)


def run_sample(args):
    import torch
    from fastgen import gpnn_distributed as gd
    model = _model(args)
    size = parse_size(args.size) if args.size else None
    device = _device(args, int(os.environ.get("LOCAL_RANK", "0")))
    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    paths = gd.image_files(args.images) if args.images else [args.image]
    if args.n * len(paths) > MAX_SAMPLES:
        raise ValueError(f"-n {args.n}" + (f" x {len(paths)} images" if len(paths) > 1 else "") +
                         f" is more than the {MAX_SAMPLES:,} samples one `gpnn sample` run draws; "
                         "split it into several runs (another --seed each)")
    for p in paths:
        src = _source_hw(p, args.max_side)
        _check_fits(args, model, "sample", src, size or src, min(args.batch, args.n), device)
    rank, world, _ = gd.init_from_env()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    barrier = None
    if world > 1:
        import torch.distributed as dist
        barrier = dist.barrier
    try:
        written = gd.run_samples(model, paths, lambda p: load_source_image(p, args.max_side).to(device), args.n,
                                 args.out, seed=args.seed, output_size=size, batch=args.batch,
                                 overwrite=args.overwrite, progress=not args.no_progress,
                                 rank=rank, world=world, barrier=barrier)
    finally:
        from fastgen.distributed import leave_group
        leave_group()
    where = f" (rank {rank} of {world})" if world > 1 else ""
    print(f"wrote {len(written)} samples to {args.out}{where}")
    return 0


def run_retarget(args):
    from fastgen.images import save_contact_sheet, save_image
    model = _model(args)
    size = parse_size(args.size)
    device = _device(args)
    _check_fits(args, model, "retarget", _source_hw(args.image, args.max_side), size, 1, device)
    x = load_source_image(args.image, args.max_side).to(device)
    y = model.retarget(x, size, progress=not args.no_progress)[0].cpu()
    name = f"{_stem(args.image)}_retarget_{size[0]}x{size[1]}"
    png = save_image(y, os.path.join(args.out, name + ".png"))
    save_contact_sheet([x.cpu(), y], os.path.join(args.out, name + "_sheet.png"))
    print(f"wrote {png}")
    return 0


def run_inpaint(args):
    import torch
    import torch.nn.functional as F
    from fastgen.images import load_image, save_contact_sheet, save_image
    model = _model(args, alpha=0.05)   # the paper's editing setting: a weaker push to use every patch
    device = _device(args)
    src = _source_hw(args.image, args.max_side)
    _check_fits(args, model, "inpaint", src, src, 1, device)
    full = load_image(args.image)
    mask = load_image(args.mask, mode="L")[0]
    if tuple(mask.shape) != tuple(full.shape[-2:]):
        raise ValueError(f"--mask is {mask.shape[0]}x{mask.shape[1]} but the image is "
                         f"{full.shape[-2]}x{full.shape[-1]}; they must be the same size")
    mask = (mask >= 0.5).float()
    x = load_source_image(args.image, args.max_side)
    if tuple(x.shape[-2:]) != tuple(full.shape[-2:]):   # shrink the mask like the image: any touch = masked
        mask = (F.interpolate(mask[None, None], size=x.shape[-2:], mode="area")[0, 0] > 0).float()
    y = model.inpaint(x.to(device), mask.to(device), seed=args.seed, progress=not args.no_progress)[0].cpu()
    name = f"{_stem(args.image)}_inpaint"
    png = save_image(y, os.path.join(args.out, name + ".png"))
    holed = torch.where(mask.bool(), torch.full_like(x, 0.5), x)
    save_contact_sheet([x, holed, y], os.path.join(args.out, name + "_sheet.png"), nrow=3)
    print(f"wrote {png}")
    return 0


def _structure_task(args, patches_path, structure_path, name, alpha, call):
    """analogy / edit: the output has the structure image's layout, the patches image's
    patches; PNG + a contact sheet (patches image, structure image, output)."""
    from fastgen.images import save_contact_sheet, save_image
    model = _model(args, alpha=alpha)
    device = _device(args)
    _check_fits(args, model, name.rsplit("_", 1)[-1], _source_hw(patches_path, args.max_side),
                _source_hw(structure_path, args.max_side) or (1, 1), 1, device)
    a = load_source_image(patches_path, args.max_side).to(device)
    b = load_source_image(structure_path, args.max_side).to(device)
    y = call(model, a, b)[0].cpu()
    png = save_image(y, os.path.join(args.out, name + ".png"))
    save_contact_sheet([a.cpu(), b.cpu(), y], os.path.join(args.out, name + "_sheet.png"), nrow=3)
    print(f"wrote {png}")
    return 0


def run_analogy(args):
    return _structure_task(args, args.a, args.b, f"{_stem(args.b)}_as_{_stem(args.a)}_analogy", 0.005,
                           lambda m, a, b: m.analogy(b, a, progress=not args.no_progress))


def run_edit(args):
    # alpha 0.05 as inpaint: pasted duplicates are wanted, a weaker push to use every patch
    return _structure_task(args, args.image, args.edited, f"{_stem(args.edited)}_edit", 0.05,
                           lambda m, x, e: m.edit(x, e, progress=not args.no_progress))
