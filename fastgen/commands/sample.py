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
        m.add_argument("-n", type=int, default=64,
                       help="number of samples (refused when they would not fit in the available memory)")
        m.add_argument("--seed", type=int, default=0)
        m.add_argument("--nrow", type=int, default=None, help="images per row of the grid (>= 1)")
        m.add_argument("--device", default=None)
        if name in ("vqvae", "vqvae2"):
            m.add_argument("--label", default=None, metavar="L[,L...]",
                           help="the classes to draw (a class-conditional prior: trained with --class-conditional), "
                                "cycled over the -n samples; default: every class in turn. With an unconditional "
                                "prior, --min-confidence keeps samples the digits classifier labels L")
            m.add_argument("--min-confidence", type=float, default=None, metavar="P",
                           help="rejection sampling: redraw each sample until the digits classifier gives its class "
                                "(--label's, else its most likely) probability >= P (digit images only)")
            m.add_argument("--max-rounds", type=int, default=10,
                           help="with --min-confidence: draws per sample at most (the best one is kept)")
        if name == "transformer":
            m.add_argument("--prompt", action="append", required=True,
                           help="caption to draw (repeat the flag for several; -n images each)")
            m.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0)")
            m.add_argument("--top-k", type=int, default=None, help="keep the k most likely codes at each step")
            m.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this much probability")
            m.add_argument("--guidance", type=float, default=1.0,
                           help=f"classifier-free guidance scale in [0, {MAX_GUIDANCE:g}] (0: the conditional "
                                "logits alone)")
            m.add_argument("--rerank", type=int, default=1, metavar="K",
                           help="draw K candidates per image and keep the best: by --scorer when given, else by the "
                                "digits classifier's probability of the prompted digit (digits prompts only)")
            m.add_argument("--scorer", default=None, metavar="CKPT",
                           help="a `fastgen train clip` checkpoint: --rerank keeps the candidate whose image it finds "
                                "most similar to the prompt (any captions)")
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


# the largest --guidance: far past any useful scale; (1 + guidance) * (cond - uncond) stays finite
MAX_GUIDANCE = 1000.0


def check_flags(args):
    """The sampling flags, checked as `fastgen train` checks its own (train.finite_floats,
    train.positive) before any checkpoint is read: a ValueError naming the flag (the CLI's
    exit code 2), instead of torch's "probability tensor contains inf/nan" at the first
    draw, a negative-dimension error from the grid, or a flag silently ignored."""
    from fastgen.commands.train import finite_floats, positive
    finite_floats(args)                               # --temperature nan, --guidance inf, --top-p nan
    if args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    positive(args, "nrow", "top_k", "rerank")
    if not -2 ** 63 <= args.seed < 2 ** 64:
        raise ValueError(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    t = getattr(args, "temperature", None)
    if t is not None and t <= 0:
        raise ValueError(f"--temperature must be > 0, got {t}")
    tp = getattr(args, "top_p", None)
    if tp is not None and not 0 < tp <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {tp}")
    g = getattr(args, "guidance", None)
    if g is not None and not 0 <= g <= MAX_GUIDANCE:
        raise ValueError(f"--guidance must be in [0, {MAX_GUIDANCE:g}], got {g}")
    if getattr(args, "min_confidence", None) is not None:
        from fastgen.rejection import check_confidence
        check_confidence(args.min_confidence, args.max_rounds)
    r = getattr(args, "reconstruct", None)
    if r is not None and r < 0:
        raise ValueError(f"--reconstruct must be >= 0 (0: skip), got {r}")


def _start(args):
    from fastgen.commands.train import device_of
    check_flags(args)
    return device_of(args.device)


# --- memory estimates: a sample count that cannot fit is refused before anything is drawn ---

def _numel(shape):
    out = 1
    for s in shape:
        out *= int(s)
    return out


def grid_bytes(n, image_shape, nrow=None):
    """What fastgen.images.save_grid takes for n images (C, H, W): the float grid, its
    uint8 copies and the upscaled tiles (small images are enlarged to 48-pixel tiles)."""
    import math
    c, h, w = image_shape
    s = max(1, math.ceil(48 / max(h, w)))
    hs, ws = h * s, w * s
    pad = max(2, max(hs, ws) // 12)
    ncol = min(nrow or math.isqrt(n - 1) + 1, n)
    nrows = -(-n // ncol)
    cells = c * (nrows * (hs + pad) + pad) * (ncol * (ws + pad) + pad)
    return 11 * cells + 8 * n * c * hs * ws


def per_sample_activation_bytes(model, run_one):
    """A module's working set per sample: three times its largest activation, measured by
    forward hooks while run_one() draws one sample (with its own generator)."""
    sizes = [0]

    def hook(module, inputs, output):
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                sizes.append(t.numel() * t.element_size())
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        run_one()
    finally:
        for h in handles:
            h.remove()
    return 3 * max(sizes)


def check_fits(args, count, image_shape, device, per_sample_work=0, extra_device=0, what=None):
    """Refuse (one line naming -n, train.refuse_unless_fits) `count` samples of
    `image_shape` whose outputs (tensor, samples.pt, grid) and working set
    (per_sample_work bytes each, plus extra_device) would not fit in memory."""
    from fastgen.commands.train import refuse_unless_fits
    image = 4 * _numel(image_shape)
    host = 2 * count * image + grid_bytes(count, image_shape, args.nrow)
    work = count * (per_sample_work + image) + extra_device
    refuse_unless_fits(what or f"-n {args.n}", host, device, work,
                       hint="draw fewer samples per run (several runs with different --seed)")


def pixelcnn_sample_bytes(prior):
    """What GatedPixelCNN.sample keeps per map: every layer's rows (and the attention's cache)."""
    caches = (prior.attention is not None) + (len(prior.layer_attention) if prior.layer_attention is not None else 0)
    layers = len(prior.layers) + 4 + 2 * caches
    return 4 * layers * prior.embed.embedding_dim * _numel(prior.code_shape)


def _write(args, images, extra=None):
    from fastgen.images import save_grid
    os.makedirs(args.out, exist_ok=True)
    nrow = min(args.nrow, images.shape[0]) if args.nrow else None     # no empty columns
    png = save_grid(images, os.path.join(args.out, "samples.png"), nrow=nrow)
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
    probe = torch.Generator(device=device).manual_seed(0)
    check_fits(args, args.n, model.image_shape, device, per_sample_activation_bytes(
        model, lambda: model.sample(1, generator=probe, device=device)))
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
    probe = torch.Generator(device=device).manual_seed(0)
    check_fits(args, x.shape[0] * args.nrow, model.image_shape, device, per_sample_activation_bytes(
        model, lambda: model.sample(1, generator=probe, device=device, cond=c[:1])),
        what=f"-n {args.n} (here {x.shape[0]} inputs) x --nrow {args.nrow}")
    rows = [model.sample(x.shape[0], generator=gen, device=device, cond=c) for _ in range(args.nrow - 2)]
    grid = torch.stack([c, *rows, x], 1).flatten(0, 1).cpu()       # per input: a row
    png = _write(args, grid, {"conditions": c.cpu(), "targets": x.cpu()})
    print(f"wrote completions of {x.shape[0]} held-out {ckpt['conditional']} inputs (a row each: input, "
          f"{len(rows)} completions, truth; epoch {ckpt['epoch']} model) to {png} and samples.pt")
    return 0


def load_vqvae_prior(vqvae, path, device, vq_ckpt=None, vq_path=None):
    """The pixelcnn checkpoint at `path` (--prior), checked against the vqvae it samples for
    (shapes; with vq_ckpt, also that its codebook is the one the prior was trained on)."""
    from fastgen.training import check_codebook, load_model
    prior, ckpt = load_model(path, "pixelcnn", device, name="--prior")
    if prior.num_codes != vqvae.num_codes or tuple(prior.code_shape) != tuple(vqvae.code_shape):
        raise ValueError(f"--prior models {prior.num_codes} codes on {prior.code_shape} maps but the vqvae has "
                         f"{vqvae.num_codes} codes on {vqvae.code_shape} maps")
    if vq_ckpt is not None:
        check_codebook(ckpt, f"--prior {path}", vq_ckpt, f"--checkpoint {vq_path}")
    return prior, ckpt


@torch.no_grad()
def sample_vqvae(args):
    """vqvae: codes from the PixelCNN prior, decoded."""
    from fastgen.training import load_model
    device = _start(args)
    if args.prior is None:
        raise ValueError("--prior CKPT is required to sample a vqvae (train one with `fastgen train pixelcnn`)")
    vqvae, vq_ckpt = load_model(args.checkpoint, "vqvae", device)
    prior, pc = load_vqvae_prior(vqvae, args.prior, device, vq_ckpt, args.checkpoint)
    decode = per_sample_activation_bytes(vqvae, lambda: vqvae.decode(
        torch.zeros((1,) + tuple(vqvae.code_shape), dtype=torch.long, device=device)))
    check_fits(args, args.n, vqvae.image_shape, device, max(pixelcnn_sample_bytes(prior), decode))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    labels = wanted_labels(args, prior, device)

    def draw_codes(m, lab):
        return prior.sample(m, labels=lab if prior.num_classes else None, generator=gen, device=device,
                            temperature=args.temperature)
    if args.min_confidence is None:      # one draw: its codes are kept with the images
        codes = draw_codes(args.n, labels)
        images, extra = vqvae.decode(codes), {"codes": codes.cpu(), **_labels_entry(labels)}
    else:
        images, extra = draw_rejecting(args, lambda m, lab: vqvae.decode(draw_codes(m, lab)), labels,
                                       vqvae.image_shape)
    png = _write(args, images.cpu(), extra)
    print(f"wrote {args.n} samples (vqvae epoch {vq_ckpt['epoch']}, prior epoch {pc['epoch']}) to {png} "
          f"and samples.pt")
    return 0


def wanted_labels(args, prior, device):
    """The (n,) classes --label asks for (cycled), every class in turn for a class-conditional
    prior without --label, or None (unconditional, no --label)."""
    if args.label is None:
        return prior.labels_for(args.n, device)
    try:
        want = [int(v) for v in args.label.split(",")]
    except ValueError:
        raise ValueError(f"--label must be class numbers separated by commas, got {args.label!r}") from None
    classes = prior.num_classes or 10
    if not want or min(want) < 0 or max(want) >= classes:
        raise ValueError(f"--label classes must be in [0, {classes}), got {args.label!r}")
    if prior.num_classes is None and args.min_confidence is None:
        raise ValueError("--label needs a class-conditional prior (`fastgen train ... --class-conditional`) or "
                         "--min-confidence (keep the samples the digits classifier labels so)")
    return torch.tensor(want, device=device)[torch.arange(args.n, device=device) % len(want)]


def _labels_entry(labels):
    return {"labels": labels.cpu()} if labels is not None else {}


def draw_rejecting(args, draw, labels, image_shape):
    """draw(m, labels) through the digits classifier's rejection (--min-confidence, checked
    with the other flags; fastgen.rejection): (images, extra entries for samples.pt)."""
    from fastgen.rejection import draw_confident
    if image_shape[0] != 1:
        raise ValueError(f"--min-confidence scores samples with the digits classifier: it needs 1-channel images, "
                         f"these are {tuple(image_shape)}")
    images, st = draw_confident(draw, args.n, args.min_confidence, labels, args.max_rounds)
    print(f"rejection: {st['accepted']} of {args.n} samples reached confidence {args.min_confidence:g} "
          f"({st['draws']} drawn in {st['rounds']} rounds)")
    return images, {"confidence": st["confidence"], **_labels_entry(labels)}


def load_vqvae2_priors(vq, top_path, bottom_path, device, vq_ckpt=None, vq_path=None):
    """The two prior checkpoints of a vqvae2, checked against it (codebook size, map shapes;
    with vq_ckpt, that its codebooks are the ones the priors were trained on)."""
    from fastgen.training import check_codebook, load_model
    top, top_ck = load_model(top_path, "vqvae2_top_prior", device, name="--top-prior")
    bottom, bottom_ck = load_model(bottom_path, "vqvae2_bottom_prior", device, name="--bottom-prior")
    for name, p, shape in (("--top-prior", top, vq.top_shape), ("--bottom-prior", bottom, vq.bottom_shape)):
        if p.num_codes != vq.num_codes or tuple(p.code_shape) != tuple(shape):
            raise ValueError(f"{name} models {p.num_codes} codes on {tuple(p.code_shape)} maps but the vqvae2 has "
                             f"{vq.num_codes} codes on {tuple(shape)} maps")
    if vq_ckpt is not None:
        for name, path, ck in (("--top-prior", top_path, top_ck), ("--bottom-prior", bottom_path, bottom_ck)):
            check_codebook(ck, f"{name} {path}", vq_ckpt, f"--checkpoint {vq_path}")
    return top, bottom


@torch.no_grad()
def sample_vqvae2_images(vq, top, bottom, n, generator, device, temperature=1.0, batch=64, labels=None):
    out = []
    for s in range(0, n, batch):
        m = min(batch, n - s)
        lab = None if labels is None or top.num_classes is None else labels[s:s + m]
        t = top.sample(m, labels=lab, generator=generator, device=device, temperature=temperature)
        b = bottom.sample(t, generator=generator, temperature=temperature)
        out.append(vq.decode(t, b))
    return torch.cat(out)


@torch.no_grad()
def sample_vqvae2(args):
    """vqvae2: top codes from the top prior, bottom codes given them, decoded."""
    from fastgen.training import load_model
    device = _start(args)
    vq, ck = load_model(args.checkpoint, "vqvae2", device)
    top, bottom = load_vqvae2_priors(vq, args.top_prior, args.bottom_prior, device, ck, args.checkpoint)
    # drawn 64 at a time (sample_vqvae2_images): the working set is one batch's
    decode = per_sample_activation_bytes(vq, lambda: vq.decode(
        torch.zeros((1,) + tuple(vq.top_shape), dtype=torch.long, device=device),
        torch.zeros((1,) + tuple(vq.bottom_shape), dtype=torch.long, device=device)))
    batch = min(args.n, 64) * max(pixelcnn_sample_bytes(top), pixelcnn_sample_bytes(bottom.pixelcnn), decode)
    check_fits(args, args.n, vq.image_shape, device, extra_device=batch)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    labels = wanted_labels(args, top, device)
    draw = lambda m, lab: sample_vqvae2_images(vq, top, bottom, m, gen, device, args.temperature,  # noqa: E731
                                               labels=lab)
    if args.min_confidence is None:
        images, extra = draw(args.n, labels), _labels_entry(labels)
    else:
        images, extra = draw_rejecting(args, draw, labels, vq.image_shape)
    png = _write(args, images.cpu(), extra or None)
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
    from fastgen.training import check_codebook, linked_checkpoint, load_model
    device = _start(args)
    model, ck = load_model(args.checkpoint, "transformer", device)
    # the VQ model: found relative to the transformer's folder (moved together), else at its absolute path
    vq_path = linked_checkpoint(ck, "vq_checkpoint", os.path.dirname(os.path.abspath(args.checkpoint)),
                                f"--checkpoint {args.checkpoint}")
    source = CodeSource(ck["vq_kind"], vq_path, device)
    if source.num_codes != model.num_codes or source.length != model.image_tokens:
        raise ValueError(f"the transformer models {model.image_tokens} codes of {model.num_codes} but its VQ model "
                         f"{vq_path} has {source.length} of {source.num_codes}")
    check_codebook(ck, f"--checkpoint {args.checkpoint}", source.ckpt, f"its VQ model {vq_path}")
    _check_transformer_fits(args, model, source, device)
    prompts = [p for p in args.prompt for _ in range(args.n)]
    text = encode_captions(prompts, model.text_tokens).to(device)     # empty / too long / bad UTF-8: ValueError
    gen = torch.Generator(device=device).manual_seed(args.seed)
    draw = lambda t: model.sample(t, generator=gen, temperature=args.temperature, top_k=args.top_k,  # noqa: E731
                                  top_p=args.top_p, guidance=args.guidance)
    scorer = None
    if args.scorer is not None:
        scorer, _ = load_model(args.scorer, "clip", device, name="--scorer")
        if tuple(scorer.image_shape) != tuple(source.model.image_shape):
            raise ValueError(f"--scorer {args.scorer} scores {tuple(scorer.image_shape)} images but the transformer's "
                             f"VQ model decodes {tuple(source.model.image_shape)}")
        prompt_tokens = scorer.tokens(prompts).to(device)       # too long for the scorer: ValueError
        if args.rerank == 1:
            raise ValueError("--scorer re-ranks candidates: give --rerank K with K >= 2")
    if args.rerank == 1:
        images = source.decode(draw(text))
    elif scorer is not None:
        cands = torch.stack([source.decode(draw(text)).clamp(0, 1) for _ in range(args.rerank)], 1)
        score = torch.stack([scorer.eval().similarity(cands[:, k], prompt_tokens) for k in range(args.rerank)], 1)
        images = cands[torch.arange(len(prompts)), score.argmax(1)]
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


def _check_transformer_fits(args, model, source, device):
    """-n images for each --prompt, drawn in one batch: the KV caches of both guidance
    streams, the logits, the codes, the K candidates of --rerank and the outputs."""
    b = len(args.prompt) * args.n
    rows = b * (2 if args.guidance > 0 else 1)
    dim = model.pos.shape[1]
    seq = model.text_tokens + model.image_tokens
    per_row = 4 * 2 * len(model.blocks) * seq * dim + 4 * 4 * model.num_codes + 16 * seq + 100
    image_shape = source.model.image_shape
    decode = per_sample_activation_bytes(source.model, lambda: source.decode(
        torch.zeros(1, source.length, dtype=torch.long, device=device)))
    work = max(rows * per_row, b * decode) + 2 * b * args.rerank * 4 * _numel(image_shape)
    what = f"-n {args.n}" + (f" x {len(args.prompt)} prompts" if len(args.prompt) > 1 else "") + \
        (f" x --rerank {args.rerank}" if args.rerank > 1 else "")
    check_fits(args, b, image_shape, device, extra_device=work, what=what)
