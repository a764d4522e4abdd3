"""`fastgen train imle --data digits|PATH --epochs N --out DIR`: IMLE (Li & Malik 2018).

Every --staleness epochs a search round draws --samples-per-point samples per data
point and finds each point's nearest (exact, streamed in chunks); in between, Adam
(betas 0.5, 0.999) pulls each point's chosen sample towards it. Writes into DIR:
checkpoint.pt (atomic, every epoch; --resume continues it), metrics.jsonl (the mean
nearest distance of each search round, the loss), samples.png (fresh samples) and
nearest.png (rows of data points above their chosen samples).
"""
import os

import torch

from fastgen.commands import train as train_cmd
from fastgen.models.imle import CONDITIONS


def add_parser(families):
    p = train_cmd.family_parser(families, "imle", "IMLE: every data point gets a nearby sample", __doc__)
    train_cmd.data_arguments(p)
    p.set_defaults(lr=1e-3)
    p.add_argument("--arch", choices=["auto", "mlp", "conv"], default="auto",
                   help="generator network; auto: conv where the images fit it (square, side 8 * 2^k: digits "
                        "FD 53-63 vs the MLP's 69-76 at 60-150 epochs), else mlp")
    p.add_argument("--z-dim", type=int, default=64, help="latent size")
    p.add_argument("--samples-per-point", type=int, default=10, help="samples drawn per data point per search")
    p.add_argument("--staleness", type=int, default=5, help="epochs between search rounds")
    p.add_argument("--noise", type=float, default=0.01, help="std of the noise added to each chosen code")
    p.add_argument("--noise-per", choices=["step", "round"], default="step",
                   help="draw the code noise at every training step, or once per point per search round")
    p.add_argument("--loss", choices=["l2", "l1"], default="l2")
    p.add_argument("--feature-dim", type=int, default=None,
                   help="search in a fixed random projection to this many features (default: pixels)")
    p.add_argument("--feature-loss", choices=["none", "digits"], default="none",
                   help="add a feature (perceptual) term to the pixel loss: 'digits' uses the package's digits "
                        "classifier features (1-channel images; the same features the eval's FD uses)")
    p.add_argument("--feature-loss-weight", type=float, default=1.0,
                   help="weight of the --feature-loss term against the per-image pixel loss")
    p.add_argument("--reject-eps", type=float, default=None,
                   help="RS-IMLE: discard samples closer than this to any data point before the search "
                        "(Euclidean distance in the search's space: pixels in [0, 1] by default, so sqrt(64) = 8 "
                        "is the largest possible on 8x8 digits; the projected features with --feature-dim)")
    p.add_argument("--adaptive-gamma", type=float, default=None,
                   help="Adaptive IMLE: search a point again only once its sample is within its threshold, "
                        "then shrink the threshold by this factor")
    p.add_argument("--adaptive-wait", type=int, default=1,
                   help="Adaptive IMLE: search rounds a point waits after its search before another (default 1)")
    p.add_argument("--adaptive-period", type=int, default=10,
                   help="Adaptive IMLE: a point not searched for this many rounds is searched anyway (default 10)")
    p.add_argument("--conditional", choices=CONDITIONS, default=None,
                   help="conditional IMLE: each digit's top half is the input, the generator completes it "
                        "(completions.png shows several completions per input)")
    p.set_defaults(func=run)


@torch.no_grad()
def write_pngs(model, out, seed, device):
    from fastgen.images import save_grid
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed + 3)
    if model.condition_shape is None:
        save_grid(model.sample(64, generator=gen, device=device).cpu(), os.path.join(out, "samples.png"), nrow=8)
    else:
        # rows: 8 inputs, 6 rows of completions of each, the true images
        c, x = model.conditions[:8], model.data[:8]
        done = [model.sample(c.shape[0], generator=gen, device=device, cond=c) for _ in range(6)]
        save_grid(torch.cat([c, *done, x]).cpu(), os.path.join(out, "completions.png"), nrow=8)
    x, y = model.nearest_pairs(16)
    rows = [t for i in range(0, x.shape[0], 8) for t in (x[i:i + 8], y[i:i + 8])]  # points above their samples
    save_grid(torch.cat(rows).cpu(), os.path.join(out, "nearest.png"), nrow=8)
    model.train()


def run(args):
    from fastgen import training
    from fastgen.models import build_model
    from fastgen.models.imle import make_conditions
    device = train_cmd.setup(args)      # under torchrun: joins the group (data-parallel steps)
    train_cmd.positive(args, "z_dim", "samples_per_point", "staleness", "feature_dim", "adaptive_wait",
                       "adaptive_period")
    if not args.noise >= 0:
        raise ValueError(f"--noise must be >= 0, got {args.noise}")
    ckpt = train_cmd.open_run(args, "imle")
    ds, data_args = train_cmd.load_data(args, ckpt)
    arch = args.arch
    if arch == "auto":
        from fastgen.models.networks import conv_fits
        arch = "conv" if conv_fits(ds.image_shape) else "mlp"
    config = ckpt["config"] if ckpt else dict(
        image_shape=ds.image_shape, z_dim=args.z_dim, arch=arch, samples_per_point=args.samples_per_point,
        noise=args.noise, loss=args.loss, feature_dim=args.feature_dim, reject_eps=args.reject_eps,
        adaptive_gamma=args.adaptive_gamma, adaptive_wait=args.adaptive_wait, adaptive_period=args.adaptive_period,
        noise_per=args.noise_per,
        condition_shape=ds.image_shape if args.conditional else None,
        **({"feature_loss_weight": args.feature_loss_weight} if args.feature_loss != "none" else {}))
    if not ckpt:
        if args.feature_loss == "none" and "feature_loss_weight" in (getattr(args, "_explicit", None) or ()):
            raise ValueError("--feature-loss-weight needs --feature-loss (e.g. --feature-loss digits)")
        if args.feature_loss != "none" and not 0 < args.feature_loss_weight < float("inf"):
            raise ValueError(f"--feature-loss-weight must be a finite number > 0, got {args.feature_loss_weight}")
    feature_loss = None
    if config.get("feature_loss_weight"):
        if ds.image_shape[0] != 1:
            raise ValueError(f"--feature-loss digits needs 1-channel images; {ds.source} has {ds.image_shape[0]}")
        from fastgen.metrics.digit_features import DigitFeatureLoss
        feature_loss = DigitFeatureLoss(device)
    conditional = ckpt.get("conditional") if ckpt else args.conditional
    staleness = ckpt["staleness"] if ckpt else args.staleness
    torch.manual_seed(args.seed)
    model = build_model("imle", config).to(device)
    model.__dict__["feature_loss"] = feature_loss      # not a submodule: its weights are not trained or saved
    train = ds.train.to(device)
    model.attach(train, make_conditions(conditional, train) if conditional else None)
    if ckpt:       # the last search round's numbers, which evaluate() reports until the next round
        model.restore_last_search(ckpt.get("history"))

    def describe(n_params):
        return (f"imle ({'conditional on the ' + conditional + ', ' if conditional else ''}{config['arch']} generator, z {config['z_dim']}, {n_params:,} parameters, "
                f"{config['samples_per_point']} samples per point every {staleness} epochs) on {ds.source}: "
                f"{ds.train.shape[0]} points of {ds.image_shape}, device {device}")

    def evaluate():
        return {"last_mean_nearest_dist": model.last_search.get("mean_nearest_dist")}
    # the batches are indices of data points: IMLE looks up each point and its chosen code
    training.fit(model, torch.arange(ds.train.shape[0]), kind="imle", config=model.config, ckpt=ckpt,
                 **train_cmd.fit_args(args, device), betas=(0.5, 0.999), before_epoch=model.before_epoch(staleness),
                 evaluate=evaluate if conditional else train_cmd.with_sample_metrics(
                     args, evaluate, lambda n, g: model.eval().sample(n, generator=g, device=device), ds.test.to(device)),
                 write_pngs=lambda: write_pngs(model, args.out, args.seed, device),
                 extra={"data_args": data_args, "staleness": staleness, "conditional": conditional}, describe=describe)
    return 0
