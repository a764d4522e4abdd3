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
]


def add_parser(sub):
    p = sub.add_parser("train", help="train a model (ae, vae, vqvae, pixelcnn) on digits or an image folder",
                       description=__doc__.splitlines()[0])
    families = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    for mod in FAMILIES:
        importlib.import_module(mod).add_parser(families)


def family_parser(families, name, help, doc):
    """A `fastgen train NAME` parser with the shared flags."""
    p = families.add_parser(name, help=help, description=doc.splitlines()[0] if doc else help,
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common_arguments(p)
    return p


def common_arguments(p):
    p.add_argument("--epochs", type=int, required=True, help="total epochs (a resumed run continues up to this)")
    p.add_argument("--out", required=True, help="output folder (checkpoint, metrics, PNGs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=1, help="evaluate and write PNGs every N epochs (and at the end)")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on at most this many test images")
    p.add_argument("--batches-per-epoch", type=int, default=None, help="cap the batches in an epoch (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (small models on a busy machine often run fastest with 1)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def data_arguments(p):
    p.add_argument("--data", default=None, help="'digits' (sklearn, no download) or a folder of images")
    p.add_argument("--size", type=int, default=None,
                   help="center-crop and resize images to SIZE x SIZE (needed when sizes differ)")
    p.add_argument("--binarize", action="store_true", help="threshold the data at 0.5")
    p.add_argument("--test-fraction", type=float, default=None, help="held-out share (default 0.2 digits, 0.1 folders)")


def positive(args, *names):
    """Each named option, when given, is >= 1 (a ValueError naming the flag)."""
    for name in names:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def setup(args):
    """Checks of the shared flags, the thread count; returns the device."""
    positive(args, "epochs", "batch_size", "eval_every", "max_test", "batches_per_epoch", "size", "threads")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_data(args, ckpt):
    """(dataset, data settings): the settings of the checkpoint when resuming, else the flags."""
    from fastgen import data as datasets
    if ckpt is None and args.data is None:
        raise ValueError(f"--data is required for {args.model} ('digits' or a folder of images)")
    data_args = ckpt["data_args"] if ckpt else dict(data=args.data, size=args.size, binarize=args.binarize,
                                                     test_fraction=args.test_fraction)
    return datasets.load(data_args["data"], size=data_args["size"], test_fraction=data_args["test_fraction"],
                         binarize=data_args["binarize"]), data_args


def fit_args(args, device):
    """The flags fastgen.training.fit reads."""
    return dict(out=args.out, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                device=device, eval_every=args.eval_every, max_batches=args.batches_per_epoch,
                show_progress=not args.quiet)
