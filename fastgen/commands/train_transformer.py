"""`fastgen train transformer --vqvae CKPT --captions digits --epochs N --out DIR`: a
DALL-E-style transformer over a trained VQ-VAE's (or, with --vqvae2, a VQ-VAE-2's) codes,
prompted by captions.

Captions for digits come from the labels, three phrasings each ("a seven", "the digit 7",
"7"): every training image appears once per phrasing. For a VQ model trained on an image
folder, --captions FILE gives one caption per image (lines 'relative/path<TAB>caption'). Writes checkpoint.pt,
metrics.jsonl and samples.png (a row per digit, prompted "the digit D"). Then
`fastgen sample transformer --checkpoint DIR/checkpoint.pt --prompt "a seven"`.
"""
import os

import torch

from fastgen.commands import train as train_cmd

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_captions(label):
    """The three phrasings of a digit's caption."""
    article = "an" if WORDS[label][0] in "aeiou" else "a"
    return [f"{article} {WORDS[label]}", f"the digit {label}", f"{label}"]


def digit_of(prompt):
    """The digit a prompt asks for (a word or a numeral), or None."""
    p = prompt.lower()
    for d, w in enumerate(WORDS):
        if w in p.split() or str(d) in p:
            return d
    return None


def add_parser(families):
    p = train_cmd.family_parser(families, "transformer", "a caption-prompted transformer over VQ codes", __doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--vqvae", default=None, help="checkpoint of `fastgen train vqvae`")
    src.add_argument("--vqvae2", default=None, help="checkpoint of `fastgen train vqvae2` (top then bottom codes)")
    p.add_argument("--captions", default="digits",
                   help="'digits' (from the labels; the VQ model must be on digits), or for a VQ model trained on an "
                        "image folder a text file of lines 'relative/path<TAB>caption', one per image")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="caption length in bytes (default: 16 for --captions digits, 64 for a captions file)")
    p.add_argument("--text-loss-weight", type=float, default=0.0,
                   help="model the caption too: loss = w * text + (1 - w) * image (DALL-E: 0.125; 0: captions given)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--p-uncond", type=float, default=0.1, help="caption dropped with this probability (guidance)")
    p.set_defaults(func=run, lr=5e-4)


class CodeSource:
    """A VQ-VAE or VQ-VAE-2 seen as a sequence of codes per image."""

    def __init__(self, kind, path, device, args=None):
        """args: the command's, when the dataset the VQ model was trained on is wanted (.data)."""
        self.kind, self.path = kind, path
        if args is not None:
            self.model, self.ckpt, self.data = train_cmd.load_code_model(args, path, kind, device, "--" + kind)
        else:
            from fastgen import training
            self.model, self.ckpt = training.load_model(path, kind, device, name="--" + kind)
        m = self.model
        self.num_codes = m.num_codes
        self.shapes = [m.code_shape] if kind == "vqvae" else [m.top_shape, m.bottom_shape]
        self.length = sum(h * w for h, w in self.shapes)

    def encode(self, images, device):
        """(N, length) codes: the code map(s) of each image flattened, top map first."""
        maps = train_cmd.encode_all(self.model, images, device)
        maps = maps if isinstance(maps, tuple) else (maps,)
        return torch.cat([c.flatten(1) for c in maps], 1)

    @torch.no_grad()
    def decode(self, codes):
        maps, s = [], 0
        for h, w in self.shapes:
            maps.append(codes[:, s:s + h * w].reshape(-1, h, w))
            s += h * w
        return self.model.decode(*maps)


def digits_labels(ds_args):
    """Labels of the digits train/test split a VQ model was trained on."""
    from fastgen.data import digits_labels as labels
    tf = ds_args["test_fraction"]
    return labels(0.2 if tf is None else tf)


def captions_of(data_args, captions, text_tokens, whose):
    """(train, test) captions of the images `data_args` loads, per image a list of its
    phrasings: 'digits' (three per digit, from the labels) or a captions file for an image
    folder. whose: how the errors name where the images came from."""
    from fastgen import data as datasets
    if captions == "digits":
        if data_args["data"] != "digits":
            raise ValueError(f"--captions digits needs digits images, {whose} {data_args['data']!r} (give a "
                             "captions file instead)")
        y_train, y_test = digits_labels(data_args)
        return [digit_captions(int(y)) for y in y_train], [digit_captions(int(y)) for y in y_test]
    if data_args["data"] in ("digits", "photo-crops"):
        raise ValueError(f"--captions FILE needs images from an image folder, {whose} {data_args['data']!r}")
    tf = 0.1 if data_args["test_fraction"] is None else data_args["test_fraction"]
    tr, te = datasets.folder_captions(data_args["data"], captions, tf, max_bytes=text_tokens)
    return [[c] for c in tr], [[c] for c in te]


def run(args):
    from fastgen import training
    from fastgen.images import save_grid
    from fastgen.models import build_model
    from fastgen.models.transformer import encode_captions
    device = train_cmd.setup(args)
    if args.text_tokens is None:
        args.text_tokens = 16 if args.captions == "digits" else 64
    train_cmd.positive(args, "text_tokens", "dim", "layers", "heads")
    if not 0 <= args.text_loss_weight < 1:
        raise ValueError(f"--text-loss-weight must be in [0, 1), got {args.text_loss_weight}")
    ckpt = train_cmd.open_run(args, "transformer")
    kind, path = (ckpt["vq_kind"], training.linked_checkpoint(ckpt, "vq_checkpoint", args.out,
                                                              f"the run in {args.out}")) if ckpt else \
        (("vqvae", args.vqvae) if args.vqvae else ("vqvae2", args.vqvae2))
    if path is None:
        raise ValueError("--vqvae CKPT or --vqvae2 CKPT is required (the codes the transformer models)")
    captions = ckpt["captions"] if ckpt else args.captions
    source = CodeSource(kind, path, device, args)
    if ckpt:
        training.check_codebook(ckpt, f"the run in {args.out}", source.ckpt, f"--{kind} {path}")
    text_tokens = ckpt["config"]["text_tokens"] if ckpt else args.text_tokens
    caps_train, caps_test = captions_of(source.ckpt["data_args"], captions, text_tokens,
                                        f"a VQ model trained on them; {path} was trained on")
    ds = source.data
    config = ckpt["config"] if ckpt else dict(
        num_codes=source.num_codes, image_tokens=source.length, text_tokens=args.text_tokens, dim=args.dim,
        layers=args.layers, heads=args.heads, p_uncond=args.p_uncond,
        **({"text_loss_weight": args.text_loss_weight} if args.text_loss_weight else {}))
    T = config["text_tokens"]

    def rows(images, caps):      # caps: per image, its phrasings; each phrasing is one row
        codes = source.encode(images, device)
        text = [encode_captions([c[j] for c in caps], T) for j in range(len(caps[0]))]
        return torch.cat([torch.cat([t, codes], 1) for t in text])
    train_rows, test_rows = rows(ds.train, caps_train), rows(ds.test, caps_test)
    torch.manual_seed(args.seed)
    model = build_model("transformer", config).to(device)

    @torch.no_grad()
    def evaluate():
        model.eval()
        out = model(test_rows.to(device))
        nll = float(out["nll"].mean()) / model.image_tokens      # the image codes' alone, whatever the text weight
        row = dict(test_nll_nats_per_code=nll, test_bits_per_code=nll / 0.6931471805599453)
        if "text_loss" in out:
            row["test_text_nats_per_byte"] = float(out["text_loss"])
        return row

    @torch.no_grad()
    def write_samples():
        model.eval()
        firsts = list(dict.fromkeys(c[0] for c in caps_test))[:10] if captions != "digits" else \
            [f"the digit {d}" for d in range(10)]
        prompts = [p for p in firsts for _ in range(8)]
        gen = torch.Generator(device=device).manual_seed(args.seed + 5)
        codes = model.sample(encode_captions(prompts, T).to(device), generator=gen, guidance=1.0)
        return save_grid(source.decode(codes).cpu(), os.path.join(args.out, "samples.png"), nrow=8)

    def describe(n_params):
        return (f"transformer ({config['layers']} layers, dim {config['dim']}, {n_params:,} parameters) over "
                f"{source.length} {kind} codes per image ({source.num_codes} codes) + {T} caption bytes, from {path}: "
                f"{train_rows.shape[0]} captioned train images, device {device}")
    torch.manual_seed(args.seed)
    training.fit(model, train_rows, kind="transformer", config=config, ckpt=ckpt,
                 **train_cmd.fit_args(args, device), evaluate=evaluate, write_pngs=write_samples,
                 extra={"vq_kind": kind, **training.link_entries("vq_checkpoint", path, args.out),
                        training.FINGERPRINT: training.codebook_fingerprint(source.ckpt["model"]),
                        "captions": captions},
                 describe=describe)
    return 0
