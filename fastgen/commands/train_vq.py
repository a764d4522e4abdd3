"""`fastgen train vqvae` and `fastgen train pixelcnn --vqvae CKPT` (the VQ-VAE family).

Hooked into `fastgen train` (fastgen/commands/train.py) and `fastgen sample vqvae`
(fastgen/commands/sample.py); shares their checkpoint format, data loading, progress
bar and PNG helpers (fastgen.training, fastgen.data, fastgen.images).

vqvae writes into OUT: checkpoint.pt, metrics.jsonl, reconstructions.png (rows of test
inputs, each above its reconstruction). pixelcnn trains a gated PixelCNN prior on the
code maps of a trained VQ-VAE (the images come from that run's data settings) and
writes checkpoint.pt, metrics.jsonl and samples.png (prior samples, decoded).
"""
import math
import os
import time

import torch

CHECKPOINT = "checkpoint.pt"
MODELS = ("vqvae", "pixelcnn")


def add_arguments(p):
    """The options only the VQ-VAE family uses (the shared ones live in train.py)."""
    g = p.add_argument_group("vqvae / pixelcnn")
    g.add_argument("--vqvae", metavar="CKPT", default=None,
                   help="pixelcnn: the VQ-VAE checkpoint whose codes the prior models")
    g.add_argument("--num-codes", type=int, default=64, help="vqvae: codebook size")
    g.add_argument("--code-dim", type=int, default=16, help="vqvae: code dimension")
    g.add_argument("--downsample", type=int, default=None,
                   help="vqvae: image side / code-map side (power of 2; default 2 up to 16 px, else 4)")
    g.add_argument("--hidden", type=int, default=64, help="vqvae: encoder/decoder channels")
    g.add_argument("--res-blocks", type=int, default=2, help="vqvae: residual blocks in encoder and decoder")
    g.add_argument("--commitment", type=float, default=0.25, help="vqvae: commitment weight beta")
    g.add_argument("--no-ema", action="store_true", help="vqvae: train the codes by the codebook loss, not EMA")
    g.add_argument("--dead-code-threshold", type=int, default=20,
                   help="vqvae: re-seed codes unused for this many steps (0: never)")
    g.add_argument("--prior-dim", type=int, default=64, help="pixelcnn: channels")
    g.add_argument("--prior-layers", type=int, default=6, help="pixelcnn: gated layers")
    g.add_argument("--prior-kernel", type=int, default=3, help="pixelcnn: kernel width (odd)")


def _positive(args, *names):
    for name in names:
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def _setup(args):
    _positive(args, "epochs", "batch_size", "eval_every", "max_test", "batches_per_epoch", "size",
              "num_codes", "code_dim", "hidden", "prior_dim", "prior_layers")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.threads is not None:
        _positive(args, "threads")
        torch.set_num_threads(args.threads)
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _open_run(args):
    """The existing checkpoint in OUT when resuming (None for a fresh run)."""
    from fastgen import training
    path = os.path.join(args.out, CHECKPOINT)
    if not os.path.exists(path):
        return None
    if not args.resume:
        raise ValueError(f"{path} exists; pass --resume to continue that run or choose another --out")
    ckpt = training.load_checkpoint(path)
    if ckpt["kind"] != args.model:
        raise ValueError(f"{path} holds a {ckpt['kind']!r} model but you asked to train {args.model!r}")
    return ckpt


def load_vqvae(path, device="cpu"):
    """(model in eval mode, checkpoint dict) from a `fastgen train vqvae` checkpoint."""
    from fastgen import training
    from fastgen.models import build_model
    ckpt = training.load_checkpoint(path)
    if ckpt["kind"] != "vqvae":
        raise ValueError(f"{path} holds a {ckpt['kind']!r} model, not a vqvae")
    model = build_model("vqvae", ckpt["config"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


@torch.no_grad()
def encode_all(model, images, device, batch=256):
    return torch.cat([model.encode(images[i:i + batch].to(device)).cpu() for i in range(0, images.shape[0], batch)])


@torch.no_grad()
def write_reconstructions(model, test, path, device):
    from fastgen.images import save_grid
    x = test[:32].to(device)
    rec = model.reconstruct(x)
    rows = [t for i in range(0, x.shape[0], 8) for t in (x[i:i + 8], rec[i:i + 8])]  # inputs above reconstructions
    return save_grid(torch.cat(rows).cpu(), path, nrow=8)


@torch.no_grad()
def evaluate_vqvae(model, test, device):
    model.eval()
    x = test.to(device)
    out = model(x)
    idx = out["indices"]
    used = torch.bincount(idx.flatten(), minlength=model.num_codes)
    return dict(test_mse=float(out["mse"]), test_perplexity=float(out["perplexity"]),
                codes_used=int((used > 0).sum()), num_codes=model.num_codes)


@torch.no_grad()
def evaluate_prior(prior, codes, device, batch=256):
    prior.eval()
    nll = torch.cat([prior(codes[i:i + batch].to(device))["nll"].cpu() for i in range(0, codes.shape[0], batch)])
    per_code = float(nll.mean()) / (codes.shape[1] * codes.shape[2])
    return dict(test_nll_nats_per_code=per_code, test_bits_per_code=per_code / math.log(2))


def run(args):
    device = _setup(args)
    if args.model == "vqvae":
        return _run_vqvae(args, device)
    return _run_pixelcnn(args, device)


def _save(args, ckpt_path, model, optimizer, epoch, history, data_gen, extra):
    from fastgen import training
    training.save_checkpoint({
        "format": training.CHECKPOINT_FORMAT, "kind": args.model, "config": model.config,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr": optimizer.param_groups[0]["lr"],
        "epoch": epoch, "history": history, "rng": training.rng_state(data_gen), **extra,
    }, ckpt_path)


def _fit(args, model, train_data, ckpt, device, evaluate, write_pngs, extra, describe):
    """The epoch loop shared by both models: train, evaluate, PNGs, metrics, checkpoint."""
    from fastgen import training
    torch.manual_seed(args.seed)
    data_gen = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=ckpt["lr"] if ckpt else args.lr)
    history, start = [], 0
    ckpt_path = os.path.join(args.out, CHECKPOINT)
    if ckpt:
        history, start, done = training.resume(ckpt, model, optimizer, data_gen, ckpt_path, args.epochs)
        if done:
            return 0
    print(describe(sum(p.numel() for p in model.parameters())))
    for epoch in range(start, args.epochs):
        t0 = time.time()
        train_loss = training.train_epoch(model, optimizer, train_data, args.batch_size, data_gen,
                                          max_batches=args.batches_per_epoch, show_progress=not args.quiet,
                                          desc=f"epoch {epoch + 1}/{args.epochs}", device=device)
        row = {"epoch": epoch + 1, "train_loss": train_loss}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            row.update(evaluate())
            write_pngs()
        row["seconds"] = round(time.time() - t0, 3)
        history.append(row)
        training.write_jsonl(history, os.path.join(args.out, "metrics.jsonl"))
        _save(args, ckpt_path, model, optimizer, epoch + 1, history, data_gen, extra)
        print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
              flush=True)
    return 0


def _run_vqvae(args, device):
    from fastgen import data as datasets
    from fastgen.models import build_model
    if args.data is None:
        raise ValueError("--data is required for vqvae ('digits' or a folder of images)")
    ckpt = _open_run(args)
    data_args = ckpt["data_args"] if ckpt else dict(data=args.data, size=args.size, binarize=args.binarize,
                                                     test_fraction=args.test_fraction)
    ds = datasets.load(data_args["data"], size=data_args["size"], test_fraction=data_args["test_fraction"],
                       binarize=data_args["binarize"])
    side = min(ds.image_shape[1:])
    config = ckpt["config"] if ckpt else dict(
        image_shape=ds.image_shape, downsample=args.downsample or (2 if side <= 16 else 4), hidden=args.hidden,
        res_hidden=max(args.hidden // 2, 1), num_res_blocks=args.res_blocks, num_codes=args.num_codes,
        code_dim=args.code_dim, commitment=args.commitment, ema=not args.no_ema,
        dead_code_threshold=args.dead_code_threshold or None)
    torch.manual_seed(args.seed)
    model = build_model("vqvae", config).to(device)
    test = ds.test[:args.max_test] if args.max_test else ds.test
    out_png = os.path.join(args.out, "reconstructions.png")

    def describe(n_params):
        return (f"vqvae ({config['num_codes']} codes of dim {config['code_dim']}, code map "
                f"{model.code_shape[0]}x{model.code_shape[1]}, {n_params:,} parameters) on {ds.source}: "
                f"{ds.train.shape[0]} train / {test.shape[0]} test images of {ds.image_shape}, device {device}")
    return _fit(args, model, ds.train, ckpt, device, lambda: evaluate_vqvae(model, test, device),
                lambda: write_reconstructions(model, test, out_png, device), {"data_args": data_args}, describe)


def _run_pixelcnn(args, device):
    from fastgen import data as datasets
    from fastgen.images import save_grid
    from fastgen.models import build_model
    ckpt = _open_run(args)
    vq_path = ckpt["vqvae_checkpoint"] if ckpt else args.vqvae
    if vq_path is None:
        raise ValueError("--vqvae CKPT is required for pixelcnn (a checkpoint written by `fastgen train vqvae`)")
    vqvae, vq_ckpt = load_vqvae(vq_path, device)
    da = vq_ckpt["data_args"]
    ds = datasets.load(da["data"], size=da["size"], test_fraction=da["test_fraction"], binarize=da["binarize"])
    test_images = ds.test[:args.max_test] if args.max_test else ds.test
    train_codes, test_codes = encode_all(vqvae, ds.train, device), encode_all(vqvae, test_images, device)
    config = ckpt["config"] if ckpt else dict(num_codes=vqvae.num_codes, code_shape=vqvae.code_shape,
                                              dim=args.prior_dim, layers=args.prior_layers,
                                              kernel=args.prior_kernel)
    torch.manual_seed(args.seed)
    prior = build_model("pixelcnn", config).to(device)
    out_png = os.path.join(args.out, "samples.png")

    @torch.no_grad()
    def write_samples():
        prior.eval()
        gen = torch.Generator(device=device).manual_seed(args.seed + 3)
        codes = prior.sample(64, generator=gen, device=device)
        save_grid(vqvae.decode(codes).cpu(), out_png, nrow=8)

    def describe(n_params):
        return (f"pixelcnn prior ({config['layers']} gated layers, {n_params:,} parameters) over "
                f"{vqvae.code_shape[0]}x{vqvae.code_shape[1]} maps of {vqvae.num_codes} codes from {vq_path}: "
                f"{train_codes.shape[0]} train / {test_codes.shape[0]} test maps, device {device}")
    return _fit(args, prior, train_codes, ckpt, device, lambda: evaluate_prior(prior, test_codes, device),
                write_samples, {"vqvae_checkpoint": os.path.abspath(vq_path)}, describe)


# ---- `fastgen sample vqvae --checkpoint VQ --prior PIXELCNN` ---------------------------------

def add_sample_arguments(p):
    p.add_argument("--prior", metavar="CKPT", default=None,
                   help="vqvae: the pixelcnn checkpoint (from `fastgen train pixelcnn`) that samples the codes")
    p.add_argument("--temperature", type=float, default=1.0, help="vqvae: softmax temperature of the prior")


@torch.no_grad()
def sample(args):
    from fastgen import training
    from fastgen.images import save_grid
    from fastgen.models import build_model
    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    if args.prior is None:
        raise ValueError("--prior CKPT is required to sample a vqvae (train one with `fastgen train pixelcnn`)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vqvae, vq_ckpt = load_vqvae(args.checkpoint, device)
    pc = training.load_checkpoint(args.prior)
    if pc["kind"] != "pixelcnn":
        raise ValueError(f"--prior {args.prior} holds a {pc['kind']!r} model, not a pixelcnn")
    prior = build_model("pixelcnn", pc["config"]).to(device)
    prior.load_state_dict(pc["model"])
    prior.eval()
    if prior.num_codes != vqvae.num_codes or tuple(prior.code_shape) != tuple(vqvae.code_shape):
        raise ValueError(f"--prior models {prior.num_codes} codes on {prior.code_shape} maps but the vqvae has "
                         f"{vqvae.num_codes} codes on {vqvae.code_shape} maps")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    codes = prior.sample(args.n, generator=gen, device=device, temperature=args.temperature)
    x = vqvae.decode(codes).cpu()
    os.makedirs(args.out, exist_ok=True)
    png = save_grid(x, os.path.join(args.out, "samples.png"), nrow=args.nrow)
    torch.save({"images": x, "codes": codes.cpu()}, os.path.join(args.out, "samples.pt"))
    print(f"wrote {args.n} samples (vqvae epoch {vq_ckpt['epoch']}, prior epoch {pc['epoch']}) to {png} "
          f"and samples.pt")
    return 0
