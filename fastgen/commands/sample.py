"""`fastgen sample MODEL --checkpoint PATH --out DIR -n 64`: images from trained models.

Every sampler lives here: ae/vae decode z ~ N(0, I), imle generates G(z); vqvae decodes code maps drawn from
a PixelCNN prior (--prior). Each writes DIR/samples.png (a grid) and DIR/samples.pt.
"""
import os

import torch


def add_parser(sub):
    p = sub.add_parser("sample", help="draw images from checkpoints written by `fastgen train`",
                       description=__doc__.splitlines()[0])
    models = p.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name, help in (("ae", "an autoencoder (decodes N(0, I): expected to look wrong)"),
                       ("vae", "a VAE: decodes z ~ N(0, I)"),
                       ("imle", "an IMLE generator: G(z), z ~ N(0, I)"),
                       ("vqvae", "a VQ-VAE with a PixelCNN prior over its codes (--prior)"),
                       ("vqvae2", "a VQ-VAE-2: top prior, then bottom prior given the top codes, then the decoder"),
                       ("transformer", "a caption-prompted transformer over VQ codes (--prompt)")):
        m = models.add_parser(name, help=help, description=help)
        m.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `fastgen train`")
        m.add_argument("--out", required=True, help="output folder (samples.png, samples.pt)")
        m.add_argument("-n", type=int, default=64, help="number of samples")
        m.add_argument("--seed", type=int, default=0)
        m.add_argument("--nrow", type=int, default=None, help="images per row of the grid")
        m.add_argument("--device", default=None)
        if name == "transformer":
            m.add_argument("--prompt", action="append", required=True,
                           help="caption to draw (repeat the flag for several; -n images each)")
            m.add_argument("--temperature", type=float, default=1.0)
            m.add_argument("--top-k", type=int, default=None, help="keep the k most likely codes at each step")
            m.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this much probability")
            m.add_argument("--guidance", type=float, default=1.0,
                           help="classifier-free guidance scale (0: the conditional logits alone)")
            m.add_argument("--rerank", type=int, default=1, metavar="K",
                           help="draw K candidates per image and keep the one the digits classifier finds most "
                                "like the prompted digit (digits prompts only)")
            m.set_defaults(func=sample_transformer)
        elif name == "vqvae2":
            m.add_argument("--top-prior", required=True, metavar="CKPT", help="`fastgen train prior --level top` checkpoint")
            m.add_argument("--bottom-prior", required=True, metavar="CKPT",
                           help="`fastgen train prior --level bottom` checkpoint")
            m.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of both priors")
            m.add_argument("--reconstruct", type=int, default=8, metavar="N",
                           help="also write reconstructions.png for N test images: each input, its top codes with "
                                "bottom codes drawn by the bottom prior (what the top level alone carries), and "
                                "both levels (0: skip)")
            m.set_defaults(func=sample_vqvae2)
        elif name == "vqvae":
            m.add_argument("--prior", metavar="CKPT", default=None,
                           help="the pixelcnn checkpoint (from `fastgen train pixelcnn`) that samples the codes")
            m.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the prior")
            m.set_defaults(func=sample_vqvae)
        else:
            m.set_defaults(func=sample_latent)


def _start(args):
    from fastgen.commands.train import device_of
    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    return device_of(args.device)


def _write(args, images, extra=None):
    from fastgen.images import save_grid
    os.makedirs(args.out, exist_ok=True)
    png = save_grid(images, os.path.join(args.out, "samples.png"), nrow=args.nrow)
    torch.save(images if extra is None else {"images": images, **extra}, os.path.join(args.out, "samples.pt"))
    return png


@torch.no_grad()
def sample_latent(args):
    """ae / vae / imle: decode (generate from) z ~ N(0, I)."""
    from fastgen.training import load_model
    device = _start(args)
    model, ckpt = load_model(args.checkpoint, args.model, device)
    if args.model == "ae":
        print("note: an autoencoder has no prior; these decode z ~ N(0, I) and are expected to look wrong")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    if args.model == "imle" and ckpt.get("conditional"):
        return _sample_conditional(args, model, ckpt, gen, device)
    png = _write(args, model.sample(args.n, generator=gen, device=device).cpu())
    print(f"wrote {args.n} samples (epoch {ckpt['epoch']} model) to {png} and samples.pt")
    return 0


def _sample_conditional(args, model, ckpt, gen, device):
    """Conditional IMLE: completions of held-out inputs (the data's test split), each
    row one input: the input, --nrow - 2 (default 8) completions, the true image."""
    from fastgen.commands.train import load_data
    from fastgen.models.imle import make_conditions
    ds = load_data(args, ckpt)[0]
    held = ds.test if ds.test.shape[0] else ds.train
    x = held[:args.n].to(device)
    c = make_conditions(ckpt["conditional"], x)
    args.nrow = max(3, args.nrow or 10)
    rows = [model.sample(x.shape[0], generator=gen, device=device, cond=c) for _ in range(args.nrow - 2)]
    grid = torch.stack([c, *rows, x], 1).flatten(0, 1).cpu()       # per input: a row
    png = _write(args, grid, {"conditions": c.cpu(), "targets": x.cpu()})
    print(f"wrote completions of {x.shape[0]} held-out {ckpt['conditional']} inputs (a row each: input, "
          f"{len(rows)} completions, truth; epoch {ckpt['epoch']} model) to {png} and samples.pt")
    return 0


def load_vqvae_prior(vqvae, path, device):
    """The pixelcnn checkpoint at `path` (--prior), checked against the vqvae it samples for."""
    from fastgen.training import load_model
    prior, ckpt = load_model(path, "pixelcnn", device, name="--prior")
    if prior.num_codes != vqvae.num_codes or tuple(prior.code_shape) != tuple(vqvae.code_shape):
        raise ValueError(f"--prior models {prior.num_codes} codes on {prior.code_shape} maps but the vqvae has "
                         f"{vqvae.num_codes} codes on {vqvae.code_shape} maps")
    return prior, ckpt


@torch.no_grad()
def sample_vqvae(args):
    """vqvae: codes from the PixelCNN prior, decoded."""
    from fastgen.training import load_model
    device = _start(args)
    if args.prior is None:
        raise ValueError("--prior CKPT is required to sample a vqvae (train one with `fastgen train pixelcnn`)")
    vqvae, vq_ckpt = load_model(args.checkpoint, "vqvae", device)
    prior, pc = load_vqvae_prior(vqvae, args.prior, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    codes = prior.sample(args.n, generator=gen, device=device, temperature=args.temperature)
    png = _write(args, vqvae.decode(codes).cpu(), {"codes": codes.cpu()})
    print(f"wrote {args.n} samples (vqvae epoch {vq_ckpt['epoch']}, prior epoch {pc['epoch']}) to {png} "
          f"and samples.pt")
    return 0


def load_vqvae2_priors(vq, top_path, bottom_path, device):
    """The two prior checkpoints of a vqvae2, checked against it (codebook size, map shapes)."""
    from fastgen.training import load_model
    top, _ = load_model(top_path, "vqvae2_top_prior", device, name="--top-prior")
    bottom, _ = load_model(bottom_path, "vqvae2_bottom_prior", device, name="--bottom-prior")
    for name, p, shape in (("--top-prior", top, vq.top_shape), ("--bottom-prior", bottom, vq.bottom_shape)):
        if p.num_codes != vq.num_codes or tuple(p.code_shape) != tuple(shape):
            raise ValueError(f"{name} models {p.num_codes} codes on {tuple(p.code_shape)} maps but the vqvae2 has "
                             f"{vq.num_codes} codes on {tuple(shape)} maps")
    return top, bottom


@torch.no_grad()
def sample_vqvae2_images(vq, top, bottom, n, generator, device, temperature=1.0, batch=64):
    out = []
    for s in range(0, n, batch):
        m = min(batch, n - s)
        t = top.sample(m, generator=generator, device=device, temperature=temperature)
        b = bottom.sample(t, generator=generator, temperature=temperature)
        out.append(vq.decode(t, b))
    return torch.cat(out)


@torch.no_grad()
def sample_vqvae2(args):
    """vqvae2: top codes from the top prior, bottom codes given them, decoded."""
    from fastgen.training import load_model
    device = _start(args)
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    vq, ck = load_model(args.checkpoint, "vqvae2", device)
    top, bottom = load_vqvae2_priors(vq, args.top_prior, args.bottom_prior, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    images = sample_vqvae2_images(vq, top, bottom, args.n, gen, device, args.temperature)
    png = _write(args, images.cpu())
    if args.reconstruct > 0:
        from fastgen.commands.train import load_data
        from fastgen.images import save_grid
        ds = load_data(args, ck)[0]
        x = ds.test[:args.reconstruct].to(device)
        t, b = vq.encode(x)
        from_top = vq.decode(t, bottom.sample(t, generator=gen, temperature=args.temperature))
        rows = torch.stack([x, from_top, vq.decode(t, b)], 1).flatten(0, 1)   # per input: a row of 3
        print(f"wrote {save_grid(rows.cpu(), os.path.join(args.out, 'reconstructions.png'), nrow=3)} "
              "(input | top codes + bottom codes from the prior | both levels)")
    print(f"wrote {args.n} samples (vqvae2 epoch {ck['epoch']}) to {png} and samples.pt")
    return 0


@torch.no_grad()
def sample_transformer(args):
    """transformer: codes drawn for each --prompt, decoded by its VQ model; optional re-ranking."""
    from fastgen.commands.train_transformer import CodeSource, digit_of
    from fastgen.models.transformer import encode_captions
    from fastgen.training import load_model
    device = _start(args)
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if args.rerank < 1:
        raise ValueError(f"--rerank must be >= 1, got {args.rerank}")
    model, ck = load_model(args.checkpoint, "transformer", device)
    source = CodeSource(ck["vq_kind"], ck["vq_checkpoint"], device)
    if source.num_codes != model.num_codes or source.length != model.image_tokens:
        raise ValueError(f"the transformer models {model.image_tokens} codes of {model.num_codes} but its VQ model "
                         f"{ck['vq_checkpoint']} has {source.length} of {source.num_codes}")
    prompts = [p for p in args.prompt for _ in range(args.n)]
    text = encode_captions(prompts, model.text_tokens).to(device)     # empty / too long / bad UTF-8: ValueError
    gen = torch.Generator(device=device).manual_seed(args.seed)
    draw = lambda t: model.sample(t, generator=gen, temperature=args.temperature, top_k=args.top_k,  # noqa: E731
                                  top_p=args.top_p, guidance=args.guidance)
    if args.rerank == 1:
        images = source.decode(draw(text))
    else:
        from fastgen.metrics.digit_features import digit_outputs
        wanted = [digit_of(p) for p in prompts]
        if any(w is None for w in wanted) or source.model.image_shape[0] != 1:
            raise ValueError("--rerank scores candidates with the digits classifier: every --prompt must name a digit")
        cands = torch.stack([source.decode(draw(text)) for _ in range(args.rerank)], 1)   # (B, K, 1, H, W)
        probs = digit_outputs(cands.flatten(0, 1))[1].view(len(prompts), args.rerank, 10)
        score = probs[torch.arange(len(prompts)), :, torch.tensor(wanted)]
        images = cands[torch.arange(len(prompts)), score.argmax(1)]
    args.nrow = args.nrow or args.n
    png = _write(args, images.cpu(), {"prompts": prompts})
    print(f"wrote {len(prompts)} samples ({len(args.prompt)} prompts x {args.n}; transformer epoch {ck['epoch']}) "
          f"to {png} and samples.pt")
    return 0
