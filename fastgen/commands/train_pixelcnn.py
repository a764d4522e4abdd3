"""`fastgen train pixelcnn --vqvae CKPT --epochs N --out DIR`: a gated PixelCNN prior over
the code maps of a trained VQ-VAE (the images come from that run's data settings).

Writes into DIR: checkpoint.pt, metrics.jsonl and samples.png (prior samples, decoded).
"""
import math
import os

import torch

from fastgen.commands import train as train_cmd


def add_parser(families):
    p = train_cmd.family_parser(families, "pixelcnn", "PixelCNN prior over a trained vqvae's codes", __doc__)
    p.add_argument("--vqvae", metavar="CKPT", default=None,
                   help="the VQ-VAE checkpoint (from `fastgen train vqvae`) whose codes the prior models")
    p.add_argument("--prior-dim", type=int, default=64, help="channels")
    p.add_argument("--prior-layers", type=int, default=6, help="gated layers")
    p.add_argument("--prior-kernel", type=int, default=3, help="kernel width (odd)")
    context_arguments(p, "condition the prior on the image's class (digits: its digit); sample with --label")
    p.set_defaults(func=run)


def context_arguments(p, class_help):
    """--attention, --dropout and --class-conditional: the options every gated PixelCNN prior
    command shares (this one and `fastgen train prior`)."""
    p.add_argument("--attention", nargs="?", const="head", default="none", choices=["none", "head", "every"],
                   help="causal self-attention: 'head' (the flag alone) one block before the head, 'every' one "
                        "after every gated layer (PixelSNAIL-style: each position reads every earlier one)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the gated features in training")
    p.add_argument("--class-conditional", action="store_true", help=class_help)


def context_config(args):
    """The config entries of --attention and --dropout (only those not at their defaults,
    so configs of runs without them stay as they were), checked."""
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    # runs recorded before --attention took a value stored it as True / False
    attention = {"none": False, "head": True, "every": "every", True: True, False: False, None: False}[args.attention]
    return {**({"attention": attention} if attention else {}), **({"dropout": args.dropout} if args.dropout else {})}


@torch.no_grad()
def evaluate(prior, codes, device, batch=256):
    prior.eval()
    nll = torch.cat([prior(codes[i:i + batch].to(device))["nll"].cpu() for i in range(0, codes.shape[0], batch)])
    per_code = float(nll.mean()) / (prior.code_shape[0] * prior.code_shape[1])   # codes may be packed rows
    return dict(test_nll_nats_per_code=per_code, test_bits_per_code=per_code / math.log(2))


def class_labels(vq_ckpt, vq_path):
    """(train, test) class labels of the images a VQ model was trained on: the digits'
    digits; other data has no labels here."""
    from fastgen.commands.train_transformer import digits_labels
    da = vq_ckpt["data_args"]
    if da["data"] != "digits":
        raise ValueError(f"--class-conditional needs labelled images: {vq_path} was trained on {da['data']!r}; "
                         "only --data digits carries labels")
    return digits_labels(da)


def run(args):
    from fastgen import training
    from fastgen.images import save_grid
    from fastgen.models import build_model
    device = train_cmd.setup(args)
    train_cmd.positive(args, "prior_dim", "prior_layers")
    ckpt = train_cmd.open_run(args, "pixelcnn")
    context = context_config(args)       # flags checked before the codes are computed
    vq_path = training.linked_checkpoint(ckpt, "vqvae_checkpoint", args.out, f"the run in {args.out}") if ckpt \
        else args.vqvae
    if vq_path is None:
        raise ValueError("--vqvae CKPT is required for pixelcnn (a checkpoint written by `fastgen train vqvae`)")
    vqvae, vq_ckpt, ds = train_cmd.load_code_model(args, vq_path, "vqvae", device, "--vqvae")
    if ckpt:
        training.check_codebook(ckpt, f"the run in {args.out}", vq_ckpt, f"--vqvae {vq_path}")
    conditional = bool(ckpt["config"].get("num_classes")) if ckpt else args.class_conditional
    if conditional:      # labels ride along as the last column of each training row
        y_train, y_test = class_labels(vq_ckpt, vq_path)
    test_images = ds.test[:args.max_test] if args.max_test else ds.test
    train_codes = train_cmd.encode_all(vqvae, ds.train, device)
    test_codes = train_cmd.encode_all(vqvae, test_images, device)
    config = ckpt["config"] if ckpt else dict(num_codes=vqvae.num_codes, code_shape=vqvae.code_shape,
                                              dim=args.prior_dim, layers=args.prior_layers,
                                              kernel=args.prior_kernel, **context,
                                              **({"num_classes": 10} if conditional else {}))
    torch.manual_seed(args.seed)
    prior = build_model("pixelcnn", config).to(device)
    if conditional:
        train_codes, test_codes = prior.pack(train_codes, y_train), prior.pack(test_codes, y_test[:test_codes.shape[0]])
    out_png = os.path.join(args.out, "samples.png")

    @torch.no_grad()
    def write_samples():
        prior.eval()
        gen = torch.Generator(device=device).manual_seed(args.seed + 3)
        n = 80 if conditional else 64       # conditional: one column per class
        codes = prior.sample(n, labels=prior.labels_for(n, device), generator=gen, device=device)
        save_grid(vqvae.decode(codes).cpu(), out_png, nrow=10 if conditional else 8)

    def describe(n_params):
        return (f"pixelcnn prior ({config['layers']} gated layers, {n_params:,} parameters) over "
                f"{vqvae.code_shape[0]}x{vqvae.code_shape[1]} maps of {vqvae.num_codes} codes from {vq_path}: "
                f"{train_codes.shape[0]} train / {test_codes.shape[0]} test maps, device {device}")
    torch.manual_seed(args.seed)   # training noise from the same seed, after the init drew its share
    training.fit(prior, train_codes, kind="pixelcnn", config=prior.config, ckpt=ckpt,
                 **train_cmd.fit_args(args, device), evaluate=train_cmd.with_sample_metrics(
                     args, lambda: evaluate(prior, test_codes, device),
                     lambda n, g: vqvae.decode(prior.eval().sample(n, labels=prior.labels_for(n, device), generator=g,
                                                                   device=device)), test_images.to(device)),
                 write_pngs=write_samples, describe=describe,
                 extra={**training.link_entries("vqvae_checkpoint", vq_path, args.out),
                        training.FINGERPRINT: training.codebook_fingerprint(vq_ckpt["model"])})
    return 0
