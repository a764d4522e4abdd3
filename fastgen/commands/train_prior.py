"""`fastgen train prior --vqvae2 CKPT --level top|bottom --epochs N --out DIR`: one of
VQ-VAE-2's two priors, over the codes of a trained vqvae2 (its data, its split).

top: a gated PixelCNN over the top maps; bottom: a gated PixelCNN over the bottom maps
conditioned on the top codes (fastgen.models.vqvae2). Writes checkpoint.pt,
metrics.jsonl.

The PixelSNAIL-style priors of the public VQ-VAE-2 code: `--attention every` (causal
self-attention after every gated layer: every position reads the whole past),
`--dropout 0.1`, and for the bottom prior `--cond-blocks 2` (a residual stack over the
top codes before they condition each layer).
"""
import os

import torch

from fastgen.commands import train as train_cmd


def add_parser(families):
    p = train_cmd.family_parser(families, "prior", "a VQ-VAE-2 prior (--level top or bottom)", __doc__)
    p.add_argument("--vqvae2", default=None, help="checkpoint.pt written by `fastgen train vqvae2`")
    p.add_argument("--level", choices=["top", "bottom"], default=None, help="which code maps to model")
    p.add_argument("--prior-dim", type=int, default=64, help="channels of the gated stacks")
    p.add_argument("--prior-layers", type=int, default=8, help="gated layers")
    p.add_argument("--prior-kernel", type=int, default=3, help="odd kernel width")
    from fastgen.commands.train_pixelcnn import context_arguments
    context_arguments(p, "top prior only: condition on the image's class (digits: its digit); sample with --label")
    p.add_argument("--cond-blocks", type=int, default=0,
                   help="bottom prior only: residual blocks over the top codes before they condition the layers")
    p.set_defaults(func=run, lr=3e-4)


def run(args):
    from fastgen import training
    from fastgen.commands.train_pixelcnn import class_labels, context_config
    from fastgen.models import build_model
    device = train_cmd.setup(args)
    train_cmd.positive(args, "prior_dim", "prior_layers")
    level = args.level
    existing = os.path.join(args.out, "checkpoint.pt")
    if level is None and args.resume and os.path.isfile(existing):
        level = training.load_checkpoint(existing).get("level")
    if level is None:
        raise ValueError("--level top|bottom is required")
    kind = f"vqvae2_{level}_prior"
    ckpt = train_cmd.open_run(args, kind)
    # every flag checked before the codes are computed
    if args.cond_blocks and level != "bottom":
        raise ValueError("--cond-blocks is an option of the bottom prior (--level bottom)")
    if args.cond_blocks < 0:
        raise ValueError(f"--cond-blocks must be >= 0, got {args.cond_blocks}")
    if args.class_conditional and level != "top":
        raise ValueError("--class-conditional is an option of the top prior (--level top); the bottom prior "
                         "follows the top codes")
    context = context_config(args)
    vq_path = training.linked_checkpoint(ckpt, "vqvae2_checkpoint", args.out, f"the run in {args.out}") if ckpt \
        else args.vqvae2
    if vq_path is None:
        raise ValueError("--vqvae2 CKPT is required (a checkpoint written by `fastgen train vqvae2`)")
    vq, vq_ckpt, ds = train_cmd.load_code_model(args, vq_path, "vqvae2", device, "--vqvae2")
    if ckpt:
        training.check_codebook(ckpt, f"the run in {args.out}", vq_ckpt, f"--vqvae2 {vq_path}")
    conditional = bool(ckpt["config"].get("num_classes")) if ckpt else args.class_conditional
    if conditional:
        y_train, y_test = class_labels(vq_ckpt, vq_path)
    test_images = ds.test[:args.max_test] if args.max_test else ds.test
    tr_t, tr_b = train_cmd.encode_all(vq, ds.train, device)
    te_t, te_b = train_cmd.encode_all(vq, test_images, device)
    shape = vq.top_shape if level == "top" else vq.bottom_shape
    config = ckpt["config"] if ckpt else dict(num_codes=vq.num_codes, code_shape=shape, dim=args.prior_dim,
                                              layers=args.prior_layers, kernel=args.prior_kernel,
                                              **context,
                                              **({"cond_blocks": args.cond_blocks} if args.cond_blocks else {}),
                                              **({"num_classes": 10} if conditional else {}))
    torch.manual_seed(args.seed)
    prior = build_model(kind, config).to(device)
    # what training iterates over: the top maps, or packed (bottom, top) rows
    if conditional:
        train_data, test_data = prior.pack(tr_t, y_train), prior.pack(te_t, y_test[:te_t.shape[0]])
    else:
        train_data, test_data = (tr_t, te_t) if level == "top" else (prior.pack(tr_b, tr_t), prior.pack(te_b, te_t))

    @torch.no_grad()
    def evaluate():
        prior.eval()
        nll = float(prior(test_data.to(device))["loss"])
        return dict(test_nll_nats_per_code=nll, test_bits_per_code=nll / 0.6931471805599453)

    def write_samples():      # samples need both priors: `fastgen sample vqvae2`
        return None

    def describe(n_params):
        return (f"vqvae2 {level} prior ({config['layers']} gated layers, {n_params:,} parameters) over "
                f"{config['code_shape'][0]}x{config['code_shape'][1]} maps of {vq.num_codes} codes from {vq_path}: "
                f"{train_data.shape[0]} train / {test_data.shape[0]} test maps, device {device}")
    torch.manual_seed(args.seed)
    training.fit(prior, train_data, kind=kind, config=config, ckpt=ckpt,
                 **train_cmd.fit_args(args, device), evaluate=evaluate, write_pngs=write_samples,
                 extra={**training.link_entries("vqvae2_checkpoint", vq_path, args.out), "level": level,
                        training.FINGERPRINT: training.codebook_fingerprint(vq_ckpt["model"])},
                 describe=describe)
    return 0
