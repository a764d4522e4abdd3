"""`fastgen train vqvae2 --data digits --size 32 --epochs N --out DIR`: VQ-VAE-2.

Writes into DIR: checkpoint.pt, metrics.jsonl, reconstructions.png (test inputs, each
row of 8 above its reconstructions). Then
`fastgen train prior --vqvae2 DIR/checkpoint.pt --level top` (and `--level bottom`)
train the two priors, and `fastgen sample vqvae2` draws images.
"""
import os

import torch

from fastgen.commands import train as train_cmd


def add_parser(families):
    p = train_cmd.family_parser(families, "vqvae2", "VQ-VAE-2 (top and bottom code maps, EMA codebooks)", __doc__)
    train_cmd.data_arguments(p)
    train_cmd.codebook_arguments(p, num_codes=512, code_dim=64, hidden=128, levels=" (each level)")
    train_cmd.quantizer_arguments(p)
    p.set_defaults(func=run)


@torch.no_grad()
def write_reconstructions(model, test, path, device):
    x = test[:24].to(device)
    return train_cmd.save_reconstructions(x, model.reconstruct(x), path)


@torch.no_grad()
def evaluate(model, test, device):
    model.eval()
    out = model(test.to(device))
    used = [int((torch.bincount(out[k].flatten(), minlength=model.num_codes) > 0).sum()) for k in ("top", "bottom")]
    return dict(test_mse=float(out["mse"]), perplexity_top=float(out["perplexity_top"]),
                perplexity_bottom=float(out["perplexity_bottom"]), codes_used_top=used[0], codes_used_bottom=used[1])


def run(args):
    from fastgen import training
    from fastgen.models import build_model
    device = train_cmd.setup(args)
    train_cmd.positive(args, "num_codes", "code_dim", "hidden")
    quantizer = train_cmd.quantizer_config(args)
    if quantizer.pop("stages", 1) > 1 or quantizer.pop("groups", 1) > 1:
        raise ValueError("--stages / --groups (several codes per position) are options of `fastgen train vqvae`; "
                         "a vqvae2 keeps one code per position on each level")
    ckpt = train_cmd.open_run(args, "vqvae2")
    ds, data_args = train_cmd.load_data(args, ckpt)
    c, h, w = ds.image_shape
    if h % 8 or w % 8:
        raise ValueError(f"vqvae2 needs image sides divisible by 8, got {h}x{w}; pass --size (e.g. 32 for digits)")
    config = ckpt["config"] if ckpt else dict(
        image_shape=ds.image_shape, hidden=args.hidden, res_hidden=max(args.hidden // 2, 1),
        num_res_blocks=args.res_blocks, num_codes=args.num_codes, code_dim=args.code_dim,
        commitment=args.commitment, dead_code_threshold=args.dead_code_threshold or None, **quantizer)
    torch.manual_seed(args.seed)
    model = build_model("vqvae2", config).to(device)
    test = ds.test[:args.max_test] if args.max_test else ds.test
    out_png = os.path.join(args.out, "reconstructions.png")

    def describe(n_params):
        return (f"vqvae2 ({config.get('quantizer', 'vq')}: {model.num_codes} codes of dim {model.vq_t.dim} "
                f"per level, top "
                f"{model.top_shape[0]}x{model.top_shape[1]}, bottom {model.bottom_shape[0]}x{model.bottom_shape[1]}, "
                f"{n_params:,} parameters) on {ds.source}: {ds.train.shape[0]} train / {test.shape[0]} test images "
                f"of {ds.image_shape}, device {device}")
    torch.manual_seed(args.seed)
    training.fit(model, ds.train, kind="vqvae2", config=model.config, ckpt=ckpt, **train_cmd.fit_args(args, device),
                 evaluate=lambda: evaluate(model, test, device),
                 write_pngs=lambda: write_reconstructions(model, test, out_png, device),
                 extra={"data_args": data_args}, describe=describe)
    return 0
