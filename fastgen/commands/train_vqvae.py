"""`fastgen train vqvae --data digits|PATH --epochs N --out DIR`: VQ-VAE.

Writes into DIR: checkpoint.pt, metrics.jsonl, reconstructions.png (rows of test
inputs, each above its reconstruction). `fastgen train pixelcnn --vqvae DIR/checkpoint.pt`
then trains a prior over its codes.
"""
import os

import torch

from fastgen.commands import train as train_cmd


def add_parser(families):
    p = train_cmd.family_parser(families, "vqvae", "VQ-VAE (EMA codebook, dead-code reset)", __doc__)
    train_cmd.data_arguments(p)
    train_cmd.codebook_arguments(p, num_codes=64, code_dim=16, hidden=64)
    train_cmd.quantizer_arguments(p)
    p.add_argument("--downsample", type=int, default=None,
                   help="image side / code-map side (power of 2; default 2 up to 16 px, else 4)")
    p.add_argument("--no-ema", action="store_true", help="train the codes by the codebook loss, not EMA")
    p.set_defaults(func=run)


@torch.no_grad()
def write_reconstructions(model, test, path, device):
    x = test[:32].to(device)
    return train_cmd.save_reconstructions(x, model.reconstruct(x), path)


@torch.no_grad()
def evaluate(model, test, device):
    model.eval()
    x = test.to(device)
    out = model(x)
    idx = out["indices"]
    used = torch.bincount(idx.flatten(), minlength=model.num_codes)
    return dict(test_mse=float(out["mse"]), test_perplexity=float(out["perplexity"]),
                codes_used=int((used > 0).sum()), num_codes=model.num_codes)


def run(args):
    from fastgen import training
    from fastgen.models import build_model
    device = train_cmd.setup(args)
    train_cmd.positive(args, "num_codes", "code_dim", "hidden")
    quantizer = train_cmd.quantizer_config(args)
    ckpt = train_cmd.open_run(args, "vqvae")
    ds, data_args = train_cmd.load_data(args, ckpt)
    side = min(ds.image_shape[1:])
    config = ckpt["config"] if ckpt else dict(
        image_shape=ds.image_shape, downsample=args.downsample or (2 if side <= 16 else 4), hidden=args.hidden,
        res_hidden=max(args.hidden // 2, 1), num_res_blocks=args.res_blocks, num_codes=args.num_codes,
        code_dim=args.code_dim, commitment=args.commitment, ema=not args.no_ema,
        dead_code_threshold=args.dead_code_threshold or None, **quantizer)
    torch.manual_seed(args.seed)
    model = build_model("vqvae", config).to(device)
    test = ds.test[:args.max_test] if args.max_test else ds.test
    out_png = os.path.join(args.out, "reconstructions.png")

    def describe(n_params):
        return (f"vqvae ({config.get('quantizer', 'vq')}: {model.num_codes} codes of dim {model.quantizer.dim}, code map "
                f"{model.code_shape[0]}x{model.code_shape[1]}, {n_params:,} parameters) on {ds.source}: "
                f"{ds.train.shape[0]} train / {test.shape[0]} test images of {ds.image_shape}, device {device}")
    torch.manual_seed(args.seed)   # training noise from the same seed, after the init drew its share
    training.fit(model, ds.train, kind="vqvae", config=model.config, ckpt=ckpt, **train_cmd.fit_args(args, device),
                 evaluate=lambda: evaluate(model, test, device),
                 write_pngs=lambda: write_reconstructions(model, test, out_png, device),
                 extra={"data_args": data_args}, describe=describe)
    return 0
