"""`fastgen train MODEL ...`: every model family trains through fastgen.training.fit.

Each family lives in its own module (FAMILIES) with an `add_parser(families, common)`
that adds its subcommand(s) -- with only the flags that family reads -- and a run
function. The flags every family shares are added by `common_arguments`, the data
flags by `data_arguments`. A new training command = a new module listed here.
"""
import argparse
import importlib

import torch

FAMILIES = [
    "fastgen.commands.train_vae",        # ae, vae
    "fastgen.commands.train_vqvae",      # vqvae
    "fastgen.commands.train_pixelcnn",   # pixelcnn (a prior over a trained vqvae's codes)
    "fastgen.commands.train_imle",       # imle
    "fastgen.commands.train_vqvae2",     # vqvae2
    "fastgen.commands.train_prior",      # prior (VQ-VAE-2's top or bottom prior)
    "fastgen.commands.train_transformer",  # transformer (caption-prompted, over VQ codes)
    "fastgen.commands.train_clip",       # clip (an image-text scorer that re-ranks transformer samples)
]


def add_parser(sub):
    p = sub.add_parser("train", help="train a model (ae, vae, vqvae, pixelcnn, imle, vqvae2, prior, transformer, clip) on digits, photo crops or an image folder",
                       description=__doc__.splitlines()[0])
    families = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    for mod in FAMILIES:
        importlib.import_module(mod).add_parser(families)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default, except None (the help text says what None means)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def family_parser(families, name, help, doc):
    """A `fastgen train NAME` parser with the shared flags."""
    p = families.add_parser(name, help=help, description=doc.splitlines()[0] if doc else help,
                            formatter_class=HelpFormatter)
    common_arguments(p)
    return p


def common_arguments(p):
    p.add_argument("--epochs", type=int, required=True, help="total epochs (a resumed run continues up to this)")
    p.add_argument("--out", required=True, help="output folder (checkpoint, metrics, PNGs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="learning rate per epoch: constant, or half a cosine down to 0.05 x --lr at the last epoch")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the weights (e.g. 0.999) and evaluate, draw "
                        "the PNGs and sample with it (stored in the checkpoint)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate and write PNGs every N epochs (and at the end)")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on at most this many test images")
    p.add_argument("--batches-per-epoch", type=int, default=None, help="cap the batches in an epoch (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (small models on a busy machine often run fastest with 1)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--sample-metrics", type=int, default=0, metavar="N",
                   help="at each evaluation draw N samples and log FD, precision/recall/density/coverage "
                        "(and class coverage on digits) against the test split (fastgen eval's numbers; 0: off)")


def data_arguments(p):
    p.add_argument("--data", default=None,
                   help="'digits' (sklearn, no download), 'photo-crops' (64 px crops of sklearn's photos) or a folder of images")
    p.add_argument("--size", type=int, default=None,
                   help="center-crop and resize images to SIZE x SIZE (needed when sizes differ)")
    p.add_argument("--binarize", action="store_true", help="threshold the data at 0.5")
    p.add_argument("--test-fraction", type=float, default=None,
                   help="held-out share (default: 0.2 for digits, 0.1 for folders)")


def codebook_arguments(p, num_codes, code_dim, hidden, levels=""):
    """The VQ models' shared flags (train vqvae, train vqvae2), with the model's defaults."""
    p.add_argument("--num-codes", type=int, default=num_codes, help=f"codebook size{levels}")
    p.add_argument("--code-dim", type=int, default=code_dim, help="code dimension")
    p.add_argument("--hidden", type=int, default=hidden, help="encoder/decoder channels")
    p.add_argument("--res-blocks", type=int, default=2, help="residual blocks in encoder and decoder")
    p.add_argument("--commitment", type=float, default=None,
                   help="commitment weight beta (default 0.25; 0 for --quantizer lfq, as vector-quantize-pytorch)")
    p.add_argument("--dead-code-threshold", type=int, default=20,
                   help="re-seed codes unused for this many steps (0: never)")


def quantizer_arguments(p):
    """--quantizer and --levels (train vqvae): which quantizer (fastgen/nn/quantizers.py)."""
    p.add_argument("--quantizer", choices=("vq", "simvq", "fsq", "lfq"), default="vq",
                   help="vq: a learned codebook of --num-codes x --code-dim; simvq: a frozen random codebook "
                        "through one learned linear map; fsq: finite scalar quantization "
                        "on --levels (codes = their product); lfq: lookup-free, --num-codes a power of two")
    p.add_argument("--levels", default=None, help="FSQ levels per channel, e.g. 8,5,5,5 (--quantizer fsq)")
    p.add_argument("--entropy-weight", type=float, default=None,
                   help="--quantizer lfq: weight of the entropy penalty (default 0.1, as vector-quantize-pytorch's "
                        "entropy_loss_weight)")
    p.add_argument("--rotation-trick", action="store_true",
                   help="--quantizer vq: gradients through the rotation onto the code (Fifty et al. 2024), "
                        "not straight through")
    p.add_argument("--stages", type=int, default=1,
                   help="residual quantization: this many codes per position, each quantizing what the "
                        "earlier left (residual VQ / FSQ / LFQ)")
    p.add_argument("--groups", type=int, default=1,
                   help="grouped (multi-head) quantization: the code's channels in this many heads sharing "
                        "one quantizer, a code per head (vq: --code-dim is the total)")


def quantizer_config(args):
    """The model config entries of --quantizer, --levels and --rotation-trick, checked
    together (a ValueError naming the flag)."""
    if args.quantizer == "fsq" and not args.levels:
        raise ValueError("--quantizer fsq needs --levels, e.g. --levels 8,5,5,5")
    if args.levels and args.quantizer != "fsq":
        raise ValueError(f"--levels is for --quantizer fsq (got --quantizer {args.quantizer})")
    if args.rotation_trick and args.quantizer not in ("vq", "simvq"):
        raise ValueError(f"--rotation-trick is for --quantizer vq or simvq (got --quantizer {args.quantizer})")
    levels = parse_levels(args.levels) if args.levels else None
    if args.entropy_weight is not None and args.quantizer != "lfq":
        raise ValueError(f"--entropy-weight is for --quantizer lfq (got --quantizer {args.quantizer})")
    if args.entropy_weight is not None and not 0 <= args.entropy_weight < float("inf"):
        raise ValueError(f"--entropy-weight must be a finite number >= 0, got {args.entropy_weight}")
    weight = 0.1 if args.entropy_weight is None else args.entropy_weight
    stages, groups = getattr(args, "stages", 1), getattr(args, "groups", 1)
    for flag, v in (("--stages", stages), ("--groups", groups)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    if stages > 1 and groups > 1:
        raise ValueError("--stages and --groups do not combine; choose one")
    return dict(quantizer=args.quantizer, levels=levels, rotation_trick=args.rotation_trick, entropy_weight=weight,
                **({"stages": stages} if stages > 1 else {}), **({"groups": groups} if groups > 1 else {}))


def parse_levels(text):
    """'8,5,5,5' -> [8, 5, 5, 5]; a clear error naming --levels otherwise."""
    try:
        levels = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--levels must be integers separated by commas, e.g. 8,5,5,5 (got {text!r})") from None
    if not levels or min(levels) < 2:
        raise ValueError(f"--levels must be integers >= 2, got {text!r}")
    return levels


def save_reconstructions(x, rec, path):
    """Rows of 8 inputs, each above its 8 reconstructions, as one PNG grid."""
    from fastgen.images import save_grid
    rows = [t for i in range(0, x.shape[0], 8) for t in (x[i:i + 8], rec[i:i + 8])]
    return save_grid(torch.cat(rows).cpu(), path, nrow=8)


def positive(args, *names):
    """Each named option, when given, is >= 1 (a ValueError naming the flag)."""
    for name in names:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def setup(args):
    """Checks of the shared flags -- all before any data is loaded or any step taken --,
    the thread count; returns the device."""
    positive(args, "epochs", "batch_size", "eval_every", "max_test", "batches_per_epoch", "size", "threads")
    finite_floats(args)
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    tf = getattr(args, "test_fraction", None)
    if tf is not None and not 0 <= tf < 1:
        raise ValueError(f"--test-fraction must be in [0, 1), got {tf}")
    sm = getattr(args, "sample_metrics", 0)
    if sm < 0 or 0 < sm < 8:
        raise ValueError(f"--sample-metrics must be 0 (off) or >= 8 samples, got {sm}")
    if sm and (args.model == "vqvae" or getattr(args, "conditional", None)):
        raise ValueError("--sample-metrics: " + ("a vqvae alone draws no samples; ask `fastgen train pixelcnn` for them"
                                                  if args.model == "vqvae" else "conditional IMLE has no unconditional samples to score"))
    check_out(args.out)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # under torchrun: join the group (gloo: IMLE's merges move CPU tensors), so fit can run
    # data parallel or refuse a family that cannot; each rank on its own GPU
    import os
    from fastgen.distributed import init_from_env
    init_from_env(backend="gloo")
    device = device_of(args.device)
    if device.startswith("cuda") and ":" not in device and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def finite_floats(args):
    """Every float flag is a finite number: --lr inf or --beta nan would otherwise surface
    as NaNs somewhere inside the first step."""
    import math
    for name, v in vars(args).items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {v}")


def check_out(out):
    """--out must be (or become) a writable folder: found now, not after the first epoch.
    Leftovers of an interrupted checkpoint write (.tmp-*) are removed."""
    import os
    from fastgen.training import remove_stale_temporaries
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder")
    parent = out
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent.rstrip(os.sep))
    if parent and not os.path.isdir(parent):
        raise ValueError(f"--out {out} is below {parent}, which is a file")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out} cannot be created: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} is not writable")
    remove_stale_temporaries(out)


def device_of(name):
    """--device as a torch device this torch can use (a ValueError naming the flag)."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be cpu or cuda (or cuda:N), got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device {name}: {why} (torch {torch.__version__}); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {name!r}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return name


def available_memory(device="cpu"):
    """Bytes that new allocations on `device` can take now: CUDA's free memory on a GPU;
    on the CPU the kernel's MemAvailable (Linux), else the free physical pages; None when
    this system does not say."""
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev)[0])
        except Exception:      # noqa: BLE001 -- unknown: no check rather than a wrong one
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import os
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gib(nbytes):
    return f"{nbytes / 2 ** 30:.3g} GiB"


def refuse_unless_fits(what, host_bytes, device="cpu", device_bytes=0, hint=""):
    """A ValueError (one line, starting with `what`: the flags and values that ask for it)
    when an estimate of the memory a command is about to take exceeds what is available:
    checked before anything is allocated, so -n 1000000000 is refused at once instead of
    ending in a MemoryError (or the OOM killer) minutes later. host_bytes: CPU memory;
    device_bytes: the working set on `device` (added to host_bytes on the CPU)."""
    dev = torch.device(device)
    checks = [("", host_bytes + (device_bytes if dev.type == "cpu" else 0), "cpu")]
    if dev.type == "cuda" and device_bytes:
        checks.append((f" on {device}", device_bytes, device))
    for where, need, d in checks:
        free = available_memory(d)
        if free is not None and need > free:
            raise ValueError(f"{what} needs about {gib(need)} of memory{where} but {gib(free)} is available"
                             + (f"; {hint}" if hint else ""))


def load_data(args, ckpt):
    """(dataset, data settings): the settings of the checkpoint when resuming, else the flags."""
    from fastgen import data as datasets
    if ckpt is None and args.data is None:
        raise ValueError(f"--data is required for {args.model} ('digits' or a folder of images)")
    data_args = ckpt["data_args"] if ckpt else dict(data=args.data, size=args.size, binarize=args.binarize,
                                                     test_fraction=args.test_fraction)
    return datasets.load(data_args["data"], size=data_args["size"], test_fraction=data_args["test_fraction"],
                         binarize=data_args["binarize"]), data_args


def load_code_model(args, path, kind, device, name):
    """A trained VQ model (vqvae / vqvae2) that a prior or transformer models the codes of,
    and the dataset it was trained on: (model, checkpoint, dataset)."""
    from fastgen import training
    model, ckpt = training.load_model(path, kind, device, name=name)
    return model, ckpt, load_data(args, ckpt)[0]


@torch.no_grad()
def encode_all(model, images, device, batch=256):
    """model.encode over `images` in batches, on the CPU: a tensor of codes, or a tuple of
    them for a model with several code maps (VQ-VAE-2: top, bottom)."""
    parts = [model.encode(images[i:i + batch].to(device)) for i in range(0, images.shape[0], batch)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat([p[k] for p in parts]).cpu() for k in range(len(parts[0])))
    return torch.cat(parts).cpu()


def with_sample_metrics(args, evaluate, sample, test):
    """evaluate() plus, with --sample-metrics N, the sample-quality metrics of N samples
    (sample(n, generator) -> images) against `test`: digit features on 1-channel images,
    the pixels otherwise."""
    n = getattr(args, "sample_metrics", 0) or 0
    if n <= 0:
        return evaluate

    def run():
        from fastgen.metrics.evaluate import evaluate_samples
        row = dict(evaluate() or {})
        gen = torch.Generator(device=test.device).manual_seed(args.seed + 11)
        with torch.no_grad():
            fake = sample(n, gen).float().clamp(0, 1).cpu()
        feats = "digits" if test.shape[1] == 1 else "raw"
        m = evaluate_samples(test.cpu(), fake, features=feats, k=min(5, n - 1, test.shape[0] - 1))
        row.update({k: v for k, v in m.items() if isinstance(v, float)})
        return row
    return run


def sample_metrics_text(row):
    """The --sample-metrics part of an epoch line ('' when absent)."""
    if "fd" not in row:
        return ""
    text = (f"samples: FD {row['fd']:.1f} precision {row['precision']:.2f} recall {row['recall']:.2f} "
            f"coverage {row['coverage']:.2f}")
    return text + (f" classes {row['class_coverage']:.1f}" if "class_coverage" in row else "")


def fit_args(args, device):
    """The flags fastgen.training.fit reads (and every flag, stored in the checkpoint so a
    resumed run can refuse conflicting ones)."""
    return dict(out=args.out, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                device=device, eval_every=args.eval_every, max_batches=args.batches_per_epoch,
                show_progress=not args.quiet, flags=run_flags(args), ema=args.ema, lr_schedule=args.lr_schedule)


# flags that may differ between a run and its resumption (how long, where, how to show it)
RESUMABLE = {"epochs", "out", "resume", "quiet", "threads", "device", "eval_every", "max_test", "debug",
             "sample_metrics"}


def run_flags(args):
    """The run-defining flags of `args` as plain values (what the checkpoint records)."""
    return {k: v for k, v in vars(args).items()
            if k not in RESUMABLE and not k.startswith("_") and k not in ("func", "command", "model")
            and (v is None or isinstance(v, (bool, int, float, str)))}


def open_run(args, kind):
    """training.open_run, then on --resume: every flag given on this command line that the
    run recorded differently is refused (a resumed run would otherwise silently keep the
    checkpoint's --data, or switch --batch-size mid-run)."""
    from fastgen import training
    ckpt = training.open_run(args.out, kind, args.resume)
    if ckpt is None:
        return None
    stored = dict(ckpt.get("flags") or {})
    stored.update({k: v for k, v in (ckpt.get("data_args") or {}).items() if k not in stored})
    given = getattr(args, "_explicit", None)
    for name in sorted(given if given is not None else ()):
        if name in RESUMABLE or name not in stored:
            continue
        value = getattr(args, name, None)
        if value != stored[name]:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {value} differs from the run being resumed ({flag} {stored[name]}); "
                             f"a resumed run keeps its settings: drop {flag}, or start a new run in another --out")
    # flags not given now take the run's recorded values (a run started with --batch-size
    # 128 and resumed without it keeps 128, not the default)
    for name, value in stored.items():
        if name not in RESUMABLE and hasattr(args, name):
            setattr(args, name, value)
    return ckpt
