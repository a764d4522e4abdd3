"""`fastgen train ae|vae --data digits|PATH --epochs N --out DIR`: autoencoder and VAE.

Writes into DIR: checkpoint.pt (atomic, every epoch; --resume continues it with the
same data order and noise), metrics.jsonl (one line per epoch), and PNGs:
reconstructions.png (input rows above their reconstructions), samples.png (decoded
z ~ N(0, I)), interpolations.png (rows of decodes between two test images' codes).
"""
import os

import torch

from fastgen.commands import train as train_cmd


def add_parser(families):
    for name, help in (("ae", "deterministic autoencoder"), ("vae", "VAE with an N(0, I) prior")):
        p = train_cmd.family_parser(families, name, help, __doc__)
        train_cmd.data_arguments(p)
        p.add_argument("--arch", choices=["mlp", "conv"], default="mlp", help="encoder/decoder networks")
        p.add_argument("--latent-dim", type=int, default=16)
        if name == "vae":
            p.add_argument("--beta", type=float, default=1.0, help="KL weight")
            p.add_argument("--likelihood", choices=["gaussian", "bernoulli"], default="gaussian", help="p(x|z)")
            p.add_argument("--variance", choices=["pixel", "global"], default="pixel",
                           help="learned decoder variance per pixel or one for the image (gaussian)")
            p.add_argument("--iwae-k", type=int, default=64, help="importance samples for the test-set log p(x) bound")
        else:
            p.add_argument("--loss", choices=["mse", "bce"], default="mse", help="reconstruction loss")
        p.set_defaults(func=run)


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
    train_cmd.save_reconstructions(x, model.reconstruct(x), os.path.join(out, "reconstructions.png"))
    save_grid(model.sample(64, generator=gen, device=device), os.path.join(out, "samples.png"), nrow=8)
    k = min(8, max(1, test.shape[0] // 2))
    a = test[:k].to(device)
    b = test[k:2 * k].to(device) if test.shape[0] >= 2 * k else a.flip(0)  # a single test image: itself
    inter = model.interpolate(a, b, steps=10)
    save_grid(inter.reshape(-1, *inter.shape[2:]), os.path.join(out, "interpolations.png"), nrow=10)


def run(args):
    from fastgen import training
    from fastgen.models import build_model

    device = train_cmd.setup(args)
    train_cmd.positive(args, "latent_dim", "iwae_k")
    if getattr(args, "beta", 0.0) < 0:
        raise ValueError(f"--beta must be >= 0, got {args.beta}")
    ckpt = train_cmd.open_run(args, args.model)
    ds, data_args = train_cmd.load_data(args, ckpt)
    if args.model == "vae" and args.likelihood == "bernoulli" and ds.levels > 2 and not ckpt:
        print("note: the Bernoulli decoder on grey levels is a loss, not a likelihood; "
              "its nats/bits-per-dim are comparable only on binary data (--binarize)")

    torch.manual_seed(args.seed)
    config = ckpt["config"] if ckpt else model_config(args, ds)
    model = build_model(args.model, config).to(device)
    test = ds.test[:args.max_test] if args.max_test else ds.test

    def describe(n_params):
        return (f"{args.model} ({config['arch']}, latent {config['latent_dim']}, {n_params:,} parameters) on "
                f"{ds.source}: {ds.train.shape[0]} train / {test.shape[0]} test images of {ds.image_shape}, "
                f"{ds.levels} levels, device {device}")
    training.fit(model, ds.train, kind=args.model, config=config, ckpt=ckpt, **train_cmd.fit_args(args, device),
                 evaluate=train_cmd.with_sample_metrics(
                     args, lambda: evaluate(model, args.model, test, ds.train, getattr(args, "iwae_k", None),
                                            args.seed, device),
                     lambda n, g: model.eval().sample(n, generator=g, device=device), test),
                 write_pngs=lambda: write_pngs(model, test, args.out, args.seed, device),
                 extra={"data_args": data_args}, describe=describe, format_row=format_row)
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
    if train_cmd.sample_metrics_text(row):
        parts.append(train_cmd.sample_metrics_text(row))
    parts.append(f"{row['seconds']:.1f}s")
    return "  ".join(parts)
