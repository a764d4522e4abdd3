"""`fastgen train ae|vae --data digits|PATH --epochs N --out DIR`.

Writes into DIR: checkpoint.pt (atomic, every epoch; --resume continues it with the
same data order and noise), metrics.jsonl (one line per epoch), and PNGs:
reconstructions.png (input rows above their reconstructions), samples.png (decoded
z ~ N(0, I)), interpolations.png (rows of decodes between two test images' codes).
"""
import argparse
import os
import time

import torch

CHECKPOINT = "checkpoint.pt"


def add_parser(sub):
    p = sub.add_parser("train", help="train an autoencoder or VAE on digits or an image folder",
                       description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", choices=["ae", "vae", "vqvae", "pixelcnn"],
                   help="ae: deterministic autoencoder; vae: VAE with N(0, I) prior; vqvae: VQ-VAE; "
                        "pixelcnn: a PixelCNN prior over a trained VQ-VAE's codes (--vqvae CKPT)")
    p.add_argument("--data", default=None,
                   help="'digits' (sklearn, no download) or a folder of images (required except for pixelcnn)")
    p.add_argument("--epochs", type=int, required=True, help="total epochs (a resumed run continues up to this)")
    p.add_argument("--out", required=True, help="output folder (checkpoint, metrics, PNGs)")
    p.add_argument("--arch", choices=["mlp", "conv"], default="mlp", help="encoder/decoder networks")
    p.add_argument("--latent-dim", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=1.0, help="KL weight (vae)")
    p.add_argument("--likelihood", choices=["gaussian", "bernoulli"], default="gaussian", help="p(x|z) (vae)")
    p.add_argument("--variance", choices=["pixel", "global"], default="pixel",
                   help="learned decoder variance per pixel or one for the image (vae, gaussian)")
    p.add_argument("--loss", choices=["mse", "bce"], default="mse", help="reconstruction loss (ae)")
    p.add_argument("--size", type=int, default=None,
                   help="center-crop and resize images to SIZE x SIZE (needed when sizes differ)")
    p.add_argument("--binarize", action="store_true", help="threshold the data at 0.5 (for the Bernoulli decoder)")
    p.add_argument("--test-fraction", type=float, default=None, help="held-out share (default 0.2 digits, 0.1 folders)")
    p.add_argument("--iwae-k", type=int, default=64, help="importance samples for the test-set log p(x) bound (vae)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate and write PNGs every N epochs (and at the end)")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on at most this many test images")
    p.add_argument("--batches-per-epoch", type=int, default=None, help="cap the batches in an epoch (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (small models on a busy machine often run fastest with 1)")
    p.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT} if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    # --- VQ-VAE family (issue 4): its own options and run, in fastgen/commands/train_vq.py ---
    from fastgen.commands import train_vq
    train_vq.add_arguments(p)
    p.set_defaults(func=run)


def _check_args(args):
    for name in ("epochs", "latent_dim", "batch_size", "iwae_k", "eval_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_test", "batches_per_epoch", "size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.beta < 0:
        raise ValueError(f"--beta must be >= 0, got {args.beta}")


def model_config(args, ds):
    if args.model == "vae":
        return dict(image_shape=ds.image_shape, latent_dim=args.latent_dim, arch=args.arch,
                    likelihood=args.likelihood, variance=args.variance, levels=ds.levels, beta=args.beta)
    return dict(image_shape=ds.image_shape, latent_dim=args.latent_dim, arch=args.arch, loss=args.loss)


@torch.no_grad()
def evaluate(model, kind, test, train, iwae_k, seed, device):
    """Test-set numbers for one epoch; the eval noise is seeded so epochs compare."""
    from fastgen.models import sample_nn_mse
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = test.to(device)
    m = {}
    if kind == "vae":
        torch_state = torch.get_rng_state()
        torch.manual_seed(seed + 2)  # the ELBO's own noise, without disturbing training's RNG
        out = model(x)
        torch.set_rng_state(torch_state)
        m["test_loss"] = float(out["loss"])
        m["test_elbo_nats"] = float(out["elbo"].mean())
        m["test_kl_nats"] = float(out["kl"].mean())
        log_px = model.iwae(x, k=iwae_k, generator=gen)
        m["test_iwae_nats"] = float(log_px.mean())
        m["test_iwae_bits_per_dim"] = float(model.bits_per_dim(log_px.mean()))
        m["iwae_k"] = iwae_k
    else:
        m["test_loss"] = float(model(x)["loss"])
        m.update(model.latent_stats(x))
    samples = model.sample(min(256, max(16, x.shape[0])), generator=gen, device=device)
    # how far samples from N(0, I) fall from real images, next to the reconstructions
    m["prior_sample_nn_mse"] = sample_nn_mse(samples.cpu(), train)
    m["reconstruction_nn_mse"] = sample_nn_mse(model.reconstruct(x).cpu(), train)
    m["test_recon_mse"] = float((model.reconstruct(x) - x).square().mean())
    return m


@torch.no_grad()
def write_pngs(model, test, out, seed, device):
    from fastgen.images import save_grid
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed + 3)
    x = test[:32].to(device)
    rec = model.reconstruct(x)
    n = x.shape[0]
    rows = [t for i in range(0, n, 8) for t in (x[i:i + 8], rec[i:i + 8])]  # inputs above reconstructions
    save_grid(torch.cat(rows), os.path.join(out, "reconstructions.png"), nrow=8)
    save_grid(model.sample(64, generator=gen, device=device), os.path.join(out, "samples.png"), nrow=8)
    k = min(8, max(1, test.shape[0] // 2))
    a = test[:k].to(device)
    b = test[k:2 * k].to(device) if test.shape[0] >= 2 * k else a.flip(0)  # a single test image: itself
    inter = model.interpolate(a, b, steps=10)
    save_grid(inter.reshape(-1, *inter.shape[2:]), os.path.join(out, "interpolations.png"), nrow=10)


def run(args):
    # --- VQ-VAE family (issue 4) ---
    from fastgen.commands import train_vq
    if args.model in train_vq.MODELS:
        return train_vq.run(args)
    if args.data is None:
        raise ValueError(f"--data is required for {args.model} ('digits' or a folder of images)")
    from fastgen import data as datasets
    from fastgen import training
    from fastgen.models import build_model

    _check_args(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt_path = os.path.join(args.out, CHECKPOINT)
    ckpt = None
    if os.path.exists(ckpt_path):
        if not args.resume:
            raise ValueError(f"{ckpt_path} exists; pass --resume to continue that run or choose another --out")
        ckpt = training.load_checkpoint(ckpt_path)
        if ckpt["kind"] != args.model:
            raise ValueError(f"{ckpt_path} holds a {ckpt['kind']!r} model but you asked to train {args.model!r}")
    data_args = ckpt["data_args"] if ckpt else dict(data=args.data, size=args.size, binarize=args.binarize,
                                                     test_fraction=args.test_fraction)
    ds = datasets.load(data_args["data"], size=data_args["size"], test_fraction=data_args["test_fraction"],
                       binarize=data_args["binarize"])
    if args.model == "vae" and args.likelihood == "bernoulli" and ds.levels > 2 and not ckpt:
        print("note: the Bernoulli decoder on grey levels is a loss, not a likelihood; "
              "its nats/bits-per-dim are comparable only on binary data (--binarize)")

    torch.manual_seed(args.seed)
    data_gen = torch.Generator().manual_seed(args.seed)
    config = ckpt["config"] if ckpt else model_config(args, ds)
    model = build_model(args.model, config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=ckpt["lr"] if ckpt else args.lr)
    history, start = [], 0
    if ckpt:
        history, start, done = training.resume(ckpt, model, optimizer, data_gen, ckpt_path, args.epochs)
        if done:
            return 0
    test = ds.test[:args.max_test] if args.max_test else ds.test
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model} ({config['arch']}, latent {config['latent_dim']}, {n_params:,} parameters) on "
          f"{ds.source}: {ds.train.shape[0]} train / {test.shape[0]} test images of {ds.image_shape}, "
          f"{ds.levels} levels, device {device}")

    for epoch in range(start, args.epochs):
        t0 = time.time()
        train_loss = training.train_epoch(model, optimizer, ds.train, args.batch_size, data_gen,
                                          max_batches=args.batches_per_epoch, show_progress=not args.quiet,
                                          desc=f"epoch {epoch + 1}/{args.epochs}", device=device)
        row = {"epoch": epoch + 1, "train_loss": train_loss}
        last = epoch + 1 == args.epochs
        if (epoch + 1) % args.eval_every == 0 or last:
            row.update(evaluate(model, args.model, test, ds.train, args.iwae_k, args.seed, device))
            write_pngs(model, test, args.out, args.seed, device)
        row["seconds"] = round(time.time() - t0, 3)
        history.append(row)
        training.write_jsonl(history, os.path.join(args.out, "metrics.jsonl"))
        training.save_checkpoint({
            "format": training.CHECKPOINT_FORMAT, "kind": args.model, "config": config,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr": optimizer.param_groups[0]["lr"],
            "epoch": epoch + 1, "history": history, "rng": training.rng_state(data_gen), "data_args": data_args,
        }, ckpt_path)
        print(format_row(row), flush=True)
    return 0


def format_row(row):
    parts = [f"epoch {row['epoch']}", f"train loss {row['train_loss']:.3f}"]
    if "test_iwae_nats" in row:
        parts.append(f"test ELBO {row['test_elbo_nats']:.2f} nats")
        parts.append(f"IWAE(k={row['iwae_k']}) log p(x) >= {row['test_iwae_nats']:.2f} nats "
                     f"= {row['test_iwae_bits_per_dim']:.3f} bits/dim")
    elif "test_loss" in row:
        parts.append(f"test loss {row['test_loss']:.3f}")
        parts.append(f"codes: |mean| {row['code_abs_mean']:.2f} std {row['code_std']:.2f} (N(0,I): 0, 1)")
    if "prior_sample_nn_mse" in row:
        parts.append(f"NN-MSE prior samples {row['prior_sample_nn_mse']:.4f} "
                     f"vs reconstructions {row['reconstruction_nn_mse']:.4f}")
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)
