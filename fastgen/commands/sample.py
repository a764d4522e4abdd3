"""`fastgen sample vae --checkpoint PATH --out DIR -n 64`: images from a trained model."""
import os

import torch


def add_parser(sub):
    p = sub.add_parser("sample", help="draw images from a checkpoint written by `fastgen train`",
                       description=__doc__.splitlines()[0])
    p.add_argument("model", choices=["ae", "vae", "vqvae"], help="the kind of model in the checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `fastgen train`")
    p.add_argument("--out", required=True, help="output folder (samples.png, samples.pt)")
    p.add_argument("-n", type=int, default=64, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nrow", type=int, default=None, help="images per row of the grid")
    p.add_argument("--device", default=None)
    # --- VQ-VAE family (issue 4): --prior, in fastgen/commands/train_vq.py ---
    from fastgen.commands import train_vq
    train_vq.add_sample_arguments(p)
    p.set_defaults(func=run)


@torch.no_grad()
def run(args):
    if args.model == "vqvae":   # --- VQ-VAE family (issue 4) ---
        from fastgen.commands import train_vq
        return train_vq.sample(args)
    from fastgen.images import save_grid
    from fastgen.models import build_model
    from fastgen.training import load_checkpoint

    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    ckpt = load_checkpoint(args.checkpoint)
    if ckpt["kind"] != args.model:
        raise ValueError(f"{args.checkpoint} holds a {ckpt['kind']!r} model, not {args.model!r}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(ckpt["kind"], ckpt["config"]).to(device)
    model.load_state_dict(ckpt["model"])
    model.eval()
    if args.model == "ae":
        print("note: an autoencoder has no prior; these decode z ~ N(0, I) and are expected to look wrong")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x = model.sample(args.n, generator=gen, device=device).cpu()
    os.makedirs(args.out, exist_ok=True)
    png = save_grid(x, os.path.join(args.out, "samples.png"), nrow=args.nrow)
    torch.save(x, os.path.join(args.out, "samples.pt"))
    print(f"wrote {args.n} samples (epoch {ckpt['epoch']} model) to {png} and samples.pt")
    return 0
