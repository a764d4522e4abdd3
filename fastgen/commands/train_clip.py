"""`fastgen train clip --data digits|FOLDER --captions digits|FILE --epochs N --out DIR`: a
small CLIP-style image-text scorer (fastgen.models.ContrastiveScorer) trained on
captioned images, for re-ranking a transformer's samples
(`fastgen sample transformer --rerank K --scorer DIR/checkpoint.pt`).

Captions as `fastgen train transformer` takes them: 'digits' (three phrasings per digit,
from the labels) or a file of lines 'relative/path<TAB>caption' for an image folder. Train
the scorer on the data the transformer's VQ model was trained on (the same --data and
--size): it scores the decoded images at that size. Writes checkpoint.pt and metrics.jsonl
(test loss, in-batch retrieval accuracy; on digits also the zero-shot accuracy of
choosing among "the digit 0" ... "the digit 9").
"""
import torch

from fastgen.commands import train as train_cmd


def add_parser(families):
    p = train_cmd.family_parser(families, "clip", "a CLIP-style image-text scorer (re-ranks transformer samples)",
                                __doc__)
    train_cmd.data_arguments(p)
    p.add_argument("--captions", default="digits",
                   help="'digits' (from the labels; --data digits), or a text file of lines "
                        "'relative/path<TAB>caption' for an image folder")
    p.add_argument("--text-tokens", type=int, default=64, help="caption length in bytes")
    p.add_argument("--dim", type=int, default=64, help="the shared embedding size")
    p.add_argument("--width", type=int, default=64, help="the encoders' channels")
    p.set_defaults(func=run, batch_size=128)


def run(args):
    from fastgen import training
    from fastgen.commands.train_transformer import captions_of
    from fastgen.models import build_model
    device = train_cmd.setup(args)
    train_cmd.positive(args, "text_tokens", "dim", "width")
    ckpt = train_cmd.open_run(args, "clip")
    ds, data_args = train_cmd.load_data(args, ckpt)
    captions = ckpt["captions"] if ckpt else args.captions
    config = ckpt["config"] if ckpt else dict(image_shape=ds.image_shape, text_tokens=args.text_tokens,
                                              dim=args.dim, width=args.width)
    caps_train, caps_test = captions_of(data_args, captions, config["text_tokens"], "--data is")
    torch.manual_seed(args.seed)
    model = build_model("clip", config).to(device)

    def rows(images, caps):      # one row per (image, phrasing)
        k = len(caps[0])
        text = torch.cat([model.tokens([c[j] for c in caps]) for j in range(k)])
        return model.pack(images.repeat(k, 1, 1, 1), text)
    test = ds.test[:args.max_test] if args.max_test else ds.test
    train_rows, test_rows = rows(ds.train, caps_train), rows(test, caps_test[:test.shape[0]])
    if captions == "digits":     # the test digits' labels, for the zero-shot accuracy
        from fastgen.commands.train_transformer import digits_labels
        y_test = digits_labels(data_args)[1][:test.shape[0]].to(device)

    @torch.no_grad()
    def evaluate():
        model.eval()
        out = model(test_rows.to(device))
        row = dict(test_loss=float(out["loss"]), test_retrieval_accuracy=float(out["accuracy"]))
        if captions == "digits":     # zero-shot: the closest of the ten "the digit D" captions
            zi = model.embed_images(test.to(device))
            zt = model.embed_text(model.tokens([f"the digit {d}" for d in range(10)]).to(device))
            row["test_zero_shot_accuracy"] = float(((zi @ zt.T).argmax(1) == y_test).float().mean())
        return row

    def describe(n_params):
        return (f"clip scorer ({n_params:,} parameters, embedding {config['dim']}) on {ds.source}: "
                f"{train_rows.shape[0]} captioned train rows ({ds.train.shape[0]} images), device {device}")
    torch.manual_seed(args.seed)
    training.fit(model, train_rows, kind="clip", config=config, ckpt=ckpt, **train_cmd.fit_args(args, device),
                 evaluate=evaluate, extra={"data_args": data_args, "captions": captions}, describe=describe)
    return 0
