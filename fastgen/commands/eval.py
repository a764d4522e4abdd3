"""`fastgen eval`: sample-quality metrics of generated images against real ones.

    fastgen eval --fake runs/vae/checkpoint.pt                      (digits: the test split is real)
    fastgen eval --fake runs/vqvae/checkpoint.pt --prior runs/prior/checkpoint.pt
    fastgen eval --real feats_real.npy --fake feats_fake.npy        (features given: used as they are)
    fastgen eval --real FOLDER --fake FOLDER --features model.ts   (any TorchScript extractor)
    fastgen eval --fake runs/vq2/checkpoint.pt --prior runs/top/checkpoint.pt --bottom-prior runs/bottom/checkpoint.pt
    fastgen eval --fake runs/dalle/checkpoint.pt                   (digits captions: "the digit D" in turn)
    fastgen eval --table demo-out                                  (every model trained under a folder)

--real/--fake: 'digits' (real only), a .npy / .pt file (features (N, D) or images
(N, C, H, W) in [0, 1]; a samples.pt from `fastgen sample` too), an image folder, or a
checkpoint written by `fastgen train` (fake only; -n samples are drawn). Prints a table;
--json writes the numbers.
"""
import json
import os

import torch

KINDS = ("ae", "vae", "imle", "vqvae", "vqvae2", "transformer")


def add_parser(sub):
    p = sub.add_parser("eval", help="FD, precision/recall/density/coverage and class coverage of samples",
                       description=__doc__.splitlines()[0])
    p.add_argument("--real", default="digits", help="'digits' (the test split, default), a feature/image file or folder")
    p.add_argument("--fake", default=None, help="a feature/image file, an image folder or a fastgen checkpoint")
    p.add_argument("--prior", default=None,
                   help="the pixelcnn checkpoint that samples a vqvae's codes (a vqvae2's: its top prior)")
    p.add_argument("--bottom-prior", default=None, help="a vqvae2's bottom prior checkpoint")
    p.add_argument("--table", default=None, metavar="RUNS",
                   help="evaluate every model trained under RUNS (ae/ vae/ vqvae/+pixelcnn/ imle/ vqvae2/+prior-top/+"
                        "prior-bottom/ transformer/): a Markdown "
                        "table, written to RUNS/eval.md and RUNS/eval.json")
    p.add_argument("--features", default="digits", help="'digits' (default), 'raw' (pixels) or a TorchScript file")
    p.add_argument("-n", type=int, default=None, help="samples drawn from a checkpoint (default: as many as real)")
    p.add_argument("--k", type=int, default=5, help="neighbourhood size of precision/recall/density/coverage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="write the metrics to this JSON file")
    p.set_defaults(func=run)


def load_points(spec, name, obj=None):
    """--real/--fake that is not a checkpoint -> tensor (images or features). obj: the
    content of the .pt file `spec` when the caller has read it already."""
    import numpy as np
    if spec == "digits":
        if name != "--real":
            raise ValueError(f"{name} digits: the built-in data is only a --real set")
        from fastgen.data import load_digits
        return load_digits().test
    if obj is None and not os.path.exists(spec):
        raise FileNotFoundError(f"{name} {spec!r}: no such file or folder")
    if obj is None and os.path.isdir(spec):
        from fastgen.data import load_image_folder
        ds = load_image_folder(spec, test_fraction=0.5)
        return torch.cat([ds.train, ds.test])
    if obj is None and spec.endswith(".npy"):
        try:
            x = torch.from_numpy(np.load(spec, allow_pickle=False))
        except (ValueError, OSError) as e:
            raise ValueError(f"{name} {spec!r} is not a readable .npy array: {e}") from None
    else:
        x = read_torch_file(spec, name) if obj is None else obj
        if isinstance(x, dict) and "images" in x:
            x = x["images"]
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 4):
        raise ValueError(f"{name} {spec!r} must hold features (N, D) or images (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} {spec!r} holds {x.dtype} values; features and images must be float")
    return x.float()


def read_torch_file(spec, name):
    try:
        return torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the user's input
        raise ValueError(f"{name} {spec!r} is not a readable .pt/.npy file: {type(e).__name__}: {e}") from None


def load_fake(args, n, device):
    """--fake: samples drawn from a checkpoint, or the points of a file/folder (read once)."""
    from fastgen.training import is_checkpoint
    spec = args.fake
    obj = None
    if os.path.isfile(spec) and not spec.endswith(".npy"):
        obj = read_torch_file(spec, "--fake")
        if is_checkpoint(obj):
            return sample_checkpoint(obj, spec, n, args.seed, device, args.prior)
    return load_points(spec, "--fake", obj)


@torch.no_grad()
def sample_checkpoint(ckpt, path, n, seed=0, device="cpu", prior=None):
    """n images from a loaded fastgen generative checkpoint ((N, C, H, W) in [0, 1], on the CPU)."""
    from fastgen.commands.sample import load_vqvae_prior
    from fastgen.training import model_from_checkpoint
    kind = ckpt["kind"]
    if kind not in KINDS:
        raise ValueError(f"--fake {path!r} holds a {kind!r} model; eval samples {', '.join(KINDS)} checkpoints"
                         + (" (pass a pixelcnn as --prior with its vqvae as --fake)" if kind == "pixelcnn" else ""))
    model = model_from_checkpoint(ckpt, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    if kind == "vqvae":
        if prior is None:
            raise ValueError("--prior CKPT (a pixelcnn over this vqvae's codes) is needed to sample a vqvae")
        pri, _ = load_vqvae_prior(model, prior, device)
        # a class-conditional prior draws every class in turn
        out = [model.decode(pri.sample(min(256, n - s), labels=pri.labels_for(min(256, n - s), device, s),
                                       generator=gen, device=device)) for s in range(0, n, 256)]
        return torch.cat(out).clamp(0, 1).cpu()
    if kind == "vqvae2":
        from fastgen.commands.sample import load_vqvae2_priors, sample_vqvae2_images
        top_path, bottom_path = prior if isinstance(prior, tuple) else (prior, None)
        if top_path is None or bottom_path is None:
            raise ValueError("a vqvae2 is sampled through its two priors: --prior TOP --bottom-prior BOTTOM")
        top, bottom = load_vqvae2_priors(model, top_path, bottom_path, device)
        return sample_vqvae2_images(model, top, bottom, n, gen, device,
                                    labels=top.labels_for(n, device)).clamp(0, 1).cpu()
    if kind == "transformer":
        return sample_transformer_digits(model, ckpt, path, n, gen, device)
    if kind == "imle" and ckpt.get("conditional"):
        raise ValueError(f"--fake {path!r} is a conditional IMLE model; eval scores unconditional samples")
    return model.sample(n, generator=gen, device=device).clamp(0, 1).cpu()


@torch.no_grad()
def sample_transformer_digits(model, ckpt, path, n, gen, device, batch=256):
    """n images from a digits-captioned transformer, prompted "the digit D" for every digit
    in turn (guidance 1, as its training PNG)."""
    from fastgen.commands.train_transformer import CodeSource
    from fastgen.models.transformer import encode_captions
    from fastgen.training import linked_checkpoint
    if ckpt.get("captions") != "digits":
        raise ValueError(f"--fake {path!r}: eval samples transformers trained on digits captions (prompts "
                         "'the digit D'); for other captions sample with `fastgen sample transformer`")
    source = CodeSource(ckpt["vq_kind"], linked_checkpoint(ckpt, "vq_checkpoint", os.path.dirname(os.path.abspath(path)),
                                                            f"--fake {path}"), device)
    out = []
    for s in range(0, n, batch):
        prompts = [f"the digit {(s + i) % 10}" for i in range(min(batch, n - s))]
        codes = model.eval().sample(encode_captions(prompts, model.text_tokens).to(device), generator=gen,
                                    guidance=1.0)
        out.append(source.decode(codes))
    return torch.cat(out).clamp(0, 1).cpu()


def _print(rows, names):
    from fastgen.metrics.evaluate import format_table
    print(format_table(rows, names))


def run(args):
    from fastgen.commands.train import device_of
    from fastgen.metrics.evaluate import evaluate_samples
    device = device_of(args.device)
    if args.n is not None and args.n < 2:
        raise ValueError(f"-n must be >= 2, got {args.n}")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    if (args.table is None) == (args.fake is None):
        raise ValueError("give --fake (one set of samples) or --table RUNS (every model under a folder)")
    real = load_points(args.real, "--real")
    if args.table is not None:
        return run_table(args, real, device)
    if args.bottom_prior is not None:
        args.prior = (args.prior, args.bottom_prior)
    fake = load_fake(args, args.n or real.shape[0], device)
    m = evaluate_samples(real, fake, args.features, args.k)
    _print([m], [os.path.basename(os.path.dirname(os.path.abspath(args.fake))) or args.fake])
    if args.json:
        _write_json(args.json, m)
    return 0


def _write_json(path, obj):
    from fastgen.training import atomic_write
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))
    print(f"wrote {path}")


def training_seconds(ckpt):
    """The seconds a checkpoint's epochs took (its history rows; 0 where none were kept)."""
    return float(sum(r.get("seconds", 0) for r in ckpt.get("history") or []))


def run_table(args, real, device):
    from fastgen.data import load_digits
    from fastgen.metrics.evaluate import evaluate_samples, format_table
    runs = args.table
    if not os.path.isdir(runs):
        raise FileNotFoundError(f"--table {runs!r}: no such folder")
    n = args.n or real.shape[0]
    rows, names = [], []
    if args.real == "digits":   # the ceiling: held-out real digits against training digits
        train = load_digits().train
        idx = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(args.seed))[:n]
        rows.append(evaluate_samples(real, train[idx], args.features, args.k))
        names.append("data (train split)")
    found = [("ae", "ae", None), ("vae", "vae", None), ("vqvae + pixelcnn", "vqvae", "pixelcnn"), ("imle", "imle", None),
             ("vqvae2 + priors", "vqvae2", ("prior-top", "prior-bottom")), ("transformer", "transformer", None)]
    for name, folder, prior in found:
        ckpt = os.path.join(runs, folder, "checkpoint.pt")
        names_of = prior if isinstance(prior, tuple) else (prior,) if prior else ()
        pris = tuple(os.path.join(runs, p, "checkpoint.pt") for p in names_of)
        if not os.path.isfile(ckpt) or not all(os.path.isfile(p) for p in pris):
            continue
        pri = pris if len(pris) > 1 else (pris[0] if pris else None)
        from fastgen.training import load_checkpoint
        loaded = load_checkpoint(ckpt)
        fake = sample_checkpoint(loaded, ckpt, n, args.seed, device, pri)
        row = evaluate_samples(real, fake, args.features, args.k)
        # wall minutes of training (the epochs' own seconds, evaluation included), priors too
        # a transformer's VQ model (the one its checkpoint links to): its minutes count too
        linked = []
        if folder == "transformer":
            from fastgen.training import linked_checkpoint
            linked = [linked_checkpoint(loaded, "vq_checkpoint", os.path.dirname(os.path.abspath(ckpt)),
                                        f"the transformer {ckpt}")]
        row["train_minutes"] = (training_seconds(loaded) + sum(training_seconds(load_checkpoint(p))
                                                                for p in (*pris, *linked) if os.path.isfile(p))) / 60
        rows.append(row)
        names.append(name)
        print(f"evaluated {name} ({ckpt})", flush=True)
    if len(names) <= (1 if args.real == "digits" else 0):
        raise ValueError(f"--table {runs!r}: no ae/, vae/, vqvae/ (+ pixelcnn/), imle/, vqvae2/ (+ prior-top/, "
                         "prior-bottom/) or transformer/ checkpoint.pt under it")
    table = format_table(rows, names)
    print(table)
    from fastgen.training import atomic_write
    md = os.path.join(runs, "eval.md")
    atomic_write(md, lambda f: f.write((table + "\n").encode()))
    _write_json(args.json or os.path.join(runs, "eval.json"), dict(zip(names, rows)))
    print(f"wrote {md}")
    return 0
